"""Acceleration of next-scale AR pipelines (:class:`~fastgen.ar.pipeline.VARPipeline`), pluggable through
``fastgen.accelerate``.

``VARPipeline`` is not a diffusers pipeline; fastgen sees it through the adapter family ``"var"`` (its
denoiser is ``pipe.var``). Each technique is a typed config, an ``install``/``uninstall`` pair the core
runs (:mod:`fastgen.api`) and a recipe string. Except ``var-attn`` (which sets the attention kernel of ``pipe.var``'s attention modules), none
of them touches a module: they add keyword arguments to every pipeline call (``prune=``,
``cfg_share=``, ``refiner=``/``draft_scales=``), which the pipeline turns into fresh per-call hooks of
:meth:`fastgen.ar.var.VAR.sample`'s next-scale loop (:func:`scale_hooks`: :class:`FastVARHooks`,
:class:`CFGShareHooks`, :class:`CoDeHooks`, on the interface of :mod:`fastgen.ar.scale_hooks`), so
``fastgen.remove`` restores the pipeline bit-exactly by construction and every call starts clean.
``fastgen.summary(pipe)["last_call"]`` reports what ran at every scale (tokens computed, rows, model).

Techniques (measured speed and quality on the zoo's ``digits-var`` in the README):

``var-attn:sdpa|math|xformers`` (:class:`VARAttnConfig`)
    The attention kernel: PyTorch SDPA (default), an explicit softmax (``math``, the reference) or
    xformers' memory-efficient attention (the ``gpu`` extra; a clear error when it is missing).

``fastvar:RATIO[,last=N,metric=hf|mean,fill=cache|logits|zero]`` (:class:`FastVARConfig`)
    FastVAR-style token pruning (Guo et al., "FastVAR: Linear Visual Autoregressive Modeling via Cached
    Token Pruning", ICCV 2025). At the last ``N`` scales only the top ``(1 - RATIO)`` of the tokens,
    ranked by a cheap score of the scale's input (:func:`prune_scores`; default
    ``"hf"``: the energy the previous, coarser grid cannot represent), run through the transformer
    (attention, MLP, K/V cache: everything scales with the kept tokens). The pruned positions are filled
    from a cache of the previous scale (``fill``): its final hidden states bilinearly upsampled and put
    through the head (``"cache"``, FastVAR's cached token restoration), its raw logits nearest-upsampled
    (``"logits"``), or the codebook's zero-closest code, i.e. "no residual here" (``"zero"``). Ratio 0 is
    the baseline, bit-exactly.

``code:draft=N[,refiner=PATH]`` (:class:`CoDeConfig`)
    CoDe (Chen et al., "Collaborative Decoding Makes Visual Auto-Regressive Modeling Efficient", CVPR
    2025), training-free version: ``pipe.var`` drafts the first ``N`` scales, a smaller VAR on the same
    VQ-VAE ("refiner") builds its own KV cache from the drafted scales in one block-causal pass and
    generates the rest. Default refiner: ``var_small/`` in the pipeline's folder (the zoo's
    ``digits-var`` ships one); else a path (a VAR folder or a VARPipeline folder) or a :class:`VAR`.

``cfg-share:start=S[,every=K,mode=drop|reuse]`` (:class:`CFGShareConfig`)
    Classifier-free-guidance pair sharing at late scales (the unconditional-branch skipping of SkipVAR
    / LiteVAR). From scale ``S`` on (negative: counted from the end; ``cfg-share:2`` = the last two) the
    unconditional half of the batch runs only at every ``K``-th scale (``K = 0``: never), halving the rows
    at the other scales. At a skipped scale the guided logits are just ``cond`` (``"drop"``, default) or
    ``cond + t * delta`` where ``delta`` is the last computed ``cond - uncond`` logits, nearest-upsampled
    to the scale (``"reuse"``); the unconditional K/V of a skipped scale are copies of the conditional ones
    (used only if a later scale runs the unconditional branch again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import require_extra
from ..api import apply_technique, remove_technique
from ..hooks import get_state
from ..registry import Technique, register_technique
from ..utils.logging import get_logger
from .checkpoints import load_module
from .scale_hooks import ScaleHooks, ScaleStep
from .var import VAR, SelfAttention

logger = get_logger(__name__)

__all__ = ["VARAttnConfig", "FastVARConfig", "CoDeConfig", "CFGShareConfig", "apply_var_attn", "remove_var_attn",
           "apply_fastvar", "remove_fastvar", "apply_code", "remove_code", "apply_cfg_share", "remove_cfg_share",
           "FASTVAR_PRESETS", "load_refiner", "FastVARHooks", "CFGShareHooks", "CoDeHooks", "scale_hooks",
           "check_refiner", "prune_scores"]

_FAMILY = ("var",)
_STATS_KEY = "var"


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------

_BACKENDS = ("sdpa", "math", "xformers")
_METRICS = ("hf", "mean")
_FILLS = ("cache", "logits", "zero")
_MODES = ("reuse", "drop")


@dataclass(frozen=True)
class VARAttnConfig:
    """Attention kernel of the VAR transformer.

    Attributes:
        backend: ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention``, default: picks flash /
            memory-efficient / math kernels by itself), ``"math"`` (explicit softmax, the slow reference)
            or ``"xformers"`` (``xformers.ops.memory_efficient_attention``; ``pip install 'fastgen[gpu]'``).
    """

    backend: str = "sdpa"

    def __post_init__(self):
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, got {self.backend!r}")


@dataclass(frozen=True)
class FastVARConfig:
    """FastVAR-style token pruning at the largest scales (see the module docstring).

    Important args:
        ratio: fraction of the tokens of a pruned scale that are *not* run through the transformer (default
            0.5). The cost of a pruned scale is ~``1 - ratio`` of a dense one (attention a bit less), so with
            the last two scales pruned at 0.5 the ideal speed-up of those scales is 2x. 0 = baseline.
            Range 0-0.9.
        last: number of final scales pruned (default 2; the last two hold 62 % of the tokens at 256 px).

    Args to tinker with:
        ratios: per-scale ratios for the last ``len(ratios)`` scales (e.g. ``(0.4, 0.5)``), overriding
            ``ratio`` and ``last``. Default None.
        metric: token ranking, ``"hf"`` (default: high-frequency energy of the scale's input, what the
            previous grid cannot represent) or ``"mean"`` (FastVAR's distance to the scale's mean token).
        fill: what the pruned positions get: ``"cache"`` (default; the previous scale's final hidden states,
            bilinearly upsampled, through the head), ``"logits"`` (the previous scale's logits,
            nearest-upsampled) or ``"zero"`` (the codebook entry closest to zero: no residual).
    """

    ratio: float = 0.5
    last: int = 2
    ratios: tuple | None = None
    metric: str = "hf"
    fill: str = "cache"

    def __post_init__(self):
        def ok(r: Any) -> bool:
            return isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 <= float(r) < 1.0

        if not ok(self.ratio):
            raise ValueError(f"ratio must be in [0, 1) (fraction of tokens pruned), got {self.ratio!r}")
        if not isinstance(self.last, int) or isinstance(self.last, bool) or self.last < 1:
            raise ValueError(f"last must be a positive integer (number of final scales pruned), got {self.last!r}")
        if self.ratios is not None:
            rs = tuple(self.ratios)
            if not rs or not all(ok(r) for r in rs):
                raise ValueError(f"ratios must be a non-empty sequence of values in [0, 1), got {self.ratios!r}")
            object.__setattr__(self, "ratios", tuple(float(r) for r in rs))
        if self.metric not in _METRICS:
            raise ValueError(f"metric must be one of {', '.join(_METRICS)}, got {self.metric!r}")
        if self.fill not in _FILLS:
            raise ValueError(f"fill must be one of {', '.join(_FILLS)}, got {self.fill!r}")

    def prune_ratio(self, si: int, K: int) -> float:
        """Fraction of the tokens pruned at scale ``si`` of ``K`` (0 = dense)."""
        if self.ratios is not None:
            j = si - (K - len(self.ratios))
            return self.ratios[j] if j >= 0 else 0.0
        return float(self.ratio) if si >= K - self.last else 0.0

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "FastVARConfig":
        """``"slow"`` (ratio 0.25), ``"medium"`` (0.5) or ``"fast"`` (0.75), with field overrides."""
        if name not in FASTVAR_PRESETS:
            raise ValueError(f"unknown FastVAR preset {name!r}; choose one of {', '.join(FASTVAR_PRESETS)}")
        return replace(FASTVAR_PRESETS[name], **overrides)


FASTVAR_PRESETS: dict[str, FastVARConfig] = {
    "slow": FastVARConfig(ratio=0.25), "medium": FastVARConfig(ratio=0.5), "fast": FastVARConfig(ratio=0.75),
}


class _ModuleRef:
    """Holds a module inside a frozen config without copying it (``dataclasses.asdict`` deep-copies)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __deepcopy__(self, memo: dict) -> "_ModuleRef":
        return self

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.module.parameters())
        return f"<{type(self.module).__name__} {n / 1e6:.2f}M params>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ModuleRef) and other.module is self.module

    def __hash__(self) -> int:
        return id(self.module)


