"""The technique registry and recipe strings.

Every capability plugs in with :func:`register_technique`: a name (the recipe prefix), its config
dataclass, a parser for the text after the colon, and its ``install``/``uninstall`` pair. The core
(:mod:`fastgen.api`) owns the rest of the life cycle: it validates, records what is applied, orders it,
rolls back a failed apply, removes and reports.

Techniques are discovered through package entry points: every entry of the ``fastgen.techniques`` group
(``[project.entry-points."fastgen.techniques"]`` in a ``pyproject.toml``) names a module that registers its
techniques when imported, or a :class:`Technique` object. They are loaded the first time the registry is
read, so ``fastgen.parse_recipe("sampler:dpm++2m@8")`` works without importing ``fastgen.samplers`` by hand,
and a third-party package adds a technique without editing fastgen.

Recipe grammar: ``name[:args]`` joined by ``+`` (``"ras:0.5+tome:0.5"``); ``"baseline"``/``"none"``/``""``
is the empty recipe.
"""

from __future__ import annotations

import re
from importlib import metadata
from dataclasses import dataclass
from typing import Any, Callable

from .errors import RecipeError
from .utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["Technique", "register_technique", "get_technique", "list_techniques", "parse_recipe",
           "technique_for_config", "recipe_string", "ENTRY_POINT_GROUP", "technique_entry_points"]

#: The package entry-point group techniques are discovered through.
ENTRY_POINT_GROUP = "fastgen.techniques"

_BASELINE = {"", "baseline", "none"}
# '+' joins techniques only where a technique name follows ("dpm++2m" keeps its pluses)
_SPLIT = re.compile(r"\+(?=\s*[A-Za-z_][\w\-]*\s*(?::|\+|$))")


@dataclass(frozen=True)
class Technique:
    """A registered acceleration technique: what it is called, its config, and how to patch and unpatch it.

    The technique itself only patches; :func:`fastgen.accelerate` / :func:`fastgen.api.apply_technique` do
    the rest once, for every technique: type and family checks, ``check``, stacking rules, ordering,
    recording the config and the handle on the pipeline, the per-call hook, rollback when ``install``
    raises, ``summary`` and removal (reverse order, bit-exact).

    Attributes:
        name: recipe prefix (``"sampler"``, ``"tome"``, ...).
        config_cls: its config dataclass.
        parse: turns the text after ``name:`` (or None) into a config; raises ``RecipeError``/``ValueError``.
        to_string: config -> recipe string (inverse of ``parse``), for reports.
        install: ``install(pipe, state, config) -> handle`` patches ``pipe`` (``state`` is its
            :class:`fastgen.hooks.PipelineState`; ``state.adapter`` knows the family) and returns whatever
            ``uninstall`` needs. Only called on a pipeline where the technique is not installed.
        uninstall: ``uninstall(pipe, state, handle)`` undoes ``install`` bit-exactly.
        on_call: optional ``on_call(pipe, handle, kwargs) -> kwargs``, run at the start of every pipeline
            call (reset per-call state, change the call's arguments such as ``num_inference_steps``).
        summary: optional ``summary(pipe, handle) -> dict`` of what it did on the last call.
        check: optional ``check(pipe, adapter, config)`` that raises before anything is patched.
        families: adapter families it supports (None: all).
        help: one line for ``fastgen info`` and error messages.
        example: an example recipe string.
        incompatible: ``{other technique name: reason}`` pairs that cannot stack (checked both ways, against
            what is applied and within one ``accelerate`` call, before anything is patched); the name
            ``"*"`` stands for every other technique (one that must run alone) except those in ``stacks_with``.
        stacks_with: with ``incompatible={"*": reason}``, the techniques that may still stack with it.
        order: where it goes within one ``accelerate`` call (lower first; stable otherwise). Techniques
            that replace a component (``gd``) use a negative order so the others patch the new one.
        family_hint: appended to the error for an unsupported family (what to use there instead); a dict
            gives one per family (``"*"``: the others).
        replaces_denoiser: ``install`` swaps the pipeline's denoiser module for another one. The core then
            takes every other applied technique off first and puts it back afterwards (so they patch the
            new denoiser), on install and on uninstall alike.
    """

    name: str
    config_cls: type
    parse: Callable[[str | None], Any]
    to_string: Callable[[Any], str]
    install: Callable[[Any, Any, Any], Any]
    uninstall: Callable[[Any, Any, Any], None]
    on_call: Callable[[Any, Any, dict], dict] | None = None
    summary: Callable[[Any, Any], dict] | None = None
    check: Callable[..., None] | None = None
    families: tuple[str, ...] | None = None
    help: str = ""
    example: str = ""
    incompatible: dict[str, str] | None = None
    order: int = 0
    stacks_with: tuple[str, ...] = ()
    family_hint: str | dict[str, str] = ""
    replaces_denoiser: bool = False


