"""Command-line flags as nnU-Net spells them: valued options with one dash and underscores (``-id_column``),
booleans with two dashes (``--overwrite``).

Flags that earlier versions spelled otherwise (``--id-column``, ``--bootstrap``) keep working for one version:
:meth:`Parser.add_renamed` registers both spellings for one option, and :meth:`Parser.parse_known_args` warns on
stderr when a command line uses the old one.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict

__all__ = ["Parser", "REMOVED_IN"]

REMOVED_IN = "0.4"


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with renamed flags."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.renamed: Dict[str, str] = {}

    def add_renamed(self, new: str, old: str, **kwargs):
        """The option ``new``; ``old`` sets it too, with a deprecation warning, and is left out of ``-h``."""
        if kwargs.get("required"):
            raise ValueError(f"{new}: a required option cannot keep an old spelling ({old})")
        kwargs.setdefault("dest", new.lstrip("-"))
        self.renamed[old] = new
        action = self.add_argument(new, **kwargs)
        self.add_argument(old, **{**kwargs, "help": argparse.SUPPRESS})
        return action

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        for token in argv:
            flag = token.split("=", 1)[0]
            if flag in self.renamed:
                print(f"{self.prog}: warning: {flag} is deprecated, use {self.renamed[flag]} (the old spelling is "
                      f"removed in version {REMOVED_IN})", file=sys.stderr)
        return super().parse_known_args(args, namespace)