@dataclass(frozen=True)
class CoDeConfig:
    """CoDe draft/refine split (see the module docstring).

    Attributes:
        draft: number of initial scales drafted by ``pipe.var`` (default 4 of the 6 ``digits-var`` scales;
            CoDe's 256 px settings are 6-8 of 10). The refiner generates scales ``draft .. K-1``; the larger
            ``draft``, the closer to the big model and the smaller the saving. Range 1..K-1.
        refiner: the small model: ``None`` (``var_small/`` in the pipeline's folder), a path to a VAR folder
            (``config.json`` + ``model.safetensors``) or to a VARPipeline folder, or a :class:`VAR`.
    """

    draft: int = 4
    refiner: Any = field(default=None)

    def __post_init__(self):
        if not isinstance(self.draft, int) or isinstance(self.draft, bool) or self.draft < 1:
            raise ValueError(f"draft must be a positive integer (scales drafted by the big model), got {self.draft!r}")
        r = self.refiner
        if isinstance(r, torch.nn.Module):
            if not isinstance(r, VAR):
                raise ValueError(f"refiner must be a fastgen.ar.VAR, got {type(r).__name__}")
            object.__setattr__(self, "refiner", _ModuleRef(r))
        elif r is not None and not isinstance(r, (str, Path, _ModuleRef)):
            raise ValueError(f"refiner must be None, a path or a VAR, got {type(r).__name__}")
        elif isinstance(r, Path):
            object.__setattr__(self, "refiner", str(r))


