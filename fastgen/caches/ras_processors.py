"""The per-family parts of region-adaptive sampling (:mod:`fastgen.caches.ras`): what it patches and how.

* :data:`FAMILY_SPECS`: per family, the modules whose output tokens are gathered/scattered, the output
  feature layout, the denoiser arguments that make RAS sit a call out, and whether CFG is batched;
  :data:`STOCK_PROCESSORS` and :func:`image_attentions`: the attentions whose keys are the image tokens and
  the processors RAS accepts there.
* The hooks on the token path: :class:`GatherHook` (after the patch embedding), :class:`ScatterHook` (after
  the output projection), :class:`KVHook` (K/V recovery on ``to_k``/``to_v``), and Sana's
  :class:`SanaBlockHook`/:class:`SanaDepthwiseHook` (the conv feed-forward's grid).
* The attention processors that replace the stock ones where RoPE is applied to Q and K:
  :class:`FluxProcessor`, and for Lumina2 :class:`LuminaProcessor` with :class:`LuminaRopeHook` and
  :func:`lumina_forward` (the active tokens fed as a one-token-high strip).

Every hook and processor holds the pipeline's RAS runtime (``fastgen.caches.ras``'s state machine) and
reads the current denoiser call's plan from ``rt.ctx`` (``None``: outside a RAS call, pass through). They
decide nothing themselves; installing them is :mod:`fastgen.caches.ras`'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..hooks import HookBase
from ._tokens import flat_rows, gather_rows, image_to_tokens, scatter_rows_, tokens_to_image

__all__ = [
    "FamilySpec", "FAMILY_SPECS", "STOCK_PROCESSORS", "image_attentions", "RASHook", "GatherHook", "ScatterHook",
    "KVHook", "SanaBlockHook", "SanaDepthwiseHook", "FluxProcessor", "LuminaRopeHook", "LuminaProcessor",
    "lumina_forward",
]


# --------------------------------------------------------------------------------------------------
# Per-family wiring
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FamilySpec:
    """How RAS wires into one family's denoiser."""

    gather: str | None  # module (attribute of the denoiser) whose output tokens are gathered
    scatter: str | None  # module whose output tokens are scattered back (None: done in the denoiser hook)
    channels_first: bool  # output token features ordered (C, p, p) (FLUX packing) instead of (p, p, C)
    off_kwargs: tuple[str, ...]  # denoiser kwargs that, when set, make RAS sit the call out (dense)
    cfg_batched: bool  # the family's pipelines batch [uncond, cond] in one call when guidance > 1


FAMILY_SPECS = {
    "sd3": FamilySpec("pos_embed", "proj_out", False, ("block_controlnet_hidden_states", "skip_layers"), True),
    "pixart": FamilySpec("pos_embed", "proj_out", False, ("attention_mask",), True),
    "dit": FamilySpec("pos_embed", "proj_out_2", False, (), True),
    "sana": FamilySpec("patch_embed", "proj_out", False, ("attention_mask", "controlnet_block_samples"), True),
    "flux": FamilySpec("x_embedder", "proj_out", True, ("controlnet_block_samples", "controlnet_single_block_samples"), False),
    "lumina2": FamilySpec(None, None, False, (), False),
}


# --------------------------------------------------------------------------------------------------
# Which attentions RAS patches, and the processors it accepts there
# --------------------------------------------------------------------------------------------------

STOCK_PROCESSORS = {
    # fastgen.zoo's CollapsedZerosJointAttnProcessor (the shapes-mmdit fast evaluation) works the same way
    "sd3": ("JointAttnProcessor2_0", "AttnProcessor2_0", "CollapsedZerosJointAttnProcessor"),
    "pixart": ("AttnProcessor2_0",),
    "dit": ("AttnProcessor2_0",),
    "sana": ("SanaLinearAttnProcessor2_0",),
    "flux": ("FluxAttnProcessor",),
    "lumina2": ("Lumina2AttnProcessor2_0",),
}


