"""Token merging (ToMe) for diffusers UNets and DiTs.

Reference: Bolya & Hoffman, "Token Merging for Fast Stable Diffusion" (CVPRW 2023, arXiv 2303.17604),
after Bolya et al., "Token Merging: Your ViT but Faster" (ICLR 2023). Before a block's self-attention the
image tokens are split into destination tokens (one random token per ``sx`` x ``sy`` window) and source
tokens; the ``r`` sources most similar (cosine) to some destination are averaged into it (bipartite soft
matching), attention runs on the N - r remaining tokens, and the output is *unmerged* (each merged token
copies its destination's value) so the block's residual stream keeps all N tokens.

How it differs from tomesd:

* It patches through attention processors (it wraps the block's own processor, so SDPA, xformers and
  joint/rotary processors keep doing the attention) and, for ``merge_mlp``, through diffusers hooks on the
  feed-forward module. No block ``forward`` is copied, so diffusers releases do not break it.
* Merge and unmerge are one ``scatter_add`` and one ``gather`` through a precomputed token -> merged-row
  map, and the matching can be reused for several steps (``recompute_every``) and shared by the blocks of
  one resolution level (``share_matching``), so merging pays for itself at 1024 tokens, not only at 4096+.
* Every family with ``BasicTransformerBlock`` (SD1.5, SDXL, PixArt, DiT) and SD3's joint blocks is
  supported; a ratio the partition cannot give, or a setting that would merge nothing (SDXL has no
  attention at full resolution: use ``max_downsample=2``), is an error, never a silent cap or no-op.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedPipelineError
from ..hooks import HookBase, add_hook, attach, detach_if_empty, get_state, remove_hook
from ..registry import Technique, register_technique
from ..utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["ToMeConfig", "apply_tome", "remove_tome", "Matching", "bipartite_matching"]

_NAME = "tome"
_SIZE_HOOK = "fastgen_tome_size"
_FF_HOOK = "fastgen_tome_ff"
_FAMILIES = ("sd", "sdxl", "pixart", "dit", "sd3")
PRESETS = {"slow": 0.3, "medium": 0.5, "fast": 0.6}


@dataclass(frozen=True)
class ToMeConfig:
    """Token merging settings.

    Important args:
        ratio: fraction of a block's image tokens merged away before attention (default 0.5). Higher is
            faster (attention cost ~ (1 - ratio)^2) and blurrier. Range 0.3-0.6; at most
            ``1 - 1/(sx*sy)`` (0.75 for 2x2), beyond which a ValueError is raised.
        max_downsample: UNets only: merge in blocks whose latent is downsampled at most this much
            (1 = top level, as tomesd; SDXL has no attention at full resolution and needs 2). Range 1-8.

    Args to tinker with:
        sx, sy: stride of the random partition: one destination per sx x sy window (default 2, 2).
        use_rand: random destination in each window (True) or always the top-left one (False: fewer
            artifacts at high ratios, slightly lower quality otherwise).
        merge_attn: merge around self-attention (default True: most of the gain).
        merge_crossattn: also merge the queries of cross-attention (UNet/PixArt; small gain).
        merge_mlp: also merge around the feed-forward (more speed, more quality loss).
        min_tokens: leave blocks with fewer image tokens alone: at small token counts merging does not pay
            (default 256; 0 merges everywhere).
        recompute_every: recompute the matching every this many steps and reuse it in between
            (default 1; 2-4 trades a little quality for less matching work).
        share_matching: compute the matching once per resolution level and step (at its first block) and
            reuse it in the level's other blocks (default True; cheaper, nearly the same quality).
        seed: seed of the random partition (per call and step; the global RNG is never touched).
    """

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    min_tokens: int = 256
    recompute_every: int = 1
    share_matching: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.sx < 1 or self.sy < 1:
            raise ValueError(f"sx and sy must be >= 1, got {self.sx}, {self.sy}")
        limit = 1 - 1 / (self.sx * self.sy)
        if not 0 <= self.ratio <= limit + 1e-9:
            raise ValueError(f"ratio must be in [0, {limit:.3f}] for a {self.sx}x{self.sy} partition (one token of "
                             f"each window is kept), got {self.ratio}; use a larger sx/sy to merge more")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"max_downsample must be 1, 2, 4 or 8, got {self.max_downsample}")
        if self.recompute_every < 1:
            raise ValueError(f"recompute_every must be >= 1, got {self.recompute_every}")
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ValueError("nothing to merge: enable merge_attn, merge_crossattn or merge_mlp")


@dataclass
class Matching:
    """A bipartite merge of N tokens into M = N - r rows, for a batch: ``assign`` (B, N) maps every token to
    its merged row; merge averages tokens per row (scatter_add), unmerge copies rows back (gather)."""

    assign: torch.Tensor  # (B, N) int64
    counts: torch.Tensor  # (B, M, 1)
    num_rows: int

    def merge(self, x_BNC: torch.Tensor) -> torch.Tensor:
        B, N, C = x_BNC.shape
        idx = self.assign.unsqueeze(-1).expand(B, N, C)
        out = x_BNC.new_zeros(B, self.num_rows, C).scatter_add_(1, idx, x_BNC)
        return out / self.counts.to(x_BNC.dtype)

    def unmerge(self, y_BMC: torch.Tensor) -> torch.Tensor:
        B, M, C = y_BMC.shape
        assert M == self.num_rows, (M, self.num_rows)
        return y_BMC.gather(1, self.assign.unsqueeze(-1).expand(B, self.assign.shape[1], C))


def bipartite_matching(metric_BNC: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int,
                       generator: torch.Generator | None = None) -> Matching:
    """Bipartite soft matching with a 2D stride partition (one destination per sx x sy window).

    ``metric_BNC`` are the tokens on an h x w grid (row-major). The r source tokens with the highest cosine
    similarity to their best destination are merged into it. ``generator`` picks the destination in each
    window at random (None: top-left).
    """
    B, N, C = metric_BNC.shape
    assert N == h * w, (N, h, w)
    dev = metric_BNC.device
    hs, ws = h // sy, w // sx
    if generator is not None:
        pick = torch.randint(sy * sx, (hs, ws, 1), generator=generator, device=generator.device).to(dev)
    else:
        pick = torch.zeros(hs, ws, 1, dtype=torch.long, device=dev)
    is_dst = torch.zeros(hs, ws, sy * sx, dtype=torch.bool, device=dev).scatter_(2, pick, True)
    is_dst = is_dst.view(hs, ws, sy, sx).transpose(1, 2).reshape(hs * sy, ws * sx)
    grid = torch.zeros(h, w, dtype=torch.bool, device=dev)  # leftover rows/cols (not divisible) stay sources
    grid[: hs * sy, : ws * sx] = is_dst
    flat = grid.flatten()
    dst_pos = flat.nonzero().squeeze(1)  # (Nd,)
    src_pos = (~flat).nonzero().squeeze(1)  # (Ns,)
    n_dst, n_src = dst_pos.numel(), src_pos.numel()
    if r > n_src:
        raise ValueError(f"cannot merge {r} of {N} tokens: the {sx}x{sy} partition leaves only {n_src} sources")
    m = metric_BNC / metric_BNC.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    scores = m[:, src_pos] @ m[:, dst_pos].transpose(1, 2)  # (B, Ns, Nd)
    best, best_dst = scores.max(dim=-1)  # (B, Ns)
    order = best.argsort(dim=-1, descending=True)
    merged_src, kept_src = order[:, :r], order[:, r:]  # indices into src_pos
    n_kept = n_src - r
    assign = torch.empty(B, N, dtype=torch.long, device=dev)
    rows_kept = torch.arange(n_kept, device=dev).expand(B, n_kept)
    assign.scatter_(1, src_pos[kept_src], rows_kept)
    assign[:, dst_pos] = n_kept + torch.arange(n_dst, device=dev)
    assign.scatter_(1, src_pos[merged_src], n_kept + best_dst.gather(1, merged_src))
    num_rows = n_kept + n_dst
    counts = torch.zeros(B, num_rows, dtype=metric_BNC.dtype, device=dev).scatter_add_(
        1, assign, torch.ones(B, N, dtype=metric_BNC.dtype, device=dev))
    return Matching(assign, counts.unsqueeze(-1), num_rows)


@dataclass
class _ToMeState:
    config: ToMeConfig
    processors: dict = field(default_factory=dict)  # attention module -> original processor
    ff_modules: list = field(default_factory=list)
    grid: tuple[int, int] | None = None  # top-level token grid of the current call
    cache: dict = field(default_factory=dict)  # key -> (step computed, Matching)
    merged: dict = field(default_factory=dict)  # tokens -> merged rows, for the summary
    calls: int = 0


def _level_grid(st: _ToMeState, n: int) -> tuple[int, int, int] | None:
    """(downsample, h, w) of a block seeing n image tokens, from the call's top-level grid."""
    if st.grid is None:
        return None
    H, W = st.grid
    for d in (1, 2, 4, 8, 16):
        h, w = math.ceil(H / d), math.ceil(W / d)
        if h * w == n:
            return d, h, w
    return None


