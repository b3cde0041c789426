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
from ..api import apply_technique, remove_technique
from ..hooks import HookBase, HookSet, get_state
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
    hooks: HookSet = field(default_factory=HookSet)
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


def _install(pipe, st, config: ToMeConfig) -> _ToMeState:
    tstate = _ToMeState(config)
    merger = _Merger(pipe, tstate)
    for key, attn, kind in _targets(pipe, st.adapter, config):
        tstate.processors[attn] = attn.processor
        attn.processor = _wrapper_class(type(attn.processor))(attn.processor, merger, key, cross=(kind == "cross"))
    if config.merge_mlp:
        for key, blk in st.adapter.blocks(pipe):
            ff = getattr(blk, "ff", None)
            if ff is not None:
                tstate.hooks.add(ff, _FFHook(merger, key), _FF_HOOK)
    tstate.hooks.add(st.adapter.denoiser(pipe), _SizeHook(tstate, st.adapter.patch_size(pipe)), _SIZE_HOOK)
    return tstate


def _uninstall(pipe, st, tstate: _ToMeState) -> None:
    for attn, proc in tstate.processors.items():
        attn.processor = proc
    tstate.hooks.remove_all()


def _on_call(pipe, t: _ToMeState, kwargs: dict) -> dict:
    t.grid, t.cache, t.merged, t.calls = None, {}, {}, 0
    return kwargs


def _summary(pipe, t: _ToMeState) -> dict:
    return {"tokens_to_rows": {int(n): int(m) for n, m in t.merged.items()}, "merged_calls": t.calls}


def apply_tome(pipe, config: ToMeConfig | None = None):
    """Merge tokens in ``pipe``'s transformer blocks (see :class:`ToMeConfig`). Safe to call twice. Returns ``pipe``."""
    return apply_technique(pipe, _NAME, config)


def remove_tome(pipe):
    """Undo :func:`apply_tome`: original processors back, hooks removed. Returns ``pipe``."""
    return remove_technique(pipe, _NAME)


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
    name=_NAME, config_cls=ToMeConfig, parse=_parse, to_string=_to_string, install=_install, uninstall=_uninstall,
    on_call=_on_call, summary=_summary, check=_check, families=_FAMILIES,
    family_hint="For FLUX, Sana and Lumina2 use a step cache ('blockcache:...') or RAS ('ras:...').",
    help="token merging around attention (UNet, PixArt, DiT, SD3); 'tome:0.5' or 'tome:0.5,max_downsample=2'",
    example="tome:0.5",
))