def image_attentions(family: str, model) -> list[tuple[str, Any, str]]:
    """``(name, attention module, role)`` of every attention whose keys are the image tokens."""
    out = []
    if family in ("sd3",):
        for i, blk in enumerate(model.transformer_blocks):
            out.append((f"transformer_blocks.{i}.attn", blk.attn, "linear"))
            if getattr(blk, "attn2", None) is not None:
                out.append((f"transformer_blocks.{i}.attn2", blk.attn2, "linear"))
    elif family in ("pixart", "dit", "sana"):
        for i, blk in enumerate(model.transformer_blocks):
            out.append((f"transformer_blocks.{i}.attn1", blk.attn1, "linear"))
    elif family == "flux":
        for attr in ("transformer_blocks", "single_transformer_blocks"):
            for i, blk in enumerate(getattr(model, attr)):
                out.append((f"{attr}.{i}.attn", blk.attn, "flux"))
    elif family == "lumina2":
        for i, blk in enumerate(model.noise_refiner):
            out.append((f"noise_refiner.{i}.attn", blk.attn, "image"))
        for i, blk in enumerate(model.layers):
            out.append((f"layers.{i}.attn", blk.attn, "joint"))
    return out


# --------------------------------------------------------------------------------------------------
# Hooks (diffusers ModelHook protocol)
# --------------------------------------------------------------------------------------------------

class RASHook(HookBase):
    """Base of the RAS hooks: holds the pipeline's RAS runtime ``rt`` (``rt.ctx``: the current call's plan)."""

    def __init__(self, rt):
        self.rt = rt
        self.fn_ref = None


class GatherHook(RASHook):
    """After the patch/position embedding: keep only the active tokens."""

    def post_forward(self, module, output):
        ctx = self.rt.ctx
        if ctx is None or ctx.mode != "sparse":
            return output
        _expect(output, ctx.b, ctx.n, "the patch embedding")
        return gather_rows(output, ctx.rows, ctx.k)


class ScatterHook(RASHook):
    """After the output projection: put the active tokens back among the cached ones."""

    def post_forward(self, module, output):
        ctx = self.rt.ctx
        if ctx is None:
            return output
        _expect(output, ctx.b, ctx.k, "the output projection")
        return self.rt.take_output(ctx, output)


class KVHook(RASHook):
    """On a self-attention's ``to_k``/``to_v``: cache K/V of all image tokens, refresh the active ones."""

    def new_forward(self, module, x):
        out = self.fn_ref.original_forward(x)
        ctx = self.rt.ctx
        if ctx is None:
            return out
        if ctx.mode == "dense":
            _expect(out, ctx.b, ctx.n, "a cached K/V projection")
            ctx.slot.kv[id(self)] = out
            return out
        buf = ctx.slot.kv[id(self)]
        return scatter_rows_(buf, ctx.rows, out)


class SanaBlockHook(RASHook):
    """Sana blocks reshape tokens to the (h, w) grid for their conv FFN: at sparse steps make it (1, k)."""

    def pre_forward(self, module, *args, **kwargs):
        ctx = self.rt.ctx
        if ctx is None or ctx.mode != "sparse":
            return args, kwargs
        if len(args) >= 7:
            args = args[:5] + (1, ctx.k) + args[7:]
        else:
            kwargs = {**kwargs, "height": 1, "width": ctx.k}
        return args, kwargs


class SanaDepthwiseHook(RASHook):
    """GLUMBConv's 3x3 depthwise conv at sparse steps: the active tokens' inputs are written into the cached
    input grid (inactive neighbours keep their last values) and the conv's outputs at the active positions
    are returned. The depthwise conv itself is run on the whole grid (channels-last): it is ~1% of the
    block's FLOPs and oneDNN's full conv is cheaper than a gathered 3x3 stencil."""

    def new_forward(self, module, x):
        ctx = self.rt.ctx
        if ctx is None:
            return self.fn_ref.original_forward(x)
        c = x.shape[1]
        if ctx.mode == "dense":
            ctx.slot.kv[id(self)] = x.permute(0, 2, 3, 1).contiguous()  # [B, h, w, C] rows
            return self.fn_ref.original_forward(x)
        grid = ctx.slot.kv[id(self)]
        rows = grid.view(-1, c)
        rows.index_copy_(0, ctx.rows, x[:, :, 0, :].transpose(1, 2).reshape(-1, c))
        out = self.fn_ref.original_forward(grid.permute(0, 3, 1, 2))  # NCHW shape, channels-last memory
        out = out.permute(0, 2, 3, 1).reshape(-1, c).index_select(0, ctx.rows)  # [B*k, C]
        return out.view(ctx.b, ctx.k, c).transpose(1, 2).unsqueeze(2)


