"""Exceptions fastgen raises. Each message says what is wrong and what to do instead."""

from __future__ import annotations

import importlib

__all__ = [
    "FastgenError", "RecipeError", "UnsupportedPipelineError", "IncompatibleTechniquesError",
    "MissingExtraError", "require_extra", "MissingFileError"]


class FastgenError(Exception):
    """Base class of fastgen's own errors (the CLI prints these as one line, no traceback)."""


class RecipeError(FastgenError, ValueError):
    """A recipe string or config is malformed or names an unknown technique."""


class UnsupportedPipelineError(FastgenError, ValueError):
    """The pipeline or its denoiser class is not supported by fastgen or by one technique."""


class IncompatibleTechniquesError(FastgenError, ValueError):
    """Two requested techniques cannot be stacked."""


class MissingFileError(FastgenError, FileNotFoundError):
    """A file a technique or model needs does not exist; the message names it and what exists instead."""


class MissingExtraError(FastgenError, ImportError):
    """An optional dependency is missing; the message names the pip extra that installs it."""


def require_extra(module: str, extra: str, feature: str | None = None):
    """Import and return ``module``, or raise :class:`MissingExtraError` naming ``pip install 'fastgen[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = feature or module
        raise MissingExtraError(
            f"{what} needs the optional dependency {module!r}, which is not installed: "
            f"pip install 'fastgen[{extra}]'"
        ) from e
