"""Multi-scale residual VQ-VAE of VAR (Tian et al., "Visual Autoregressive Modeling: Scalable Image
Generation via Next-Scale Prediction", NeurIPS 2024, arXiv 2404.02905), written from the paper and the
published checkpoint layout.

An image ``x`` in ``[-1, 1]`` is encoded to a continuous feature map ``f = quant_conv(encoder(x))`` of
shape ``B x Cvae x h x w`` (``h = w = patch_nums[-1]``). It is tokenised into ``K = len(patch_nums)``
token maps ``r_1 .. r_K`` of growing size ``pn_k x pn_k`` by *residual* quantisation (Algorithm 1 of the
paper)::

    f_rest = f ; f_hat = 0
    for k in 1..K:
        r_k   = argmin_v || area_down(f_rest, pn_k) - e_v ||^2          (the last scale is not resized)
        h_k   = phi_k( bicubic_up(e[r_k], h) )
        f_hat = f_hat + h_k ;  f_rest = f_rest - h_k

``phi_k(z) = (1 - q) z + q conv3x3(z)`` with ``q = quant_resi = 0.5``. With ``share_quant_resi = 4`` only
four convolutions exist; scale ``k`` uses the one whose "tick" (``linspace(1/12, 11/12, 4)``) lies
closest to ``k / (K - 1)``, which is ``[0,0,1,1,1,2,2,3,3,3]`` for ten scales. Decoding is
``decoder(post_quant_conv(f_hat))`` clamped to ``[-1, 1]``.

The encoder/decoder are the LDM "vq-f16" convolutional nets (``ch=160, ch_mult=(1,1,2,2,4)``, two
ResNet blocks per level, self-attention at the lowest resolution and in the middle, GroupNorm(32), SiLU).
Every module name matches the released ``vae_ch160v4096z32.pth`` so its ``state_dict`` loads as is.

Naming: tensors carry their layout in the name (``f_BChw``, ``idx_Bl``, ``x_BLCv``): ``B`` batch,
``C`` channels, ``h, w`` spatial, ``l`` tokens of one scale, ``L`` tokens of all scales, ``V`` vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "VQVAEConfig", "VQVAE", "Encoder", "Decoder", "MultiScaleResidualQuantizer", "Phi", "phi_index",
    "PATCH_NUMS_256", "PATCH_NUMS_512",
]

#: The official 10-step schedule for 256 px images (``L = 680`` tokens).
PATCH_NUMS_256: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
#: The official 10-step schedule for 512 px images (``L = 2240`` tokens, used by VAR-d36).
PATCH_NUMS_512: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def config_from_dict(cls, d: Mapping[str, Any]):
    """An instance of the config dataclass ``cls`` from a saved ``config.json`` dict (lists become tuples; the
    ``_class_name`` key is ignored); a ``ValueError`` lists unknown keys and the known ones."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names - {"_class_name"})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; known keys are {sorted(names)}")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    return cls(**kw)


