"""Small helpers shared by the quant modules: finding the denoiser, the layers quant can wrap, and its timestep.

Everything here depends only on torch and the core (:mod:`fastgen.adapters`), so any quant module
(:mod:`quant.qalora`'s parts, :mod:`quant.calibration`, :mod:`quant.deploy`, :mod:`quant.export`, ...) can
import it without importing another.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from fastgen.errors import UnsupportedPipelineError

__all__ = ["TIMESTEP_NAMES", "get_denoiser", "layer_kind", "parent_module", "timestep_param", "timestep_values"]

#: Names a denoiser's ``forward`` gives its timestep argument (diffusers: ``timestep``; a few: ``timesteps``, ``t``).
TIMESTEP_NAMES: tuple[str, ...] = ("timestep", "timesteps", "t")


def get_denoiser(pipe_or_model) -> nn.Module:
    """The denoiser of a pipeline (its ``transformer`` or ``unet``), or the module itself."""
    if isinstance(pipe_or_model, nn.Module):
        return pipe_or_model
    try:
        from fastgen.adapters import get_adapter

        return get_adapter(pipe_or_model).denoiser(pipe_or_model)
    except UnsupportedPipelineError:
        for attr in ("transformer", "unet"):
            m = getattr(pipe_or_model, attr, None)
            if isinstance(m, nn.Module):
                return m
        raise


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"`` for an ``nn.Linear``, ``"conv2d"`` for an ``nn.Conv2d`` (subclasses such as diffusers'
    ``LoRACompatibleLinear``/``LoRACompatibleConv`` included), None for anything quant does not wrap."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def parent_module(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(parent, attribute)`` of the submodule ``name`` of ``model`` (``"a.b.c"`` -> ``(model.a.b, "c")``), so
    that ``setattr(parent, attribute, new)`` replaces it."""
    if "." in name:
        head, attr = name.rsplit(".", 1)
        return model.get_submodule(head), attr
    return model, name


def timestep_values(t) -> list[float]:
    """A denoiser call's timestep argument as floats (a tensor of any shape, a list, a number; None -> ``[]``)."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [float(v) for v in t.detach().flatten().tolist()] if t.numel() else []
    if isinstance(t, (list, tuple)):
        return [float(v) for v in t]
    return [float(t)]


def timestep_param(model: nn.Module) -> tuple[int | None, str | None]:
    """Where ``model.forward`` takes its timestep: ``(position, name)``; position is None when the argument is
    keyword-only, and ``(None, None)`` when ``forward`` has no argument named as in :data:`TIMESTEP_NAMES`."""
    params = list(inspect.signature(type(model).forward).parameters.values())[1:]  # drop self
    for i, p in enumerate(params):
        if p.name in TIMESTEP_NAMES:
            return (i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else None), p.name
    return None, None
