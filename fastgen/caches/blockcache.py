"""DiT block/residual cache (First-Block-Cache / DBCache style): ``"blockcache:0.08"``.

Every denoiser forward runs the first ``fn_blocks`` blocks and measures how much their residual (output
minus input of the head) changed since the last *full* step: ``mean|r - r_full| / mean|r_full|``. Below
``threshold`` the middle blocks are skipped and the residual they added on the last full step is added
instead (optionally extrapolated to first order from the last two full steps, as TaylorSeer/DBCache's
calibrator do); the last ``bn_blocks`` blocks always run and correct the result. ``warmup_steps`` and
``max_cached_steps`` (consecutive) bound the drift.

Supported: SD3/SD3.5 (``JointTransformerBlock``, including the last ``context_pre_only`` block that
returns ``encoder_hidden_states=None``, the case that crashes diffusers' ``FirstBlockCacheConfig`` on SD3),
PixArt-α/Σ and DiT (``BasicTransformerBlock``), FLUX (double then single blocks, one span), Sana and
Lumina2. The blocks come from the family adapter (``get_state(pipe).adapter.blocks(pipe)``).

Patching: a diffusers ``ModelHook`` with ``new_forward`` on block 0, on the last head block and on every
middle block, all sharing one per-pipeline state object; a small hook on the transformer opens each
forward. No block ``forward`` is copied: a skipped block returns its inputs (the first skipped one adds
the kept residual). State is per pipeline call and per denoiser call within a step (cond/uncond run as
separate calls, as Lumina2 does, keep separate caches); the step index comes from the call itself.

The decision needs one host sync per forward (``.item()``), as diffusers' and cache-dit's caches do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedPipelineError
from ..api import apply_technique, remove_technique
from ..hooks import HookSet, uninstall_hooks
from ..registry import Technique, register_technique
from ..utils.logging import get_logger
from ..hooks import HookBase
from .deepcache import StepTracker

logger = get_logger(__name__)

__all__ = ["BlockCacheConfig", "apply_blockcache", "remove_blockcache"]

_NAME = "blockcache"
_HOOK = "fastgen_blockcache"
_FAMILIES = ("sd3", "flux", "pixart", "sana", "lumina2", "dit")
# block class -> True when it takes and returns (encoder_hidden_states, hidden_states), False: a tensor
_BLOCK_IO = {
    "JointTransformerBlock": True, "FluxTransformerBlock": True, "FluxSingleTransformerBlock": True,
    "BasicTransformerBlock": False, "SanaTransformerBlock": False, "Lumina2TransformerBlock": False,
}


@dataclass(frozen=True)
class BlockCacheConfig:
    """Skip the middle transformer blocks when the head blocks' residual barely changed.

    Attributes:
        threshold: relative L1 change of the head residual since the last full step below which the middle
            blocks are skipped (default 0.08, as cache-dit's DBCache). 0 = never skip (bit-exact
            baseline). Higher = more skipping, faster, lower quality; 0.05-0.2 on trained models. Random
            weights change 0.4-0.7 per step, so there only a value near 1 makes it fire.
        fn_blocks: head blocks always computed; their residual drives the decision (default 1 = First Block
            Cache). More = a better decision but less saved. Range 1 to blocks-1.
        bn_blocks: tail blocks always computed after the cached span to correct it (default 0). Range 0 to
            blocks - fn_blocks - 1.
        warmup_steps: the first steps of each call are always full (default 2; cache-dit uses 8 at 28-50
            steps). Range 0 to steps.
        max_cached_steps: at most this many consecutive cached steps before a forced full one (default 3;
            -1 = unlimited, 0 = never cache).
        taylor: extrapolate the cached residual to first order from the last two full steps instead of
            reusing it as is (default False). Usually better quality for the same skipping.
    """

    threshold: float = 0.08
    fn_blocks: int = 1
    bn_blocks: int = 0
    warmup_steps: int = 2
    max_cached_steps: int = 3
    taylor: bool = False

    def __post_init__(self):
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise ValueError(f"threshold must be a number >= 0 (0 = never cache), got {t!r}")
        for name, lo in (("fn_blocks", 1), ("bn_blocks", 0), ("warmup_steps", 0), ("max_cached_steps", -1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not isinstance(self.taylor, bool):
            raise ValueError(f"taylor must be True or False, got {self.taylor!r}")

    @classmethod
    def preset(cls, name: str) -> "BlockCacheConfig":
        """``"slow"`` (threshold 0.05), ``"medium"`` (0.08), ``"fast"`` (0.15, taylor, up to 4 cached steps)."""
        presets = {"slow": cls(threshold=0.05), "medium": cls(threshold=0.08),
                   "fast": cls(threshold=0.15, max_cached_steps=4, taylor=True)}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose slow, medium or fast")
        return presets[name]


class _Ctx:
    """What one denoiser call slot (cond, uncond, ...) keeps between steps."""

    def __init__(self):
        self.head_full = None  # head residual at the last full step
        self.res = None  # (hidden residual, encoder residual or None, encoder output is None) of the span
        self.res_step = None
        self.prev_res = None  # the span residual of the full step before (for taylor)
        self.prev_step = None
        self.consecutive = 0


class _State:
    def __init__(self, pipe_state, config: BlockCacheConfig, n_blocks: int):
        self.st = pipe_state
        self.config = config
        self.n = n_blocks
        self.first_mid = config.fn_blocks
        self.last_mid = n_blocks - config.bn_blocks - 1
        self.new_call()

    def new_call(self) -> None:
        self.tracker = StepTracker()
        self.ctxs: dict[int, _Ctx] = {}
        self.ctx = _Ctx()
        self.step = 0
        self.skipping = False
        self.head_in = None
        self.span_in = None
        self.residual = None
        self.rel: list[float] = []
        self.record = {"threshold": self.config.threshold, "cached_steps": [], "full_steps": [],
                       "forwards_full": 0, "forwards_cached": 0, "blocks_skipped": 0,
                       "blocks_per_forward": self.n, "rel_change": None}
        self.st.call.records[_NAME] = self.record

    def begin(self) -> None:
        if self.st.call.records.get(_NAME) is not self.record:  # transformer called outside a pipeline call
            self.st.call.records[_NAME] = self.record
        self.step = max(self.st.call.step_index, 0)
        self.ctx = self.ctxs.setdefault(self.tracker.advance(self.step), _Ctx())
        self.skipping = False
        self.head_in = self.span_in = self.residual = None

    def end(self) -> None:
        rec = self.record
        key = "cached_steps" if self.skipping else "full_steps"
        rec["forwards_cached" if self.skipping else "forwards_full"] += 1
        if self.step not in rec[key]:
            rec[key].append(self.step)
        if self.rel:
            r = sorted(self.rel)
            rec["rel_change"] = {"min": round(r[0], 4), "median": round(r[len(r) // 2], 4), "max": round(r[-1], 4)}
        self.skipping = False

    @torch.compiler.disable
    def decide(self, head_out: torch.Tensor) -> None:
        """After the head blocks: skip the middle span or not, for the rest of this forward."""
        c, cfg = self.ctx, self.config
        if self.head_in is None or head_out.shape != self.head_in.shape:
            return
        r = head_out - self.head_in
        rel = None
        if c.head_full is not None and c.head_full.shape == r.shape:
            rel = float(((r - c.head_full).abs().mean() / c.head_full.abs().mean()).item())
            self.rel.append(rel)
        ok = (rel is not None and rel < cfg.threshold and c.res is not None and self.step >= cfg.warmup_steps
              and (cfg.max_cached_steps < 0 or c.consecutive < cfg.max_cached_steps))
        if ok:
            c.consecutive += 1
            self.skipping = True
        else:
            c.consecutive = 0
            c.head_full = r

    def span_residual(self, hidden: torch.Tensor):
        """The residual to add on a cached step (first-order extrapolated when ``taylor``)."""
        c = self.ctx
        h, e, e_none = c.res
        if h.shape != hidden.shape:
            return None
        if (self.config.taylor and c.prev_res is not None and c.prev_res[0].shape == h.shape
                and c.res_step != c.prev_step):
            k = (self.step - c.res_step) / (c.res_step - c.prev_step)
            ph, pe, _ = c.prev_res
            h = h + (h - ph) * k
            if e is not None and pe is not None and pe.shape == e.shape:
                e = e + (e - pe) * k
        return h, e, e_none

    def keep(self, out_h, out_e, in_h, in_e) -> None:
        c = self.ctx
        e = out_e - in_e if (out_e is not None and in_e is not None and out_e.shape == in_e.shape) else None
        if c.res is not None:
            c.prev_res, c.prev_step = c.res, c.res_step
        c.res, c.res_step = (out_h - in_h, e, out_e is None), self.step


def _io(args, kwargs, joint: bool):
    h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    e = None
    if joint:
        e = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (args[1] if len(args) > 1 else None)
    return h, e


class _BlockHook(HookBase):
    """On block ``index``: records the head input, decides after the head, skips or records the span."""

    def __init__(self, state: _State, index: int, joint: bool):
        super().__init__()
        self.s, self.i, self.joint = state, index, joint
        self.mid = state.first_mid <= index <= state.last_mid
        self.enc_none = False  # this block returned encoder_hidden_states=None (SD3's last block)

    def new_forward(self, module, *args, **kwargs):
        s, i = self.s, self.i
        h, e = _io(args, kwargs, self.joint)
        if i == 0:
            s.head_in = h
        if self.mid and s.skipping:
            if i == s.first_mid:
                s.residual = s.span_residual(h)
            if s.residual is not None:
                s.record["blocks_skipped"] += 1
                if i == s.first_mid:
                    rh, re_, e_none = s.residual
                    h = h + rh
                    e = None if e_none and s.last_mid == i else (e + re_ if (re_ is not None and e is not None) else e)
                if not self.joint:
                    return h
                if self.enc_none or (i == s.last_mid and s.residual[2]):
                    e = None
                return e, h
            s.skipping = False  # shapes changed: fall back to computing
        if self.mid and i == s.first_mid:
            s.span_in = (h, e)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.joint:
            out_e, out_h = out
            self.enc_none = out_e is None
        else:
            out_e, out_h = None, out
        if i == s.first_mid - 1:
            s.decide(out_h)
        if self.mid and i == s.last_mid and s.span_in is not None:
            s.keep(out_h, out_e, *s.span_in)
        return out


class _ControllerHook(HookBase):
    def __init__(self, state: _State):
        super().__init__()
        self.s = state

    def pre_forward(self, module, *args, **kwargs):
        self.s.begin()
        return args, kwargs

    def post_forward(self, module, output):
        self.s.end()
        return output


def _blocks(pipe, adapter, config: BlockCacheConfig):
    blocks = adapter.blocks(pipe)
    for name, blk in blocks:
        if type(blk).__name__ not in _BLOCK_IO:
            raise UnsupportedPipelineError(
                f"blockcache: {name} of {type(adapter.denoiser(pipe)).__name__} is a {type(blk).__name__}, whose "
                f"inputs/outputs it does not know; supported blocks: {', '.join(_BLOCK_IO)}")
    n = len(blocks)
    if config.fn_blocks + config.bn_blocks >= n:
        raise ValueError(
            f"blockcache: fn_blocks ({config.fn_blocks}) + bn_blocks ({config.bn_blocks}) must leave at least one "
            f"block to cache, but {type(adapter.denoiser(pipe)).__name__} has {n} blocks")
    return blocks


def _check(pipe, adapter, config: BlockCacheConfig) -> None:
    _blocks(pipe, adapter, config)


def apply_blockcache(pipe, config: BlockCacheConfig | None = None):
    """Cache the middle transformer blocks' residual between steps (see :class:`BlockCacheConfig`).

    Returns ``pipe``; calling it again replaces the config. ``fastgen.summary(pipe)["last_call"]
    ["blockcache"]`` reports the cached and full steps, blocks skipped and the observed relative changes.

    Raises:
        UnsupportedPipelineError: a UNet pipeline (use ``"deepcache"``) or an unknown block class.
        ValueError: ``fn_blocks + bn_blocks`` leaves no block to cache.
    """
    return apply_technique(pipe, _NAME, config)


def _install(pipe, st, config: BlockCacheConfig) -> HookSet:
    blocks = _blocks(pipe, st.adapter, config)
    state = _State(st, config, len(blocks))
    handle = HookSet(state)
    for i, (_, blk) in enumerate(blocks):
        if i == 0 or i == config.fn_blocks - 1 or state.first_mid <= i <= state.last_mid:
            handle.add(blk, _BlockHook(state, i, _BLOCK_IO[type(blk).__name__]), _HOOK)
    model = st.adapter.denoiser(pipe)
    handle.add(model, _ControllerHook(state), _HOOK)
    logger.info("blockcache on %s: blocks %d-%d of %d cacheable, threshold %g", type(model).__name__,
                state.first_mid, state.last_mid, len(blocks), config.threshold)
    return handle


def _on_call(pipe, handle: HookSet, kwargs: dict) -> dict:
    handle.state.new_call()
    return kwargs


def remove_blockcache(pipe):
    """Undo :func:`apply_blockcache` (no-op if not applied), restoring the transformer bit-exactly."""
    return remove_technique(pipe, _NAME)


_KEYS = (("mc", "max_cached_steps"), ("f", "fn_blocks"), ("b", "bn_blocks"), ("w", "warmup_steps"))


def _parse(args: str | None) -> BlockCacheConfig:
    if args is None:
        return BlockCacheConfig()
    parts = [p.strip() for p in args.split(",") if p.strip()]
    if not parts:
        return BlockCacheConfig()
    head = parts[0].lower()
    if head in ("slow", "medium", "fast"):
        base = BlockCacheConfig.preset(head)
    else:
        base = BlockCacheConfig(threshold=float(head))
    kw = {}
    for p in parts[1:]:
        key = p.lower()
        if key in ("taylor", "t"):
            kw["taylor"] = True
            continue
        for short, field in _KEYS:
            if key.startswith(short) and key[len(short):].lstrip("-").isdigit():
                kw[field] = int(key[len(short):])
                break
        else:
            raise ValueError(f"unknown option {p!r}; options: F<n> (head blocks), B<n> (tail blocks), "
                             "W<n> (warm-up steps), MC<n> (max consecutive cached, -1 = no limit), taylor")
    import dataclasses

    return dataclasses.replace(base, **kw)


def _to_string(c: BlockCacheConfig) -> str:
    d = BlockCacheConfig()
    s = f"blockcache:{c.threshold:g}"
    for short, field in (("F", "fn_blocks"), ("B", "bn_blocks"), ("W", "warmup_steps"), ("MC", "max_cached_steps")):
        if getattr(c, field) != getattr(d, field):
            s += f",{short}{getattr(c, field)}"
    if c.taylor:
        s += ",taylor"
    return s


register_technique(Technique(
    name=_NAME, config_cls=BlockCacheConfig, parse=_parse, install=_install, uninstall=uninstall_hooks, on_call=_on_call,
    to_string=_to_string, check=_check, families=_FAMILIES,
    family_hint="blockcache caches DiT transformer blocks and this pipeline has a UNet; use 'deepcache:3' for UNets",
    help="DiT block cache (FBC/DBCache): skip the middle blocks when the first blocks' residual barely changed",
    example="blockcache:0.08",
))