@dataclass
class VQVAEConfig:
    """Hyper-parameters of the multi-scale VQ-VAE. The defaults are the released ``vae_ch160v4096z32``.

    Attributes:
        vocab_size: codebook size ``V`` (4096).
        z_channels: latent / code dimension ``Cvae`` (32).
        ch: base width of the conv nets (160); must be divisible by ``norm_groups``.
        ch_mult: width multipliers per resolution level; ``len(ch_mult) - 1`` halvings, so the default
            (1,1,2,2,4) downsamples by 16.
        num_res_blocks: ResNet blocks per encoder level (the decoder has one more per level).
        dropout: dropout inside the ResNet blocks (0 for inference).
        in_channels: image channels (3).
        using_sa: self-attention blocks at the lowest resolution level.
        using_mid_sa: self-attention in the middle block.
        norm_groups: GroupNorm groups (32 in the release; lower it for tiny test widths).
        quant_conv_ks: kernel size of ``quant_conv`` / ``post_quant_conv`` (3).
        quant_resi: residual ratio ``q`` of ``phi(z) = (1-q) z + q conv(z)``; 0 disables phi.
        share_quant_resi: number of phi convolutions: 0 = one per scale, 1 = a single shared one,
            n >= 2 = ``n`` "partially shared" ones selected by scale ratio (4 in the release).
        using_znorm: nearest code by cosine similarity instead of Euclidean distance (False).
        beta: commitment-loss weight (VAE training only).
        patch_nums: side lengths of the K token maps, small to large; the last equals the latent size.
    """

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    in_channels: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    norm_groups: int = 32
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    using_znorm: bool = False
    beta: float = 0.25
    patch_nums: tuple[int, ...] = PATCH_NUMS_256

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if len(self.patch_nums) < 2:
            raise ValueError(f"patch_nums needs at least two scales, got {self.patch_nums}")
        if any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:])) or self.patch_nums[0] < 1:
            raise ValueError(f"patch_nums must be positive and strictly increasing, got {self.patch_nums}")
        widths = [self.ch] + [self.ch * m for m in self.ch_mult]
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"every conv width {sorted(set(widths))} must be divisible by norm_groups="
                             f"{self.norm_groups}")
        if self.share_quant_resi < 0:
            raise ValueError(f"share_quant_resi must be >= 0, got {self.share_quant_resi}")

    @property
    def downsample(self) -> int:
        """Spatial downsampling factor of the encoder (16 for the release)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        """Image side length in pixels that the last scale covers (256 for the 256 px schedule)."""
        return self.patch_nums[-1] * self.downsample

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VQVAEConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise a ``ValueError`` naming them."""
        return config_from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ----------------------------------------------------------------------------------------------------
# Convolutional encoder / decoder (LDM vq-f16 layout)
# ----------------------------------------------------------------------------------------------------


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """``x + conv(silu(norm(conv(silu(norm(x))))))``, with a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused 1x1 ``qkv`` conv and a residual ``proj_out``."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BChw.shape
        q, k, v = self.qkv(self.norm(x_BChw)).view(B, 3, C, H * W).transpose(2, 3).unbind(1)  # each B,HW,C
        o_BNC = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x_BChw + self.proj_out(o_BNC.transpose(1, 2).reshape(B, C, H, W))


class Downsample2x(nn.Module):
    """Stride-2 3x3 conv after asymmetric (right/bottom) zero padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResNet blocks), ``attn`` (attention after each block, may be empty)
    and an optional ``downsample``/``upsample``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int, using_sa: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups) if using_sa else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image ``B x 3 x H x W`` -> features ``B x z_channels x H/ds x W/ds``."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        g, n_lv = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for lv, mult in enumerate(cfg.ch_mult):
            level, c_out = _Level(), cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(c_in, c_out, cfg.dropout, g))
                c_in = c_out
                if lv == n_lv - 1 and cfg.using_sa:
                    level.attn.append(AttnBlock(c_in, g))
            if lv != n_lv - 1:
                level.downsample = Downsample2x(c_in)
            self.down.append(level)
        self.mid = _Mid(c_in, cfg.dropout, g, cfg.using_mid_sa)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_B3HW)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features ``B x z_channels x h x w`` -> image ``B x 3 x h*ds x w*ds`` (not clamped)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        g, n_lv = cfg.norm_groups, len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, 1, 1)
        self.mid = _Mid(c_in, cfg.dropout, g, cfg.using_mid_sa)
        levels: list[_Level] = []
        for lv in reversed(range(n_lv)):  # built from the lowest resolution up, stored by level index
            level, c_out = _Level(), cfg.ch * cfg.ch_mult[lv]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(c_in, c_out, cfg.dropout, g))
                c_in = c_out
                if lv == n_lv - 1 and cfg.using_sa:
                    level.attn.append(AttnBlock(c_in, g))
            if lv != 0:
                level.upsample = Upsample2x(c_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, 1, 1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z_BChw))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------
# phi refinement convolutions and the multi-scale residual quantiser
# ----------------------------------------------------------------------------------------------------


