"""Bad input ends in one clear message and a non-zero exit, never a traceback.

Every command of the plugin is wrapped by :func:`command`. Library functions raise ``ValueError`` (or
:class:`InputError`, a ``ValueError`` meant for the user) whose message names the case, the file or the flag and the
fix; the wrapper prints it as ``<command>: error: <message>`` on stderr and exits with status 2, as argparse does for
a bad flag. An interruption (Ctrl-C, SIGTERM) exits with status 130 after the writers have removed what they had
begun (see :mod:`nnunet_dmoe.dataset_conversion.common`).

``NNUNET_DMOE_TRACEBACK=1`` re-raises instead, for debugging the plugin itself.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Callable

__all__ = ["InputError", "command", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED"]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class InputError(ValueError):
    """A problem with the user's input (a file, a flag, a table row) that the user can fix; the message says how."""


# Errors that the plugin's checks raise with a message for the user. OSError covers missing, unreadable and
# existing files; UnicodeDecodeError is a ValueError (tables are decoded with the file named, see tables.py).
_USER_ERRORS = (ValueError, OSError, RuntimeError)


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _default_sigterm_in_forked_child() -> None:
    """A process forked by a command (nnU-Net's fork pools, e.g. the one that lists imagesTr) gets the default
    SIGTERM back. ``Pool.terminate`` then ends every worker, also one blocked inside C code, where a Python handler
    never runs (a lock that another thread of the parent held at fork time): with the handler inherited, such a worker
    outlives SIGTERM, and the pool's join waits for it forever."""
    if signal.getsignal(signal.SIGTERM) is _sigterm_to_interrupt:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_forked_child)


def command(name: str) -> Callable:
    """Decorator for a console-script entry point: bad input -> ``name: error: message`` and exit status 2;
    Ctrl-C or SIGTERM -> ``name: interrupted`` and exit status 130 (after every ``finally`` has run)."""

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def run(*args, **kwargs):
            if os.environ.get("NNUNET_DMOE_TRACEBACK") == "1":
                return func(*args, **kwargs)
            previous = previous_int = None
            try:  # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C, so that temporary folders are removed
                previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
                # Ctrl-C too where the shell started the command with SIGINT ignored (`cmd &` in a script)
                previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
            except ValueError:  # not the main thread
                pass
            try:
                return func(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"{name}: interrupted", file=sys.stderr)
                sys.exit(EXIT_INTERRUPTED)
            except _USER_ERRORS as e:
                message = str(e) or type(e).__name__
                print(f"{name}: error: {message}", file=sys.stderr)
                sys.exit(EXIT_BAD_INPUT)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
                if previous_int is not None:
                    signal.signal(signal.SIGINT, previous_int)

        return run

    return decorate
