"""Prompt sets for work that needs prompts but was given none: calibration, tuning, benchmarking.

One rule for the whole library: a pipeline loaded from fastgen's zoo gets prompts of its own world (the
shapes grammar it was trained on, seeded so they are reproducible and never the held-out evaluation prompts);
a class-conditional pipeline (DiT) gets class labels; any other pipeline gets :data:`GENERIC_PROMPTS`, a
small, varied text-to-image set. A user who knows their prompt distribution passes it instead, as a list or
as a file of one prompt per line (:func:`read_prompts`); that is always better than any default.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Sequence

from .errors import FastgenError

__all__ = ["GENERIC_PROMPTS", "default_prompts", "read_prompts", "resolve_prompts", "is_class_conditional",
           "check_calibration_prompts"]

#: Generic text-to-image prompts (people, animals, objects, scenes, styles, text-free): the default calibration and
#: quality set for a user's pipeline. Not the zoo's shapes world.
GENERIC_PROMPTS: tuple[str, ...] = (
    "a photo of a cat sitting on a sofa",
    "an astronaut riding a horse on the moon",
    "a mountain lake at sunrise, mist over the water",
    "a bowl of fresh fruit on a wooden kitchen table",
    "portrait of an old fisherman, dramatic lighting",
    "a red sports car parked on a city street at night",
    "a watercolor painting of a lighthouse by the sea",
    "a cozy library with tall bookshelves and a fireplace",
    "a golden retriever puppy playing in the snow",
    "a plate of sushi, top-down food photography",
    "a futuristic city skyline with flying cars, digital art",
    "a field of sunflowers under a blue sky",
    "a wooden cabin in a pine forest, autumn",
    "a close-up of a hummingbird drinking from a flower",
    "an oil painting of a sailing ship in a storm",
    "a modern living room with large windows, interior design",
)


def is_class_conditional(pipe) -> bool:
    """True when ``pipe`` is called with ``class_labels`` (DiT-style) instead of a text prompt."""
    return "class_labels" in inspect.signature(type(pipe).__call__).parameters


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file: one per line; blank lines and lines starting with ``#`` are skipped."""
    p = Path(path)
    if not p.is_file():
        raise FastgenError(f"prompt file {str(p)!r} does not exist; pass a text file with one prompt per line")
    prompts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if not prompts:
        raise FastgenError(f"prompt file {str(p)!r} holds no prompts; write one prompt per line")
    return prompts


def default_prompts(pipe, n: int, seed: int | None = None) -> list:
    """``n`` prompts for ``pipe`` when the user gave none (see the module docstring).

    Args:
        pipe: the pipeline the prompts are for.
        n: how many (cycled when the set is smaller).
        seed: zoo models only: the shapes-grammar stream to draw from (default
            ``fastgen.zoo.shapes.CALIBRATION_SEED``; never the evaluation seed).

    Returns:
        strings, or class indices for a class-conditional pipeline.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if is_class_conditional(pipe):
        k = len(getattr(pipe, "labels", None) or {}) or 8
        return [i % min(8, k) for i in range(n)]
    from . import zoo

    if zoo.name_of(pipe) is not None:
        from .zoo import shapes

        return shapes.sample_prompts(n, shapes.CALIBRATION_SEED if seed is None else seed)
    return [GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)] for i in range(n)]


def resolve_prompts(pipe, prompts: str | os.PathLike | Sequence[str] | None, n: int,
                    seed: int | None = None) -> list:
    """The user's ``prompts`` (a sequence, or a path to a prompt file), else :func:`default_prompts`."""
    if prompts is None:
        return default_prompts(pipe, n, seed)
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts)
    out = list(prompts)
    if not out:
        raise FastgenError("the prompt list is empty; pass at least one prompt (or None for the default set)")
    return out


def check_calibration_prompts(value):
    """Validate a config's ``calibration_prompts`` field: None, a prompt-file path, or a sequence of prompts
    (strings; class indices for DiT). Returns it normalised (a sequence becomes a tuple); ``ValueError`` otherwise."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("calibration_prompts must be None, a prompt-file path or a tuple of prompts, got ''")
        return value
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"calibration_prompts must be None, a prompt-file path or a tuple of prompts, got "
                         f"{value!r}") from None
    if not out or not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in out):
        raise ValueError(f"calibration_prompts must hold at least one prompt (strings, or class indices for DiT), "
                         f"got {value!r}")
    return out
