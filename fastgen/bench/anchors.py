"""Anchors: other projects' accelerators, as recipes, so ``fastgen bench`` runs them beside ours in the same process.

They are benchmark references, not fastgen techniques: each is applied as the other project publishes it.

* ``"tomesd:0.5"`` — tomesd 0.1.3's ``apply_patch`` (the anchor for ``tome``; extra ``anchors``);
* ``"diffusers-fbc:0.05"`` — diffusers' own ``FirstBlockCacheConfig`` (ParaAttention's First Block Cache);
* ``"diffusers-taylorseer:5"`` — diffusers' ``TaylorSeerCacheConfig`` (cache interval 5, its defaults
  otherwise: 3 warm-up steps, order 1, bfloat16 factors);
* ``"anchor-deepcache:3"`` — the ``DeepCache`` package's ``DeepCacheSDHelper`` as published (extra
  ``anchors``: ``pip install 'fastgen[anchors]'``);
* ``"anchor-cachedit:0.08"`` — cache-dit's DBCache (``cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(...))``)
  on the DiT pipelines, as published (extra ``anchors``).

diffusers' cache hooks need a cache context (``model.cache_context(name)``) around every denoiser call,
and only some pipelines set one (FLUX does; SD1.5/SDXL/SD3/PixArt/Sana/Lumina2 do not, so every forward
would raise "No cache context is set"). These wrappers supply it: a hook on the denoiser sets a context
per denoiser call within a step (so cond/uncond run as separate calls keep separate state) and the hook
state is reset at the start of every pipeline call. Where an anchor cannot run, the recipe says so
instead of crashing mid-call (e.g. FirstBlockCache on SD3: its last ``JointTransformerBlock`` returns
``encoder_hidden_states=None`` and diffusers subtracts from it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..api import apply_technique, remove_technique
from ..caches.deepcache import StepTracker
from ..errors import UnsupportedPipelineError, require_extra
from ..hooks import HookBase, add_hook, remove_hook
from ..adapters import DIFFUSION_FAMILIES
from ..registry import Technique, register_technique
from ..utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["TomesdConfig", "DiffusersFBCConfig", "DiffusersTaylorSeerConfig", "AnchorDeepCacheConfig",
           "AnchorCacheDiTConfig", "apply_tomesd", "remove_tomesd", "apply_diffusers_fbc", "remove_diffusers_fbc",
           "apply_diffusers_taylorseer", "remove_diffusers_taylorseer", "apply_anchor_deepcache",
           "remove_anchor_deepcache", "apply_anchor_cachedit", "remove_anchor_cachedit"]

_CTX_HOOK = "fastgen_cache_context"
# families whose pipelines already wrap the denoiser call in ``cache_context``
_PIPELINE_SETS_CONTEXT = ("flux",)
# TaylorSeer's default patterns (``^transformer_blocks.*attn`` ...) match no module of these families:
# point it at their attention modules instead
_TAYLORSEER_IDENTIFIERS = {
    "pixart": [r"^transformer_blocks\.\d+\.attn[12]$"],
    "dit": [r"^transformer_blocks\.\d+\.attn[12]$"],
    "sana": [r"^transformer_blocks\.\d+\.attn[12]$"],
    "lumina2": [r"^layers\.\d+\.attn$"],
    "sd": [r"^(down_blocks|mid_block|up_blocks).*transformer_blocks\.\d+\.attn[12]$"],
    "sdxl": [r"^(down_blocks|mid_block|up_blocks).*transformer_blocks\.\d+\.attn[12]$"],
}


@dataclass(frozen=True)
class DiffusersFBCConfig:
    """diffusers ``FirstBlockCacheConfig`` on the pipeline's transformer (PixArt, DiT, FLUX).

    Attributes:
        threshold: relative change of the first block's residual below which the other blocks are skipped
            (diffusers' default 0.05; higher = faster, lower quality; 0.05-0.2).
    """

    threshold: float = 0.05

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not self.threshold >= 0:
            raise ValueError(f"threshold must be a number >= 0, got {self.threshold!r}")


@dataclass(frozen=True)
class DiffusersTaylorSeerConfig:
    """diffusers ``TaylorSeerCacheConfig`` on the denoiser's attention modules (all families).

    Attributes:
        cache_interval: a full computation every ``cache_interval`` steps, Taylor-predicted attention
            outputs in between (diffusers' default 5; 2-6).
        warmup_steps: ``disable_cache_before_step``: first steps always computed (default 3).
        max_order: Taylor order (default 1; 1-2).
    """

    cache_interval: int = 5
    warmup_steps: int = 3
    max_order: int = 1

    def __post_init__(self):
        for name, lo in (("cache_interval", 1), ("warmup_steps", 0), ("max_order", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


@dataclass(frozen=True)
class AnchorDeepCacheConfig:
    """The ``DeepCache`` package (``DeepCacheSDHelper``) on SD/SDXL pipelines, as published.

    Attributes:
        interval: ``cache_interval`` (default 3).
        branch: ``cache_branch_id`` (default 0).

    Known limits of the package (kept as is): it finds the step with ``scheduler.timesteps.index(t)``, so
    it fails when the timestep is passed as a keyword or is not in the schedule.
    """

    interval: int = 3
    branch: int = 0

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval < 1 or not isinstance(self.branch, int) or self.branch < 0:
            raise ValueError(f"interval must be >= 1 and branch >= 0, got {self.interval!r}, {self.branch!r}")


@dataclass(frozen=True)
class AnchorCacheDiTConfig:
    """cache-dit's DBCache (``cache_dit.DBCacheConfig``) as published, for side-by-side runs.

    Attributes:
        threshold: ``residual_diff_threshold`` (default 0.08, cache-dit's). The relative L1 change of the
            first ``fn_blocks`` blocks' residual under which the middle blocks are skipped. Higher = faster
            and lossier; 0.05-0.3 on trained models.
        fn_blocks: ``Fn_compute_blocks`` (default 1; cache-dit's 8 asserts on models with fewer than 9
            blocks).
        bn_blocks: ``Bn_compute_blocks`` (default 0).
        warmup_steps: ``max_warmup_steps`` (default 8, cache-dit's): steps always computed at the start.
        max_continuous: ``max_continuous_cached_steps`` (default -1, no limit).

    What differs from ``blockcache:`` (ours): cache-dit accumulates the change over consecutive cached
    steps and compares the accumulated value with the threshold; ours compares the change since the
    last full step. cache-dit patches ``pipe.__class__.__call__``; fastgen gives the pipeline its own
    subclass while this anchor is applied, so other pipelines of the same class are not affected.
    """

    threshold: float = 0.08
    fn_blocks: int = 1
    bn_blocks: int = 0
    warmup_steps: int = 8
    max_continuous: int = -1

    def __post_init__(self):
        if not self.threshold >= 0 or self.fn_blocks < 1 or self.bn_blocks < 0 or self.warmup_steps < 0:
            raise ValueError(f"anchor-cachedit needs threshold >= 0, F >= 1, B >= 0, W >= 0; got {self}")


# ---------------------------------------------------------------------------------------------------------
# diffusers cache hooks


class _ContextHook(HookBase):
    """Sets diffusers' cache context around every denoiser forward (one name per call within a step)."""

    def __init__(self, pipe_state):
        super().__init__()
        self.st = pipe_state
        self.tracker = StepTracker()

    def pre_forward(self, module, *args, **kwargs):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        step = max(self.st.call.step_index, 0)
        sub = self.tracker.advance(step)
        _set_cache_context(module, CacheContext(f"fastgen{sub}", step_index=step))
        return args, kwargs

    def post_forward(self, module, output):
        from diffusers.hooks.hooks import _set_cache_context

        _set_cache_context(module, None)
        return output


def _snapshot(model: torch.nn.Module) -> dict:
    return {id(m): (hasattr(m, "_diffusers_hook"), "forward" in m.__dict__, "_cache_config" in m.__dict__)
            for m in model.modules()}


def _tidy(model: torch.nn.Module, before: dict) -> None:
    """Drop what diffusers' enable/disable_cache left behind on modules that did not have it before."""
    for m in model.modules():
        had_reg, had_fwd, had_cfg = before.get(id(m), (False, False, False))
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None and not had_reg and not reg.hooks:
            del m._diffusers_hook
        fwd = m.__dict__.get("forward")
        if fwd is not None and not had_fwd and getattr(fwd, "__func__", None) is type(m).forward:
            del m.forward
        if "_cache_config" in m.__dict__ and not had_cfg and m.__dict__["_cache_config"] is None:
            del m._cache_config
    reg = getattr(model, "_diffusers_hook", None)
    if reg is not None:
        reg.invalidate_child_registries_cache()


def _install_diffusers_cache(pipe, st, diffusers_config, hook_names: tuple[str, ...], apply_fn) -> dict:
    model = st.adapter.denoiser(pipe)
    before = _snapshot(model)
    from diffusers.hooks import HookRegistry
    from diffusers.models.cache_utils import CacheMixin

    uses_mixin = isinstance(model, CacheMixin)
    if uses_mixin:
        model.enable_cache(diffusers_config)
    else:
        apply_fn(model, diffusers_config)
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    own_context = st.adapter.family not in _PIPELINE_SETS_CONTEXT
    ctx = _ContextHook(st)
    if own_context:
        add_hook(model, ctx, _CTX_HOOK)
    return {"model": model, "before": before, "mixin": uses_mixin, "hooks": hook_names, "own_context": own_context,
            "ctx": ctx}


def _diffusers_cache_on_call(pipe, saved: dict, kwargs: dict) -> dict:
    from diffusers.hooks import HookRegistry

    saved["ctx"].tracker = StepTracker()
    HookRegistry.check_if_exists_or_initialize(saved["model"]).reset_stateful_hooks(recurse=True)
    return kwargs


def _remove_diffusers_cache(pipe, st, saved: dict) -> None:
    model = saved["model"]
    if saved["own_context"]:
        remove_hook(model, _CTX_HOOK)
    if saved["mixin"]:
        model.disable_cache()
    else:
        for m in model.modules():
            reg = getattr(m, "_diffusers_hook", None)
            if reg is not None:
                for h in saved["hooks"]:
                    reg.remove_hook(h, recurse=False)
    _tidy(model, saved["before"])


_UNET_FBC = ("diffusers' FirstBlockCache needs a transformer with block lists and this is a UNet; use 'deepcache:3' "
             "(or 'anchor-deepcache:3')")
_FBC_HINTS = {
    "sd3": ("diffusers' FirstBlockCache crashes on SD3Transformer2DModel (its last JointTransformerBlock has "
            "context_pre_only=True and returns encoder_hidden_states=None, which first_block_cache.py subtracts from: "
            "TypeError); use fastgen's 'blockcache:0.08' on SD3"),
    "sd": _UNET_FBC, "sdxl": _UNET_FBC,
    "sana": "diffusers' FirstBlockCache does not know SanaTransformerBlock; use fastgen's 'blockcache:0.08'",
    "lumina2": "diffusers' FirstBlockCache does not know Lumina2TransformerBlock; use fastgen's 'blockcache:0.08'",
    "*": "diffusers' FirstBlockCache does not know this denoiser's blocks; use fastgen's 'blockcache:0.08'",
}


def _fbc_check(pipe, adapter, config) -> None:
    model = adapter.denoiser(pipe)
    cls = type(model).__name__
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
    from diffusers.hooks._helpers import TransformerBlockRegistry

    blocks = [b for n, sub in model.named_children() if n in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
              and isinstance(sub, torch.nn.ModuleList) for b in sub]
    for b in blocks:
        try:
            TransformerBlockRegistry.get(type(b))
        except ValueError:
            raise UnsupportedPipelineError(
                f"diffusers-fbc: diffusers' FirstBlockCache does not know {type(b).__name__} (the blocks of {cls}; "
                "not in its TransformerBlockRegistry); use fastgen's 'blockcache:0.08'") from None
    if len(blocks) < 2:
        raise UnsupportedPipelineError(f"diffusers-fbc: {cls} has {len(blocks)} cacheable blocks; FirstBlockCache needs >= 2")


def _install_fbc(pipe, st, config: DiffusersFBCConfig) -> dict:
    from diffusers import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

    return _install_diffusers_cache(pipe, st, FirstBlockCacheConfig(threshold=float(config.threshold)),
                                    (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK), apply_first_block_cache)


def apply_diffusers_fbc(pipe, config: DiffusersFBCConfig | None = None):
    """diffusers' ``FirstBlockCacheConfig(threshold)`` with the cache context supplied. Returns ``pipe``."""
    return apply_technique(pipe, "diffusers-fbc", config)


def remove_diffusers_fbc(pipe):
    """Remove :func:`apply_diffusers_fbc`. Returns ``pipe``."""
    return remove_technique(pipe, "diffusers-fbc")


def _taylorseer_diffusers_config(adapter, config: DiffusersTaylorSeerConfig):
    from diffusers import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(cache_interval=config.cache_interval, disable_cache_before_step=config.warmup_steps,
                                 max_order=config.max_order, cache_identifiers=_TAYLORSEER_IDENTIFIERS.get(adapter.family))


def _taylorseer_check(pipe, adapter, config) -> None:
    import re

    from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

    pats = _TAYLORSEER_IDENTIFIERS.get(adapter.family) or list(_TRANSFORMER_BLOCK_IDENTIFIERS)
    model = adapter.denoiser(pipe)
    if not any(any(re.fullmatch(p, n) for p in pats) for n, _ in model.named_modules()):
        raise UnsupportedPipelineError(
            f"diffusers-taylorseer: no attention module of {type(model).__name__} matches {pats}; it would do nothing")


def _install_taylorseer(pipe, st, config: DiffusersTaylorSeerConfig) -> dict:
    from diffusers import apply_taylorseer_cache
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    return _install_diffusers_cache(pipe, st, _taylorseer_diffusers_config(st.adapter, config),
                                    (_TAYLORSEER_CACHE_HOOK,), apply_taylorseer_cache)


def apply_diffusers_taylorseer(pipe, config: DiffusersTaylorSeerConfig | None = None):
    """diffusers' ``TaylorSeerCacheConfig`` with the cache context supplied. Returns ``pipe``."""
    return apply_technique(pipe, "diffusers-taylorseer", config)


def remove_diffusers_taylorseer(pipe):
    """Remove :func:`apply_diffusers_taylorseer`. Returns ``pipe``."""
    return remove_technique(pipe, "diffusers-taylorseer")


# ---------------------------------------------------------------------------------------------------------
# the DeepCache package


def _install_anchor_deepcache(pipe, st, config: AnchorDeepCacheConfig) -> dict:
    deepcache = require_extra("DeepCache", "anchors", "the anchor-deepcache recipe")
    unet = st.adapter.denoiser(pipe)
    before = {id(m): "forward" in m.__dict__ for m in unet.modules()}
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=config.interval, cache_branch_id=config.branch)
    helper.enable()
    return {"helper": helper, "before": before}


def _uninstall_anchor_deepcache(pipe, st, saved: dict) -> None:
    """Disable the DeepCache helper and drop the ``forward`` attributes it leaves on the modules."""
    saved["helper"].disable()
    for m in st.adapter.denoiser(pipe).modules():
        fwd = m.__dict__.get("forward")
        if fwd is not None and not saved["before"].get(id(m), False) and getattr(fwd, "__func__", None) is type(m).forward:
            del m.forward


def apply_anchor_deepcache(pipe, config: AnchorDeepCacheConfig | None = None):
    """``DeepCache.DeepCacheSDHelper`` with ``cache_interval``/``cache_branch_id``. Returns ``pipe``."""
    return apply_technique(pipe, "anchor-deepcache", config)


def remove_anchor_deepcache(pipe):
    """Remove :func:`apply_anchor_deepcache`. Returns ``pipe``."""
    return remove_technique(pipe, "anchor-deepcache")


# ---------------------------------------------------------------------------------------------------------
# cache-dit


class _QuietCacheDiT:
    """cache-dit logs at INFO on every enable/disable (its loggers do not propagate): raise them to ERROR."""

    def __enter__(self):
        import logging

        self.saved = {}
        for name, lg in list(logging.Logger.manager.loggerDict.items()):
            if isinstance(lg, logging.Logger) and (name.startswith("cache_dit") or name == "CACHE_DIT"):
                self.saved[name] = lg.level
                lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        import logging

        for name, level in self.saved.items():
            logging.getLogger(name).setLevel(level)


def _restore_forward(model: torch.nn.Module, forward) -> None:
    if forward is None:
        model.__dict__.pop("forward", None)
    else:
        model.forward = forward


def _drop_new_attributes(pipe, model: torch.nn.Module, keys: dict[int, set]) -> None:
    for m in [pipe, *model.modules()]:
        for k in set(m.__dict__) - keys.get(id(m), set()):
            del m.__dict__[k]


def _cachedit_check(pipe, adapter, config: AnchorCacheDiTConfig) -> None:
    n_blocks = len(adapter.blocks(pipe))
    if config.fn_blocks + config.bn_blocks >= n_blocks:
        raise ValueError(f"anchor-cachedit: F{config.fn_blocks} + B{config.bn_blocks} must leave blocks to cache; "
                         f"{type(adapter.denoiser(pipe)).__name__} has {n_blocks}")


def _install_anchor_cachedit(pipe, st, config: AnchorCacheDiTConfig) -> dict:
    import os

    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
    cache_dit = require_extra("cache_dit", "anchors", "the anchor-cachedit recipe")
    model = st.adapter.denoiser(pipe)
    forward = model.__dict__.get("forward")  # diffusers' hook registry's partial, or none
    keys = {id(m): set(m.__dict__) for m in [pipe, *model.modules()]}  # cache-dit leaves stats attributes
    shared_class = type(pipe)
    # cache-dit assigns __call__ on pipe.__class__: give this pipeline a class of its own first
    pipe.__class__ = type(shared_class.__name__, (shared_class,), {"__module__": shared_class.__module__})
    pipe.__class__.__qualname__ = shared_class.__qualname__
    cfg = cache_dit.DBCacheConfig(
        Fn_compute_blocks=config.fn_blocks, Bn_compute_blocks=config.bn_blocks,
        residual_diff_threshold=config.threshold, max_warmup_steps=config.warmup_steps,
        max_continuous_cached_steps=config.max_continuous)
    try:
        with _QuietCacheDiT():
            cache_dit.enable_cache(pipe, cache_config=cfg)
    except Exception as e:
        model.__dict__.pop("_original_forward", None)
        with _QuietCacheDiT():
            try:
                cache_dit.disable_cache(pipe)
            except Exception:  # noqa: BLE001 - nothing was installed
                pass
        _restore_forward(model, forward)
        _drop_new_attributes(pipe, model, keys)
        pipe.__class__ = shared_class
        raise UnsupportedPipelineError(f"anchor-cachedit: cache-dit refused {type(pipe).__name__}: "
                                       f"{type(e).__name__}: {e}") from e
    return {"class": shared_class, "model": model, "forward": forward, "keys": keys}


def _uninstall_anchor_cachedit(pipe, st, saved: dict) -> None:
    """``cache_dit.disable_cache(pipe)`` and back to the shared class."""
    import cache_dit

    model = saved["model"]
    # cache-dit restores with ``_original_forward.__get__(model)``, which a diffusers HookRegistry's
    # ``functools.partial`` forward (fastgen's step counter) does not have: put the forward back first
    original = model.__dict__.pop("_original_forward", None)
    with _QuietCacheDiT():
        cache_dit.disable_cache(pipe)
    _restore_forward(model, saved["forward"])
    del original
    _drop_new_attributes(pipe, model, saved["keys"])
    pipe.__class__ = saved["class"]


def apply_anchor_cachedit(pipe, config: AnchorCacheDiTConfig | None = None):
    """``cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(...))``. Returns ``pipe``."""
    return apply_technique(pipe, "anchor-cachedit", config)


def remove_anchor_cachedit(pipe):
    """Remove :func:`apply_anchor_cachedit`. Returns ``pipe``."""
    return remove_technique(pipe, "anchor-cachedit")


# ---------------------------------------------------------------------------------------------------------
# recipes


def _float_arg(args, default):
    return default if not args else float(args)


def _parse_taylorseer(args: str | None) -> DiffusersTaylorSeerConfig:
    if not args:
        return DiffusersTaylorSeerConfig()
    parts = [p.strip().lower() for p in args.split(",") if p.strip()]
    kw = {"cache_interval": int(parts[0])}
    for p in parts[1:]:
        if p[:1] == "w" and p[1:].isdigit():
            kw["warmup_steps"] = int(p[1:])
        elif p[:1] == "o" and p[1:].isdigit():
            kw["max_order"] = int(p[1:])
        else:
            raise ValueError(f"unknown option {p!r}; options: W<n> (warm-up steps), O<n> (Taylor order)")
    return DiffusersTaylorSeerConfig(**kw)


def _ts_string(c: DiffusersTaylorSeerConfig) -> str:
    s = f"diffusers-taylorseer:{c.cache_interval}"
    if c.warmup_steps != 3:
        s += f",W{c.warmup_steps}"
    if c.max_order != 1:
        s += f",O{c.max_order}"
    return s


def _parse_deepcache(args: str | None) -> AnchorDeepCacheConfig:
    if not args:
        return AnchorDeepCacheConfig()
    head, _, b = args.partition(",")
    b = b.strip().lower()
    if b and not (b[:1] == "b" and b[1:].isdigit()):
        raise ValueError(f"anchor-deepcache takes the interval and optionally bB (branch), got {args!r}")
    return AnchorDeepCacheConfig(int(head), int(b[1:]) if b else 0)


register_technique(Technique(
    name="diffusers-fbc", config_cls=DiffusersFBCConfig, parse=lambda a: DiffusersFBCConfig(_float_arg(a, 0.05)),
    install=_install_fbc, uninstall=_remove_diffusers_cache, on_call=_diffusers_cache_on_call,
    to_string=lambda c: f"diffusers-fbc:{c.threshold:g}",
    check=_fbc_check, families=("pixart", "dit", "flux"),
    family_hint=_FBC_HINTS,
    help="anchor: diffusers' FirstBlockCacheConfig (cache context supplied; not on SD3, Sana, Lumina2, UNets)",
    example="diffusers-fbc:0.05",
))
register_technique(Technique(
    families=DIFFUSION_FAMILIES,  # a diffusers denoiser; a next-scale AR model (var) is not one
    name="diffusers-taylorseer", config_cls=DiffusersTaylorSeerConfig, parse=_parse_taylorseer,
    install=_install_taylorseer, uninstall=_remove_diffusers_cache, on_call=_diffusers_cache_on_call,
    to_string=_ts_string, check=_taylorseer_check,
    help="anchor: diffusers' TaylorSeerCacheConfig on the attention modules (cache context supplied)",
    example="diffusers-taylorseer:5",
))


def _parse_cachedit(args: str | None) -> AnchorCacheDiTConfig:
    if not args:
        return AnchorCacheDiTConfig()
    parts = [p.strip().lower() for p in args.split(",") if p.strip()]
    kw: dict = {"threshold": float(parts[0])}
    keys = {"f": "fn_blocks", "b": "bn_blocks", "w": "warmup_steps", "mc": "max_continuous"}
    for p in parts[1:]:
        key = "mc" if p.startswith("mc") else p[:1]
        num = p[len(key):]
        if key not in keys or not num.lstrip("-").isdigit():
            raise ValueError(f"unknown option {p!r}; options: F<n> (head blocks), B<n> (tail blocks), W<n> (warm-up "
                             "steps), MC<n> (max consecutive cached steps, -1 = no limit)")
        kw[keys[key]] = int(num)
    return AnchorCacheDiTConfig(**kw)


def _cachedit_string(c: AnchorCacheDiTConfig) -> str:
    d = AnchorCacheDiTConfig()
    s = f"anchor-cachedit:{c.threshold:g}"
    for attr, key in (("fn_blocks", "F"), ("bn_blocks", "B"), ("warmup_steps", "W"), ("max_continuous", "MC")):
        if getattr(c, attr) != getattr(d, attr):
            s += f",{key}{getattr(c, attr)}"
    return s


register_technique(Technique(
    name="anchor-cachedit", config_cls=AnchorCacheDiTConfig, parse=_parse_cachedit,
    install=_install_anchor_cachedit, uninstall=_uninstall_anchor_cachedit, check=_cachedit_check,
    to_string=_cachedit_string, families=("sd3", "flux", "pixart", "sana", "lumina2", "dit"),
    incompatible={"*": "anchor-cachedit is a benchmark reference and runs alone (cache-dit replaces the "
                       "denoiser's forward, which the other techniques' hooks would wrap)"},
    help="anchor: cache-dit's DBCache as published (extra 'anchors'); F1 by default (cache-dit's F8 needs 9+ blocks)",
    example="anchor-cachedit:0.08",
))
register_technique(Technique(
    name="anchor-deepcache", config_cls=AnchorDeepCacheConfig, parse=_parse_deepcache,
    install=_install_anchor_deepcache, uninstall=_uninstall_anchor_deepcache,
    to_string=lambda c: f"anchor-deepcache:{c.interval}" + (f",b{c.branch}" if c.branch else ""),
    families=("sd", "sdxl"), help="anchor: the DeepCache package's DeepCacheSDHelper as published (extra 'anchors')",
    example="anchor-deepcache:3",
))


# ---------------------------------------------------------------------------------------------------------
# tomesd (the anchor for ``tome``)

@dataclass(frozen=True)
class TomesdConfig:
    """tomesd 0.1.3 as published (``tomesd.apply_patch(pipe, ratio=..., max_downsample=...)``): the comparison
    anchor for ``tome``. Needs ``pip install 'fastgen[anchors]'``. Note tomesd caps ratios above 0.75
    silently and is a no-op on SDXL with max_downsample=1 (we raise for both instead).

    Attributes:
        ratio: tomesd's ``ratio``, the fraction of tokens merged (default 0.5). Range 0-0.75.
        max_downsample: tomesd's ``max_downsample`` (default 1 = top level only; SDXL needs 2). Range 1-8.
    """

    ratio: float = 0.5
    max_downsample: int = 1

    def __post_init__(self):
        if not 0 <= self.ratio <= 0.75:
            raise ValueError(f"tomesd ratio must be in [0, 0.75], got {self.ratio}")


def _install_tomesd(pipe, st, config: TomesdConfig) -> None:
    tomesd = require_extra("tomesd", "anchors", "the tomesd anchor")
    tomesd.apply_patch(pipe, ratio=config.ratio, max_downsample=config.max_downsample)


def _uninstall_tomesd(pipe, st, handle: None) -> None:
    import tomesd

    tomesd.remove_patch(pipe)


def apply_tomesd(pipe, config: TomesdConfig | None = None):
    """Apply the tomesd anchor to a SD/SDXL pipeline (for side-by-side benchmarks). Returns ``pipe``."""
    return apply_technique(pipe, "tomesd", config)


def remove_tomesd(pipe):
    """Remove the tomesd anchor. Returns ``pipe``."""
    return remove_technique(pipe, "tomesd")


def _parse_tomesd(args: str | None) -> TomesdConfig:
    if not args:
        return TomesdConfig()
    head, _, md = args.partition(",")
    kw = {}
    if md:
        k, _, v = md.partition("=")
        if k.strip() != "max_downsample":
            raise ValueError(f"tomesd takes only max_downsample=N after the ratio, got {md!r}")
        kw["max_downsample"] = int(v)
    return TomesdConfig(float(head), **kw)


register_technique(Technique(
    name="tomesd", config_cls=TomesdConfig, parse=_parse_tomesd, install=_install_tomesd, uninstall=_uninstall_tomesd,
    to_string=lambda c: f"tomesd:{c.ratio:g}" + (f",max_downsample={c.max_downsample}" if c.max_downsample != 1 else ""),
    families=("sd", "sdxl"), family_hint="tomesd only patches SD/SDXL UNets; use 'tome:...'",
    help="anchor: tomesd 0.1.3 as published (extra 'anchors')", example="tomesd:0.5",
))