class _Merger:
    """Per-pipeline logic shared by the processors and hooks of one ToMe application."""

    def __init__(self, pipe, state: _ToMeState):
        self.pipe_state = get_state(pipe)
        self.st = state

    def matching(self, x_BNC: torch.Tensor, block_key: str) -> Matching | None:
        cfg, st = self.st.config, self.st
        n = x_BNC.shape[1]
        lvl = _level_grid(st, n)
        if lvl is None or n < cfg.min_tokens or lvl[0] > cfg.max_downsample:
            return None
        d, h, w = lvl
        r = int(n * cfg.ratio)
        if r == 0:
            return None
        step = max(self.pipe_state.call.step_index, 0)
        key = (n, x_BNC.shape[0]) if cfg.share_matching else (n, x_BNC.shape[0], block_key)
        hit = st.cache.get(key)
        if hit is not None and 0 <= step - hit[0] < cfg.recompute_every:
            return hit[1]
        gen = None
        if cfg.use_rand:
            gen = torch.Generator(device=x_BNC.device.type).manual_seed(cfg.seed * 100003 + step)
        with torch.no_grad():
            m = bipartite_matching(x_BNC.detach(), h, w, cfg.sx, cfg.sy, r, gen)
        st.cache[key] = (step, m)
        st.merged[n] = m.num_rows
        return m


