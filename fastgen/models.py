"""Resolve a model name for the CLI, the benchmark and the app.

* a zoo name (``shapes-mmdit``, ``shapes-unet``): the trained default models shipped with fastgen
  (:func:`fastgen.zoo.load_default`); their default call and exact evaluator come from :mod:`fastgen.zoo`;
* ``tiny-<kind>``: :func:`fastgen.testing.tiny_pipeline` (random weights, seconds per image);
* ``bench-<kind>``: the same family at bench size (speed ratios only; random weights);
* a local folder: ``DiffusionPipeline.from_pretrained(path)`` (offline, ``local_files_only``);
* anything else with a ``/`` is treated as a hub id and loaded with ``from_pretrained`` (needs network
  or a populated HF cache).
"""

from __future__ import annotations

import os

import torch

from .errors import FastgenError
from .testing import KINDS, tiny_pipeline

__all__ = ["list_models", "load_model", "default_model", "DEFAULT_MODEL", "FALLBACK_MODEL", "ModelNotFoundError"]

#: The trained default model (``fastgen/zoo``); :data:`FALLBACK_MODEL` when its weights are not installed.
DEFAULT_MODEL = "shapes-mmdit"
#: A tiny random-weight pipeline of the same family: speed ratios are real, images are noise-like.
FALLBACK_MODEL = "tiny-sd3"


class ModelNotFoundError(FastgenError, ValueError):
    """The model name is neither a known name nor a loadable folder."""


def list_models() -> list[str]:
    """Names :func:`load_model` accepts besides paths and hub ids."""
    from . import zoo

    return zoo.list() + [f"tiny-{k}" for k in KINDS] + [f"bench-{k}" for k in KINDS]


def default_model() -> str:
    """The model the CLI and the app start on: :data:`DEFAULT_MODEL` when its weights are installed, else
    :data:`FALLBACK_MODEL`."""
    from . import zoo

    if (zoo.weights_path(DEFAULT_MODEL) / "model_index.json").exists():
        return DEFAULT_MODEL
    return FALLBACK_MODEL


def load_model(name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Load a pipeline by name (see module docstring). The progress bar is disabled."""
    from . import zoo

    if name in zoo.list():
        return zoo.load_default(name, device=device, dtype=dtype)
    for prefix, size in (("tiny-", "tiny"), ("bench-", "bench")):
        if name.startswith(prefix) and name[len(prefix):] in KINDS:
            return tiny_pipeline(name[len(prefix):], size=size, device=device, dtype=dtype)
    if os.path.isdir(name) or "/" in name:
        from diffusers import DiffusionPipeline

        from fastgen.utils.io import dtype_kwarg

        local = os.path.isdir(name)
        if not local and name.startswith((".", "/")):
            raise ModelNotFoundError(f"no such model folder: {name}")
        try:
            pipe = DiffusionPipeline.from_pretrained(name, local_files_only=local,
                                                     **dtype_kwarg(dtype or torch.float32))
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(f"could not load a diffusers pipeline from {name!r}: {e}") from e
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device) if device is not None else pipe
    raise ModelNotFoundError(f"unknown model {name!r}; use a local diffusers folder, a hub id, or one of: {', '.join(list_models())}")