@dataclass(frozen=True)
class CFGShareConfig:
    """CFG-pair sharing at late scales (see the module docstring).

    Attributes:
        start: first scale whose unconditional branch may be skipped (default -2: the last two scales;
            negative values count from the end). Guidance matters most at the coarse scales (they fix the
            class), least at the fine ones, and the fine ones cost most.
        every: within the shared scales, run the unconditional branch at every ``every``-th one (the first
            of them included); 0 (default) = never. Each skipped scale saves half of that scale's rows.
        mode: ``"drop"`` (default: the conditional logits only, i.e. no guidance there) or ``"reuse"``
            (``cond + t * delta``, ``delta`` = the last computed ``cond - uncond`` logits, nearest-upsampled).
            On ``digits-var`` (last two scales shared, cfg 2, 500 samples) ``"drop"`` keeps accuracy and
            Fréchet distance at the baseline's (0.998 / 2.11 vs 0.998 / 2.07) while ``"reuse"`` loses
            (0.988 / 3.57): a guidance direction computed at a coarser scale does not transfer.
    """

    start: int = -2
    every: int = 0
    mode: str = "drop"

    def __post_init__(self):
        if not isinstance(self.start, int) or isinstance(self.start, bool):
            raise ValueError(f"start must be an integer scale index (negative: from the end), got {self.start!r}")
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 0:
            raise ValueError(f"every must be an integer >= 0 (0 = never run the unconditional branch), got {self.every!r}")
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {self.mode!r}")

    def first_shared(self, K: int) -> int:
        return self.start if self.start >= 0 else K + self.start

    def run_uncond(self, si: int, K: int) -> bool:
        """Whether scale ``si`` of ``K`` runs the unconditional branch."""
        s = self.first_shared(K)
        if si < s:
            return True
        return self.every > 0 and (si - s) % self.every == 0


# --------------------------------------------------------------------------------------------------
# The techniques as per-scale hooks of VAR.sample (fastgen.ar.scale_hooks)
# --------------------------------------------------------------------------------------------------


def prune_scores(in_BChw: torch.Tensor, prev_pn: int, metric: str = "hf") -> torch.Tensor:
    """Per-token score ``B x pn^2`` of a scale's continuous input ``in_BChw`` (the running reconstruction
    downsampled to the scale) used to rank tokens for FastVAR-style pruning (high = keep):

    * ``"hf"``: high-frequency energy ``||x - up(area(x, prev_pn))||^2``, what the previous, coarser grid
      cannot represent (bilinear upsampling);
    * ``"mean"``: FastVAR's ``||x - mean(x)||^2`` (deviation from the scale's mean token).
    """
    if metric == "hf":
        coarse = F.interpolate(in_BChw, size=(prev_pn, prev_pn), mode="area")
        up = F.interpolate(coarse, size=in_BChw.shape[-2:], mode="bilinear", align_corners=False)
        d = in_BChw - up
    elif metric == "mean":
        d = in_BChw - in_BChw.mean(dim=(2, 3), keepdim=True)
    else:
        raise ValueError(f"unknown pruning metric {metric!r}; use 'hf' or 'mean'")
    return d.float().square().sum(1).flatten(1)


