"""Region-adaptive sampling (RAS) for diffusers DiTs.

Reference: Liu et al., "Region-Adaptive Sampling for Diffusion Transformers" (arXiv 2502.10389, CVPR
2026; code microsoft/RAS). At most denoising steps the transformer runs only on the image tokens it is
currently "focused" on; every other token keeps its last computed model output (velocity or noise), so
the scheduler moves it along its cached direction. Active tokens still attend to the whole image: the
keys/values of the skipped tokens are reused from their last computation ("K/V recovery"). Dense steps
(a warm-up and a few resets) refresh everything.

How this implementation works and where it differs from the reference code:

* **Scheduler-agnostic.** The skipped tokens' part of the model output is the last output computed for
  them, written back into the denoiser's own output tensor, so any diffusers scheduler works (FlowMatch
  Euler, DPM-Solver++, UniPC, DDIM ...); the reference swaps in its own FlowMatch Euler scheduler.
* **Real savings through hooks, no copied forward.** Tokens are gathered right after the patch/position
  embedding (``pos_embed``, ``patch_embed`` or ``x_embedder``) and scattered back after the output
  projection, so every block sees only the active image tokens (Q, MLP, norms, projections on active
  tokens). K/V of the image tokens are cached per block: for SD3/SD3.5, PixArt, DiT and Sana a hook on
  each self-attention's ``to_k``/``to_v`` writes the active tokens' new K/V into the cache and hands the
  stock processor the full K/V; FLUX and Lumina2 apply RoPE to Q and K, so their attention processors
  are replaced by RAS ones that rotate the active tokens with their own positions. Text tokens are always
  recomputed.
* **Per-pipeline, per-call state**; batch > 1 (each prompt has its own selection); non-square latents;
  any patch size; CFG batched or as separate calls.
* **CFG decision:** the token selection is *shared by the conditional and unconditional rows of one
  prompt* (batched CFG: rows ``i`` and ``i + B/2``; separate calls: all calls of a step). The focus score
  is the mean of the members' scores, so a token's guided velocity is always either fully fresh or fully
  cached, as in the reference (which runs on the already-combined output). ``share="sample"`` selects
  per row, ``share="batch"`` one selection for the whole batch.
* **Selection rule decided by experiment** (:mod:`fastgen.bench.experiments.ras`, table in the
  README): on the shipped shapes-mmdit (100 held-out prompts), recomputing the *highest*-focus tokens
  with a starvation bonus (recompute priority ``log score + starvation * steps_since_recompute``, default
  ``starvation=0.5``) gives the highest PSNR against the dense result at ratio 0.5 (36.2 dB, score 0.65
  vs dense 0.64) and within 0.2 dB of the best at 0.25 (30.1 dB). Recomputing the lowest-focus tokens
  (25.9 dB) and the reference's own rule (27.0 / 25.9 dB; it caches both ends of the ranking) lose
  6-10 dB at 0.5, and every RAS variant beats plain fewer steps at the same FLOPs (23.1 / 20.9 dB).
* **Sana** has two non-token-local parts: linear attention, whose K^T V summary is recomputed every step
  from the full (cached + fresh) K/V, and the GLUMBConv feed-forward with a 3x3 depthwise convolution:
  its 1x1 convolutions run on the active tokens only; the depthwise convolution reads the active tokens'
  fresh inputs and the inactive neighbours' cached ones (the same "recovery" as K/V). It is run on the
  whole cached grid (~1% of the block's FLOPs; cheaper with oneDNN than a gathered stencil) and its
  outputs are taken at the active positions.
* **Lumina2** packs caption and image tokens into one padded sequence whose unpatchify needs all image
  tokens, so there the active tokens are fed to the model as a one-token-high strip image (the model's
  patchify, embedding and unpatchify are per patch) and a hook on its RoPE embedder hands out the active
  tokens with their real positions.

Layout: this module holds the config (:class:`RASConfig`, recipe parsing), the selection rule
(:func:`select_tokens`), the per-pipeline state machine that plans each denoiser call, install/uninstall and
the registration; the per-family table, the hooks on the token path and the rewritten FLUX/Lumina2
attention processors are in :mod:`fastgen.caches.ras_processors`.

Unsupported (raises): UNets (use ``tome``/``deepcache``), fused QKV projections, custom attention
processors (IP-Adapter), ControlNet residuals and SD3 skip-layer guidance (those calls run dense and are
counted in ``summary`` as ``off``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from ..errors import UnsupportedPipelineError
from ..api import apply_technique, remove_technique
from ..hooks import HookSet, get_state
from ..registry import Technique, register_technique
from ..utils.logging import get_logger
from ._tokens import flat_rows, scatter_rows
from .ras_processors import (
    FAMILY_SPECS,
    STOCK_PROCESSORS,
    FluxProcessor,
    GatherHook,
    KVHook,
    LuminaProcessor,
    LuminaRopeHook,
    RASHook,
    SanaBlockHook,
    SanaDepthwiseHook,
    ScatterHook,
    image_attentions,
    lumina_forward,
)

logger = get_logger(__name__)

__all__ = ["RASConfig", "apply_ras", "remove_ras", "select_tokens", "PRESETS"]

_NAME = "ras"
_FAMILIES = ("sd3", "pixart", "dit", "sana", "flux", "lumina2")
_RULES = ("high", "low", "ends", "middle")
_METRICS = ("std", "l2norm")
_SHARES = ("cfg", "sample", "batch")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RASConfig:
    """Region-adaptive sampling settings.

    Important args:
        sample_ratio: fraction of the image tokens recomputed at a sparse step (default 0.5). Cost of a
            sparse step ~ ratio (attention and MLP both scale with the active tokens), so with the
            default dense schedule at 28 steps the ideal speedup is 28 / (6 + 22 * ratio): 1.65x at 0.5,
            2.4x at 0.25. Lower is faster and drifts more. Range 0.2-0.75.
        warmup_steps: the first steps run dense (default 0.15: a float < 1 is a fraction of the call's
            steps, rounded; 4 of 28, like the reference; an int is a step count). Early steps decide the
            layout, skipping there costs most quality. Range 0.1-0.25 (or 2-6 steps).
        dense_steps: extra dense "reset" steps that refresh every token and the K/V caches (default
            ``(0.43, 0.715)``: steps 12 and 20 of 28, the reference's SD3 schedule; floats < 1 are
            fractions of the steps, ints are step indices). Each costs one full step.

    Args to tinker with:
        ratio_schedule: per-step sample ratios (step 0, 1, ...; the last value repeats), overriding
            ``sample_ratio``; 1.0 marks a dense step. Default None.
        dense_every: also run a dense step every this many steps after the warm-up (default None).
        metric: per-token focus score of the last model output: ``"std"`` (std over channels, averaged
            over the patch's pixels; the reference's default) or ``"l2norm"``.
        rule: which tokens are recomputed: ``"high"`` (highest focus score; the best rule on the trained
            shapes-mmdit, see docs/techniques/ras.md), ``"low"`` (lowest),
            ``"ends"`` (``high_fraction`` of them from the top of the ranking, the rest from the bottom) or
            ``"middle"`` (the reference's SD3 script: the *skipped* tokens are taken from both ends,
            ``high_fraction`` of them from the top, and the middle band is recomputed). Default ``"high"``.
        high_fraction: share taken from the top for ``"ends"``/``"middle"`` (default 0.3, the reference's
            SD3 ``high_ratio``). Range 0-1.
        starvation: fairness: a token's recompute priority is ``log(score) + starvation * s`` where ``s``
            is the number of steps since it was last recomputed (``"high"``: the score; ``"low"``: minus
            it), so no region is frozen for long. Default 0.5 (best of 0-5 on the shipped shapes-mmdit:
            +6.3 dB (ratio 0.5) and +2.7 dB (ratio 0.25) PSNR over 0; see docs/results/ras.md). Large values
            (>= 2) make it a focus-ordered round robin. 0 disables. Range 0.3-1.
        share: who shares one token selection: ``"cfg"`` (the conditional/unconditional rows of a prompt;
            default), ``"sample"`` (each row) or ``"batch"`` (the whole batch).
    """

    sample_ratio: float = 0.5
    warmup_steps: float = 0.15
    dense_steps: tuple = (0.43, 0.715)
    ratio_schedule: tuple | None = None
    dense_every: int | None = None
    metric: str = "std"
    rule: str = "high"
    high_fraction: float = 0.3
    starvation: float = 0.5
    share: str = "cfg"

    def __post_init__(self):
        def ratio_ok(r):
            return isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 < float(r) <= 1.0

        if not ratio_ok(self.sample_ratio):
            raise ValueError(f"sample_ratio must be in (0, 1] (fraction of image tokens recomputed), got {self.sample_ratio!r}")
        if self.ratio_schedule is not None:
            sched = tuple(self.ratio_schedule)
            if not sched or not all(ratio_ok(r) for r in sched):
                raise ValueError(f"ratio_schedule must be a non-empty sequence of ratios in (0, 1], got {self.ratio_schedule!r}")
            object.__setattr__(self, "ratio_schedule", tuple(float(r) for r in sched))
        _check_step_value("warmup_steps", self.warmup_steps)
        if isinstance(self.dense_steps, (int, float)):
            raise ValueError(f"dense_steps must be a sequence (e.g. (12, 20) or ()), got {self.dense_steps!r}")
        object.__setattr__(self, "dense_steps", tuple(self.dense_steps))
        for s in self.dense_steps:
            _check_step_value("dense_steps entry", s)
        if self.dense_every is not None and (not isinstance(self.dense_every, int) or self.dense_every < 1):
            raise ValueError(f"dense_every must be a positive integer or None, got {self.dense_every!r}")
        if self.metric not in _METRICS:
            raise ValueError(f"metric must be one of {', '.join(_METRICS)}, got {self.metric!r}")
        if self.rule not in _RULES:
            raise ValueError(f"rule must be one of {', '.join(_RULES)}, got {self.rule!r}")
        if not isinstance(self.high_fraction, (int, float)) or not 0.0 <= self.high_fraction <= 1.0:
            raise ValueError(f"high_fraction must be in [0, 1], got {self.high_fraction!r}")
        if not isinstance(self.starvation, (int, float)) or self.starvation < 0 or not math.isfinite(self.starvation):
            raise ValueError(f"starvation must be a finite number >= 0, got {self.starvation!r}")
        if self.share not in _SHARES:
            raise ValueError(f"share must be one of {', '.join(_SHARES)}, got {self.share!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "RASConfig":
        """``"slow"`` (ratio 0.5), ``"medium"`` (0.375) or ``"fast"`` (0.25), with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown RAS preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    # -- schedule -----------------------------------------------------------------------------------
    def step_plan(self, step: int, num_steps: int) -> tuple[bool, float, str]:
        """``(dense, ratio, reason)`` for 0-based ``step`` of a ``num_steps``-step call."""
        warm = _resolve_step(self.warmup_steps, num_steps)
        if step < warm:
            return True, 1.0, "warmup"
        if step in {_resolve_step(s, num_steps) for s in self.dense_steps}:
            return True, 1.0, "reset"
        if self.dense_every is not None and step > warm and (step - warm) % self.dense_every == 0:
            return True, 1.0, "reset"
        if self.ratio_schedule is not None:
            r = self.ratio_schedule[min(step, len(self.ratio_schedule) - 1)]
        else:
            r = float(self.sample_ratio)
        if r >= 1.0:
            return True, 1.0, "ratio 1"
        return False, r, "sparse"