class _ToMeProcessor:
    """Wraps a block's attention processor: merge image tokens, run the original processor, unmerge."""

    def __init__(self, inner, merger: _Merger, key: str, cross: bool):
        self.inner = inner
        self.merger = merger
        self.key = key
        self.cross = cross

    def __getattr__(self, name):  # expose the wrapped processor's attributes
        return getattr(self.__dict__["inner"], name)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        is_joint = encoder_hidden_states is not None and not self.cross and hidden_states.ndim == 3
        if hidden_states.ndim != 3 or (encoder_hidden_states is not None and not self.cross and not is_joint):
            return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        m = self.merger.matching(hidden_states, self.key)
        if m is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        self.merger.st.calls += 1
        out = self.inner(attn, m.merge(hidden_states), encoder_hidden_states, *args, **kwargs)
        if isinstance(out, tuple):  # joint attention: (image, text)
            return (m.unmerge(out[0]),) + tuple(out[1:])
        return m.unmerge(out)


_WRAPPERS: dict[type, type] = {}


def _wrapper_class(inner_cls: type) -> type:
    """A _ToMeProcessor subclass whose ``__call__`` shows the wrapped processor's signature: diffusers'
    Attention filters the keyword arguments it passes (``image_rotary_emb``, ...) by that signature."""
    if inner_cls not in _WRAPPERS:
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return _ToMeProcessor.__call__(self, attn, hidden_states, *args, **kwargs)

        __call__.__signature__ = inspect.signature(inner_cls.__call__)
        _WRAPPERS[inner_cls] = type(f"ToMe{inner_cls.__name__}", (_ToMeProcessor,), {"__call__": __call__})
    return _WRAPPERS[inner_cls]


class _FFHook(HookBase):
    """Merge around a feed-forward module (diffusers hook): tokens in, merged rows through, unmerged out."""

    def __init__(self, merger: _Merger, key: str):
        self.merger, self.key, self.fn_ref = merger, key, None

    def new_forward(self, module, hidden_states, *args, **kwargs):
        m = self.merger.matching(hidden_states, self.key) if hidden_states.ndim == 3 else None
        if m is None:
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        return m.unmerge(self.fn_ref.original_forward(m.merge(hidden_states), *args, **kwargs))