def _grid_resize(x_RnC: torch.Tensor, pn: int, mode: str) -> torch.Tensor:
    """Resize a flattened ``p x p`` token grid ``R x p^2 x C`` to ``R x pn^2 x C``."""
    R, n, C = x_RnC.shape
    p = int(round(math.sqrt(n)))
    g = x_RnC.transpose(1, 2).reshape(R, C, p, p)
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(g, size=(pn, pn), mode=mode, **kw).flatten(2).transpose(1, 2)


def _match_rows(x: torch.Tensor, R: int) -> torch.Tensor:
    """``x`` with ``R`` rows: the first ``R`` (conditional) rows, or the rows repeated (B -> 2B)."""
    if x.shape[0] == R:
        return x
    if x.shape[0] > R:
        return x[:R]
    return x.repeat(R // x.shape[0], *([1] * (x.ndim - 1)))


class FastVARHooks(ScaleHooks):
    """FastVAR pruning (:class:`FastVARConfig`) in ``VAR.sample``: ``plan`` keeps the top-ranked tokens of a
    pruned scale (:func:`prune_scores`), ``full_grid`` fills the others from the previous scale
    (``config.fill``), ``on_logits`` remembers this scale's hidden states and logits for the next one, and
    ``on_tokens`` puts the zero code at the pruned positions with ``fill="zero"``."""

    def __init__(self, config: FastVARConfig):
        self.config = config
        self._h: torch.Tensor | None = None  # previous scale's final hidden states (R x n x C), or None
        self._raw: torch.Tensor | None = None  # previous scale's logits (R x n x V)
        self._keep: torch.Tensor | None = None  # the tokens kept at the current scale
        self._quant: Any = None

    def begin(self, var, vae, B: int) -> None:
        self._h = self._raw = self._keep = None
        self._quant = vae.quantize

    def plan(self, step: ScaleStep) -> None:
        if step.handed_over:
            self._h = None  # hidden states of the previous model mean nothing to the new one
        self._keep = self._select(step) if step.si > 0 else None
        if self._keep is not None:
            step.keep_Bk = self._keep

    def _select(self, step: ScaleStep) -> torch.Tensor | None:
        """Indices ``B x k`` (sorted) of the tokens to compute at ``step``, or ``None`` to run it dense."""
        c = self.config
        ratio = float(c.prune_ratio(step.si, step.K))
        if ratio <= 0 or step.in_BChw is None:
            return None
        n = step.pn ** 2
        k = max(1, int(round(n * (1.0 - ratio))))
        if k >= n:
            return None
        if (c.fill == "cache" and self._h is None) or (c.fill == "logits" and self._raw is None):
            return None  # nothing to fill from (e.g. right after a CoDe model switch)
        scores_Bn = prune_scores(step.in_BChw, step.model.patch_nums[step.si - 1], c.metric)
        return scores_Bn.topk(k, dim=1).indices.sort(dim=1).values

    def full_grid(self, step: ScaleStep, h_RkC: torch.Tensor, cond_RD: torch.Tensor
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
        keep_Bk, pn, fill = step.keep_Bk, step.pn, self.config.fill
        B, k = keep_Bk.shape
        R, n = h_RkC.shape[0], pn * pn
        keep_Rk = keep_Bk.repeat(R // B, 1)
        if fill == "cache":  # previous scale's final hidden states, bilinearly upsampled, under the kept ones
            h_RnC = _grid_resize(_match_rows(self._h, R), pn, "bilinear").to(h_RkC.dtype)
            h_RnC = h_RnC.scatter(1, keep_Rk.unsqueeze(-1).expand(-1, -1, h_RkC.shape[-1]), h_RkC)
            return h_RnC, step.model.get_logits(h_RnC, cond_RD)
        logits_RkV = step.model.get_logits(h_RkC, cond_RD)
        V = logits_RkV.shape[-1]
        if fill == "logits":  # previous scale's raw logits, nearest-upsampled
            base_RnV = _grid_resize(_match_rows(self._raw, R), pn, "nearest").to(logits_RkV.dtype)
        elif fill == "zero":  # placeholder: the sampled tokens there are replaced by the zero code
            base_RnV = logits_RkV.new_zeros(R, n, V)
        else:
            raise ValueError(f"unknown pruning fill {fill!r}; use 'cache', 'logits' or 'zero'")
        return None, base_RnV.scatter(1, keep_Rk.unsqueeze(-1).expand(-1, -1, V), logits_RkV)

    def on_logits(self, step: ScaleStep, h_RnC: torch.Tensor | None, logits_RnV: torch.Tensor) -> None:
        self._h, self._raw = h_RnC, logits_RnV
        return None

    def on_tokens(self, step: ScaleStep, idx_Bl: torch.Tensor) -> torch.Tensor:
        if self._keep is None or self.config.fill != "zero":
            return idx_Bl
        # the code closest to the zero vector (a "no change" residual) at every pruned position
        zero = int(self._quant.embedding.weight.detach().float().norm(dim=1).argmin())
        kept_Bl = torch.zeros_like(idx_Bl, dtype=torch.bool).scatter_(1, self._keep, True)
        return torch.where(kept_Bl, idx_Bl, torch.full_like(idx_Bl, zero))


class CFGShareHooks(ScaleHooks):
    """CFG-pair sharing (:class:`CFGShareConfig`) in ``VAR.sample``: ``plan`` drops the unconditional rows
    where ``config.run_uncond`` is False (their K/V become copies of the conditional ones, see
    :class:`fastgen.ar.scale_hooks.CondRowsCache`); ``on_logits`` remembers ``cond - uncond`` where both ran
    and guides the other scales (``config.mode``)."""

    def __init__(self, config: CFGShareConfig):
        self.config = config
        self._delta: tuple[torch.Tensor, int] | None = None  # last computed cond - uncond (B x n x V) and its pn

    def begin(self, var, vae, B: int) -> None:
        self._delta = None

    def plan(self, step: ScaleStep) -> None:
        if not self.config.run_uncond(step.si, step.K):
            step.uncond = False

    def on_logits(self, step: ScaleStep, h_RnC: torch.Tensor | None, logits_RnV: torch.Tensor) -> torch.Tensor | None:
        B, pn, t = step.B, step.pn, step.t
        if step.uncond:  # the standard CFG runs; remember its direction
            self._delta = (logits_RnV[:B] - logits_RnV[B:], pn)
            return None
        cond_BnV = logits_RnV
        if self.config.mode == "drop" or self._delta is None or t == 0:
            return cond_BnV
        delta_BpV, p_prev = self._delta
        if p_prev != pn:
            delta_BpV = _grid_resize(delta_BpV, pn, "nearest")
        return cond_BnV + t * delta_BpV.to(cond_BnV.dtype)


def check_refiner(drafter: VAR, refiner: VAR, draft_scales: int | None) -> None:
    """Raise ``ValueError`` unless ``refiner`` can take over from ``drafter`` after ``draft_scales`` scales
    (same scales, vocabulary, ``Cvae``, classes and device)."""
    K = len(drafter.patch_nums)
    if draft_scales is None or not 0 < int(draft_scales) < K:
        raise ValueError(f"CoDe needs draft_scales in [1, {K - 1}] (the scales the main model drafts), "
                         f"got {draft_scales}")
    mine = (drafter.patch_nums, drafter.V, drafter.Cvae, drafter.num_classes)
    theirs = (refiner.patch_nums, refiner.V, refiner.Cvae, refiner.num_classes)
    if mine != theirs:
        raise ValueError(f"the CoDe refiner must share patch_nums, vocabulary, Cvae and classes with the drafter: "
                         f"drafter {mine}, refiner {theirs}")
    if refiner.device != drafter.device:
        raise ValueError(f"the CoDe refiner is on {refiner.device}, the drafter on {drafter.device}")


class CoDeHooks(ScaleHooks):
    """CoDe draft/refine in ``VAR.sample``: the sampled model drafts scales ``0 .. draft_scales - 1``, then
    ``handover`` gives the rest to ``refiner``, which builds its own KV cache from the drafted scales."""

    def __init__(self, refiner: VAR, draft_scales: int | None):
        self.refiner, self.draft_scales = refiner, draft_scales

    def begin(self, var, vae, B: int) -> None:
        check_refiner(var, self.refiner, self.draft_scales)

    def handover(self, si: int) -> VAR | None:
        return self.refiner if si == self.draft_scales else None


def scale_hooks(prune: FastVARConfig | None = None, cfg_share: CFGShareConfig | None = None,
                refiner: VAR | None = None, draft_scales: int | None = None) -> list[ScaleHooks]:
    """Fresh per-call hooks for ``VAR.sample(hooks=...)`` from the acceleration keyword arguments of a
    :class:`~fastgen.ar.pipeline.VARPipeline` call (what the techniques' ``on_call`` adds)."""
    hooks: list[ScaleHooks] = []
    if refiner is not None:
        hooks.append(CoDeHooks(refiner, draft_scales))
    if cfg_share is not None:
        hooks.append(CFGShareHooks(cfg_share))
    if prune is not None:
        hooks.append(FastVARHooks(prune))
    return hooks


# --------------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------------


_FAMILY_HINT = "It works on next-scale AR pipelines (fastgen.ar.VARPipeline); for diffusion pipelines use 'ras', 'tome' or a step cache."


def _stats(pipe) -> dict:
    return get_state(pipe).call.records.setdefault(_STATS_KEY, {})


def _count_scale(pipe):
    st = get_state(pipe)

    def cb(si: int, K: int) -> None:
        st.call.on_denoiser_call(si)  # one "step" per scale: summary's steps_run counts scales

    return cb


def _call_kwargs(pipe, kwargs: dict, extra: dict) -> dict:
    """A call's keyword arguments plus ``extra`` (what one technique adds), the shared per-call stats dict
    and the scale counter."""
    out = dict(kwargs)
    out.update(extra)
    out.setdefault("stats", _stats(pipe))
    if "callback_on_scale_end" not in out or out["callback_on_scale_end"] is None:
        out["callback_on_scale_end"] = _count_scale(pipe)
    return out


def _install_config(pipe, st, config) -> Any:
    return config  # nothing to patch: the per-call hook passes the config to VAR.sample


def _uninstall_nothing(pipe, st, handle) -> None:
    pass


def _scales(pipe) -> list[dict]:
    st = get_state(pipe)
    rec = (st.last_call or {}).get(_STATS_KEY) or {}
    return rec.get("scales", [])


def _kv(args: str | None) -> tuple[list[str], dict[str, str]]:
    pos, kw = [], {}
    for part in (args or "").split(","):
        part = part.strip()
        if not part:
            continue
        k, eq, v = part.partition("=")
        if eq:
            kw[k.strip().lower()] = v.strip()
        else:
            pos.append(part)
    return pos, kw


def _int(v: str, what: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {v!r}") from None


# --------------------------------------------------------------------------------------------------
# var-attn
# --------------------------------------------------------------------------------------------------

_ATTN = "var-attn"


def _attn_check(pipe, adapter, config: VARAttnConfig) -> None:
    if config.backend == "xformers":
        require_extra("xformers.ops", "gpu", "the xformers attention backend (var-attn:xformers)")


def _attn_install(pipe, st, config: VARAttnConfig) -> tuple:
    mods = [m for m in pipe.var.modules() if isinstance(m, SelfAttention)]
    saved = [(m, m.backend) for m in mods]
    for m in mods:
        m.backend = config.backend
    return config, saved


def _attn_uninstall(pipe, st, handle: tuple) -> None:
    for m, old in handle[1]:
        m.backend = old


def apply_var_attn(pipe, config: VARAttnConfig | None = None):
    """Set the attention kernel of every attention module of ``pipe.var``. Returns ``pipe``."""
    return apply_technique(pipe, _ATTN, config)


def remove_var_attn(pipe):
    """Restore the attention kernels ``apply_var_attn`` replaced. Returns ``pipe``."""
    return remove_technique(pipe, _ATTN)


def _attn_summary(pipe, handle: tuple) -> dict:
    return {"backend": handle[0].backend, "attention_modules": len(handle[1])}


register_technique(Technique(
    name=_ATTN, config_cls=VARAttnConfig, parse=lambda a: VARAttnConfig((a or "sdpa").strip().lower()),
    install=_attn_install, uninstall=_attn_uninstall, on_call=lambda p, h, kw: _call_kwargs(p, kw, {}),
    to_string=lambda c: f"{_ATTN}:{c.backend}", check=_attn_check, families=_FAMILY, family_hint=_FAMILY_HINT,
    summary=_attn_summary,
    help="attention kernel of a VAR transformer: sdpa (default), math or xformers (extra 'gpu')",
    example="var-attn:sdpa",
))


# --------------------------------------------------------------------------------------------------
# fastvar
# --------------------------------------------------------------------------------------------------

_FASTVAR = "fastvar"


def apply_fastvar(pipe, config: FastVARConfig | None = None):
    """Prune tokens at the last scales of every call of ``pipe`` (see :class:`FastVARConfig`). Returns ``pipe``."""
    return apply_technique(pipe, _FASTVAR, config)


def remove_fastvar(pipe):
    """Undo :func:`apply_fastvar` (bit-exact). Returns ``pipe``."""
    return remove_technique(pipe, _FASTVAR)


def _fastvar_summary(pipe, config: FastVARConfig) -> dict:
    sc = _scales(pipe)
    pruned = [s for s in sc if s["tokens"] < s["of"]]
    return {"pruned_scales": [s["scale"] for s in pruned],
            "kept_tokens": {s["scale"]: f"{s['tokens']}/{s['of']}" for s in pruned}}


def _fastvar_parse(args: str | None) -> FastVARConfig:
    pos, kw = _kv(args)
    base = FastVARConfig()
    out: dict[str, Any] = {}
    if pos:
        first = pos[0].lower()
        if first in FASTVAR_PRESETS:
            base = FASTVAR_PRESETS[first]
        else:
            try:
                out["ratio"] = float(first)
            except ValueError:
                raise ValueError(f"expected a pruning ratio in [0, 1) or a preset ({', '.join(FASTVAR_PRESETS)}), "
                                 f"got {pos[0]!r}") from None
        if len(pos) > 1:
            raise ValueError(f"unexpected arguments {pos[1:]}; use key=value")
    for k, v in kw.items():
        if k == "ratio":
            out["ratio"] = float(v)
        elif k == "last":
            out["last"] = _int(v, "last")
        elif k == "ratios":
            out["ratios"] = tuple(float(x) for x in v.split("/") if x)
        elif k in ("metric", "fill"):
            out[k] = v.lower()
        else:
            raise ValueError(f"unknown fastvar option {k!r}; keys: ratio, last, ratios, metric, fill")
    return replace(base, **out)


def _fastvar_string(c: FastVARConfig) -> str:
    d = FastVARConfig()
    parts = [f"{c.ratio:g}"]
    if c.last != d.last:
        parts.append(f"last={c.last}")
    if c.ratios is not None:
        parts.append("ratios=" + "/".join(f"{r:g}" for r in c.ratios))
    if c.metric != d.metric:
        parts.append(f"metric={c.metric}")
    if c.fill != d.fill:
        parts.append(f"fill={c.fill}")
    return f"{_FASTVAR}:" + ",".join(parts)


register_technique(Technique(
    name=_FASTVAR, config_cls=FastVARConfig, parse=_fastvar_parse, to_string=_fastvar_string,
    install=_install_config, uninstall=_uninstall_nothing, on_call=lambda p, c, kw: _call_kwargs(p, kw, {"prune": c}),
    families=_FAMILY, family_hint=_FAMILY_HINT, summary=_fastvar_summary,
    help="FastVAR token pruning at the last scales of a VAR, pruned positions filled from the previous scale",
    example="fastvar:0.5",
))


# --------------------------------------------------------------------------------------------------
# code (CoDe draft / refine)
# --------------------------------------------------------------------------------------------------

_CODE = "code"


def load_refiner(spec: Any, pipe=None) -> VAR:
    """Resolve :attr:`CoDeConfig.refiner` to a :class:`VAR` on ``pipe``'s device and dtype."""
    if isinstance(spec, _ModuleRef):
        return spec.module
    if isinstance(spec, VAR):
        return spec
    if spec is None:
        root = getattr(pipe, "name_or_path", None)
        cand = Path(root) / "var_small" if root else None
        if cand is None or not (cand / "config.json").is_file():
            raise ValueError(
                "CoDe needs a refiner: pass CoDeConfig(refiner=PATH_OR_VAR) or 'code:draft=N,refiner=PATH' "
                f"(the pipeline's folder {root!r} has no var_small/ sub-folder)")
        spec = cand
    path = Path(spec)
    if (path / "model_index.json").is_file():
        path = path / "var"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"CoDe refiner {spec!s}: no VAR folder (config.json + model.safetensors) there")
    var = load_module(path)
    if not isinstance(var, VAR):
        raise ValueError(f"CoDe refiner {spec!s} holds a {type(var).__name__}, not a VAR")
    if pipe is not None:
        var.to(device=pipe.var.device, dtype=pipe.dtype)
    return var


def _code_check(pipe, adapter, config: CoDeConfig) -> None:
    K = len(pipe.var.patch_nums)
    if not 0 < config.draft < K:
        raise ValueError(f"code: draft must lie in [1, {K - 1}] for this {K}-scale model, got {config.draft}")


def _code_install(pipe, st, config: CoDeConfig) -> tuple:
    refiner = load_refiner(config.refiner, pipe)
    check_refiner(pipe.var, refiner, config.draft)
    return config, refiner


def _code_on_call(pipe, handle: tuple, kwargs: dict) -> dict:
    config, refiner = handle
    return _call_kwargs(pipe, kwargs, {"refiner": refiner, "draft_scales": config.draft})


def apply_code(pipe, config: CoDeConfig | None = None):
    """Let ``pipe.var`` draft the first ``config.draft`` scales and a small refiner finish every call.
    Returns ``pipe``."""
    return apply_technique(pipe, _CODE, config)


def remove_code(pipe):
    """Undo :func:`apply_code` (bit-exact). Returns ``pipe``."""
    return remove_technique(pipe, _CODE)


def _code_summary(pipe, handle: tuple) -> dict:
    ref = handle[1]
    sc = _scales(pipe)
    return {"draft_scales": [s["scale"] for s in sc if s["model"] == "main"],
            "refined_scales": [s["scale"] for s in sc if s["model"] == "refiner"],
            "refiner_params_m": round(sum(p.numel() for p in ref.parameters()) / 1e6, 3),
            "main_params_m": round(sum(p.numel() for p in pipe.var.parameters()) / 1e6, 3)}


def _code_parse(args: str | None) -> CoDeConfig:
    pos, kw = _kv(args)
    out: dict[str, Any] = {}
    if pos:
        out["draft"] = _int(pos[0], "draft")
    for k, v in kw.items():
        if k == "draft":
            out["draft"] = _int(v, "draft")
        elif k == "refiner":
            out["refiner"] = v
        else:
            raise ValueError(f"unknown code option {k!r}; keys: draft, refiner")
    return CoDeConfig(**out)


def _code_string(c: CoDeConfig) -> str:
    s = f"{_CODE}:draft={c.draft}"
    if isinstance(c.refiner, str):
        s += f",refiner={c.refiner}"
    return s


register_technique(Technique(
    name=_CODE, config_cls=CoDeConfig, parse=_code_parse, to_string=_code_string,
    install=_code_install, uninstall=_uninstall_nothing, on_call=_code_on_call, check=_code_check,
    families=_FAMILY, family_hint=_FAMILY_HINT, summary=_code_summary,
    help="CoDe: the VAR drafts the first N scales, a small VAR on the same VQ-VAE refines the rest",
    example="code:draft=4",
))


# --------------------------------------------------------------------------------------------------
# cfg-share
# --------------------------------------------------------------------------------------------------

_SHARE = "cfg-share"


def apply_cfg_share(pipe, config: CFGShareConfig | None = None):
    """Skip the unconditional branch at late scales of every call (see :class:`CFGShareConfig`). Returns ``pipe``."""
    return apply_technique(pipe, _SHARE, config)


def remove_cfg_share(pipe):
    """Undo :func:`apply_cfg_share` (bit-exact). Returns ``pipe``."""
    return remove_technique(pipe, _SHARE)


def _share_summary(pipe, config: CFGShareConfig) -> dict:
    return {"uncond_skipped_scales": [s["scale"] for s in _scales(pipe) if not s["uncond"]]}


def _share_parse(args: str | None) -> CFGShareConfig:
    pos, kw = _kv(args)
    out: dict[str, Any] = {}
    if pos:  # "cfg-share:2" = the last two scales
        n = _int(pos[0], "the number of final scales")
        if n < 1:
            raise ValueError(f"the number of final scales must be >= 1, got {n}")
        out["start"] = -n
    for k, v in kw.items():
        if k in ("start", "every"):
            out[k] = _int(v, k)
        elif k == "mode":
            out["mode"] = v.lower()
        else:
            raise ValueError(f"unknown cfg-share option {k!r}; keys: start, every, mode")
    return CFGShareConfig(**out)


def _share_string(c: CFGShareConfig) -> str:
    d = CFGShareConfig()
    parts = [f"start={c.start}"]
    if c.every != d.every:
        parts.append(f"every={c.every}")
    if c.mode != d.mode:
        parts.append(f"mode={c.mode}")
    return f"{_SHARE}:" + ",".join(parts)


register_technique(Technique(
    name=_SHARE, config_cls=CFGShareConfig, parse=_share_parse, to_string=_share_string,
    install=_install_config, uninstall=_uninstall_nothing,
    on_call=lambda p, c, kw: _call_kwargs(p, kw, {"cfg_share": c}),
    families=_FAMILY, family_hint=_FAMILY_HINT, summary=_share_summary,
    help="CFG-pair sharing: skip the unconditional branch at late VAR scales (no guidance there, or reuse the last)",
    example="cfg-share:start=-2",
))