class Phi(nn.Conv2d):
    """``phi(h) = (1 - q) h + q conv3x3(h)``: the learned refinement applied to each upsampled code map."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw * (1 - self.resi_ratio) + super().forward(h_BChw) * self.resi_ratio


def _ticks(n: int) -> np.ndarray:
    # positions in [0, 1] that the n phi layers are "responsible" for; 4 layers use thirds-spaced ends
    return np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)


def phi_index(si: int, num_scales: int, num_phi: int) -> int:
    """Which of ``num_phi`` phi layers scale ``si`` (0-based, of ``num_scales``) uses: the layer whose tick
    is nearest to ``si / (num_scales - 1)`` (first one on ties). ``[0,0,1,1,1,2,2,3,3,3]`` for 10 scales
    and 4 layers."""
    assert num_scales >= 2 and 0 <= si < num_scales, (si, num_scales)
    return int(np.argmin(np.abs(_ticks(num_phi) - si / (num_scales - 1))))


class PhiPartiallyShared(nn.Module):
    """``n >= 2`` phi layers (``qresi_ls.{i}``) shared across the scales by nearest tick."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(layers)

    def select(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi_ls[phi_index(si, num_scales, len(self.qresi_ls))]


class PhiShared(nn.Module):
    """One phi layer (``qresi``) for every scale."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.qresi = layer

    def select(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi


class PhiNonShared(nn.ModuleList):
    """One phi layer per scale (``{i}``), picked by tick like the partially shared case."""

    def select(self, si: int, num_scales: int) -> nn.Module:
        return self[phi_index(si, num_scales, len(self))]


class MultiScaleResidualQuantizer(nn.Module):
    """The multi-scale residual quantiser (module name ``quantize`` in the VQ-VAE).

    Parameters: ``embedding`` (``V x Cvae`` codebook), ``quant_resi`` (the phi layers) and the buffer
    ``ema_vocab_hit_SV`` (``K x V`` code usage statistics, kept for checkpoint compatibility).
    """

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.vocab_size, self.Cvae = cfg.vocab_size, cfg.z_channels
        self.patch_nums: tuple[int, ...] = cfg.patch_nums
        self.using_znorm, self.beta = cfg.using_znorm, cfg.beta

        def make() -> nn.Module:
            return Phi(cfg.z_channels, cfg.quant_resi) if abs(cfg.quant_resi) > 1e-6 else nn.Identity()

        if cfg.share_quant_resi == 0:
            self.quant_resi: nn.Module = PhiNonShared([make() for _ in cfg.patch_nums])
        elif cfg.share_quant_resi == 1:
            self.quant_resi = PhiShared(make())
        else:
            self.quant_resi = PhiPartiallyShared([make() for _ in range(cfg.share_quant_resi)])
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)

    # -- helpers --------------------------------------------------------------------------------------
    def phi(self, si: int, num_scales: int | None = None) -> nn.Module:
        """The phi layer of scale ``si``."""
        return self.quant_resi.select(si, num_scales or len(self.patch_nums))

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry for each row of ``z_NC`` (Euclidean, or cosine if znorm)."""
        z_NC, e_VC = z_NC.float(), self.embedding.weight.detach().float()  # distances in float32
        if self.using_znorm:
            return (F.normalize(z_NC, dim=-1) @ F.normalize(e_VC, dim=-1).T).argmax(dim=1)
        d_NV = torch.addmm(z_NC.square().sum(1, keepdim=True) + e_VC.square().sum(1), z_NC, e_VC.T,
                           beta=1, alpha=-2)
        return d_NV.argmin(dim=1)

    def _upsampled_phi(self, h_BChw: torch.Tensor, si: int, num_scales: int, size: int) -> torch.Tensor:
        # bicubic up to the full latent size first, then phi (the last scale is already full size)
        if si != num_scales - 1:
            h_BChw = F.interpolate(h_BChw, size=(size, size), mode="bicubic")
        return self.phi(si, num_scales)(h_BChw)

    def _embed_map(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        B = idx_Bl.shape[0]
        assert idx_Bl.shape[1] == pn * pn, f"token map of {idx_Bl.shape[1]} tokens is not {pn}x{pn}"
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)

    # -- encoding --------------------------------------------------------------------------------------
    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool,
                           patch_nums: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Residual-quantise ``f_BChw``; returns per scale the token indices ``idx_Bl`` (``B x pn^2``), or
        with ``to_fhat`` the cumulative reconstruction ``f_hat`` after that scale (``B x Cvae x h x w``)."""
        pns = tuple(patch_nums or self.patch_nums)
        B, C, H, W = f_BChw.shape
        assert H == W == pns[-1], f"feature map {H}x{W} does not match the last scale {pns[-1]}"
        assert C == self.Cvae, f"feature map has {C} channels, the codebook {self.Cvae}"
        f_rest = f_BChw.detach().to(self.embedding.weight.dtype).clone()
        f_hat = torch.zeros_like(f_rest)
        out: list[torch.Tensor] = []
        K = len(pns)
        for si, pn in enumerate(pns):
            r_BChw = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != K - 1 else f_rest
            idx_N = self.nearest_code(r_BChw.permute(0, 2, 3, 1).reshape(-1, C))
            h_BChw = self._upsampled_phi(self._embed_map(idx_N.view(B, pn * pn), pn), si, K, H)
            f_hat = f_hat + h_BChw
            f_rest = f_rest - h_BChw
            out.append(f_hat.clone() if to_fhat else idx_N.view(B, pn * pn))
        return out

    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE training pass: returns the straight-through quantised features ``f_hat`` (gradients flow to
        ``f`` unchanged) and the VQ loss ``mean_k [beta ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2]``
        (commitment + codebook terms at every scale). Also updates ``ema_vocab_hit_SV`` in training."""
        f_BChw = f_BChw.float()
        B, C, H, W = f_BChw.shape
        f_ng = f_BChw.detach()
        f_rest, f_hat = f_ng.clone(), torch.zeros_like(f_ng)
        K = len(self.patch_nums)
        loss = f_BChw.new_zeros(())
        for si, pn in enumerate(self.patch_nums):
            r_BChw = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != K - 1 else f_rest
            idx_N = self.nearest_code(r_BChw.permute(0, 2, 3, 1).reshape(-1, C))
            if self.training:
                hit_V = idx_N.bincount(minlength=self.vocab_size).float()
                self.ema_vocab_hit_SV[si].mul_(0.99).add_(hit_V, alpha=0.01)
            h_BChw = self._upsampled_phi(self._embed_map(idx_N.view(B, pn * pn), pn), si, K, H)
            f_hat = f_hat + h_BChw
            f_rest = f_rest - h_BChw.detach()
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f_BChw) + F.mse_loss(f_hat, f_ng)
        return (f_hat.detach() - f_ng) + f_BChw, loss / K

    # -- decoding --------------------------------------------------------------------------------------
    def idxBl_to_fhat(self, ms_idx_Bl: Sequence[torch.Tensor], cumulative: bool = False
                      ) -> torch.Tensor | list[torch.Tensor]:
        """Token maps of all scales -> ``f_hat = sum_k phi_k(up(e[r_k]))`` (``B x Cvae x h x w``); with
        ``cumulative`` the list of partial sums after each scale."""
        pns = self.patch_nums
        assert len(ms_idx_Bl) == len(pns), f"got {len(ms_idx_Bl)} token maps for {len(pns)} scales"
        B, H = ms_idx_Bl[0].shape[0], pns[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, H)
        parts = []
        for si, (pn, idx_Bl) in enumerate(zip(pns, ms_idx_Bl)):
            f_hat = f_hat + self._upsampled_phi(self._embed_map(idx_Bl, pn), si, len(pns), H)
            parts.append(f_hat)
        return parts if cumulative else f_hat

    # -- VAR teacher forcing and inference ------------------------------------------------------------
    def idxBl_to_var_input(self, gt_ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of VAR: for scales ``k = 2..K``, ``area_down(f_hat_{k-1}, pn_k)``
        flattened and concatenated, ``B x (L - pn_1^2) x Cvae``, in the codebook's dtype. Only the first
        ``K - 1`` token maps are read."""
        pns, K = self.patch_nums, len(self.patch_nums)
        assert len(gt_ms_idx_Bl) >= K - 1, f"need at least {K - 1} token maps, got {len(gt_ms_idx_Bl)}"
        B, H = gt_ms_idx_Bl[0].shape[0], pns[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, H)
        inputs = []
        for si in range(K - 1):
            f_hat = f_hat + self._upsampled_phi(self._embed_map(gt_ms_idx_Bl[si], pns[si]), si, K, H)
            nxt = pns[si + 1]
            inputs.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
        x_BLCv = torch.cat(inputs, dim=1)
        assert x_BLCv.shape[1] == sum(p * p for p in pns[1:])
        return x_BLCv

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """One inference step: add scale ``si``'s code map ``h_BChw`` (``B x Cvae x pn x pn``, already
        embedded) to ``f_hat`` and return ``(f_hat, next_input)`` where ``next_input`` is ``f_hat``
        area-downsampled to the next scale (``f_hat`` itself after the last scale). ``f_hat`` is not
        modified in place."""
        H = self.patch_nums[-1]
        assert SN == len(self.patch_nums), f"SN={SN} but the quantiser has {len(self.patch_nums)} scales"
        f_hat = f_hat + self._upsampled_phi(h_BChw, si, SN, H)
        if si == SN - 1:
            return f_hat, f_hat
        nxt = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")


class VQVAE(nn.Module):
    """VAR's multi-scale VQ-VAE with the official module names (``encoder``, ``decoder``, ``quantize``,
    ``quant_conv``, ``post_quant_conv``). Images are ``B x 3 x H x W`` in ``[-1, 1]``.

    >>> vae = VQVAE(VQVAEConfig(ch=16, ch_mult=(1, 2), norm_groups=8, vocab_size=64, z_channels=8,
    ...                         patch_nums=(1, 2, 4)))
    >>> idx = vae.img_to_idxBl(torch.zeros(1, 3, 8, 8)); [t.shape[1] for t in idx]
    [1, 4, 16]
    """

    def __init__(self, config: VQVAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or VQVAEConfig()
        self.V, self.Cvae, self.vocab_size = cfg.vocab_size, cfg.z_channels, cfg.vocab_size
        self.downsample = cfg.downsample
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleResidualQuantizer(cfg)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, 1, ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, 1, ks // 2)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.config.patch_nums

    def _check_img(self, img_B3HW: torch.Tensor) -> None:
        s = self.config.image_size
        if img_B3HW.ndim != 4 or img_B3HW.shape[1] != self.config.in_channels or img_B3HW.shape[-2:] != (s, s):
            raise ValueError(f"expected images of shape (B, {self.config.in_channels}, {s}, {s}) in [-1, 1], "
                             f"got {tuple(img_B3HW.shape)}")

    def img_to_f(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Continuous latent ``f = quant_conv(encoder(img))`` (``B x Cvae x h x w``)."""
        self._check_img(img_B3HW)
        return self.quant_conv(self.encoder(img_B3HW))

    def img_to_idxBl(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Image in ``[-1, 1]`` -> list of K token index maps, each ``B x pn_k^2`` (row-major)."""
        return self.quantize.f_to_idxBl_or_fhat(self.img_to_f(img_B3HW), to_fhat=False)

    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Decode ``f_hat`` to an image in ``[-1, 1]``."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp(-1, 1)

    def idxBl_to_img(self, ms_idx_Bl: Sequence[torch.Tensor], last_one: bool = True
                     ) -> torch.Tensor | list[torch.Tensor]:
        """Token maps -> image in ``[-1, 1]``; with ``last_one=False`` one image per partial sum."""
        if last_one:
            return self.fhat_to_img(self.quantize.idxBl_to_fhat(ms_idx_Bl))
        return [self.fhat_to_img(f) for f in self.quantize.idxBl_to_fhat(ms_idx_Bl, cumulative=True)]

    def img_to_reconstructed_img(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Encode, quantise at all scales and decode (the VQ-VAE round trip), in ``[-1, 1]``."""
        f_hat = self.quantize.f_to_idxBl_or_fhat(self.img_to_f(img_B3HW), to_fhat=True)[-1]
        return self.fhat_to_img(f_hat)

    def forward(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE training pass: ``(reconstruction, vq_loss)`` with a straight-through quantiser (the
        reconstruction is not clamped)."""
        f_hat, vq_loss = self.quantize(self.img_to_f(img_B3HW))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Like ``nn.Module.load_state_dict``; a usage buffer ``quantize.ema_vocab_hit_SV`` saved for a
        different number of scales is ignored (the VAE itself is resolution-agnostic)."""
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and tuple(state_dict[key].shape) != tuple(self.quantize.ema_vocab_hit_SV.shape):
            state_dict = dict(state_dict)
            state_dict[key] = self.quantize.ema_vocab_hit_SV.detach().clone()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