class _SizeHook(HookBase):
    """Records the call's top-level token grid from the denoiser input (B, C, H, W)."""

    def __init__(self, state: _ToMeState, patch: int):
        self.st, self.patch, self.fn_ref = state, patch, None

    def pre_forward(self, module, *args, **kwargs):
        x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            self.st.grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        return args, kwargs


def _targets(pipe, adapter, cfg: ToMeConfig) -> list[tuple[str, torch.nn.Module, str]]:
    """(key, attention module, kind) for every attention ToMe wraps; kind is 'self' or 'cross'."""
    out = []
    for name, blk in adapter.blocks(pipe):
        cls = type(blk).__name__
        if cls == "BasicTransformerBlock":
            if cfg.merge_attn and not blk.only_cross_attention:
                out.append((name, blk.attn1, "self"))
            if cfg.merge_crossattn and getattr(blk, "attn2", None) is not None:
                out.append((name, blk.attn2, "cross"))
        elif cls == "JointTransformerBlock":
            if cfg.merge_attn:
                out.append((name, blk.attn, "self"))
                if getattr(blk, "attn2", None) is not None:
                    out.append((name + ".attn2", blk.attn2, "self"))
        else:
            raise UnsupportedPipelineError(f"ToMe does not support {cls} blocks (in {type(pipe).__name__}) yet; "
                                           f"supported families: {', '.join(_FAMILIES)}")
    return out


def _check(pipe, adapter, cfg: ToMeConfig) -> None:
    if adapter.family not in _FAMILIES:
        raise UnsupportedPipelineError(
            f"ToMe supports {', '.join(_FAMILIES)} pipelines, not {type(pipe).__name__}; for FLUX, Sana and "
            "Lumina2 use a step cache ('blockcache:...') or RAS ('ras:...')")
    targets = _targets(pipe, adapter, cfg)
    if adapter.is_unet:
        depth = {}
        for name, _, _ in targets:  # down_blocks.i / up_blocks.i / mid_block
            parts = name.split(".")
            if parts[0] == "down_blocks":
                depth[name] = 2 ** int(parts[1])
            elif parts[0] == "up_blocks":
                depth[name] = 2 ** (len(pipe.unet.config.block_out_channels) - 1 - int(parts[1]))
            else:
                depth[name] = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        if not any(d <= cfg.max_downsample for d in depth.values()):
            levels = sorted(set(depth.values()))
            raise ValueError(
                f"ToMe with max_downsample={cfg.max_downsample} would merge nothing in this UNet: its attention "
                f"blocks sit at downsample {levels} (SDXL has none at full resolution); use max_downsample={levels[0]}")


def apply_tome(pipe, config: ToMeConfig | None = None):
    """Merge tokens in ``pipe``'s transformer blocks (see :class:`ToMeConfig`). Safe to call twice. Returns ``pipe``."""
    config = config or ToMeConfig()
    if not isinstance(config, ToMeConfig):
        raise TypeError(f"apply_tome expects a ToMeConfig, got {type(config).__name__}")
    st0 = get_state(pipe)
    if st0 is not None and _NAME in st0.applied:
        remove_tome(pipe)
    st = attach(pipe)
    try:
        _check(pipe, st.adapter, config)
    except BaseException:
        detach_if_empty(pipe)
        raise
    tstate = _ToMeState(config)
    merger = _Merger(pipe, tstate)
    denoiser = st.adapter.denoiser(pipe)
    for key, attn, kind in _targets(pipe, st.adapter, config):
        tstate.processors[attn] = attn.processor
        attn.processor = _wrapper_class(type(attn.processor))(attn.processor, merger, key, cross=(kind == "cross"))
    if config.merge_mlp:
        for key, blk in st.adapter.blocks(pipe):
            ff = getattr(blk, "ff", None)
            if ff is not None:
                add_hook(ff, _FFHook(merger, key), _FF_HOOK)
                tstate.ff_modules.append(ff)
    add_hook(denoiser, _SizeHook(tstate, st.adapter.patch_size(pipe)), _SIZE_HOOK)
    st.saved[_NAME] = tstate
    st.applied[_NAME] = config
    st.call_hooks[_NAME] = _on_call
    return pipe


