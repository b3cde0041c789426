"""The one-call API (``accelerate``, ``remove``, ``summary``) and the technique life cycle behind it.

The core owns every technique's life cycle; a technique only supplies ``install``/``uninstall`` (see
:class:`fastgen.registry.Technique`). Here, once for all of them:

1. **validate** everything before anything is patched: config type, the technique's own ``check``, family
   support, the same technique twice, and the stacking rules against what is already applied;
2. **install** in order (``Technique.order``, stable), recording the config and the handle ``install``
   returned in the pipeline's state (``pipe._fastgen``) and its per-call hook; a technique that replaces the
   denoiser gets the others lifted off and put back onto the new one;
3. **roll back** what the call installed if any install raises (putting back a replaced config), so the
   pipeline is never left half-patched;
4. **summary** and **remove** (reverse order; bit-exact; the call wrapper and step counter leave with the
   last technique).

``apply_technique``/``remove_technique`` are what every public ``apply_x``/``remove_x`` is made of.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from .adapters import get_adapter
from .errors import FastgenError, IncompatibleTechniquesError, MissingFileError, RecipeError, UnsupportedPipelineError
from .hooks import PipelineState, attach, detach_if_empty, get_state, retarget_step_counter
from .registry import Technique, get_technique, parse_recipe, recipe_string, technique_for_config
from .utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["accelerate", "remove", "summary", "apply_technique", "remove_technique", "applied", "handle_of"]


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


def _family_error(pipe, adapter, tech: Technique) -> UnsupportedPipelineError:
    hint = tech.family_hint
    if isinstance(hint, dict):
        hint = hint.get(adapter.family, hint.get("*", ""))
    try:
        what = f"{type(adapter.denoiser(pipe)).__name__}, family {adapter.family!r}"
    except Exception:  # noqa: BLE001 - the message must not fail
        what = f"family {adapter.family!r}"
    return UnsupportedPipelineError(f"{tech.name} does not support {type(pipe).__name__} ({what}); it supports: "
                                    f"{', '.join(tech.families)}" + (f". {hint}" if hint else ""))


def _plan(pipe, configs: list[Any]) -> list[tuple[Technique, Any]]:
    """Validate ``configs`` against ``pipe`` (nothing is patched) and return them in install order.

    In this order, once: the same technique twice, family support, the stacking rules (against what is
    applied and within the call), then each technique's own ``check``."""
    adapter = get_adapter(pipe)
    plan: list[tuple[Technique, Any]] = []
    names = set()
    for cfg in configs:
        tech = technique_for_config(cfg)
        if tech.name in names:
            raise RecipeError(f"technique {tech.name!r} was given twice in one accelerate() call")
        names.add(tech.name)
        if tech.families is not None and adapter.family not in tech.families:
            raise _family_error(pipe, adapter, tech)
        plan.append((tech, cfg))
    plan.sort(key=lambda tc: tc[0].order)  # stable: e.g. gd (which swaps the denoiser) goes first
    st = get_state(pipe)
    already = [n for n in (st.applied if st is not None else {}) if n not in names]
    _check_compatible([t.name for t, _ in plan], already)
    for tech, cfg in plan:
        if tech.check is not None:
            with refusal(tech):
                tech.check(pipe, adapter, cfg)
    return plan


@contextlib.contextmanager
def refusal(tech: Technique):
    """A technique's refusal (``check``/``install`` raising ``ValueError`` or ``FileNotFoundError``) reaches the
    user as a :class:`FastgenError` (``RecipeError`` / ``MissingFileError``, still a ``ValueError`` /
    ``FileNotFoundError``), so ``except fastgen.FastgenError`` catches every refusal and the CLI prints one line."""
    try:
        yield
    except FastgenError:
        raise
    except FileNotFoundError as e:
        raise MissingFileError(f"{tech.name}: {e}") from e
    except ValueError as e:
        raise RecipeError(f"{tech.name}: {e}") from e