def _check_step_value(what: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ValueError(f"{what} must be a step index/count (int >= 0) or a fraction in [0, 1) of the steps, got {v!r}")
    if isinstance(v, float) and v >= 1.0 and not v.is_integer():
        raise ValueError(f"{what} {v!r}: a float must be a fraction < 1 of the steps; use an int for a step number")


def _resolve_step(v, num_steps: int) -> int:
    if isinstance(v, float) and v < 1.0:
        return int(v * num_steps + 0.5)
    return int(v)


PRESETS: dict[str, RASConfig] = {
    "slow": RASConfig(sample_ratio=0.5),
    "medium": RASConfig(sample_ratio=0.375),
    "fast": RASConfig(sample_ratio=0.25),
}

_KEYS = {"ratio": "sample_ratio", "warmup": "warmup_steps", "dense": "dense_steps", "schedule": "ratio_schedule",
         "every": "dense_every", "metric": "metric", "rule": "rule", "high_fraction": "high_fraction",
         "hf": "high_fraction", "starvation": "starvation", "share": "share"}


def _num(text: str) -> float | int:
    text = text.strip()
    v = float(text)
    return int(v) if ("." not in text and "e" not in text.lower() and v.is_integer()) else v


def _parse(args: str | None) -> RASConfig:
    """``"0.5"``, ``"fast"``, ``"0.25,rule=low,starvation=0.2,warmup=4,dense=12/20,every=4,schedule=1/0.5"``."""
    if not args:
        return RASConfig()
    parts = [p.strip() for p in args.split(",")]
    base = RASConfig()
    kw: dict[str, Any] = {}
    first = parts[0]
    if "=" not in first:
        parts = parts[1:]
        if first.lower() in PRESETS:
            base = PRESETS[first.lower()]
        else:
            try:
                kw["sample_ratio"] = float(first)
            except ValueError:
                raise ValueError(f"expected a sample ratio in (0, 1] or a preset ({', '.join(PRESETS)}), got {first!r}") from None
    for part in parts:
        key, eq, val = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in _KEYS:
            raise ValueError(f"bad RAS option {part!r}; use key=value with keys {', '.join(sorted(_KEYS))}")
        name, val = _KEYS[key], val.strip()
        if name in ("dense_steps", "ratio_schedule"):
            items = [] if val.lower() in ("", "none") else [_num(x) for x in val.split("/")]
            kw[name] = tuple(items) if (items or name == "dense_steps") else None
        elif name == "dense_every":
            kw[name] = None if val.lower() == "none" else int(val)
        elif name in ("metric", "rule", "share"):
            kw[name] = val.lower()
        else:
            kw[name] = _num(val)
    return replace(base, **kw)


def _to_string(c: RASConfig) -> str:
    base = RASConfig()
    out = [f"{c.sample_ratio:g}"]
    rev = {v: k for k, v in _KEYS.items() if k != "hf"}
    for f in fields(c):
        if f.name == "sample_ratio":
            continue
        v, d = getattr(c, f.name), getattr(base, f.name)
        if v == d:
            continue
        key = rev[f.name]
        if isinstance(v, tuple):
            out.append(f"{key}=" + ("/".join(f"{x:g}" for x in v) if v else "none"))
        elif v is None:
            out.append(f"{key}=none")
        elif isinstance(v, float):
            out.append(f"{key}={v:g}")
        else:
            out.append(f"{key}={v}")
    return "ras:" + ",".join(out)


# --------------------------------------------------------------------------------------------------
# Token selection
# --------------------------------------------------------------------------------------------------

def select_tokens(score_GN: torch.Tensor, k: int, rule: str = "high", high_fraction: float = 0.3,
                  starvation: float = 0.0, age_GN: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``[G, k]`` (ascending) of the tokens to recompute, per group, from focus scores ``[G, N]``.

    ``rule`` and ``high_fraction`` as in :class:`RASConfig`; ``age`` counts the steps since each token was
    last recomputed and adds ``starvation * age`` to its recompute priority (log domain).
    """
    g, n = score_GN.shape
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    z = torch.log(score_GN.float().clamp_min(1e-20))
    bonus = starvation * age_GN.float() if (age_GN is not None and starvation) else torch.zeros_like(z)
    neg_inf = torch.finfo(z.dtype).min
    if rule == "high":
        idx = torch.topk(z + bonus, k, dim=1).indices
    elif rule == "low":
        idx = torch.topk(-z + bonus, k, dim=1).indices
    elif rule == "ends":
        n_hi = int(round(high_fraction * k))
        hi = torch.topk(z + bonus, n_hi, dim=1).indices
        taken = torch.zeros_like(z, dtype=torch.bool).scatter_(1, hi, True)
        lo = torch.topk((-z + bonus).masked_fill(taken, neg_inf), k - n_hi, dim=1).indices
        idx = torch.cat([hi, lo], dim=1)
    elif rule == "middle":
        m = n - k
        m_hi = int(round(high_fraction * m))
        cached = torch.zeros_like(z, dtype=torch.bool)
        if m_hi:
            cached.scatter_(1, torch.topk(z - bonus, m_hi, dim=1).indices, True)
        if m - m_hi:
            cached.scatter_(1, torch.topk((-z - bonus).masked_fill(cached, neg_inf), m - m_hi, dim=1).indices, True)
        idx = (~cached).nonzero()[:, 1].view(g, k)
    else:
        raise ValueError(f"rule must be one of {', '.join(_RULES)}, got {rule!r}")
    return idx.sort(dim=1).values


# --------------------------------------------------------------------------------------------------
# The state machine: per-pipeline runtime, per-call slots, the plan of one denoiser call
# --------------------------------------------------------------------------------------------------

@dataclass
class _Slot:
    """Caches of one denoiser call position within a step (0: the only/first call; 1: a separate uncond call)."""

    b: int
    n: int
    valid: bool = False
    out: torch.Tensor | None = None  # [B, N, P] last full output tokens
    metric: torch.Tensor | None = None  # [B, N] focus score of ``out``
    kv: dict = field(default_factory=dict)  # per hook/processor: cached tensors
    extra: dict = field(default_factory=dict)


@dataclass
class _Ctx:
    """What the current denoiser call does; read by every RAS hook and processor."""

    mode: str  # "dense" | "sparse"
    slot: _Slot
    b: int
    n: int
    grid: tuple[int, int] | None  # (h, w) image tokens
    k: int = 0
    idx: torch.Tensor | None = None  # [B, k]
    rows: torch.Tensor | None = None  # [B*k]
    memo: dict = field(default_factory=dict)


class _Runtime:
    """The per-pipeline RAS state: config, per-call caches and the current call's plan."""

    def __init__(self, pipe, family: str, config: RASConfig):
        self.pipe = pipe
        self.family = family
        self.spec = FAMILY_SPECS[family]
        self.config = config
        self.model = get_state(pipe).adapter.denoiser(pipe)
        self.p = 1 if family == "flux" else int(getattr(self.model.config, "patch_size", 1) or 1)
        cfg = self.model.config
        in_ch = int(cfg.get("in_channels") or 0)
        out_ch = int(vars(self.model).get("out_channels") or cfg.get("out_channels") or in_ch)
        if family == "flux":  # tokens are 2x2-packed latents: C*4 features, ordered (C, 2, 2)
            in_ch, out_ch = in_ch // 4, out_ch // 4
        self.out_ch = out_ch
        # learned-sigma models (PixArt, DiT) predict [eps, variance]: score the eps part only
        self.metric_ch = in_ch if out_ch == 2 * in_ch else out_ch
        self.ctx: _Ctx | None = None
        self.call_obj = None
        self.new_call(None, {})

    # -- per call -----------------------------------------------------------------------------------
    def new_call(self, call_obj, kwargs: dict) -> None:
        self.call_obj = call_obj
        self.slots: dict[int, _Slot] = {}
        self.step = -1
        self.slot_i = -1
        self.step_plan: tuple[bool, float, str] | None = None
        self.step_sel: dict | None = None
        self.age: torch.Tensor | None = None
        self.cfg_batched = False
        if self.spec.cfg_batched and call_obj is not None:
            gs = kwargs.get("guidance_scale")
            if gs is None:
                p = inspect.signature(type(self.pipe).__call__).parameters.get("guidance_scale")
                gs = p.default if p is not None and p.default is not inspect.Parameter.empty else 1.0
            self.cfg_batched = float(gs) > 1.0
        self.record = {"steps": [], "calls": []}
        if call_obj is not None:
            call_obj.records[_NAME] = self.record

    def _num_steps(self, call) -> int:
        n = getattr(self.pipe, "_num_timesteps", None)
        if not n:
            n = call.num_inference_steps
        if not n:
            p = inspect.signature(type(self.pipe).__call__).parameters.get("num_inference_steps")
            n = p.default if p is not None and isinstance(p.default, int) else 28
        return int(n)

    def _groups(self, b: int) -> tuple[int, torch.Tensor]:
        share = self.config.share
        if share == "batch":
            return 1, torch.zeros(b, dtype=torch.long)
        if share == "cfg" and self.cfg_batched and b % 2 == 0:
            return b // 2, torch.arange(b) % (b // 2)
        return b, torch.arange(b)

    # -- the decision for one denoiser call ---------------------------------------------------------
    def begin(self, args: tuple, kwargs: dict) -> _Ctx | None:
        st = get_state(self.pipe)
        call = st.call if st is not None else None
        if call is None or call is not self.call_obj or call.latency_s is not None:
            return None  # a forward outside a pipeline call: leave it alone
        if torch.is_grad_enabled():
            return self._off("grad enabled")
        for name in self.spec.off_kwargs:
            if kwargs.get(name) is not None:
                return self._off(f"{name} given")
        ja = kwargs.get("joint_attention_kwargs") or kwargs.get("cross_attention_kwargs") or kwargs.get("attention_kwargs")
        if ja and "ip_adapter_image_embeds" in ja:
            return self._off("ip adapter")
        x = args[0] if args else kwargs.get("hidden_states")
        if self.family == "flux":
            b, n = x.shape[0], x.shape[1]
            grid = None
        else:
            b, h, w = x.shape[0], x.shape[-2] // self.p, x.shape[-1] // self.p
            n, grid = h * w, (h, w)
        step = call.step_index
        if step != self.step:
            self.step, self.slot_i, self.step_sel = step, 0, None
            self.step_plan = self.config.step_plan(step, self._num_steps(call))
        else:
            self.slot_i += 1
        slot = self.slots.get(self.slot_i)
        if slot is None or slot.b != b or slot.n != n:
            slot = self.slots[self.slot_i] = _Slot(b, n)
        dense, ratio, reason = self.step_plan
        k = n
        if not dense:
            k = min(n, max(1, math.ceil(ratio * n)))
            if k >= n:
                dense, reason = True, "ratio rounds to all tokens"
            elif not slot.valid:
                dense, reason = True, "no cache yet"
        if not dense:
            sel = self._selection(b, n, k)
            if sel is None:
                dense, reason = True, "no focus score yet"
        if dense:
            if self.age is not None and self.slot_i == 0:
                self.age.zero_()
            ctx = _Ctx("dense", slot, b, n, grid, k=n)
        else:
            idx = sel["idx_g"][sel["group"]].to(x.device)
            ctx = _Ctx("sparse", slot, b, n, grid, k=k, idx=idx, rows=flat_rows(idx, n))
        self._log(step, ctx.mode, ctx.k, n, reason)
        return ctx

    def _off(self, reason: str) -> None:
        self.record["calls"].append({"step": self.step, "mode": "off", "reason": reason})
        return None

    def _log(self, step: int, mode: str, k: int, n: int, reason: str) -> None:
        self.record["calls"].append({"step": step, "slot": self.slot_i, "mode": mode, "tokens": k, "of": n})
        if self.slot_i == 0:
            self.record["steps"].append({"step": step, "dense": mode == "dense", "tokens": k, "of": n, "reason": reason})

    def _selection(self, b: int, n: int, k: int) -> dict | None:
        if self.step_sel is not None and self.step_sel["key"] == (b, n, k):
            return self.step_sel
        metrics = [s.metric for s in self.slots.values() if s.metric is not None and s.b == b and s.n == n]
        if not metrics:
            return None
        score = torch.stack(metrics).mean(0).float()  # [B, N]
        g, group = self._groups(b)
        group = group.to(score.device)
        score_g = score.new_zeros(g, n).index_add_(0, group, score) / torch.bincount(group, minlength=g)[:, None]
        if self.age is None or self.age.shape != (g, n) or self.age.device != score.device:
            self.age = torch.zeros(g, n, dtype=torch.long, device=score.device)
        c = self.config
        idx_g = select_tokens(score_g, k, c.rule, c.high_fraction, c.starvation, self.age)
        self.age += 1
        self.age.scatter_(1, idx_g, 0)
        self.step_sel = {"key": (b, n, k), "idx_g": idx_g, "group": group}
        return self.step_sel

    def end(self, ctx: _Ctx | None, ok: bool) -> None:
        if ctx is None:
            return
        slot = ctx.slot
        slot.valid = ok and slot.out is not None
        call = self.call_obj
        if call is not None and self.step >= self._num_steps(call) - 1:  # last step: free the caches
            slot.kv.clear()
            slot.extra.clear()
            slot.valid = False

    # -- output tokens ------------------------------------------------------------------------------
    def score(self, out_BNP: torch.Tensor) -> torch.Tensor:
        """Per-token focus score ``[B, N]`` of full output tokens."""
        b, n, f = out_BNP.shape
        x = out_BNP.detach().float()
        if self.spec.channels_first:
            x = x.reshape(b, n, self.out_ch, f // self.out_ch)[:, :, : self.metric_ch].transpose(2, 3)
        else:
            x = x.reshape(b, n, f // self.out_ch, self.out_ch)[..., : self.metric_ch]
        if self.config.metric == "std":
            s = x.std(dim=-1) if x.shape[-1] > 1 else x.abs()[..., 0]
        else:
            s = x.norm(dim=-1)
        return s.mean(dim=-1)

    def take_output(self, ctx: _Ctx, out_BKP: torch.Tensor) -> torch.Tensor:
        """Full output tokens from this call's (active or all) tokens; updates the slot's cache and score."""
        slot = ctx.slot
        if ctx.mode == "dense":
            full = out_BKP
        else:
            full = scatter_rows(slot.out, ctx.rows, out_BKP)
        slot.out = full
        slot.metric = self.score(full)
        return full


class _DenoiserHook(RASHook):
    """Decides the call's mode; for Lumina2 also feeds the active tokens as a strip and scatters the output."""

    def new_forward(self, module, *args, **kwargs):
        rt = self.rt
        ctx = rt.begin(args, kwargs)
        rt.ctx = ctx
        ok = False
        try:
            if ctx is not None and rt.family == "lumina2":
                out = lumina_forward(rt, ctx, self.fn_ref.original_forward, args, kwargs)
            else:
                out = self.fn_ref.original_forward(*args, **kwargs)
            ok = True
            return out
        finally:
            rt.ctx = None
            rt.end(ctx, ok)


# --------------------------------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------------------------------

def _check(pipe, adapter, config: RASConfig) -> None:
    family = adapter.family
    model = adapter.denoiser(pipe)
    st = get_state(pipe)
    for name, attn, _ in image_attentions(family, model):
        proc = type(attn.processor).__name__
        if proc not in STOCK_PROCESSORS[family] and not (st is not None and _NAME in st.applied):
            raise UnsupportedPipelineError(
                f"RAS: {type(model).__name__}.{name} uses attention processor {proc}; RAS supports "
                f"{', '.join(STOCK_PROCESSORS[family])} there (reset with model.set_default_attn_processor())"
            )
        if getattr(attn, "fused_projections", False) or getattr(attn, "to_qkv", None) is not None:
            raise UnsupportedPipelineError(
                f"RAS: {type(model).__name__}.{name} has fused QKV projections; call model.unfuse_qkv_projections() first"
            )


def _install(pipe, st, config: RASConfig) -> dict:
    family = st.adapter.family
    model = st.adapter.denoiser(pipe)
    rt = _Runtime(pipe, family, config)
    saved = {"runtime": rt, "hooks": HookSet(), "processors": []}
    try:
        hook = saved["hooks"].add
        spec = rt.spec
        if spec.gather is not None:
            hook(getattr(model, spec.gather), GatherHook(rt), "fastgen_ras_gather")
        if spec.scatter is not None:
            hook(getattr(model, spec.scatter), ScatterHook(rt), "fastgen_ras_scatter")
        for name, attn, role in image_attentions(family, model):
            if role == "linear":
                hook(attn.to_k, KVHook(rt), "fastgen_ras_kv")
                hook(attn.to_v, KVHook(rt), "fastgen_ras_kv")
            else:
                old = attn.processor
                new = FluxProcessor(rt, old) if role == "flux" else LuminaProcessor(rt, old, role)
                attn.set_processor(new)
                saved["processors"].append((attn, old))
        if family == "sana":
            for blk in model.transformer_blocks:
                hook(blk, SanaBlockHook(rt), "fastgen_ras_grid")
                hook(blk.ff.conv_depth, SanaDepthwiseHook(rt), "fastgen_ras_dwconv")
        if family == "lumina2":
            hook(model.rope_embedder, LuminaRopeHook(rt), "fastgen_ras_rope")
        den = _DenoiserHook(rt)
        hook(model, den, "fastgen_ras")  # after the others: the step counter stays outermost
        _repair_new_forward(model, den, "fastgen_ras")
    except BaseException:
        _uninstall(pipe, st, saved)
        raise
    logger.info("RAS on %s: %s", type(pipe).__name__, _to_string(config))
    return saved


def _uninstall(pipe, st, saved: dict) -> None:
    saved["hooks"].remove_all()
    for attn, old in reversed(saved["processors"]):
        attn.set_processor(old)


def apply_ras(pipe, config: RASConfig | None = None):
    """Apply region-adaptive sampling to ``pipe`` (replacing an earlier RAS config). Returns ``pipe``.

    Raises:
        UnsupportedPipelineError: a UNet pipeline, a denoiser with custom/fused attention processors.
    """
    return apply_technique(pipe, _NAME, config)


def remove_ras(pipe):
    """Undo :func:`apply_ras` (no-op when not applied), restoring the pipeline bit-exactly. Returns ``pipe``."""
    return remove_technique(pipe, _NAME)


def _repair_new_forward(module, hook, name: str) -> None:
    """Make sure ``hook.new_forward`` is in ``module``'s hook chain.

    ``fastgen.hooks.add_hook`` keeps the step counter outermost by removing and re-registering it, and
    diffusers' ``HookRegistry.remove_hook`` then splices the inner forward into the next hook's
    ``fn_ref.forward``, which for a ``new_forward`` hook is the hook itself (it should go to
    ``original_forward``): the hook would be silently bypassed. Put it back where diffusers expects it.
    """
    import functools

    registry = module._diffusers_hook
    fn_ref = registry._fn_refs[registry._hook_order.index(name)]
    if getattr(fn_ref.forward, "func", None) != hook.new_forward:
        fn_ref.original_forward = fn_ref.forward
        fn_ref.forward = functools.update_wrapper(functools.partial(hook.new_forward, module), hook.new_forward)


def _on_call(pipe, saved: dict, kwargs: dict) -> dict:
    saved["runtime"].new_call(get_state(pipe).call, kwargs)
    return kwargs


def _summary(pipe, saved: dict) -> dict:
    st = get_state(pipe)
    rec = st.last_call.get(_NAME) if st.last_call else None
    if not rec:
        return {}
    calls = [c for c in rec["calls"] if c["mode"] != "off"]
    done = sum(c["tokens"] for c in calls)
    total = sum(c["of"] for c in calls)
    return {
        "steps": rec["steps"],
        "dense_steps": [s["step"] for s in rec["steps"] if s["dense"]],
        "sparse_steps": sum(1 for s in rec["steps"] if not s["dense"]),
        "token_fraction": (done / total) if total else None,
        "off_calls": [c for c in rec["calls"] if c["mode"] == "off"],
        "calls": rec["calls"],
    }


register_technique(Technique(
    name=_NAME, config_cls=RASConfig, parse=_parse, to_string=_to_string, install=_install, uninstall=_uninstall,
    on_call=_on_call, summary=_summary, check=_check, families=_FAMILIES,
    family_hint=("RAS works on DiT pipelines (SD3/SD3.5, FLUX, PixArt-α/Σ, Sana, Lumina2, DiT): a UNet has no token "
                 "sequence to subsample; for UNets use 'tome' or a step cache."),
    help="region-adaptive sampling: recompute only the image tokens in focus, reuse the rest (DiTs)",
    example="ras:0.5",
    incompatible={"tome": "both change the token set of the attention; apply only one"},
))
