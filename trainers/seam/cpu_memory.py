"""CPU training: glibc keeps freed memory for reuse instead of handing it back to the kernel after every step.

On CPU, PyTorch allocates tensors with ``malloc``. glibc serves large blocks (32 MiB and more always; smaller ones
until its adaptive threshold has grown) with a fresh ``mmap`` and unmaps them when they are freed. A training step
frees and re-allocates the same large activations and gradients every iteration, so every iteration maps them anew
and the kernel zero-fills each page on first touch. On small machines that costs a good part of a step: one dMoE
train step in the demo's 2D configuration made about 23 000 page faults and 50 ms of kernel time, much of it for
the expert gradients of the 512-wide block (two tensors of 33.5 MiB).

:func:`keep_freed_memory` tells glibc (``mallopt``) to take every block from its heap (``M_MMAP_MAX`` = 0) and to
give freed memory back only when more than 2 GiB are free at the heap's top (``M_TRIM_THRESHOLD``): after the first
step the same memory is reused. The process keeps its peak size (as PyTorch's CUDA caching allocator does on the
GPU). This is what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` in the environment would do, applied from
inside the process so that users need not know. The trainers call it at the start of CPU training; it changes
nothing on GPU, off glibc (macOS, musl), when ``$NNUNET_DMOE_KEEP_FREED_MEMORY=0``, or when the environment sets
these parameters itself (``MALLOC_MMAP_MAX_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_TOP_PAD_`` or their ``glibc.malloc`` tunables: yours win).
"""
import ctypes
import os
import platform
import sys

__all__ = ["ENV", "keep_freed_memory"]

ENV = "NNUNET_DMOE_KEEP_FREED_MEMORY"
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int: about 2 GiB
# the user's own settings of the same glibc parameters (environment variables and their tunables)
_USER_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_USER_TUNABLES = ("glibc.malloc.mmap_max", "glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold",
                  "glibc.malloc.top_pad")
_state = None


def _reason_to_skip():
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"off (${ENV}={os.environ[ENV]})"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc: left as it is"
    users = [v for v in _USER_VARIABLES if v in os.environ]
    if any(t in os.environ.get("GLIBC_TUNABLES", "") for t in _USER_TUNABLES):
        users.append("GLIBC_TUNABLES")
    if users:
        return f"left to your settings ({', '.join(users)})"
    return None


def keep_freed_memory() -> str:
    """Apply the setting once per process (see the module's docstring); returns a line for the training log."""
    global _state
    if _state is None:
        _state = _reason_to_skip()
        if _state is None:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
            _state = ("glibc keeps freed memory for reuse (mmap off, trim above 2 GiB; "
                      f"${ENV}=0 turns this off)") if ok else "glibc's mallopt refused the setting: left as it is"
    return f"CPU memory: {_state}"