def accelerate(pipe, *configs_or_recipes: Any):
    """Apply techniques to ``pipe`` in order and return the same pipeline object.

    Args:
        pipe: a diffusers pipeline of a supported family (see ``fastgen.adapters.supported_pipelines()``).
        configs_or_recipes: technique configs (``fastgen.SamplerConfig(...)``, ``fastgen.ToMeConfig(...)``,
            ...) and/or recipe strings (``"sampler:dpm++2m@8"``, ``"ras:0.5+tome:0.5"``).

    Applying a technique that is already applied replaces its config (the same config again is a no-op,
    so calling twice is safe). Everything is validated before anything is patched; if applying fails
    half-way, what this call applied is removed again (and a replaced config put back), so the pipeline is
    never left half-patched.

    Raises:
        RecipeError: bad recipe or config. UnsupportedPipelineError: unsupported pipeline or a technique
        that does not support this family. IncompatibleTechniquesError: techniques that cannot stack.
    """
    configs = _configs(configs_or_recipes)
    plan = _plan(pipe, configs)
    st = get_state(pipe)
    before = dict(st.applied) if st is not None else {}
    done: list[tuple[Technique, Any]] = []  # (technique, the config it replaced or None)
    try:
        for tech, cfg in plan:
            prev = before.get(tech.name)
            if prev is not None and _same(prev, cfg):
                continue
            if prev is not None:
                _uninstall(pipe, tech)
            done.append((tech, prev))
            _install(pipe, tech, cfg)
    except BaseException:
        for tech, prev in reversed(done):
            if tech.name in applied(pipe):
                _uninstall(pipe, tech)
            if prev is not None:
                _install(pipe, tech, prev)
        raise
    logger.info("accelerate %s: %s", type(pipe).__name__, recipe_string(configs))
    return pipe


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # a config holding tensors or arrays: compare by identity
        return a is b


def _lift_others(pipe, name: str) -> list[Any]:
    """Uninstall every applied technique but ``name`` (reverse order); their configs in application order."""
    st = get_state(pipe)
    others = [(n, c) for n, c in (st.applied if st is not None else {}).items() if n != name]
    for n, _ in reversed(others):
        _uninstall(pipe, get_technique(n))
    return [c for _, c in others]


def _put_back(pipe, configs: list[Any]) -> None:
    for cfg in configs:
        _install(pipe, technique_for_config(cfg), cfg)


def _record(st: PipelineState, tech: Technique, cfg: Any, handle: Any) -> None:
    """Note ``tech`` as applied with ``cfg`` (in order), keep its ``handle`` and register its ``on_call``."""
    st.applied[tech.name] = cfg
    st.saved[tech.name] = handle
    if tech.on_call is not None:
        on_call = tech.on_call
        st.call_hooks[tech.name] = lambda p, kwargs: on_call(p, handle, kwargs)


def _forget(st: PipelineState, name: str) -> None:
    """Drop every record :func:`_record` made for ``name``."""
    del st.applied[name]
    st.saved.pop(name, None)
    st.call_hooks.pop(name, None)


def _install(pipe, tech: Technique, cfg: Any) -> None:
    lifted = _lift_others(pipe, tech.name) if tech.replaces_denoiser else []
    try:
        st = attach(pipe)
        st.busy += 1
        try:
            with refusal(tech):
                handle = tech.install(pipe, st, cfg)
        except BaseException:
            detach_if_empty(pipe)
            raise
        finally:
            st.busy -= 1
        _record(st, tech, cfg, handle)
        if tech.replaces_denoiser:
            retarget_step_counter(pipe)
    finally:
        _put_back(pipe, lifted)


def _uninstall(pipe, tech: Technique) -> None:
    lifted = _lift_others(pipe, tech.name) if tech.replaces_denoiser else []
    try:
        st: PipelineState = get_state(pipe)
        st.busy += 1
        try:
            tech.uninstall(pipe, st, st.saved[tech.name])
        finally:
            st.busy -= 1
        _forget(st, tech.name)
        if st.applied and tech.replaces_denoiser:
            retarget_step_counter(pipe)
        detach_if_empty(pipe)
    finally:
        _put_back(pipe, lifted)


def apply_technique(pipe, name: str, config: Any = None):
    """Apply technique ``name`` with ``config`` (its default config when None); what every public
    ``apply_x(pipe, config)`` is. Same rules as :func:`accelerate`. Returns ``pipe``."""
    tech = get_technique(name)
    if config is None:
        config = tech.config_cls()
    if not isinstance(config, tech.config_cls):
        raise TypeError(f"{name} expects a {tech.config_cls.__name__}, got {type(config).__name__}; "
                        f"build one (fastgen.{tech.config_cls.__name__}(...)) or pass a recipe string to "
                        f"fastgen.accelerate, e.g. {tech.example or name!r}")
    return accelerate(pipe, config)


