"""One logger tree for fastgen (``fastgen.*``), with ``set_verbosity`` and ``FASTGEN_VERBOSITY``."""

from __future__ import annotations

import logging
import os
import sys

_ROOT = "fastgen"
_configured = False


def _configure() -> None:
    global _configured
    if _configured:
        return
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(os.environ.get("FASTGEN_VERBOSITY", "WARNING").upper())
    root.propagate = False
    _configured = True


def get_logger(name: str) -> logging.Logger:
    """The logger for module ``name`` under the ``fastgen`` root (other packages pass their ``__name__``)."""
    _configure()
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


def set_verbosity(level: int | str) -> None:
    """Set the level of every fastgen logger (``"INFO"``, ``logging.DEBUG``, ...)."""
    _configure()
    logging.getLogger(_ROOT).setLevel(level.upper() if isinstance(level, str) else level)