def _on_call(pipe, kwargs: dict) -> dict:
    t: _ToMeState = get_state(pipe).saved[_NAME]
    t.grid, t.cache, t.merged, t.calls = None, {}, {}, 0
    return kwargs


def remove_tome(pipe):
    """Undo :func:`apply_tome`: original processors back, hooks removed. Returns ``pipe``."""
    st = get_state(pipe)
    if st is None or _NAME not in st.applied:
        return pipe
    tstate: _ToMeState = st.saved.pop(_NAME)
    for attn, proc in tstate.processors.items():
        attn.processor = proc
    for ff in tstate.ff_modules:
        remove_hook(ff, _FF_HOOK)
    remove_hook(st.adapter.denoiser(pipe), _SIZE_HOOK)
    del st.applied[_NAME]
    st.call_hooks.pop(_NAME, None)
    detach_if_empty(pipe)
    return pipe


def _summary(pipe) -> dict:
    t: _ToMeState = get_state(pipe).saved[_NAME]
    return {"tokens_to_rows": {int(n): int(m) for n, m in t.merged.items()}, "merged_calls": t.calls}


def _parse(args: str | None) -> ToMeConfig:
    if not args:
        return ToMeConfig()
    head, *opts = [a.strip() for a in args.split(",")]
    ratio = PRESETS[head] if head in PRESETS else float(head)
    kw: dict = {}
    for opt in opts:
        k, _, v = opt.partition("=")
        if k not in ToMeConfig.__dataclass_fields__ or k == "ratio":
            raise ValueError(f"unknown ToMe option {k!r}; options: "
                             f"{', '.join(f for f in ToMeConfig.__dataclass_fields__ if f != 'ratio')}")
        typ = type(getattr(ToMeConfig(), k))
        kw[k] = (v.lower() in ("1", "true", "yes")) if typ is bool else typ(v)
    return ToMeConfig(ratio=ratio, **kw)


def _to_string(c: ToMeConfig) -> str:
    default = ToMeConfig()
    extra = [f"{k}={getattr(c, k)}" for k in ToMeConfig.__dataclass_fields__ if k != "ratio" and getattr(c, k) != getattr(default, k)]
    return "tome:" + ",".join([f"{c.ratio:g}"] + extra)


register_technique(Technique(
    name=_NAME, config_cls=ToMeConfig, parse=_parse, apply=apply_tome, remove=remove_tome, to_string=_to_string,
    check=_check, families=_FAMILIES, summary=_summary,
    help="token merging around attention (UNet, PixArt, DiT, SD3); 'tome:0.5' or 'tome:0.5,max_downsample=2'",
    example="tome:0.5",
))


# --- anchor: tomesd (extra "anchors"), so `fastgen bench` can compare against it in the same run ----------

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


def apply_tomesd(pipe, config: TomesdConfig | None = None):
    """Apply the tomesd anchor to a SD/SDXL pipeline (for side-by-side benchmarks). Returns ``pipe``."""
    from ..errors import require_extra

    config = config or TomesdConfig()
    tomesd = require_extra("tomesd", "anchors", "the tomesd anchor")
    st = attach(pipe)
    if not st.adapter.is_unet:
        detach_if_empty(pipe)
        raise UnsupportedPipelineError(f"tomesd only patches SD/SDXL UNets, not {type(pipe).__name__}; use 'tome:...'")
    tomesd.apply_patch(pipe, ratio=config.ratio, max_downsample=config.max_downsample)
    st.applied["tomesd"] = config
    return pipe


def remove_tomesd(pipe):
    """Remove the tomesd anchor. Returns ``pipe``."""
    st = get_state(pipe)
    if st is not None and "tomesd" in st.applied:
        import tomesd

        tomesd.remove_patch(pipe)
        del st.applied["tomesd"]
        detach_if_empty(pipe)
    return pipe


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
    name="tomesd", config_cls=TomesdConfig, parse=_parse_tomesd, apply=apply_tomesd, remove=remove_tomesd,
    to_string=lambda c: f"tomesd:{c.ratio:g}" + (f",max_downsample={c.max_downsample}" if c.max_downsample != 1 else ""),
    families=("sd", "sdxl"), help="anchor: tomesd 0.1.3 as published (extra 'anchors')", example="tomesd:0.5",
))