def _expect(t: torch.Tensor, b: int, n: int, where: str) -> None:
    if t.shape[0] != b or t.shape[1] != n:
        raise RuntimeError(
            f"RAS: {where} returned shape {tuple(t.shape)}, expected ({b}, {n}, ...); this denoiser does not "
            "follow the layout RAS was built for; remove RAS (fastgen.remove(pipe, 'ras'))"
        )


# --------------------------------------------------------------------------------------------------
# FLUX: attention processor with RoPE on the active tokens
# --------------------------------------------------------------------------------------------------

def _rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb(use_real=True, unbind_dim=-1)`` for ``x [B, S, H, D]`` and per-sample ``cos/sin [B, S, D]``."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rot = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos[:, :, None, :] + x_rot.float() * sin[:, :, None, :]).to(x.dtype)


class FluxProcessor:
    """FluxAttnProcessor with K/V recovery: Q/K/V for text + active image tokens, attention over all."""

    def __init__(self, rt, original):
        self.rt = rt
        self.original = original
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        ctx = self.rt.ctx
        if ctx is None or attention_mask is not None or image_rotary_emb is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value, enc_q, enc_k, enc_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            enc_q = attn.norm_added_q(enc_q.unflatten(-1, (-1, attn.head_dim)))
            enc_k = attn.norm_added_k(enc_k.unflatten(-1, (-1, attn.head_dim)))
            enc_v = enc_v.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([enc_q, query], dim=1)
            key = torch.cat([enc_k, key], dim=1)
            value = torch.cat([enc_v, value], dim=1)
        s = query.shape[1]
        if ctx.mode == "dense":
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            ctx.slot.kv[id(self)] = (key, value)
            k_all, v_all = key, value
        else:
            t = s - ctx.k  # text tokens come first
            cos, sin, rows = _flux_sparse(ctx, image_rotary_emb, t)
            query = _rope_real(query, cos, sin)
            key = _rope_real(key, cos, sin)
            k_all, v_all = ctx.slot.kv[id(self)]
            scatter_rows_(k_all, rows, key)
            scatter_rows_(v_all, rows, value)
        out = dispatch_attention_fn(query, k_all, v_all, attn_mask=None, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            t = encoder_hidden_states.shape[1]
            enc_out, out = out.split_with_sizes([t, out.shape[1] - t], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            enc_out = attn.to_add_out(enc_out.contiguous())
            return out, enc_out
        return out


def _flux_sparse(ctx, rotary, t: int):
    """Per-sample RoPE tables ``[B, t+k, D]`` and cache rows for the text + active image tokens (memoised)."""
    key = ("flux", t)
    if key not in ctx.memo:
        cos, sin = rotary  # [t + N, D]
        b, n = ctx.b, ctx.n
        img = ctx.idx + t  # [B, k]
        pos = torch.cat([torch.arange(t, device=img.device).expand(b, t), img], dim=1)  # [B, t+k]
        cos_s, sin_s = cos.to(img.device)[pos], sin.to(img.device)[pos]
        ctx.memo[key] = (cos_s, sin_s, flat_rows(pos, t + n))
    return ctx.memo[key]


# --------------------------------------------------------------------------------------------------
# Lumina2: strip input, RoPE positions and the attention processor
# --------------------------------------------------------------------------------------------------

def lumina_forward(rt, ctx, forward, args: tuple, kwargs: dict):
    """Run the Lumina2 denoiser ``forward`` for ``ctx``: at sparse steps on the active tokens as a one-token-high
    strip image; the output is scattered back among the cached tokens (``rt.take_output``)."""
    x = args[0] if args else kwargs["hidden_states"]
    p, (h, w) = rt.p, ctx.grid
    if ctx.mode == "sparse":
        active = gather_rows(image_to_tokens(x, p), ctx.rows, ctx.k)
        ctx.memo["lumina_tokens"] = active  # what the rope embedder hands out instead of patchifying the strip
        strip = tokens_to_image(active, 1, ctx.k, p)
        if args:
            args = (strip,) + tuple(args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": strip}
    out = forward(*args, **kwargs)
    sample = out[0] if isinstance(out, tuple) else out.sample
    full = rt.take_output(ctx, image_to_tokens(sample, p))
    if ctx.mode == "dense":
        return out
    image = tokens_to_image(full, h, w, p)
    if isinstance(out, tuple):
        return (image,) + tuple(out[1:])
    out.sample = image
    return out


class LuminaRopeHook(RASHook):
    """Dense: remember the full-grid RoPE tables. Sparse: skip the embedder (the strip's own positions would
    be wrong, and out of the tables' range for long strips) and hand out the active tokens with their real
    positions: patchified tokens, caption/image/joint RoPE tables and sequence lengths (caption + k)."""

    def new_forward(self, module, hidden_states, attention_mask):
        ctx = self.rt.ctx
        if ctx is None or ctx.mode == "dense":
            out = self.fn_ref.original_forward(hidden_states, attention_mask)
            if ctx is not None:
                ctx.slot.extra["rope"] = out[1:]
            return out
        cap_freqs, img_full, freqs_full, cap_lens, seq_full = ctx.slot.extra["rope"]
        if attention_mask.sum(dim=1).tolist() != list(cap_lens):
            raise RuntimeError("RAS: the caption lengths changed between steps of one call; remove RAS for this pipeline")
        k, n, b = ctx.k, ctx.n, ctx.b
        img_s = gather_rows(img_full, ctx.rows, k)
        ls, lf = max(cap_lens) + k, max(seq_full)
        freqs_s = freqs_full.new_zeros(b, ls, freqs_full.shape[-1])
        pos = torch.empty(b, ls, dtype=torch.long, device=ctx.idx.device)
        for i, c in enumerate(cap_lens):
            freqs_s[i, :c] = freqs_full[i, :c]
            freqs_s[i, c:c + k] = img_s[i]
            pos[i, :c] = torch.arange(c, device=pos.device)
            pos[i, c:c + k] = ctx.idx[i] + c
            pos[i, c + k:] = torch.arange(c + n, lf, device=pos.device)  # padding rows map to padding rows
        ctx.memo["lumina_joint"] = (flat_rows(pos, lf), lf)
        if len(set(seq_full)) > 1:
            ctx.memo["lumina_mask"] = torch.arange(lf, device=pos.device)[None, :] < torch.tensor(seq_full, device=pos.device)[:, None]
        return ctx.memo["lumina_tokens"], cap_freqs, img_s, freqs_s, list(cap_lens), [c + k for c in cap_lens]


class LuminaProcessor:
    """Lumina2AttnProcessor2_0 with K/V recovery. ``role``: ``"image"`` (noise refiner) or ``"joint"`` (main layers)."""

    def __init__(self, rt, original, role: str):
        self.rt = rt
        self.original = original
        self.role = role

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 base_sequence_length=None):
        from diffusers.models.embeddings import apply_rotary_emb

        ctx = self.rt.ctx
        if ctx is None or encoder_hidden_states is not hidden_states or image_rotary_emb is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                 base_sequence_length)
        batch_size, sequence_length, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        dtype = query.dtype
        kv_heads = key.shape[-1] // head_dim
        query = query.view(batch_size, -1, attn.heads, head_dim)
        key = key.view(batch_size, -1, kv_heads, head_dim)
        value = value.view(batch_size, -1, kv_heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
        key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        if ctx.mode == "dense":
            ctx.slot.kv[id(self)] = (key, value)
            mask = attention_mask
            length = sequence_length
        else:
            k_all, v_all = ctx.slot.kv[id(self)]
            if self.role == "image":
                rows, mask, length = ctx.rows, None, ctx.n
            else:
                (rows, length), mask = ctx.memo["lumina_joint"], ctx.memo.get("lumina_mask")
            key, value = scatter_rows_(k_all, rows, key), scatter_rows_(v_all, rows, value)
        if base_sequence_length is not None:
            softmax_scale = math.sqrt(math.log(length, base_sequence_length)) * attn.scale
        else:
            softmax_scale = attn.scale
        n_rep = attn.heads // kv_heads
        if n_rep >= 1:
            key = key.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
            value = value.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
        if mask is not None:
            mask = mask.bool().view(batch_size, 1, 1, -1)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=mask, scale=softmax_scale)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
