"""Tiny offline pipelines of the real diffusers classes, for tests, examples and benchmarks.

``tiny_pipeline(kind)`` builds a real diffusers pipeline (the same classes users load from the hub) with
tiny random weights, fully offline: the tokenizers are built locally (:mod:`fastgen.text`), nothing is
downloaded, and the weights are deterministic from ``seed``. Every kind generates an image in a few
seconds on a CPU.

``tiny_pipeline(kind, size="bench")`` gives the same family with a denoiser large enough for speed
ratios to mean something (hidden 384, several blocks); call it at :func:`bench_resolution` to get 1024 or
4096 image tokens. Random weights say nothing about quality: quality numbers come from the trained
default models (``fastgen.load_default``).

Example::

    from fastgen.testing import tiny_pipeline
    pipe = tiny_pipeline("sd3")
    image = pipe("a red circle", num_inference_steps=4, height=32, width=32).images[0]
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .text import build_word_tokenizer

__all__ = ["KINDS", "tiny_pipeline", "bench_resolution", "tiny_resolution", "is_class_conditional",
           "default_call_kwargs"]


@dataclass(frozen=True)
class _Spec:
    build: Callable[[str, dict], Any]
    # pixels per image-token side (VAE downsampling x patch size; UNets: top level), tiny / bench
    px_per_token: tuple[int, int]
    # default (height, width) for a quick tiny call
    tiny_hw: tuple[int, int]
    class_conditional: bool = False


def _clip_config(hidden: int, projection_dim: int | None, vocab_size: int, layers: int = 2):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        layer_norm_eps=1e-5,
        num_attention_heads=max(1, hidden // 16),
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        hidden_act="gelu",
        projection_dim=projection_dim or hidden,
        max_position_embeddings=77,
    )


def _clip(hidden: int, with_projection: bool, tok, projection_dim: int | None = None):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = _clip_config(hidden, projection_dim, len(tok))
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def _t5(d_model: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        d_model=d_model, d_kv=8, d_ff=d_model * 2, num_heads=max(1, d_model // 8), num_layers=2,
        vocab_size=vocab_size, pad_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
        decoder_start_token_id=vocab_size - 1, relative_attention_num_buckets=8,
    )
    return T5EncoderModel(cfg).eval()


def _gemma2(hidden: int, vocab_size: int):
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(
        hidden_size=hidden, intermediate_size=hidden * 2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=max(4, hidden // 2), num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=512,
        pad_token_id=vocab_size - 1, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        attn_implementation="eager",
    )
    return Gemma2Model(cfg).eval()


def _vae(latent_channels: int = 4, blocks: tuple[int, ...] = (8,), **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=blocks, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
        latent_channels=latent_channels, norm_num_groups=min(blocks[0], 8), sample_size=32, **kw,
    ).eval()


def _bench(size: str) -> bool:
    if size not in ("tiny", "bench"):
        raise ValueError(f"size must be 'tiny' or 'bench', got {size!r}")
    return size == "bench"


def _build_sd(size: str, ov: dict):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    big = _bench(size)
    tok = build_word_tokenizer()
    hidden = 64 if big else 32
    unet_kw = dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(160, 320, 640, 640) if big else (32, 64),
        down_block_types=(("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)) if big else ("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=(("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3) if big else ("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden, attention_head_dim=8 if big else 4, norm_num_groups=32 if big else 8,
    )
    unet_kw.update(ov.pop("unet", {}))
    unet = UNet2DConditionModel(**unet_kw).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        unet=unet, scheduler=sched, vae=_vae(4, (32, 32, 64, 64) if big else (8,)), text_encoder=_clip(hidden, False, tok),
        tokenizer=tok, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _build_sdxl(size: str, ov: dict):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    big = _bench(size)
    tok = build_word_tokenizer()
    unet_kw = dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(160, 320, 640) if big else (32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D") if big else ("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D") if big else ("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2) if big else (1, 2), attention_head_dim=(2, 4, 8) if big else (2, 4),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        cross_attention_dim=64, use_linear_projection=True, norm_num_groups=32 if big else 8,
    )
    unet_kw.update(ov.pop("unet", {}))
    unet = UNet2DConditionModel(**unet_kw).eval()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        unet=unet, scheduler=sched, vae=_vae(4, (32, 32, 64) if big else (8,)),
        text_encoder=_clip(32, False, tok), tokenizer=tok,
        text_encoder_2=_clip(32, True, tok, projection_dim=32), tokenizer_2=tok,
        force_zeros_for_empty_prompt=True,
    )


def _build_sd3(size: str, ov: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    big = _bench(size)
    tok = build_word_tokenizer()
    clip_hidden = 32
    tr_kw = dict(
        sample_size=32, patch_size=2 if big else 1, in_channels=4, out_channels=4,
        num_layers=4 if big else 2, attention_head_dim=64 if big else 8, num_attention_heads=6 if big else 4,
        caption_projection_dim=384 if big else 32, joint_attention_dim=2 * clip_hidden,
        pooled_projection_dim=2 * clip_hidden, pos_embed_max_size=96 if big else 64,
    )
    tr_kw.update(ov.pop("transformer", {}))
    transformer = SD3Transformer2DModel(**tr_kw).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, (8,), shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(clip_hidden, True, tok), tokenizer=tok,
        text_encoder_2=_clip(clip_hidden, True, tok), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None,
    )


def _build_flux(size: str, ov: dict):
    from diffusers import FluxPipeline, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler

    big = _bench(size)
    tok = build_word_tokenizer()
    tr_kw = dict(
        patch_size=1, in_channels=16, num_layers=4 if big else 1, num_single_layers=4 if big else 1,
        attention_head_dim=64 if big else 16, num_attention_heads=6 if big else 2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(16, 24, 24) if big else (4, 4, 8),
    )
    tr_kw.update(ov.pop("transformer", {}))
    transformer = FluxTransformer2DModel(**tr_kw).eval()
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
        vae=_vae(4, (8, 8), shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(32, False, tok), tokenizer=tok,
        text_encoder_2=_t5(32, len(tok)), tokenizer_2=tok,
    )


def _build_pixart(size: str, ov: dict):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    big = _bench(size)
    tok = build_word_tokenizer(model_max_length=120)
    tr_kw = dict(
        sample_size=32 if not big else 64, num_layers=4 if big else 2, patch_size=2 if big else 1,
        attention_head_dim=64 if big else 8, num_attention_heads=6 if big else 3, caption_channels=32,
        in_channels=4, cross_attention_dim=384 if big else 24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1,
    )
    tr_kw.update(ov.pop("transformer", {}))
    transformer = PixArtTransformer2DModel(**tr_kw).eval()
    return PixArtSigmaPipeline(tokenizer=tok, text_encoder=_t5(32, len(tok)), vae=_vae(4, (8,)),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())


def _build_sana(size: str, ov: dict):
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    big = _bench(size)
    tok = build_word_tokenizer(model_max_length=2048)  # Sana prepends a long instruction
    tok.padding_side = "right"
    tr_kw = dict(
        patch_size=1, in_channels=4, out_channels=4, num_layers=4 if big else 1,
        num_attention_heads=6 if big else 2, attention_head_dim=64 if big else 4,
        num_cross_attention_heads=6 if big else 2, cross_attention_head_dim=64 if big else 4,
        cross_attention_dim=384 if big else 8, caption_channels=16, sample_size=32,
    )
    tr_kw.update(ov.pop("transformer", {}))
    transformer = SanaTransformer2DModel(**tr_kw).eval()
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=0.41407,
    ).eval()
    return SanaPipeline(tokenizer=tok, text_encoder=_gemma2(16, len(tok)), vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def _build_lumina2(size: str, ov: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    big = _bench(size)
    tok = build_word_tokenizer(model_max_length=512)
    tr_kw = dict(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=384 if big else 16, num_layers=4 if big else 2,
        num_refiner_layers=1, num_attention_heads=6 if big else 2, num_kv_heads=6 if big else 2, multiple_of=16,
        ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
        axes_dim_rope=(16, 24, 24) if big else (4, 2, 2), axes_lens=(300, 512, 512), cap_feat_dim=16,
    )
    tr_kw.update(ov.pop("transformer", {}))
    transformer = Lumina2Transformer2DModel(**tr_kw).eval()
    return Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                           # Lumina2Pipeline hard-codes vae_scale_factor = 8, so the VAE downsamples 8x
                           vae=_vae(4, (8, 8, 8, 8), shift_factor=0.0, scaling_factor=1.0),
                           text_encoder=_gemma2(16, len(tok)), tokenizer=tok)


def _build_dit(size: str, ov: dict):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    big = _bench(size)
    tr_kw = dict(
        sample_size=32 if not big else 64, num_layers=4 if big else 2, patch_size=2, attention_head_dim=64 if big else 8,
        num_attention_heads=6 if big else 2, in_channels=4, out_channels=8, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    )
    tr_kw.update(ov.pop("transformer", {}))
    transformer = DiTTransformer2DModel(**tr_kw).eval()
    id2label = {0: "circle", 1: "square", 2: "triangle"}
    return DiTPipeline(transformer=transformer, vae=_vae(4, (8,)), scheduler=DDIMScheduler(), id2label=id2label)


_SPECS: dict[str, _Spec] = {
    "sd": _Spec(_build_sd, (1, 8), (32, 32)),
    "sdxl": _Spec(_build_sdxl, (1, 4), (32, 32)),
    "sd3": _Spec(_build_sd3, (1, 2), (32, 32)),
    "flux": _Spec(_build_flux, (4, 4), (32, 32)),
    "pixart": _Spec(_build_pixart, (1, 2), (32, 32)),
    "sana": _Spec(_build_sana, (2, 2), (32, 32)),
    "lumina2": _Spec(_build_lumina2, (16, 16), (64, 64)),
    "dit": _Spec(_build_dit, (2, 2), (32, 32), class_conditional=True),
}
#: The pipeline families ``tiny_pipeline`` can build.
KINDS: tuple[str, ...] = tuple(_SPECS)


def _check_kind(kind: str) -> _Spec:
    if kind not in _SPECS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; choose one of {', '.join(KINDS)}")
    return _SPECS[kind]


def is_class_conditional(kind: str) -> bool:
    """Whether ``tiny_pipeline(kind)`` is class-conditional (``"dit"``: class labels instead of prompts, and no
    height/width: the transformer's ``sample_size`` fixes the image size). ``ValueError`` for an unknown kind."""
    return _check_kind(kind).class_conditional


def tiny_resolution(kind: str) -> tuple[int, int] | None:
    """(height, width) in pixels of a quick call of ``tiny_pipeline(kind)``; None for class-conditional kinds
    (they take no height/width). ``ValueError`` for an unknown kind."""
    spec = _check_kind(kind)
    return None if spec.class_conditional else spec.tiny_hw


def tiny_pipeline(kind: str, *, size: str = "tiny", seed: int = 0, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, **overrides: Any):
    """Build a real diffusers pipeline of family ``kind`` with small random weights, offline.

    Args:
        kind: one of :data:`KINDS` (``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``, ``"pixart"``, ``"sana"``,
            ``"lumina2"``, ``"dit"``).
        size: ``"tiny"`` (seconds per image on CPU) or ``"bench"`` (a denoiser big enough for speed ratios
            to mean something; use :func:`bench_resolution` for its call size).
        seed: weights are drawn after ``torch.manual_seed(seed)``; the global RNG state is restored after.
        device, dtype: where to put the pipeline (default CPU, float32).
        overrides: ``transformer={...}`` or ``unet={...}`` config entries to change.

    Returns:
        The diffusers pipeline (e.g. ``StableDiffusion3Pipeline``) with the progress bar disabled.
    """
    spec = _check_kind(kind)
    ov = {k: dict(v) for k, v in overrides.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = spec.build(size, ov)
    if ov:
        raise TypeError(f"unexpected overrides for {kind!r}: {sorted(ov)}; use transformer={{...}} or unet={{...}}")
    pipe.set_progress_bar_config(disable=True)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


def bench_resolution(kind: str, tokens: int = 1024, size: str = "bench") -> tuple[int, int]:
    """(height, width) in pixels at which ``tiny_pipeline(kind, size=size)`` sees ``tokens`` image tokens."""
    spec = _check_kind(kind)
    if spec.class_conditional:
        raise ValueError(f"{kind!r} pipelines take no height/width: the token count is fixed by the transformer's "
                         "sample_size (tiny: 256, bench: 1024 tokens)")
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise ValueError(f"tokens must be a square number (1024, 4096, ...), got {tokens}")
    px = spec.px_per_token[1] if size == "bench" else spec.px_per_token[0]
    return side * px, side * px


def default_call_kwargs(pipe, prompt: str = "a red circle left of a blue square", *, steps: int = 4,
                        height: int | None = None, width: int | None = None, seed: int = 0) -> dict:
    """Keyword arguments for a quick, seeded call of ``pipe`` (class labels for DiT, a prompt otherwise)."""
    from diffusers import DiTPipeline

    gen = torch.Generator("cpu").manual_seed(seed)
    if isinstance(pipe, DiTPipeline):
        return {"class_labels": [0], "num_inference_steps": steps, "generator": gen}
    kw: dict[str, Any] = {"prompt": prompt, "num_inference_steps": steps, "generator": gen}
    params = inspect.signature(type(pipe).__call__).parameters
    if "use_resolution_binning" in params:
        kw["use_resolution_binning"] = False  # PixArt/Sana bins snap tiny sizes up to >= 256 px
    if "clean_caption" in params:
        kw["clean_caption"] = False  # needs bs4/ftfy; our prompts are clean
    if height is not None:
        kw["height"] = height
    if width is not None:
        kw["width"] = width
    return kw