def remove_technique(pipe, name: str):
    """Remove technique ``name`` from ``pipe`` if applied (a no-op otherwise); what every public
    ``remove_x(pipe)`` is. Returns ``pipe``."""
    if name in applied(pipe):
        _uninstall(pipe, get_technique(name))
    return pipe


def adopt(pipe, name: str, config: Any, handle: Any = None) -> bool:
    """Record technique ``name`` as applied with ``config`` when one of its building blocks patched ``pipe``
    directly (``fastgen.quant.apply_qalora(pipe)``, ``quant.to_int8(pipe)``), so :func:`summary` reports it and
    :func:`remove` undoes it like any other technique.

    A no-op while the core runs a technique's install or uninstall (that technique owns what its building blocks
    do), and for a pipeline fastgen does not support (the building block still works; there is just no record).
    ``handle`` is what the technique's ``uninstall`` will be given. Returns True when a record was made or
    updated.
    """
    st = get_state(pipe)
    if st is not None and st.busy:
        return False
    tech = get_technique(name)
    try:
        st = attach(pipe)
    except UnsupportedPipelineError:
        logger.debug("%s applied to an unsupported %s: not recorded", name, type(pipe).__name__)
        return False
    _record(st, tech, config, handle)
    return True


def release(pipe, name: str) -> None:
    """Drop the record :func:`adopt` made when the building block's own undo (``quant.remove_qalora(pipe)``) runs
    outside the core; a no-op inside the core's uninstall and when nothing is recorded."""
    st = get_state(pipe)
    if st is None or st.busy or name not in st.applied:
        return
    _forget(st, name)
    detach_if_empty(pipe)


def applied(pipe) -> dict[str, Any]:
    """``{technique name: config}`` of what is applied to ``pipe``, in application order (a copy)."""
    st = get_state(pipe)
    return dict(st.applied) if st is not None else {}


def handle_of(pipe, name: str) -> Any:
    """What technique ``name``'s ``install`` returned on ``pipe`` (None when it is not applied). For a
    technique's own helpers and research scripts that inspect its runtime state."""
    st = get_state(pipe)
    return st.saved.get(name) if st is not None and name in st.applied else None


def _check_compatible(new: list[str], already: list[str]) -> None:
    """Raise IncompatibleTechniquesError for a declared incompatible pair among ``new`` + ``already``."""
    everything = list(new) + list(already)
    for i, a in enumerate(new):
        for b in everything:
            if b == a or (b in new and new.index(b) < i):
                continue
            ta, tb = get_technique(a), get_technique(b)
            ia, ib = ta.incompatible or {}, tb.incompatible or {}
            reason = (ia.get(b) or ib.get(a) or (None if b in ta.stacks_with else ia.get("*"))
                      or (None if a in tb.stacks_with else ib.get("*")))
            if reason:
                where = "already applied" if b in already else "in the same recipe"
                raise IncompatibleTechniquesError(f"{a} and {b} ({where}) cannot stack: {reason}")


def remove(pipe, *names: str):
    """Remove fastgen techniques from ``pipe`` (all of them, or only ``names``), restoring it bit-exactly.

    Techniques are removed in the reverse order of application. Returns ``pipe``; a no-op on an
    unpatched pipeline.
    """
    current = list(applied(pipe))
    unknown = [n for n in names if n not in current]
    if unknown:
        raise RecipeError(f"cannot remove {unknown}: applied techniques are {current or 'none'}")
    for name in reversed(current):
        if (not names or name in names) and name in applied(pipe):
            _uninstall(pipe, get_technique(name))
    return pipe


def summary(pipe) -> dict:
    """What fastgen did to ``pipe``, and what its last call did.

    Returns a dict with ``pipeline``, ``family``, ``recipe`` (the applied techniques as a recipe string),
    ``techniques`` (name -> config fields) and ``last_call`` (steps run, denoiser calls, latency, and each
    technique's own per-call record such as tokens merged or blocks reused), or ``None`` for
    ``last_call`` before the first patched call. Works on unpatched pipelines too (recipe ``baseline``).
    """
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
        for name in st.applied:
            tech = get_technique(name)
            if tech.summary is not None:
                last[name] = tech.summary(pipe, st.saved.get(name))
    return {**base, "recipe": recipe_string(list(st.applied.values())), "techniques": techniques, "last_call": last}
