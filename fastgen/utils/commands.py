"""The argument parser every ``fastgen`` command and subcommand uses.

:class:`CommandParser` is an :class:`argparse.ArgumentParser` whose ``--help`` keeps the description's line
breaks and ends with an ``Example:`` block, and whose argument errors are one line on stderr with exit
status 2 (no usage dump), e.g. ``fastgen train zoo: error: the following arguments are required: --out
(see `fastgen train zoo --help`)``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any

__all__ = ["CommandParser"]


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with an ``example`` epilog and one-line argument errors (exit status 2).

    Args:
        example: command line(s) shown under ``Example:`` at the end of ``--help`` (several: one per line).
        args, kwargs: as for :class:`argparse.ArgumentParser`; ``formatter_class`` defaults to
            :class:`argparse.RawDescriptionHelpFormatter`, an ``epilog`` is printed after the example.

    Sub-parsers made with ``add_subparsers().add_parser(...)`` are ``CommandParser`` too and take ``example``.
    """

    def __init__(self, *args: Any, example: str | None = None, **kwargs: Any) -> None:
        epilog = kwargs.pop("epilog", None)
        if example:
            block = "Example:\n" + textwrap.indent(textwrap.dedent(example).strip("\n"), "  ")
            epilog = block + ("\n\n" + epilog if epilog else "")
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, epilog=epilog, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``PROG: error: MESSAGE (see `PROG --help`)`` on one line and exit with status 2."""
        message = " ".join(message.split())
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)
