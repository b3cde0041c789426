"""The one-call API: ``accelerate``, ``remove``, ``summary``."""

from __future__ import annotations

from typing import Any

from .adapters import get_adapter
from .errors import IncompatibleTechniquesError, RecipeError, UnsupportedPipelineError
from .hooks import get_state
from .registry import Technique, parse_recipe, recipe_string, technique_for_config
from .utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["accelerate", "remove", "summary"]


def _configs(items: tuple[Any, ...]) -> list[Any]:
    configs: list[Any] = []
    for item in items:
        if isinstance(item, str):
            configs.extend(parse_recipe(item))
        elif isinstance(item, (list, tuple)):
            configs.extend(_configs(tuple(item)))
        else:
            technique_for_config(item)  # raises for a non-config
            configs.append(item)
    return configs


def accelerate(pipe, *configs_or_recipes: Any):
    """Apply techniques to ``pipe`` in order and return the same pipeline object.

    Args:
        pipe: a diffusers pipeline of a supported family (see ``fastgen.adapters.supported_pipelines()``).
        configs_or_recipes: technique configs (``fastgen.samplers.SamplerConfig(...)``, ...) and/or recipe
            strings (``"sampler:dpm++2m@8"``, ``"ras:0.5+tome:0.5"``).

    Applying a technique that is already applied replaces its config (calling twice is safe).
    Everything is validated before anything is patched; if applying fails half-way, what this call
    applied is removed again, so the pipeline is never left half-patched.

    Raises:
        RecipeError: bad recipe or config. UnsupportedPipelineError: unsupported pipeline or a technique
        that does not support this family. IncompatibleTechniquesError: techniques that cannot stack.
    """
    configs = _configs(configs_or_recipes)
    adapter = get_adapter(pipe)
    plan: list[tuple[Technique, Any]] = []
    names = set()
    for cfg in configs:
        tech = technique_for_config(cfg)
        if tech.name in names:
            raise RecipeError(f"technique {tech.name!r} was given twice in one accelerate() call")
        names.add(tech.name)
        if tech.check is not None:  # first: its message can say what to use instead
            tech.check(pipe, adapter, cfg)
        if tech.families is not None and adapter.family not in tech.families:
            raise UnsupportedPipelineError(
                f"{tech.name} does not support {type(pipe).__name__} (family {adapter.family!r}); "
                f"it supports: {', '.join(tech.families)}"
            )
        plan.append((tech, cfg))
    plan.sort(key=lambda tc: tc[0].order)  # stable: e.g. gd (which swaps the denoiser) goes first
    st = get_state(pipe)
    before = dict(st.applied) if st is not None else {}
    _check_compatible([t.name for t, _ in plan], [n for n in before if n not in names])
    done: list[Technique] = []
    try:
        for tech, cfg in plan:
            tech.apply(pipe, cfg)
            done.append(tech)
    except BaseException:
        for tech in reversed(done):
            tech.remove(pipe)
            if tech.name in before:  # put back what was there before this call
                tech.apply(pipe, before[tech.name])
        raise
    logger.info("accelerate %s: %s", type(pipe).__name__, recipe_string(configs))
    return pipe


def _check_compatible(new: list[str], applied: list[str]) -> None:
    """Raise IncompatibleTechniquesError for a declared incompatible pair among ``new`` + ``applied``."""
    from .registry import get_technique

    everything = list(new) + list(applied)
    for i, a in enumerate(new):
        for b in everything:
            if b == a or (b in new and new.index(b) < i):
                continue
            ta, tb = get_technique(a), get_technique(b)
            ia, ib = ta.incompatible or {}, tb.incompatible or {}
            reason = (ia.get(b) or ib.get(a) or (None if b in ta.stacks_with else ia.get("*"))
                      or (None if a in tb.stacks_with else ib.get("*")))
            if reason:
                where = "already applied" if b in applied else "in the same recipe"
                raise IncompatibleTechniquesError(f"{a} and {b} ({where}) cannot stack: {reason}")


def remove(pipe, *names: str):
    """Remove fastgen techniques from ``pipe`` (all of them, or only ``names``), restoring it bit-exactly.

    Techniques are removed in the reverse order of application. Returns ``pipe``; a no-op on an
    unpatched pipeline.
    """
    st = get_state(pipe)
    if st is None:
        return pipe
    applied = list(st.applied)
    unknown = [n for n in names if n not in applied]
    if unknown:
        raise RecipeError(f"cannot remove {unknown}: applied techniques are {applied or 'none'}")
    for name in reversed(applied):
        if names and name not in names:
            continue
        from .registry import get_technique

        get_technique(name).remove(pipe)
    return pipe


def summary(pipe) -> dict:
    """What fastgen did to ``pipe``, and what its last call did.

    Returns a dict with ``pipeline``, ``family``, ``recipe`` (the applied techniques as a recipe string),
    ``techniques`` (name -> config fields) and ``last_call`` (steps run, denoiser calls, latency, and each
    technique's own per-call record such as tokens merged or blocks reused), or ``None`` for
    ``last_call`` before the first patched call. Works on unpatched pipelines too (recipe ``baseline``).
    """
    import dataclasses

    st = get_state(pipe)
    base = {"pipeline": type(pipe).__name__}
    try:
        base["family"] = get_adapter(pipe).family
    except UnsupportedPipelineError:
        base["family"] = None
    if st is None:
        return {**base, "recipe": "baseline", "techniques": {}, "last_call": None}
    techniques = {}
    for name, cfg in st.applied.items():
        techniques[name] = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else repr(cfg)
    last = dict(st.last_call) if st.last_call is not None else None
    if last is not None:
        from .registry import get_technique

        for name in st.applied:
            tech = get_technique(name)
            if tech.summary is not None:
                last[name] = tech.summary(pipe)
    return {**base, "recipe": recipe_string(list(st.applied.values())), "techniques": techniques, "last_call": last}
