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

This file is the model only. Loading the released checkpoints (:func:`fastgen.ar.checkpoints.load_official`)
lives in :mod:`fastgen.ar.checkpoints`; the accelerators (FastVAR, CoDe, cfg-share in :mod:`fastgen.ar.accel`)
change the next-scale loop of :meth:`VAR.sample` only through the per-scale hooks of
:mod:`fastgen.ar.scale_hooks`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .scale_hooks import CondRowsCache, ScaleHooks, ScaleStep, as_hooks
from .vqvae import PATCH_NUMS_256, VQVAE, config_from_dict

__all__ = [
    "VARConfig", "VAR", "VARSample", "KVCache", "SelfAttention", "AdaLNSelfAttn", "AdaLNBeforeHead", "FFN",
    "sample_top_k_top_p", "filter_top_k_top_p", "block_causal_buffers", "attention", "scale_contributions",
]


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
# Sampling state (what an accelerator changes in the next-scale loop goes through fastgen.ar.scale_hooks)
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


# ----------------------------------------------------------------------------------------------------
# HMAR: a scale's own code contribution (the mask branch's input)
# ----------------------------------------------------------------------------------------------------


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
                kv = st.caches[i] if full else CondRowsCache(st.caches[i], R)
            h = blk(h, cond, None, kv)
        return h

    def _prefill(self, st: "_ModelState", inputs: Sequence[torch.Tensor]) -> None:
        """A model taking over mid-call (a scale hook's ``handover``, e.g. CoDe's refiner): build its KV caches
        from the earlier scales' inputs in one block-causal pass (``inputs[k]`` is the ``B x pn_{k+1}^2 x Cvae``
        input of scale ``k + 1``)."""
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
        hmar_steps: Mapping[int, int] | None = None,
        hooks: ScaleHooks | Sequence[ScaleHooks] | None = None, stats: dict | None = None,
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
            hooks: per-scale hooks (:class:`fastgen.ar.scale_hooks.ScaleHooks`, one or a sequence): which
                model runs a scale, whether its unconditional rows run, which of its tokens are computed and
                how the rest are filled, how its logits are guided. The accelerators of
                :mod:`fastgen.ar.accel` (FastVAR, CoDe, cfg-share) are such hooks. ``None``: plain VAR.
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
        hooks = as_hooks(hooks)
        hooks.begin(self, vae, B)
        owners: list[tuple[VAR, bool]] = []  # (model that runs scale k, whether it takes over at k)
        for si in range(K):
            nxt = hooks.handover(si)
            owners.append((nxt, True) if nxt is not None else (owners[-1][0] if owners else self, False))
        hmar_steps = dict(hmar_steps or {})
        for si, n_sub in hmar_steps.items():
            if not 0 <= int(si) < K or int(n_sub) < 1:
                raise ValueError(f"hmar_steps must map scale indices in [0, {K - 1}] to >= 1 sub-steps, got {hmar_steps}")
            if int(n_sub) > 1 and owners[int(si)][0].config.mask_layers is None:
                raise ValueError("hmar_steps needs an HMAR model with a masked-refinement branch "
                                 "(VARConfig(markov=True, mask_layers=0 or n)); this VAR has none")
        label_B = self._resolve_labels(B, label_B, generator)
        m, st = self, self._sampling_state(label_B)
        f_hat = st.cond_BD.new_zeros(B, self.Cvae, pns[-1], pns[-1])
        emb = quant.embedding
        tokens: list[torch.Tensor] = []
        records: list[dict[str, Any]] = []
        inputs: list[torch.Tensor] = []  # next-scale inputs so far (a new model's KV-cache prefill)
        in_BlCv: torch.Tensor | None = None
        in_BChw: torch.Tensor | None = None
        for si, pn in enumerate(pns):
            n = pn * pn
            owner, handed_over = owners[si]
            if handed_over:  # another model takes over: it builds its KV cache from the scales so far
                m, st = owner, owner._sampling_state(label_B)
                if si > 0:
                    m._prefill(st, inputs[:si - 1])  # scales 0 .. si-1 (inputs[-1] is scale si's own input)
            ratio = si / (K - 1)
            t = cfg * ratio
            step = ScaleStep(si=si, K=K, pn=pn, B=B, t=t, model=m, handed_over=handed_over, in_BChw=in_BChw)
            hooks.plan(step)
            uncond, keep_Bk = step.uncond, step.keep_Bk
            R = 2 * B if uncond else B
            x_RnC = m._scale_input(st, si, in_BlCv)
            if not uncond:
                x_RnC = x_RnC[:B]
            rec: dict[str, Any] = {"scale": si, "pn": pn, "tokens": n, "of": n, "rows": R, "uncond": uncond,
                                   "model": "refiner" if m is not self else "main", "substeps": 1}
            if keep_Bk is not None:  # only the kept tokens run through the transformer
                assert keep_Bk.ndim == 2 and keep_Bk.shape[0] == B, (keep_Bk.shape, B)
                idx_RkC = keep_Bk.repeat(R // B, 1).unsqueeze(-1).expand(-1, -1, x_RnC.shape[-1])
                h_RkC = m._run_blocks(st, torch.gather(x_RnC, 1, idx_RkC))
                rec["tokens"] = keep_Bk.shape[1]
                h_RnC, logits_RnV = hooks.full_grid(step, h_RkC, st.cond_BD[:R])
            else:
                h_RnC = m._run_blocks(st, x_RnC)
                logits_RnV = m.get_logits(h_RnC, st.cond_BD[:R])
            assert logits_RnV.shape == (R, n, self.V), (tuple(logits_RnV.shape), R, n, self.V)
            logits_BlV = hooks.on_logits(step, h_RnC, logits_RnV)
            if logits_BlV is None:
                if not uncond:
                    raise ValueError(f"scale {si} ran without its unconditional rows but no scale hook guided it")
                logits_BlV = (1 + t) * logits_RnV[:B] - t * logits_RnV[B:]
            logits_BlV = filter_top_k_top_p(logits_BlV, top_k, top_p)
            probs_NV = logits_BlV.softmax(-1).view(-1, self.V)
            idx_Bl = torch.multinomial(probs_NV, 1, replacement=True, generator=generator).view(B, n)
            n_sub = int(hmar_steps.get(si, 1))
            idx_Bl = hooks.on_tokens(step, idx_Bl)
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