_REGISTRY: dict[str, Technique] = {}
_loaded = False


def register_technique(technique: Technique) -> Technique:
    """Add ``technique`` to the registry (re-registering the same name replaces it). Returns it."""
    if not isinstance(technique, Technique):
        raise TypeError(f"register_technique expects a fastgen.Technique, got {type(technique).__name__}")
    if not (callable(technique.install) and callable(technique.uninstall)):
        raise TypeError(f"technique {technique.name!r} needs callable install and uninstall functions")
    _REGISTRY[technique.name] = technique
    return technique


def technique_entry_points() -> list[metadata.EntryPoint]:
    """The installed entry points of the ``fastgen.techniques`` group (fastgen's own and third parties')."""
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    eps = technique_entry_points()
    if not eps:
        logger.warning("no %r entry points found: fastgen's techniques are registered through its package "
                       "metadata; install it (pip install -e .) instead of running it from a bare source tree",
                       ENTRY_POINT_GROUP)
    for ep in eps:
        try:
            obj = ep.load()
        except ImportError as e:  # a plugin with a missing optional dependency must not break the core
            logger.debug("technique plugin %s (%s) not loaded: %s", ep.name, ep.value, e)
            continue
        except Exception as e:  # a broken third-party plugin neither
            logger.warning("technique plugin %s (%s) failed to load and is skipped: %s: %s", ep.name, ep.value,
                           type(e).__name__, e)
            continue
        if isinstance(obj, Technique):
            register_technique(obj)


def list_techniques() -> list[Technique]:
    """All registered techniques, sorted by name."""
    _load_plugins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_technique(name: str) -> Technique:
    """The technique registered as ``name``; a :class:`RecipeError` listing the known names otherwise."""
    _load_plugins()
    if name not in _REGISTRY:
        known = ", ".join(f"{t.name} (e.g. {t.example!r})" if t.example else t.name for t in list_techniques())
        raise RecipeError(f"unknown technique {name!r}; known techniques: {known}")
    return _REGISTRY[name]


def technique_for_config(config: Any) -> Technique:
    """The technique whose config class ``config`` is an instance of."""
    _load_plugins()
    for t in _REGISTRY.values():
        if isinstance(config, t.config_cls):
            return t
    raise RecipeError(
        f"{type(config).__name__} is not a fastgen technique config; pass a recipe string like 'sampler:dpm++2m@8' "
        f"or one of: {', '.join(t.config_cls.__name__ for t in list_techniques())}"
    )


def config_class(name: str) -> type:
    """The config class called ``name`` (e.g. ``"ToMeConfig"``) of a registered technique."""
    for t in list_techniques():
        if t.config_cls.__name__ == name:
            return t.config_cls
    raise AttributeError(f"no registered technique has a config class {name!r}; its plugin may have failed to load "
                         "(run `fastgen info`, or set FASTGEN_VERBOSITY=debug to see why)")


def parse_recipe(recipe: str) -> list[Any]:
    """Parse a recipe string into technique configs.

    ``"baseline"`` -> ``[]``; ``"sampler:dpm++2m@8"`` -> ``[SamplerConfig(...)]``;
    ``"ras:0.5+tome:0.5"`` -> two configs. Raises :class:`RecipeError` with the offending part.
    """
    if not isinstance(recipe, str):
        raise RecipeError(f"a recipe must be a string like 'sampler:dpm++2m@8', got {type(recipe).__name__}")
    text = recipe.strip()
    if text.lower() in _BASELINE:
        return []
    configs = []
    seen = set()
    for part in _SPLIT.split(text):
        part = part.strip()
        if not part:
            raise RecipeError(f"empty technique in recipe {recipe!r}; join techniques with '+', e.g. 'a:1+b:2'")
        name, _, args = part.partition(":")
        name = name.strip().lower()
        tech = get_technique(name)
        if name in seen:
            raise RecipeError(f"technique {name!r} appears twice in recipe {recipe!r}")
        seen.add(name)
        try:
            configs.append(tech.parse(args.strip() if args.strip() else None))
        except RecipeError:
            raise
        except (ValueError, TypeError) as e:
            hint = f" (example: {tech.example!r})" if tech.example else ""
            raise RecipeError(f"bad arguments in {part!r}: {e}{hint}") from None
    return configs


def recipe_string(configs: list[Any]) -> str:
    """Inverse of :func:`parse_recipe`."""
    if not configs:
        return "baseline"
    return "+".join(technique_for_config(c).to_string(c) for c in configs)
