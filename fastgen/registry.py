"""The technique registry and recipe strings.

Every capability plugs in with :func:`register_technique`: a name (the recipe prefix), its config
dataclass, a parser for the text after the colon, and its ``apply``/``remove`` pair. Packages register
themselves on import; the modules listed in :data:`PLUGIN_MODULES` are imported the first time the
registry is read, so ``fastgen.parse_recipe("sampler:dpm++2m@8")`` works without importing ``samplers``
by hand.

Recipe grammar: ``name[:args]`` joined by ``+`` (``"ras:0.5+tome:0.5"``); ``"baseline"``/``"none"``/``""``
is the empty recipe.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable

from .errors import RecipeError
from .utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["Technique", "register_technique", "get_technique", "list_techniques", "parse_recipe",
           "technique_for_config", "recipe_string", "PLUGIN_MODULES"]

#: Modules that register techniques when imported (later capabilities add theirs here).
PLUGIN_MODULES: list[str] = ["fastgen.steps", "fastgen.guidance", "fastgen.samplers", "fastgen.caches.tome", "fastgen.caches.stepcache", "fastgen.caches.anchors", "fastgen.caches.ras", "fastgen.quant.recipe", "fastgen.ar.accel", "fastgen.distill.recipe", "fastgen.quant.mobile", "fastgen.samplers.schedule", "fastgen.samplers.skip_tuning"]

_BASELINE = {"", "baseline", "none"}
# '+' joins techniques only where a technique name follows ("dpm++2m" keeps its pluses)
_SPLIT = re.compile(r"\+(?=\s*[A-Za-z_][\w\-]*\s*(?::|\+|$))")


@dataclass(frozen=True)
class Technique:
    """A registered acceleration technique.

    Attributes:
        name: recipe prefix (``"sampler"``, ``"tome"``, ...).
        config_cls: its config dataclass.
        parse: turns the text after ``name:`` (or None) into a config; raises ``RecipeError``/``ValueError``.
        apply: ``apply(pipe, config) -> pipe`` (the public ``apply_x``; must be safe to call twice).
        remove: ``remove(pipe) -> pipe`` (the public ``remove_x``; restores bit-exactly).
        to_string: config -> recipe string (inverse of ``parse``), for reports.
        check: optional ``check(pipe, adapter, config)`` that raises before anything is patched.
        families: adapter families it supports (None: all).
        summary: optional ``summary(pipe) -> dict`` of what it did on the last call.
        help: one line for ``fastgen info`` and error messages.
        example: an example recipe string.
        incompatible: ``{other technique name: reason}`` pairs that cannot stack (checked both ways, against
            what is applied and within one ``accelerate`` call, before anything is patched); the name
            ``"*"`` stands for every other technique (one that must run alone) except those in ``stacks_with``.
        stacks_with: with ``incompatible={"*": reason}``, the techniques that may still stack with it.
        order: where it goes within one ``accelerate`` call (lower first; stable otherwise). Techniques
            that replace a component (``gd``) use a negative order so the others patch the new one.
    """

    name: str
    config_cls: type
    parse: Callable[[str | None], Any]
    apply: Callable[..., Any]
    remove: Callable[..., Any]
    to_string: Callable[[Any], str]
    check: Callable[..., None] | None = None
    families: tuple[str, ...] | None = None
    summary: Callable[[Any], dict] | None = None
    help: str = ""
    example: str = ""
    incompatible: dict[str, str] | None = None
    order: int = 0
    stacks_with: tuple[str, ...] = ()


_REGISTRY: dict[str, Technique] = {}
_loaded = False


def register_technique(technique: Technique) -> Technique:
    """Add ``technique`` to the registry (re-registering the same name replaces it)."""
    _REGISTRY[technique.name] = technique
    return technique


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as e:  # a plugin with a missing optional dependency must not break the core
            logger.debug("technique plugin %s not loaded: %s", mod, e)


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
