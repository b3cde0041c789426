"""VAR: the next-scale prediction transformer of Tian et al., "Visual Autoregressive Modeling: Scalable
Image Generation via Next-Scale Prediction" (NeurIPS 2024, arXiv 2404.02905), written from the paper and
the released checkpoint layout (``var_d{16,20,24,30,36}.pth``) so those checkpoints load unchanged.

Model (paper Sec. 3-4, notation ``K`` scales with side lengths ``pn_1 < ... < pn_K``, ``L = sum pn_k^2``):

* The sequence is ``[s, word_embed(x_2), ..., word_embed(x_K)] + lvl_embed(k) + pos``: ``s`` is the class
  embedding plus ``pos_start`` (``pn_1^2`` start tokens); ``x_k`` is the running VQ reconstruction
  ``f_hat_{k-1}`` area-downsampled to ``pn_k x pn_k`` (a continuous ``Cvae``-dim vector per token).
* ``depth`` AdaLN transformer blocks of width ``C = 64 * depth`` and ``depth`` heads. Each block computes
  ``(g1, g2, s1, s2, b1, b2) = Linear(SiLU(cond))`` and
  ``x += g1 * Attn(LN(x) (1 + s1) + b1)``; ``x += g2 * FFN(LN(x) (1 + s2) + b2)``
  (LN without affine parameters, FFN = fc1 -> GELU(tanh) -> fc2 with 4C hidden units).
* Attention normalises q and k per head (``attn_l2_norm``) and scales q by
  ``exp(min(scale_mul_1H11, ln 100))``, so the logits are learned-temperature cosine similarities.
* Training uses a block-causal mask: a token of scale ``k`` sees every token of scales ``<= k``. At
  inference a KV cache holds the earlier scales and each step predicts all ``pn_k^2`` tokens of the next
  scale in parallel, with classifier-free guidance ramped linearly over the scales:
  ``t_k = cfg * k / (K - 1)``, ``logits = (1 + t_k) cond - t_k uncond``, then top-k / top-p sampling.
* ``class_emb`` has ``num_classes + 1`` rows; the last row is the unconditional (null) class.

Checkpoint loading lives here too: :func:`load_official` reads ``vae_ch160v4096z32.pth`` and a
``var_d*.pth`` (or a trainer checkpoint ``{"trainer": {"var_wo_ddp": ..., "vae_local": ...}}``), infers the
architecture from the tensors and reports every mismatch by name.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgen.errors import FastgenError
from fastgen.utils.logging import get_logger

from .vqvae import PATCH_NUMS_256, PATCH_NUMS_512, VQVAE, VQVAEConfig, config_from_dict

logger = get_logger(__name__)

__all__ = [
    "VARConfig", "VAR", "VARSample", "KVCache", "SelfAttention", "AdaLNSelfAttn", "AdaLNBeforeHead", "FFN",
    "sample_top_k_top_p", "CheckpointError", "read_checkpoint", "infer_var_config", "infer_vqvae_config",
    "load_state_dict_checked", "build_and_load", "load_official", "DERIVED_BUFFERS", "block_causal_buffers",
    "attention", "prune_scores", "scale_contributions", "hmar_official_to_fastgen", "HMAR_KEY_MAP",
]


class CheckpointError(FastgenError, ValueError):
    """A checkpoint does not match the model: wrong architecture, missing/unexpected/mis-shaped tensors."""


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


@dataclass
class VARConfig:
    """Hyper-parameters of the VAR transformer. Defaults are VAR-d16 at 256 px.

    Attributes:
        depth: number of blocks; the released models are 16, 20, 24, 30 (256 px) and 36 (512 px).
        patch_nums: token-map side lengths, small to large (must equal the VQ-VAE's).
        vocab_size: VQ codebook size ``V`` (4096).
        Cvae: VQ code dimension (32); the width of the continuous next-scale input.
        num_classes: number of real classes; ``class_emb`` has one more row, the null class.
        embed_dim: width ``C``; ``None`` means the official rule ``64 * depth``.
        num_heads: attention heads; ``None`` means ``depth`` (head size 64).
        mlp_ratio: FFN hidden size / ``C`` (4).
        norm_eps: LayerNorm epsilon (1e-6).
        shared_aln: one AdaLN projection shared by all blocks (``shared_ada_lin`` + per-block ``ada_gss``),
            as in VAR-d36.
        attn_l2_norm: cosine attention with a learned per-head scale (all released checkpoints).
        cond_drop_rate: probability of replacing the label by the null class in training (for CFG).
        drop_rate: dropout after the attention projection and the FFN.
        attn_drop_rate: attention-probability dropout.
        drop_path_rate: stochastic depth of the last block (linear over blocks); ``None`` means the
            official ``0.1 * depth / 24``.
        markov: HMAR mode (Kumbong et al., "HMAR: Efficient Hierarchical Masked Auto-Regressive Image
            Generation", CVPR 2025): the tokens of scale ``k`` attend only to the tokens of scale ``k``, whose
            inputs already carry every earlier scale (the running reconstruction ``f_hat_{k-1}`` downsampled to
            ``pn_k``). The training mask is block-diagonal instead of block-causal and sampling needs no KV
            cache. Default False (VAR).
        mask_layers: HMAR's masked refinement inside a scale (MaskGIT-style sub-steps, see
            :meth:`VAR.sample` ``hmar_steps``); needs ``markov``. ``None`` (default): no refinement (no
            ``mask_embed``); ``0``: the refinement pass reuses the whole trunk and head, with the learned
            ``mask_embed`` (``1 x 1 x C``) in place of the masked tokens; ``n > 0``: the last ``n`` blocks
            and the head are duplicated as a separate mask branch (``mask_blocks``, ``mask_head_nm``,
            ``mask_head``), as in HMAR's stage-2 models (which use ``n = 8``).
    """

    depth: int = 16
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    vocab_size: int = 4096
    Cvae: int = 32
    num_classes: int = 1000
    embed_dim: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float | None = None
    markov: bool = False
    mask_layers: int | None = None

    def __post_init__(self) -> None:
        if self.mask_layers is not None:
            if not self.markov:
                raise ValueError("mask_layers (HMAR masked refinement) needs markov=True")
            if not 0 <= self.mask_layers <= self.depth:
                raise ValueError(f"mask_layers must lie in [0, depth={self.depth}], got {self.mask_layers}")
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if len(self.patch_nums) < 2 or any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:])):
            raise ValueError(f"patch_nums must hold >= 2 strictly increasing sizes, got {self.patch_nums}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.width % self.heads:
            raise ValueError(f"embed_dim {self.width} is not divisible by num_heads {self.heads}")

    @property
    def width(self) -> int:
        """Model width ``C`` (``64 * depth`` unless ``embed_dim`` is set)."""
        return self.embed_dim if self.embed_dim is not None else 64 * self.depth

    @property
    def heads(self) -> int:
        """Number of attention heads (``depth`` unless ``num_heads`` is set)."""
        return self.num_heads if self.num_heads is not None else self.depth

    @property
    def drop_path(self) -> float:
        return self.drop_path_rate if self.drop_path_rate is not None else 0.1 * self.depth / 24

    @property
    def L(self) -> int:
        """Total number of tokens over all scales (680 for the 256 px schedule)."""
        return sum(p * p for p in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def begin_ends(self) -> list[tuple[int, int]]:
        """``[(start, end)]`` token range of every scale in the flattened sequence."""
        out, cur = [], 0
        for pn in self.patch_nums:
            out.append((cur, cur + pn * pn))
            cur += pn * pn
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VARConfig":
        return config_from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ----------------------------------------------------------------------------------------------------
# Building blocks (official module names)
# ----------------------------------------------------------------------------------------------------


class KVCache:
    """Per-call key/value cache of one attention layer (``B x H x L_so_far x head_dim``)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class FFN(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``."""

    def __init__(self, C: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, C)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x_BLC))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a bias-free fused ``mat_qkv``, separate ``q_bias``/``v_bias`` (the k
    bias is the zero buffer ``zero_k_bias``) and, with ``attn_l2_norm``, cosine attention scaled per head by
    ``exp(min(scale_mul_1H11, ln 100))``. Runs through ``F.scaled_dot_product_attention``."""

    def __init__(self, C: int, num_heads: int, attn_l2_norm: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        assert C % num_heads == 0
        self.num_heads, self.head_dim = num_heads, C // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop
        #: attention kernel: "sdpa" (``F.scaled_dot_product_attention``), "math" (explicit softmax) or
        #: "xformers" (``memory_efficient_attention``); set by the ``var-attn`` technique.
        self.backend = "sdpa"

    def forward(self, x_BLC: torch.Tensor, attn_bias: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q_BHLc, k_BHLc, v_BHLc = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q_BHLc = F.normalize(q_BHLc, dim=-1) * scale_mul
            k_BHLc = F.normalize(k_BHLc, dim=-1)
        if kv_cache is not None:  # keys are cached after normalisation
            k_BHLc, v_BHLc = kv_cache.append(k_BHLc, v_BHLc)
        if attn_bias is not None:
            assert attn_bias.shape[-2:] == (L, k_BHLc.shape[2]), (attn_bias.shape, L, k_BHLc.shape)
            attn_bias = attn_bias.to(q_BHLc.dtype)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.backend == "sdpa":
            o_BHLc = F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=attn_bias, scale=self.scale,
                                                    dropout_p=dropout_p)
        else:
            o_BHLc = attention(q_BHLc, k_BHLc, v_BHLc, attn_bias, self.scale, dropout_p, self.backend)
        return self.proj_drop(self.proj(o_BHLc.transpose(1, 2).reshape(B, L, C)))


def attention(q_BHLc: torch.Tensor, k_BHMc: torch.Tensor, v_BHMc: torch.Tensor, attn_bias: torch.Tensor | None,
              scale: float, dropout_p: float = 0.0, backend: str = "math") -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` with the kernel ``backend``: ``"sdpa"``, ``"math"`` (explicit
    matmul + softmax in the input dtype) or ``"xformers"`` (``xformers.ops.memory_efficient_attention``;
    the ``gpu`` extra). Returns ``B x H x L x c``."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q_BHLc, k_BHMc, v_BHMc, attn_mask=attn_bias, scale=scale,
                                              dropout_p=dropout_p)
    if backend == "math":
        s_BHLM = (q_BHLc @ k_BHMc.transpose(-1, -2)) * scale
        if attn_bias is not None:
            s_BHLM = s_BHLM + attn_bias
        p_BHLM = s_BHLM.softmax(dim=-1)
        if dropout_p > 0:
            p_BHLM = F.dropout(p_BHLM, dropout_p)
        return p_BHLM @ v_BHMc
    if backend == "xformers":
        from fastgen.errors import require_extra

        xops = require_extra("xformers.ops", "gpu", "the xformers attention backend (var-attn:xformers)")
        bias = None
        if attn_bias is not None:  # xformers wants a B x H x L x M bias with 8-aligned storage
            B, H, L, M = q_BHLc.shape[0], q_BHLc.shape[1], q_BHLc.shape[2], k_BHMc.shape[2]
            pad = (M + 7) // 8 * 8
            full = attn_bias.new_zeros(B, H, L, pad)
            full[..., :M] = attn_bias.expand(B, H, L, M)
            bias = full[..., :M]
        o_BLHc = xops.memory_efficient_attention(q_BHLc.transpose(1, 2), k_BHMc.transpose(1, 2),
                                                 v_BHMc.transpose(1, 2), attn_bias=bias, p=dropout_p, scale=scale)
        return o_BLHc.transpose(1, 2)
    raise ValueError(f"unknown attention backend {backend!r}; use 'sdpa', 'math' or 'xformers'")


class SharedAdaLin(nn.Linear):
    """``Linear(D, 6C)`` whose output is viewed as ``B x 1 x 6 x C`` (shared AdaLN of VAR-d36)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.out_features // 6)


class AdaLNSelfAttn(nn.Module):
    """One VAR block: AdaLN-modulated attention and FFN, each with a gated residual."""

    def __init__(self, C: int, D: int, num_heads: int, mlp_ratio: float, norm_eps: float, shared_aln: bool,
                 attn_l2_norm: bool, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.C, self.D, self.shared_aln = C, D, shared_aln
        self.attn = SelfAttention(C, num_heads, attn_l2_norm, attn_drop, drop)
        self.ffn = FFN(C, round(C * mlp_ratio), drop)
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, attn_bias: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """``cond_BD`` is the condition ``B x D``, or with ``shared_aln`` the shared ``B x 1 x 6 x C``."""
        if self.shared_aln:
            mods = (self.ada_gss + cond_BD).unbind(2)
        else:
            mods = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods  # each B x 1 x C
        h = self.ln_wo_grad(x_BLC) * (1 + scale1) + shift1
        x_BLC = x_BLC + self.drop_path(self.attn(h, attn_bias, kv_cache) * gamma1)
        h = self.ln_wo_grad(x_BLC) * (1 + scale2) + shift2
        return x_BLC + self.drop_path(self.ffn(h) * gamma2)


class AdaLNBeforeHead(nn.Module):
    """Final AdaLN before the classifier: ``LN(x) (1 + scale) + shift`` with ``(scale, shift)`` from
    ``ada_lin(cond)``."""

    def __init__(self, C: int, D: int, norm_eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC) * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------


def filter_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to ``-inf`` every logit below the ``top_k``-th largest (``top_k > 0``), then, with
    ``top_p > 0``, the smallest logits whose total probability is at most ``1 - top_p`` (the most likely
    token is always kept). Returns a new tensor."""
    V = logits_BlV.shape[-1]
    if top_k > 0:
        kth = logits_BlV.topk(min(top_k, V), dim=-1, largest=True, sorted=False).values.amin(-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_BlV = logits_BlV.masked_fill(drop, -torch.inf)
    return logits_BlV


def sample_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token per position from top-k/top-p filtered ``softmax(logits)`` (no temperature).
    One ``torch.multinomial`` call on ``(B*l, V)`` probabilities. Returns ``B x l`` indices."""
    B, l, V = logits_BlV.shape
    probs = filter_top_k_top_p(logits_BlV, top_k, top_p).softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, l)


def _gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    g = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits + g) / tau).softmax(dim=-1)


@dataclass
class VARSample:
    """Result of :meth:`VAR.sample`: per-scale token maps (``B x pn_k^2`` each) and the final ``f_hat``."""

    tokens: list[torch.Tensor]
    f_hat: torch.Tensor


# ----------------------------------------------------------------------------------------------------
# Sampling state and the per-scale acceleration mechanics (configs live in fastgen.ar.accel)
# ----------------------------------------------------------------------------------------------------


@dataclass
class _ModelState:
    """Per-call state of one model during :meth:`VAR.sample`: conditions of the 2B rows (conditional
    then unconditional), the AdaLN input, positions and the KV caches (``None`` in markov mode)."""

    model: "VAR"
    cond_BD: torch.Tensor
    cond: torch.Tensor
    lvl_pos: torch.Tensor
    caches: list[KVCache] | None


class _HalfCache:
    """A view of a 2B-row KV cache for a pass over the first ``R`` (conditional) rows only: the new K/V are
    written for both halves (the unconditional half gets copies) and the first ``R`` rows are attended."""

    def __init__(self, cache: KVCache, R: int):
        self.cache, self.R = cache, R

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reps = 2 if self.cache.k is None else self.cache.k.shape[0] // k.shape[0]
        k_all, v_all = self.cache.append(k.repeat(reps, 1, 1, 1), v.repeat(reps, 1, 1, 1))
        return k_all[:self.R], v_all[:self.R]

    @property
    def length(self) -> int:
        return self.cache.length


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


def _prune_select(prune: Any, si: int, K: int, pns: Sequence[int], in_BChw: torch.Tensor | None,
                  prev: dict[str, Any]) -> torch.Tensor | None:
    """Indices ``B x k`` (sorted) of the tokens to compute at scale ``si``, or ``None`` to run it dense."""
    ratio = float(prune.prune_ratio(si, K))
    if ratio <= 0 or in_BChw is None:
        return None
    n = pns[si] ** 2
    k = max(1, int(round(n * (1.0 - ratio))))
    if k >= n:
        return None
    fill = prune.fill
    if (fill == "cache" and prev.get("h") is None) or (fill == "logits" and prev.get("raw") is None):
        return None  # nothing to fill from (e.g. right after a CoDe model switch)
    scores_Bn = prune_scores(in_BChw, pns[si - 1], prune.metric)
    return scores_Bn.topk(k, dim=1).indices.sort(dim=1).values


def _grid_resize(x_RnC: torch.Tensor, pn: int, mode: str) -> torch.Tensor:
    R, n, C = x_RnC.shape
    p = int(round(math.sqrt(n)))
    g = x_RnC.transpose(1, 2).reshape(R, C, p, p)
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(g, size=(pn, pn), mode=mode, **kw).flatten(2).transpose(1, 2)


def _match_rows(x: torch.Tensor, R: int) -> torch.Tensor:
    if x.shape[0] == R:
        return x
    if x.shape[0] > R:
        return x[:R]
    return x.repeat(R // x.shape[0], *([1] * (x.ndim - 1)))


def _prune_fill(prune: Any, m: "VAR", st: _ModelState, h_RkC: torch.Tensor, keep_Bk: torch.Tensor, pn: int,
                prev: dict[str, Any], R: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Full-grid hidden states (or ``None``) and logits of a pruned scale (see ``FastVARConfig.fill``)."""
    B, k = keep_Bk.shape
    n = pn * pn
    keep_Rk = keep_Bk.repeat(R // B, 1)
    cond_BD = st.cond_BD[:R]
    if prune.fill == "cache":  # previous scale's final hidden states, bilinearly upsampled, under the kept ones
        h_RnC = _grid_resize(_match_rows(prev["h"], R), pn, "bilinear").to(h_RkC.dtype)
        h_RnC = h_RnC.scatter(1, keep_Rk.unsqueeze(-1).expand(-1, -1, h_RkC.shape[-1]), h_RkC)
        return h_RnC, m.get_logits(h_RnC, cond_BD)
    logits_RkV = m.get_logits(h_RkC, cond_BD)
    V = logits_RkV.shape[-1]
    if prune.fill == "logits":  # previous scale's raw logits, nearest-upsampled
        base = _grid_resize(_match_rows(prev["raw"], R), pn, "nearest").to(logits_RkV.dtype)
    elif prune.fill == "zero":  # placeholder: the sampled tokens there are replaced by the zero code
        base = logits_RkV.new_zeros(R, n, V)
    else:
        raise ValueError(f"unknown pruning fill {prune.fill!r}; use 'cache', 'logits' or 'zero'")
    return None, base.scatter(1, keep_Rk.unsqueeze(-1).expand(-1, -1, V), logits_RkV)


def _zero_fill_tokens(idx_Bl: torch.Tensor, keep_Bk: torch.Tensor, quant: Any) -> torch.Tensor:
    """Put the code closest to the zero vector (a "no change" residual) at every pruned position."""
    zero = int(quant.embedding.weight.detach().float().norm(dim=1).argmin())
    kept = torch.zeros_like(idx_Bl, dtype=torch.bool).scatter_(1, keep_Bk, True)
    return torch.where(kept, idx_Bl, torch.full_like(idx_Bl, zero))


def _shared_guidance(cfg_share: Any, cond_BnV: torch.Tensor, t: float, pn: int, prev: dict[str, Any]) -> torch.Tensor:
    """Guided logits of a scale whose unconditional branch was not run (see ``CFGShareConfig.mode``)."""
    if cfg_share.mode == "drop" or "delta" not in prev or t == 0:
        return cond_BnV
    delta, p_prev = prev["delta"]
    if p_prev != pn:
        delta = _grid_resize(delta, pn, "nearest")
    return cond_BnV + t * delta.to(cond_BnV.dtype)


def _scale_contribution(quant: Any, idx_Bl: torch.Tensor, masked_Bl: torch.Tensor | None, si: int,
                        pn: int) -> torch.Tensor:
    """``area(phi_k(up(e[idx])), pn)`` of one scale (``B x pn^2 x Cvae``), with the code vectors of masked
    tokens zeroed first so that nothing of them leaks into their neighbours."""
    pns = quant.patch_nums
    K, H, B = len(pns), pns[-1], idx_Bl.shape[0]
    e_BlC = quant.embedding(idx_Bl)
    if masked_Bl is not None:
        e_BlC = e_BlC * (~masked_Bl).unsqueeze(-1).to(e_BlC.dtype)
    full = quant._upsampled_phi(e_BlC.transpose(1, 2).reshape(B, -1, pn, pn), si, K, H)
    if pn != H:
        full = F.interpolate(full, size=(pn, pn), mode="area")
    return full.flatten(2).transpose(1, 2)


def scale_contributions(quant: Any, ms_idx_Bl: Sequence[torch.Tensor],
                        ms_masked_Bl: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """HMAR mask-branch inputs for teacher forcing: every scale's own code contribution at its resolution,
    ``area(phi_k(up(e[r_k])), pn_k)`` with masked tokens zeroed, concatenated: ``B x L x Cvae``."""
    out = []
    for si, (pn, idx) in enumerate(zip(quant.patch_nums, ms_idx_Bl)):
        out.append(_scale_contribution(quant, idx, None if ms_masked_Bl is None else ms_masked_Bl[si], si, pn))
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------------------------------
# The transformer
# ----------------------------------------------------------------------------------------------------


def block_causal_buffers(patch_nums: Sequence[int], device: torch.device | str | None = None, markov: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lvl_1L, attn_bias_11LL)``: the scale index of every position (``1 x L``, int64) and the
    block-causal additive mask (``1 x 1 x L x L``; 0 where scale(query) >= scale(key), else ``-inf``), or
    with ``markov`` (HMAR) the block-diagonal one (0 where scale(query) == scale(key))."""
    lvl_L = torch.cat([torch.full((pn * pn,), k, dtype=torch.long, device=device) for k, pn in enumerate(patch_nums)])
    L = lvl_L.shape[0]
    if markov:
        visible_LL = lvl_L.view(-1, 1) == lvl_L.view(1, -1)
    else:
        visible_LL = lvl_L.view(-1, 1) >= lvl_L.view(1, -1)
    bias_LL = torch.zeros(L, L, device=device).masked_fill(~visible_LL, -torch.inf)
    return lvl_L.view(1, L), bias_LL.view(1, 1, L, L)



class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer (VAR) with the official parameter names.

    Args:
        config: architecture (:class:`VARConfig`).
        vae: optional VQ-VAE used by :meth:`autoregressive_infer_cfg`/:meth:`sample` (it is *not*
            registered as a submodule, so ``state_dict`` holds the transformer only, as in the release).
        init: apply the official initialisation (:meth:`init_weights` with its default arguments).
    """

    def __init__(self, config: VARConfig | None = None, vae: VQVAE | None = None, init: bool = True):
        super().__init__()
        self.config = cfg = config or VARConfig()
        C, D, K = cfg.width, cfg.width, len(cfg.patch_nums)
        self.C, self.D, self.depth, self.num_heads = C, D, cfg.depth, cfg.heads
        self.V, self.Cvae, self.num_classes = cfg.vocab_size, cfg.Cvae, cfg.num_classes
        self.patch_nums: tuple[int, ...] = cfg.patch_nums
        self.L, self.first_l, self.begin_ends = cfg.L, cfg.first_l, cfg.begin_ends
        self.cond_drop_rate = cfg.cond_drop_rate
        self._vae: tuple[VQVAE, ...] = ()
        if vae is not None:
            self.attach_vae(vae)

        std = math.sqrt(1 / C / 3)
        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        self.lvl_embed = nn.Embedding(K, C)
        for t in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(t.data, mean=0.0, std=std)

        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(D, 6 * C)) if cfg.shared_aln
                               else nn.Identity())
        dpr = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(C, D, cfg.heads, cfg.mlp_ratio, cfg.norm_eps, cfg.shared_aln, cfg.attn_l2_norm,
                          cfg.drop_rate, cfg.attn_drop_rate, dpr[i])
            for i in range(cfg.depth)
        ])
        # scale index of every position, and the training mask (0 = visible, -inf = hidden): block-causal
        # (VAR) or block-diagonal (HMAR, markov=True)
        lvl_1L, attn_bias_11LL = block_causal_buffers(cfg.patch_nums, markov=cfg.markov)
        self.register_buffer("lvl_1L", lvl_1L)
        self.register_buffer("attn_bias_for_masking", attn_bias_11LL)
        self.head_nm = AdaLNBeforeHead(C, D, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.markov = cfg.markov
        if cfg.mask_layers is not None:  # HMAR masked refinement
            self.mask_embed = nn.Parameter(torch.empty(1, 1, C))
            nn.init.trunc_normal_(self.mask_embed.data, mean=0.0, std=std)
            if cfg.mask_layers > 0:
                first = cfg.depth - cfg.mask_layers
                self.mask_blocks = nn.ModuleList([
                    AdaLNSelfAttn(C, D, cfg.heads, cfg.mlp_ratio, cfg.norm_eps, cfg.shared_aln, cfg.attn_l2_norm,
                                  cfg.drop_rate, cfg.attn_drop_rate, dpr[first + i])
                    for i in range(cfg.mask_layers)
                ])
                self.mask_head_nm = AdaLNBeforeHead(C, D, cfg.norm_eps)
                self.mask_head = nn.Linear(C, cfg.vocab_size)
        if init:
            self.init_weights()
            if cfg.mask_layers:  # the mask branch starts as a copy of the next-scale tail (HMAR stage 2)
                self.init_mask_branch_from_tail()

    # -- helpers ----------------------------------------------------------------------------------------
    def attach_vae(self, vae: VQVAE) -> None:
        """Use ``vae`` for sampling (checks that codebook size, code dim and scales agree)."""
        vc = vae.config
        if (vc.vocab_size, vc.z_channels, vc.patch_nums) != (self.V, self.Cvae, self.patch_nums):
            raise ValueError(
                f"VQ-VAE (vocab {vc.vocab_size}, Cvae {vc.z_channels}, patch_nums {vc.patch_nums}) does not match "
                f"VAR (vocab {self.V}, Cvae {self.Cvae}, patch_nums {self.patch_nums})")
        self._vae = (vae,)

    @property
    def vae(self) -> VQVAE | None:
        return self._vae[0] if self._vae else None

    @property
    def device(self) -> torch.device:
        return self.lvl_1L.device

    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0) -> None:
        """The official initialisation: truncated normal (std ``sqrt(1/(3C))`` when ``init_std < 0``) for
        linear and embedding weights, zero biases; the head scaled by ``init_head``; AdaLN scale/shift rows
        by ``init_adaln`` and gate rows by ``init_adaln_gamma`` (blocks start close to identity); the
        attention output and ``fc2`` divided by ``sqrt(2 depth)``."""
        std = init_std if init_std >= 0 else math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight.data, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.data.zero_()
        if init_head >= 0:
            self.head.weight.data.mul_(init_head)
            self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        for blk in self.blocks:
            blk.attn.proj.weight.data.div_(math.sqrt(2 * self.depth))
            blk.ffn.fc2.weight.data.div_(math.sqrt(2 * self.depth))
            if blk.shared_aln:
                blk.ada_gss.data[:, :, 2:].mul_(init_adaln)
                blk.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)
            else:
                lin = blk.ada_lin[-1]
                lin.weight.data[2 * self.C:].mul_(init_adaln)
                lin.weight.data[:2 * self.C].mul_(init_adaln_gamma)
                lin.bias.data.zero_()

    @torch.no_grad()
    def init_mask_branch_from_tail(self) -> None:
        """Copy the last ``mask_layers`` blocks and the head into the mask branch (HMAR initialises its
        stage-2 mask branch from the next-scale model this way)."""
        n = self.config.mask_layers or 0
        if n == 0:
            return
        for dst, src in zip(self.mask_blocks, self.blocks[self.depth - n:]):
            dst.load_state_dict(src.state_dict())
        self.mask_head_nm.load_state_dict(self.head_nm.state_dict())
        self.mask_head.load_state_dict(self.head.state_dict())

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """``head(head_nm(h, cond))`` in float32."""
        return self.head(self.head_nm(h_BLC, cond_BD)).float()

    def _lvl_pos(self) -> torch.Tensor:
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC  # 1 x L x C

    def _resolve_labels(self, B: int, label_B: int | torch.Tensor | Sequence[int] | None,
                        generator: torch.Generator | None) -> torch.Tensor:
        dev = self.device
        if label_B is None:  # uniformly random real classes (drawn from the sampling generator)
            uniform = torch.full((1, self.num_classes), 1.0 / self.num_classes, device=dev)
            return torch.multinomial(uniform, num_samples=B, replacement=True, generator=generator).reshape(B)
        if isinstance(label_B, int):
            return torch.full((B,), self.num_classes if label_B < 0 else label_B, dtype=torch.long, device=dev)
        label_B = torch.as_tensor(label_B, dtype=torch.long, device=dev).reshape(-1)
        if label_B.shape[0] != B:
            raise ValueError(f"got {label_B.shape[0]} labels for a batch of {B}")
        label_B = torch.where(label_B < 0, self.num_classes, label_B)
        if int(label_B.max()) > self.num_classes:
            raise ValueError(f"class labels must be < {self.num_classes} (or {self.num_classes}/negative for the "
                             f"unconditional class), got {label_B.tolist()}")
        return label_B

    # -- teacher forcing -------------------------------------------------------------------------------
    def _embed_all(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = x_BLCv_wo_first_l.shape[0]
        assert x_BLCv_wo_first_l.shape[1:] == (self.L - self.first_l, self.Cvae), (
            f"expected x of shape (B, {self.L - self.first_l}, {self.Cvae}), got {tuple(x_BLCv_wo_first_l.shape)}")
        assert label_B.shape == (B,), f"expected {B} labels, got shape {tuple(label_B.shape)}"
        if self.training and self.cond_drop_rate > 0:
            drop_B = torch.rand(B, device=label_B.device) < self.cond_drop_rate
            label_B = torch.where(drop_B, self.num_classes, label_B)
        cond_BD = self.class_emb(label_B)
        sos_BlC = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        x_BLC = torch.cat((sos_BlC, self.word_embed(x_BLCv_wo_first_l.to(self.word_embed.weight.dtype))), dim=1)
        return x_BLC + self._lvl_pos(), cond_BD

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing pass over all ``L`` tokens with the block-causal mask (block-diagonal with
        ``markov``).

        Args:
            label_B: class labels ``B`` (``num_classes`` = unconditional). In training mode each label is
                replaced by the null class with probability ``cond_drop_rate``.
            x_BLCv_wo_first_l: next-scale inputs ``B x (L - first_l) x Cvae``, e.g. from
                ``vae.quantize.idxBl_to_var_input(tokens)``.

        Returns:
            ``logits_BLV``: float32 ``B x L x V``; row ``i`` predicts token ``i`` of the flattened pyramid.
        """
        B = x_BLCv_wo_first_l.shape[0]
        x_BLC, cond_BD = self._embed_all(label_B, x_BLCv_wo_first_l)
        cond = self.shared_ada_lin(cond_BD)
        for blk in self.blocks:
            x_BLC = blk(x_BLC, cond, self.attn_bias_for_masking)
        logits_BLV = self.get_logits(x_BLC, cond_BD)
        assert logits_BLV.shape == (B, self.L, self.V)
        return logits_BLV

    def forward_mask(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, cur_BLCv: torch.Tensor,
                     masked_BL: torch.Tensor) -> torch.Tensor:
        """HMAR masked-prediction pass (teacher forcing, all scales at once under the block-diagonal mask).

        The input of token ``i`` of scale ``k`` is its next-scale input (as in :meth:`forward`) plus, where
        ``masked_BL`` is False, ``word_embed.weight @ cur_BLCv[i]`` (the scale's own known code contribution,
        see :func:`scale_contributions`), and ``mask_embed`` where it is True. The mask branch
        (``mask_layers``) predicts every token; train it with the cross-entropy on the masked ones.

        Returns:
            ``logits_BLV`` (float32).
        """
        if self.config.mask_layers is None:
            raise ValueError("this VAR has no masked-refinement branch (VARConfig(markov=True, mask_layers=0|n))")
        B = x_BLCv_wo_first_l.shape[0]
        assert cur_BLCv.shape == (B, self.L, self.Cvae) and masked_BL.shape == (B, self.L)
        x_BLC, cond_BD = self._embed_all(label_B, x_BLCv_wo_first_l)
        known = F.linear(cur_BLCv.to(x_BLC.dtype), self.word_embed.weight)
        x_BLC = x_BLC + torch.where(masked_BL.unsqueeze(-1), self.mask_embed.to(x_BLC.dtype), known)
        cond = self.shared_ada_lin(cond_BD)
        for blk in self._mask_trunk():
            x_BLC = blk(x_BLC, cond, self.attn_bias_for_masking)
        return self._mask_logits(x_BLC, cond_BD)

    def _mask_trunk(self) -> list[nn.Module]:
        n = self.config.mask_layers or 0
        if n == 0:
            return list(self.blocks)
        return list(self.blocks[:self.depth - n]) + list(self.mask_blocks)

    def _mask_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        if not self.config.mask_layers:
            return self.get_logits(h_BLC, cond_BD)
        return self.mask_head(self.mask_head_nm(h_BLC, cond_BD)).float()

    # -- inference -------------------------------------------------------------------------------------
    def _sampling_state(self, label_B: torch.Tensor) -> "_ModelState":
        """Conditions (conditional then unconditional rows), positions and, unless ``markov``, KV caches."""
        cond_BD = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes))))  # 2B x D
        return _ModelState(self, cond_BD, self.shared_ada_lin(cond_BD), self._lvl_pos(),
                           None if self.markov else [KVCache() for _ in self.blocks])

    def _scale_input(self, st: "_ModelState", si: int, in_BlCv: torch.Tensor | None) -> torch.Tensor:
        """Input tokens of scale ``si`` for the 2B rows (conditional, unconditional), positions included."""
        b, e = self.begin_ends[si]
        if si == 0:
            R = st.cond_BD.shape[0]
            return (st.cond_BD.unsqueeze(1).expand(R, self.first_l, -1) + self.pos_start.expand(R, -1, -1)
                    + st.lvl_pos[:, :self.first_l])
        x_BlC = self.word_embed(in_BlCv.to(self.word_embed.weight.dtype)) + st.lvl_pos[:, b:e]
        return x_BlC.repeat(2, 1, 1)

    def _run_blocks(self, st: "_ModelState", x_RlC: torch.Tensor, blocks: Sequence[nn.Module] | None = None,
                    cache: bool = True) -> torch.Tensor:
        """Run ``x`` (``R`` rows: all 2B, or the B conditional ones) through the blocks, appending to the KV
        caches (with only the conditional rows, their K/V are written for both halves)."""
        R = x_RlC.shape[0]
        full = R == st.cond_BD.shape[0]
        cond = st.cond if full else st.cond[:R]
        h = x_RlC
        for i, blk in enumerate(blocks if blocks is not None else self.blocks):
            kv = None
            if cache and st.caches is not None:
                kv = st.caches[i] if full else _HalfCache(st.caches[i], R)
            h = blk(h, cond, None, kv)
        return h

    def _prefill(self, st: "_ModelState", inputs: Sequence[torch.Tensor]) -> None:
        """CoDe refiner: build this model's KV caches from the drafted scales' inputs in one block-causal
        pass (``inputs[k]`` is the ``B x pn_{k+1}^2 x Cvae`` input of scale ``k + 1``)."""
        if st.caches is None:  # markov: no cache to build
            return
        xs = [self._scale_input(st, 0, None)]
        for k, in_BlCv in enumerate(inputs, start=1):
            xs.append(self._scale_input(st, k, in_BlCv))
        x_RLC = torch.cat(xs, dim=1)
        n = x_RLC.shape[1]
        bias = self.attn_bias_for_masking[..., :n, :n]
        h = x_RLC
        for blk, cache in zip(self.blocks, st.caches):
            h = blk(h, st.cond, bias, cache)
        assert st.caches[0].length == n

    @torch.no_grad()
    def sample(
        self, B: int, label_B: int | torch.Tensor | Sequence[int] | None = None, *,
        cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
        generator: torch.Generator | None = None, vae: VQVAE | None = None,
        input_tokens: Sequence[torch.Tensor] | None = None, keep_masks: Sequence[torch.Tensor] | None = None,
        step_callback: Callable[[int, int], None] | None = None,
        hmar_steps: Mapping[int, int] | None = None, prune: Any = None, cfg_share: Any = None,
        refiner: "VAR | None" = None, draft_scales: int | None = None, stats: dict | None = None,
    ) -> VARSample:
        """Generate ``B`` token pyramids scale by scale with a KV cache (none with ``markov``) and linearly
        ramped CFG.

        Args:
            B: batch size.
            label_B: class per sample (tensor/list), one int for all (negative = unconditional), or
                ``None`` for uniformly random classes drawn from ``generator``.
            cfg: guidance scale; scale ``k`` (0-based) uses ``t = cfg * k / (K - 1)`` and
                ``logits = (1 + t) * cond - t * uncond``.
            top_k, top_p: sampling filters (0 = off); ``top_k`` larger than the vocabulary keeps all.
            more_smooth: use a Gumbel-softmax mixture of code vectors instead of the sampled code
                (visualisation only; not for FID).
            generator: random generator (on the model's device) for reproducible samples.
            vae: VQ-VAE providing the codebook and phi layers (default: the attached one).
            input_tokens, keep_masks: zero-shot editing. ``input_tokens[k]`` (``B x pn_k^2``) are the known
                tokens and ``keep_masks[k]`` (bool, ``B x pn_k^2``) marks where they are teacher-forced.
            step_callback: called as ``step_callback(k, K)`` after each scale.
            hmar_steps: HMAR masked refinement, ``{scale index: n sub-steps}`` (needs ``markov`` and
                ``mask_layers``). Sub-step 0 is the plain next-scale prediction; each later sub-step ``j``
                re-masks the ``floor(n_tok * cos(pi/2 * j / n))`` least confident tokens predicted at the
                previous sub-step (MaskGIT cosine schedule; tokens left unmasked stay fixed) and re-samples
                them with the mask branch, under the scale's CFG. ``n = 1`` is plain sampling.
            prune: FastVAR-style token pruning (:class:`fastgen.ar.accel.FastVARConfig`): at the scales it
                names only the top-ranked tokens run through the transformer; see :func:`prune_scores` and
                the config's ``fill`` for how the pruned positions are filled.
            cfg_share: CFG-pair sharing (:class:`fastgen.ar.accel.CFGShareConfig`): at the scales where its
                ``run_uncond(k, K)`` is False only the conditional rows are run; the unconditional K/V of
                such a scale are copies of the conditional ones, and the guided logits are the conditional
                ones (``mode="drop"``) or ``cond + t * delta`` with ``delta`` the last computed
                ``cond - uncond`` logits, nearest-upsampled to the scale (``mode="reuse"``).
            refiner, draft_scales: CoDe. This model drafts scales ``0 .. draft_scales - 1``; ``refiner`` (a
                VAR on the same VQ-VAE, scales and classes) builds its own KV cache from the drafted scales in
                one block-causal pass and generates the rest.
            stats: a dict filled with what ran at every scale (``stats["scales"]``: tokens computed, rows,
                model, sub-steps), read by ``fastgen.summary``.

        Returns:
            :class:`VARSample` with the per-scale tokens and the final ``f_hat``.
        """
        vae = vae or self.vae
        if vae is None:
            raise ValueError("VAR.sample needs a VQ-VAE: pass vae=... or call attach_vae(vae) first")
        quant = vae.quantize
        if (input_tokens is None) != (keep_masks is None):
            raise ValueError("input_tokens and keep_masks must be given together")
        K, pns, dev = len(self.patch_nums), self.patch_nums, self.device
        if refiner is not None:
            self._check_refiner(refiner, draft_scales)
        hmar_steps = dict(hmar_steps or {})
        for si, n_sub in hmar_steps.items():
            owner = refiner if (refiner is not None and si >= draft_scales) else self
            if not 0 <= int(si) < K or int(n_sub) < 1:
                raise ValueError(f"hmar_steps must map scale indices in [0, {K - 1}] to >= 1 sub-steps, got {hmar_steps}")
            if int(n_sub) > 1 and owner.config.mask_layers is None:
                raise ValueError("hmar_steps needs an HMAR model with a masked-refinement branch "
                                 "(VARConfig(markov=True, mask_layers=0 or n)); this VAR has none")
        label_B = self._resolve_labels(B, label_B, generator)
        m, st = self, self._sampling_state(label_B)
        f_hat = st.cond_BD.new_zeros(B, self.Cvae, pns[-1], pns[-1])
        emb = quant.embedding
        tokens: list[torch.Tensor] = []
        records: list[dict[str, Any]] = []
        inputs: list[torch.Tensor] = []  # next-scale inputs so far (CoDe prefill)
        in_BlCv: torch.Tensor | None = None
        in_BChw: torch.Tensor | None = None
        prev: dict[str, Any] = {}  # previous scale's hidden states / logits (pruning fill-in, cfg reuse)
        for si, pn in enumerate(pns):
            n = pn * pn
            if refiner is not None and si == draft_scales:
                m, st = refiner, refiner._sampling_state(label_B)
                m._prefill(st, inputs[:si - 1])  # the drafted scales 1 .. si-1 (inputs[-1] is scale si's)
                prev.pop("h", None)  # hidden states of the drafter mean nothing to the refiner
            ratio = si / (K - 1)
            t = cfg * ratio
            uncond = True if cfg_share is None else bool(cfg_share.run_uncond(si, K))
            R = 2 * B if uncond else B
            x_RnC = m._scale_input(st, si, in_BlCv)
            if not uncond:
                x_RnC = x_RnC[:B]
            rec: dict[str, Any] = {"scale": si, "pn": pn, "tokens": n, "of": n, "rows": R, "uncond": uncond,
                                   "model": "refiner" if m is not self else "main", "substeps": 1}
            # FastVAR pruning: only the top-ranked tokens run through the transformer
            keep_Bk = None
            if prune is not None and si > 0:
                keep_Bk = _prune_select(prune, si, K, pns, in_BChw, prev)
            if keep_Bk is not None:
                k = keep_Bk.shape[1]
                idx_RkC = keep_Bk.repeat(R // B, 1).unsqueeze(-1).expand(-1, -1, x_RnC.shape[-1])
                h_RkC = m._run_blocks(st, torch.gather(x_RnC, 1, idx_RkC))
                rec["tokens"] = k
                h_RnC, logits_RnV = _prune_fill(prune, m, st, h_RkC, keep_Bk, pn, prev, R)
            else:
                h_RnC = m._run_blocks(st, x_RnC)
                logits_RnV = m.get_logits(h_RnC, st.cond_BD[:R])
            if uncond:
                logits_BlV = (1 + t) * logits_RnV[:B] - t * logits_RnV[B:]
                if cfg_share is not None:
                    prev["delta"] = (logits_RnV[:B] - logits_RnV[B:], pn)
            else:
                logits_BlV = _shared_guidance(cfg_share, logits_RnV, t, pn, prev)
            if prune is not None:
                prev["h"], prev["raw"] = h_RnC, logits_RnV
            logits_BlV = filter_top_k_top_p(logits_BlV, top_k, top_p)
            probs_NV = logits_BlV.softmax(-1).view(-1, self.V)
            idx_Bl = torch.multinomial(probs_NV, 1, replacement=True, generator=generator).view(B, n)
            n_sub = int(hmar_steps.get(si, 1))
            if keep_Bk is not None and getattr(prune, "fill", None) == "zero":
                idx_Bl = _zero_fill_tokens(idx_Bl, keep_Bk, quant)
            if n_sub > 1:
                conf_Bl = probs_NV.gather(1, idx_Bl.view(-1, 1)).view(B, n)
                idx_Bl = m._refine(st, si, x_RnC, idx_Bl, conf_Bl, n_sub, t, top_k, top_p, generator, quant, B)
                rec["substeps"] = n_sub
            if more_smooth and n_sub == 1:
                tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                soft_BlV = _gumbel_softmax(logits_BlV * (1 + ratio), tau, generator)
                h_BlCv = soft_BlV.to(emb.weight.dtype) @ emb.weight.unsqueeze(0)
            else:
                h_BlCv = emb(idx_Bl)
            if keep_masks is not None:
                keep_Bl = keep_masks[si].to(dev).bool()
                gt_Bl = input_tokens[si].to(dev)
                assert keep_Bl.shape == gt_Bl.shape == (B, n), (keep_Bl.shape, gt_Bl.shape)
                idx_Bl = torch.where(keep_Bl, gt_Bl, idx_Bl)
                h_BlCv = torch.where(keep_Bl.unsqueeze(-1), emb(gt_Bl).to(h_BlCv.dtype), h_BlCv)
            tokens.append(idx_Bl)
            h_BChw = h_BlCv.transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, next_BChw = quant.get_next_autoregressive_input(si, K, f_hat, h_BChw)
            if si != K - 1:
                in_BChw = next_BChw
                in_BlCv = next_BChw.flatten(2).transpose(1, 2)
                inputs.append(in_BlCv)
            records.append(rec)
            if step_callback is not None:
                step_callback(si, K)
        if stats is not None:
            stats["scales"] = records
            stats["tokens_computed"] = sum(r["tokens"] * r["rows"] for r in records)
            stats["tokens_baseline"] = sum(r["of"] * 2 * B for r in records)
        return VARSample(tokens=tokens, f_hat=f_hat)

    def _check_refiner(self, refiner: "VAR", draft_scales: int | None) -> None:
        K = len(self.patch_nums)
        if draft_scales is None or not 0 < int(draft_scales) < K:
            raise ValueError(f"CoDe needs draft_scales in [1, {K - 1}] (the scales the main model drafts), "
                             f"got {draft_scales}")
        mine = (self.patch_nums, self.V, self.Cvae, self.num_classes)
        theirs = (refiner.patch_nums, refiner.V, refiner.Cvae, refiner.num_classes)
        if mine != theirs:
            raise ValueError(f"the CoDe refiner must share patch_nums, vocabulary, Cvae and classes with the drafter: "
                             f"drafter {mine}, refiner {theirs}")
        if refiner.device != self.device:
            raise ValueError(f"the CoDe refiner is on {refiner.device}, the drafter on {self.device}")

    def _refine(self, st: "_ModelState", si: int, x_RnC: torch.Tensor, idx_Bl: torch.Tensor, conf_Bl: torch.Tensor,
                n_sub: int, t: float, top_k: int, top_p: float, generator: torch.Generator | None, quant: Any,
                B: int) -> torch.Tensor:
        """HMAR masked refinement of one scale (see :meth:`sample` ``hmar_steps``)."""
        pn = self.patch_nums[si]
        n, R = pn * pn, x_RnC.shape[0]
        fixed_Bl = torch.zeros_like(idx_Bl, dtype=torch.bool)
        for j in range(1, n_sub):
            n_masked = int(math.floor(n * math.cos(math.pi / 2 * j / n_sub)))
            if n_masked <= 0:
                break
            order = conf_Bl.masked_fill(fixed_Bl, torch.inf).argsort(dim=1)
            masked_Bl = torch.zeros_like(fixed_Bl).scatter_(1, order[:, :n_masked], True)
            cur_BlCv = _scale_contribution(quant, idx_Bl, masked_Bl, si, pn)
            known = F.linear(cur_BlCv.to(x_RnC.dtype), self.word_embed.weight)
            x = x_RnC + torch.where(masked_Bl.unsqueeze(-1), self.mask_embed.to(x_RnC.dtype), known).repeat(R // B, 1, 1)
            h = self._run_blocks(st, x, self._mask_trunk(), cache=False)
            logits_RnV = self._mask_logits(h, st.cond_BD[:R])
            logits_BlV = (1 + t) * logits_RnV[:B] - t * logits_RnV[B:] if R == 2 * B else logits_RnV
            probs_NV = filter_top_k_top_p(logits_BlV, top_k, top_p).softmax(-1).view(-1, self.V)
            new_Bl = torch.multinomial(probs_NV, 1, replacement=True, generator=generator).view(B, n)
            new_conf = probs_NV.gather(1, new_Bl.view(-1, 1)).view(B, n)
            idx_Bl = torch.where(masked_Bl, new_Bl, idx_Bl)
            conf_Bl = torch.where(masked_Bl, new_conf, conf_Bl)
            fixed_Bl = ~masked_Bl
        return idx_Bl

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self, B: int, label_B: int | torch.Tensor | None, g_seed: int | None = None, cfg: float = 1.5,
        top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False, *,
        generator: torch.Generator | None = None, vae: VQVAE | None = None,
    ) -> torch.Tensor:
        """Sample ``B`` images (``B x 3 x H x W`` in ``[0, 1]``), the official entry point.

        ``g_seed`` seeds a fresh generator on the model's device (or pass ``generator``); see
        :meth:`sample` for the other arguments."""
        if g_seed is not None and generator is not None:
            raise ValueError("pass either g_seed or generator, not both")
        if g_seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(g_seed)
        vae = vae or self.vae
        out = self.sample(B, label_B, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth,
                          generator=generator, vae=vae)
        return vae.fhat_to_img(out.f_hat).add(1).mul(0.5)


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------

#: Buffers that are recomputed from the config; a checkpoint may omit them.
DERIVED_BUFFERS = re.compile(
    r"^(lvl_1L|attn_bias_for_masking|(mask_)?blocks\.\d+\.attn\.zero_k_bias|quantize\.ema_vocab_hit_SV)$")

_PRESETS = {PATCH_NUMS_256: "256 px", PATCH_NUMS_512: "512 px"}
_PREFIXES = ("module.", "_orig_mod.")


def _describe_pn(pns: Sequence[int], downsample: int = 16) -> str:
    pns = tuple(pns)
    L = sum(p * p for p in pns)
    name = _PRESETS.get(pns, f"{pns[-1] * downsample} px")
    return f"patch_nums {pns} ({len(pns)} scales, L={L}, {name})"


def read_checkpoint(src: str | os.PathLike | Mapping[str, Any], kind: str = "var", *,
                    weights_only: bool = True) -> dict[str, torch.Tensor]:
    """Load a state dict of ``kind`` ``"var"`` or ``"vae"`` from a ``.pth``/``.pt``/``.safetensors`` file
    or an in-memory dict, unwrapping the usual containers: the official trainer's
    ``{"trainer": {"var_wo_ddp": ..., "vae_local": ...}}``, ``{"model": ...}``, ``{"state_dict": ...}``,
    ``{"var_wo_ddp"|"var"|"vae_local"|"vae": ...}``, and ``module.``/``_orig_mod.`` key prefixes."""
    if kind not in ("var", "vae"):
        raise ValueError(f"kind must be 'var' or 'vae', got {kind!r}")
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"{kind} checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=weights_only)
            except Exception as e:  # unpickling of non-tensor objects refused by weights_only
                raise CheckpointError(
                    f"could not read {path} with torch.load(weights_only={weights_only}): {e}. If the file comes "
                    "from a source you trust (e.g. a trainer checkpoint with pickled arguments), pass "
                    "weights_only=False.") from e
        where = str(path)
    else:
        obj, where = src, "the given dict"
    marker = "head.weight" if kind == "var" else "quantize.embedding.weight"
    nested = (("var_wo_ddp", "var", "model", "state_dict", "module", "ema") if kind == "var"
              else ("vae_local", "vae", "model", "state_dict", "module"))
    for _ in range(4):  # unwrap up to a few container levels
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{where}: expected a dict of tensors, got {type(obj).__name__}")
        keys = {_strip(k) for k in obj}
        if marker in keys:
            break
        if kind == "var" and any(k.startswith(("base_blocks.", "ns_blocks.")) for k in keys):
            obj = hmar_official_to_fastgen({_strip(k): v for k, v in obj.items()})
            break
        if "trainer" in obj and isinstance(obj["trainer"], Mapping):
            obj = obj["trainer"]
            continue
        inner = next((obj[k] for k in nested if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            top = sorted(map(str, obj))[:20]
            raise CheckpointError(f"{where}: no {kind.upper()} state dict found (looked for {marker!r} at the top "
                                  f"level and under 'trainer', {', '.join(repr(k) for k in nested)}); "
                                  f"top-level keys: {top}")
        obj = inner
    else:
        raise CheckpointError(f"{where}: no {kind.upper()} state dict found")
    sd = {_strip(k): v for k, v in obj.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where}: non-tensor entries in the state dict: {bad[:10]}")
    return sd


#: How the NVlabs HMAR release splits the trunk (``base_blocks`` shared by a next-scale branch ``ns_*`` and a
#: mask branch ``mask_*``) maps onto fastgen's HMAR layout (``VARConfig(markov=True, mask_layers=n)``):
#: ``base_blocks.i`` -> ``blocks.i``; ``ns_blocks.j`` -> ``blocks.{n_base + j}``; ``ns_head.*`` -> ``head.*``;
#: ``ns_head_nm.*`` -> ``head_nm.*``; ``word_embed_bias`` -> ``word_embed.bias``; ``mask_blocks.*``,
#: ``mask_head.*``, ``mask_head_nm.*`` and ``mask_embed`` keep their names. Written from the key list in
#: the HMAR paper's code description, not checked against a released file (none is available offline):
#: anything it does not map is named by the strict loader.
HMAR_KEY_MAP = (("ns_head_nm.", "head_nm."), ("ns_head.", "head."), ("word_embed_bias", "word_embed.bias"))


def hmar_official_to_fastgen(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an NVlabs-HMAR-layout state dict to fastgen's HMAR layout (see :data:`HMAR_KEY_MAP`)."""
    n_base = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"base_blocks\.(\d+)\.", k))), default=-1)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if (m := re.match(r"base_blocks\.(\d+)\.(.*)", k)):
            k = f"blocks.{m.group(1)}.{m.group(2)}"
        elif (m := re.match(r"ns_blocks\.(\d+)\.(.*)", k)):
            k = f"blocks.{n_base + int(m.group(1))}.{m.group(2)}"
        else:
            for a, b in HMAR_KEY_MAP:
                if k.startswith(a):
                    k = b + k[len(a):]
                    break
        out[k] = v
    if "word_embed.bias" not in out and "word_embed.weight" in out:
        out["word_embed.bias"] = out["word_embed.weight"].new_zeros(out["word_embed.weight"].shape[0])
    return out


def _strip(key: Any) -> str:
    key = str(key)
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def infer_var_config(sd: Mapping[str, torch.Tensor], patch_nums: Sequence[int] | None = None,
                     **overrides: Any) -> VARConfig:
    """Read the architecture off a VAR state dict: depth (highest ``blocks.N``), width/vocabulary
    (``head.weight``), ``Cvae`` (``word_embed``), classes (``class_emb`` rows - 1), heads
    (``scale_mul_1H11``; without it, the official rule heads = depth), MLP ratio, ``shared_aln``,
    ``attn_l2_norm`` and HMAR mode (``markov``: a ``mask_embed`` tensor or a stored block-diagonal
    ``attn_bias_for_masking``; ``mask_layers``: the number of ``mask_blocks.N``; an HMAR checkpoint with
    neither, i.e. a next-scale-only one, reads as VAR: pass ``markov=True`` as an override or a full
    ``config`` to :func:`load_official`). ``patch_nums`` defaults to the
    official schedule with the checkpoint's number of positions (256 or 512 px); a given one is checked
    against ``pos_1LC``/``lvl_embed``."""
    need = ["head.weight", "word_embed.weight", "class_emb.weight", "pos_1LC", "lvl_embed.weight", "pos_start"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"not a VAR checkpoint: missing {missing}")
    block_ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not block_ids:
        raise CheckpointError("not a VAR checkpoint: no 'blocks.N.*' tensors")
    depth = max(block_ids) + 1
    V, C = sd["head.weight"].shape
    L, K, first_l = sd["pos_1LC"].shape[1], sd["lvl_embed.weight"].shape[0], sd["pos_start"].shape[1]
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in sd
    heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if attn_l2_norm else None
    shared_aln = "shared_ada_lin.1.weight" in sd or "blocks.0.ada_gss" in sd
    fc1 = sd.get("blocks.0.ffn.fc1.weight")
    mlp_ratio = fc1.shape[0] / C if fc1 is not None else 4.0
    if patch_nums is None:
        cands = [p for p in _PRESETS if sum(x * x for x in p) == L and len(p) == K and p[0] ** 2 == first_l]
        if not cands:
            raise CheckpointError(f"checkpoint has {L} positions over {K} scales, which matches no official "
                                  f"schedule; pass patch_nums explicitly")
        patch_nums = cands[0]
    patch_nums = tuple(int(p) for p in patch_nums)
    exp_L = sum(p * p for p in patch_nums)
    if (exp_L, len(patch_nums), patch_nums[0] ** 2) != (L, K, first_l):
        ckpt_pn = next((p for p in _PRESETS if sum(x * x for x in p) == L and len(p) == K), None)
        has = _describe_pn(ckpt_pn) if ckpt_pn else f"{L} positions over {K} scales"
        raise CheckpointError(f"wrong resolution: checkpoint has {has}, config expects {_describe_pn(patch_nums)}")
    # HMAR: a mask token (and maybe a mask branch), or a stored block-diagonal training mask
    mask_layers = None
    if "mask_embed" in sd:
        mask_layers = len({int(m.group(1)) for k in sd if (m := re.match(r"mask_blocks\.(\d+)\.", k))})
    markov = mask_layers is not None
    bias = sd.get("attn_bias_for_masking")
    if bias is not None and tuple(bias.shape[-2:]) == (L, L) and L > first_l:
        markov = markov or bool(torch.isinf(bias[..., -1, 0]).all())  # last token cannot see the first: HMAR
    kw = dict(depth=depth, patch_nums=patch_nums, vocab_size=V, Cvae=sd["word_embed.weight"].shape[1],
              num_classes=sd["class_emb.weight"].shape[0] - 1, embed_dim=C,
              num_heads=heads if heads is not None else depth, mlp_ratio=mlp_ratio,
              shared_aln=shared_aln, attn_l2_norm=attn_l2_norm, markov=markov, mask_layers=mask_layers)
    kw.update(overrides)
    return VARConfig(**kw)


def infer_vqvae_config(sd: Mapping[str, torch.Tensor], patch_nums: Sequence[int] = PATCH_NUMS_256,
                       **overrides: Any) -> VQVAEConfig:
    """Read the VQ-VAE architecture off its state dict (width, ``ch_mult``, blocks per level, attention,
    codebook, phi sharing). ``quant_resi`` and ``norm_groups`` are not stored and default to the release
    values (0.5, 32) unless overridden."""
    need = ["quantize.embedding.weight", "encoder.conv_in.weight", "quant_conv.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"not a VAR VQ-VAE checkpoint: missing {missing}")
    V, Cvae = sd["quantize.embedding.weight"].shape
    ch, in_ch = sd["encoder.conv_in.weight"].shape[:2]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
    nrb = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    last = levels[-1] if levels else 0
    if any(k.startswith("quantize.quant_resi.qresi_ls.") for k in sd):
        share = len({k.split(".")[3] for k in sd if k.startswith("quantize.quant_resi.qresi_ls.")})
    elif any(k.startswith("quantize.quant_resi.qresi.") for k in sd):
        share = 1
    else:
        share = 0
    kw: dict[str, Any] = dict(
        vocab_size=V, z_channels=Cvae, ch=ch, in_channels=in_ch, ch_mult=ch_mult, num_res_blocks=nrb,
        using_sa=f"encoder.down.{last}.attn.0.qkv.weight" in sd, using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd,
        quant_conv_ks=sd["quant_conv.weight"].shape[-1], share_quant_resi=share, patch_nums=tuple(patch_nums))
    if share == 0 and not any(k.startswith("quantize.quant_resi.") for k in sd):
        kw["quant_resi"] = 0.0
    kw.update(overrides)
    groups = kw.get("norm_groups", 32)
    widths = sorted({ch} | {ch * m for m in ch_mult})
    if any(w % groups for w in widths):
        raise CheckpointError(f"the VQ-VAE's conv widths {widths} are not divisible by {groups} GroupNorm groups "
                              "(the release's value; the number is not stored in the checkpoint): pass "
                              "vae_config=VQVAEConfig(..., norm_groups=N) with the value it was trained with")
    return VQVAEConfig(**kw)


def _compare_configs(expected: VARConfig, got: VARConfig) -> None:
    checks = [("depth", expected.depth, got.depth), ("width (embed_dim)", expected.width, got.width),
              ("heads", expected.heads, got.heads), ("vocab_size", expected.vocab_size, got.vocab_size),
              ("Cvae", expected.Cvae, got.Cvae), ("num_classes", expected.num_classes, got.num_classes),
              ("shared_aln", expected.shared_aln, got.shared_aln),
              ("attn_l2_norm", expected.attn_l2_norm, got.attn_l2_norm),
              ("mlp_ratio", expected.mlp_ratio, got.mlp_ratio), ("markov (HMAR)", expected.markov, got.markov),
              ("mask_layers", expected.mask_layers, got.mask_layers)]
    bad = [f"checkpoint has {n} {g}, config expects {e}" for n, e, g in checks if e != g]
    if tuple(expected.patch_nums) != tuple(got.patch_nums):
        bad.append(f"wrong resolution: checkpoint has {_describe_pn(got.patch_nums)}, config expects "
                   f"{_describe_pn(expected.patch_nums)}")
    if bad:
        raise CheckpointError("VAR checkpoint does not match the config: " + "; ".join(bad))


def load_state_dict_checked(module: nn.Module, sd: Mapping[str, torch.Tensor], name: str = "model", *,
                            strict: bool = True, copy: bool = True) -> None:
    """Load ``sd`` into ``module`` after checking it: missing, unexpected and mis-shaped tensors are
    listed by name in one :class:`CheckpointError` (``strict=False`` logs them instead and loads the
    rest). Derived buffers (:data:`DERIVED_BUFFERS`) may be absent or differently shaped. A module built on
    the meta device adopts the tensors of ``sd`` (copies of them with ``copy``)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not DERIVED_BUFFERS.match(k)]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape) and not DERIVED_BUFFERS.match(k)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if shape:
        problems.append(f"shape mismatches ({len(shape)}): {shape}")
    if problems:
        msg = f"{name} checkpoint does not match the model: " + "; ".join(problems)
        if strict:
            raise CheckpointError(msg)
        logger.warning("%s (loading the matching tensors, strict=False)", msg)
    load = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    on_meta = any(t.is_meta for t in own.values())
    if on_meta:  # built on the meta device: adopt the checkpoint's tensors (cast to the model's dtype)
        load = {k: v.to(own[k].dtype, copy=copy) for k, v in load.items()}
    module.load_state_dict(load, strict=False, assign=on_meta)
    if on_meta:
        _materialize_derived(module)


def _materialize_derived(module: nn.Module) -> None:
    # buffers that the checkpoint did not provide are recomputed (they are functions of the config)
    for mod in module.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if isinstance(mod, VAR) and name in ("lvl_1L", "attn_bias_for_masking"):
                lvl_1L, bias = block_causal_buffers(mod.patch_nums, markov=mod.config.markov)
                mod._buffers[name] = lvl_1L if name == "lvl_1L" else bias
            elif name in ("zero_k_bias", "ema_vocab_hit_SV"):
                mod._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
            else:
                raise RuntimeError(f"buffer {name!r} of {type(mod).__name__} was not in the checkpoint")
    left = [n for n, t in module.state_dict().items() if t.is_meta]
    if left:  # cannot happen after the strict checks; kept as a guard
        raise CheckpointError(f"tensors not loaded from the checkpoint: {left}")


def build_and_load(factory: Callable[[], nn.Module], sd: Mapping[str, torch.Tensor], name: str = "model", *,
                   strict: bool = True, copy: bool = True) -> nn.Module:
    """Build ``factory()`` and load ``sd`` into it. With ``strict`` the model is built on the meta device and
    takes the checkpoint's tensors directly (no random init, no second copy: VAR-d30 loads in seconds);
    with ``strict=False`` it is built normally so that tensors absent from ``sd`` keep their init. Pass
    ``copy=False`` when ``sd`` is not used elsewhere (e.g. just read from a file) to share its memory."""
    if not strict:
        module = factory()
        load_state_dict_checked(module, sd, name, strict=False)
        return module
    with torch.device("meta"):
        module = factory()
    load_state_dict_checked(module, sd, name, strict=True, copy=copy)
    return module


def load_official(
    vae_ckpt: str | os.PathLike | Mapping[str, Any] | None,
    var_ckpt: str | os.PathLike | Mapping[str, Any], *,
    depth: int | None = None, patch_nums: Sequence[int] | None = None, config: VARConfig | None = None,
    vae_config: VQVAEConfig | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    strict: bool = True, weights_only: bool = True,
) -> tuple[VQVAE, VAR]:
    """Build and load the official VAR release (or a checkpoint of its trainer).

    Args:
        vae_ckpt: ``vae_ch160v4096z32.pth`` (or a dict); ``None`` takes the VAE from a trainer checkpoint
            ``var_ckpt`` that holds ``trainer.vae_local``.
        var_ckpt: ``var_d{16,20,24,30,36}.pth``, ``ar-ckpt-*.pth`` or a dict.
        depth: expected depth; a different checkpoint raises "checkpoint has depth X, config expects Y".
        patch_nums: expected schedule (default: inferred, 256 or 512 px); a mismatch raises
            "wrong resolution: ...".
        config: full expected :class:`VARConfig` (every architecture field is compared).
        vae_config: VQ-VAE config (default: inferred from the tensors with the release's ``quant_resi``).
        device, dtype: where to put the models.
        strict: raise on missing/unexpected/mis-shaped tensors (default), else log and load the rest.
        weights_only: passed to ``torch.load``.

    Returns:
        ``(vae, var)`` in eval mode, with ``vae`` attached to ``var``.
    """
    var_sd = read_checkpoint(var_ckpt, "var", weights_only=weights_only)
    exp_pn = tuple(config.patch_nums) if config is not None else (tuple(patch_nums) if patch_nums else None)
    if config is not None and patch_nums is not None and tuple(patch_nums) != exp_pn:
        raise ValueError(f"patch_nums {tuple(patch_nums)} disagrees with config.patch_nums {exp_pn}")
    # with an expected schedule, a checkpoint of another length raises "wrong resolution: ..."
    got = infer_var_config(var_sd, patch_nums=exp_pn)
    if depth is not None and depth != got.depth:
        raise CheckpointError(f"checkpoint has depth {got.depth}, config expects depth {depth} "
                              f"(width {got.width} vs {64 * depth})")
    if config is not None:
        _compare_configs(config, got)
        got = replace(config)
    if vae_ckpt is None:
        if isinstance(var_ckpt, Mapping):
            vae_src: Any = var_ckpt
        else:
            vae_src = torch.load(str(var_ckpt), map_location="cpu", weights_only=weights_only)
        vae_sd = read_checkpoint(vae_src, "vae", weights_only=weights_only)
    else:
        vae_sd = read_checkpoint(vae_ckpt, "vae", weights_only=weights_only)
    vcfg = vae_config or infer_vqvae_config(vae_sd, patch_nums=got.patch_nums)
    if tuple(vcfg.patch_nums) != tuple(got.patch_nums):
        vcfg = replace(vcfg, patch_nums=tuple(got.patch_nums))
    if (vcfg.vocab_size, vcfg.z_channels) != (got.vocab_size, got.Cvae):
        raise CheckpointError(f"VQ-VAE has vocab {vcfg.vocab_size} and Cvae {vcfg.z_channels}, the VAR checkpoint "
                              f"expects vocab {got.vocab_size} and Cvae {got.Cvae}")
    # tensors read from files are adopted without a copy; a caller's in-memory dict is copied
    vae_copy = isinstance(vae_ckpt, Mapping) or (vae_ckpt is None and isinstance(var_ckpt, Mapping))
    vae = build_and_load(lambda: VQVAE(vcfg), vae_sd, "VQ-VAE", strict=strict, copy=vae_copy)
    var = build_and_load(lambda: VAR(got, init=False), var_sd, "VAR", strict=strict,
                         copy=isinstance(var_ckpt, Mapping))
    _check_buffers(var, var_sd)
    vae.eval().requires_grad_(False)
    var.eval().requires_grad_(False)
    vae.to(device=device, dtype=dtype)
    var.to(device=device, dtype=dtype)
    var.attach_vae(vae)
    logger.info("loaded VAR-d%d (C=%d, %s) and its VQ-VAE", got.depth, got.width, _describe_pn(got.patch_nums))
    return vae, var


def _check_buffers(var: VAR, sd: Mapping[str, torch.Tensor]) -> None:
    # the stored scale-index buffer must agree with the schedule (catches same-L, different-K orderings)
    if "lvl_1L" in sd and tuple(sd["lvl_1L"].shape) == tuple(var.lvl_1L.shape):
        if not torch.equal(sd["lvl_1L"].to(var.lvl_1L), var.lvl_1L):
            raise CheckpointError(f"wrong resolution: the checkpoint's scale layout (lvl_1L) differs from "
                                  f"{_describe_pn(var.patch_nums)}")
