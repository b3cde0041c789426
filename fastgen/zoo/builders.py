"""The zoo's model builders: the shapes-world pipelines' architectures, freshly initialised, and their folders.

* :data:`ARCH` and :func:`build_pipeline`: ``shapes-mmdit`` (``StableDiffusion3Pipeline``: an
  ``SD3Transformer2DModel`` with adaLN-zero initialisation, two small CLIP text encoders and the exact-zero
  T5 stub :func:`zero_t5`) and ``shapes-unet`` (``StableDiffusionPipeline``: a ``UNet2DConditionModel`` on SD's
  scaled-linear schedule with ``DDIMScheduler``, one small CLIP text encoder), untrained and deterministic
  from a seed.
* Their shared parts: :func:`word_tokenizer` (a byte-level BPE ``CLIPTokenizer`` over :data:`ZOO_WORDS`, frozen,
  :data:`TOKENS` long) and :func:`identity_vae` (the fixed pixel-space ``AutoencoderKL`` whose ``encode`` is a
  per-channel standardisation and ``decode`` its exact inverse); :func:`set_collapsed_zeros` switches an SD3
  transformer to the mathematically identical collapsed-zero-token attention
  (:class:`~fastgen.zoo.attention.CollapsedZerosJointAttnProcessor`).
* :func:`save_pipeline` (a safetensors pipeline folder written atomically, with ``fastgen_zoo.json``) and
  :func:`export_pipeline` (a training run's folder -> the shipped ``fastgen/zoo/weights/<name>``).

Training them is :mod:`fastgen.zoo.train`; scoring a pipeline on held-out prompts is
:func:`fastgen.zoo.evaluate.evaluate_pipeline`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastgen.text import prefix_chain_bpe
from fastgen.utils.io import swap_in_dir
from fastgen.zoo import MODELS, shapes
from fastgen.zoo.attention import use_collapsed_zeros

__all__ = [
    "ARCH", "TOKENS", "ZOO_WORDS", "check_model", "word_tokenizer", "pixel_stats", "identity_vae", "zero_t5",
    "build_pipeline", "set_collapsed_zeros", "save_pipeline", "export_pipeline",
]

#: Architecture of each model (``--arch key=value`` overrides entries).
ARCH: dict[str, dict[str, Any]] = {
    "shapes-mmdit": dict(hidden=128, layers=6, heads=4, patch=4, qk_norm="rms_norm", text_hidden=64,
                         text_layers=2, shift=1.0),
    # cross-attention only at the lowest ``attn_levels`` resolutions (8x8 = 64 tokens, like the MMDiT's
    # patch-4 grid): the 32x32 and 16x16 levels are convolution only, 1.5x faster per step on this CPU.
    "shapes-unet": dict(blocks=(32, 64, 64), layers_per_block=1, heads=4, text_hidden=64, text_layers=2,
                        attn_levels=1),
}

#: Length of every tokenizer of the zoo (the longest prompt is 8 words + start/end tokens).
TOKENS = 16


def check_model(name: str) -> str:
    """``name`` if it is a zoo text-to-image model with an architecture here, else ``ValueError``."""
    if name not in MODELS or name not in ARCH:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(MODELS)}")
    return name


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


#: The words the zoo tokenizer was built from (frozen: the shipped text encoders were trained on its ids).
ZOO_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "and", "on", "in", "with", "photo", "picture", "image", "cat", "dog", "sitting", "red",
    "green", "blue", "yellow", "sofa", "astronaut", "riding", "horse", "above", "below", "circle", "circles", "left",
    "right", "square", "squares", "three", "triangle", "triangles", "two",
)


@lru_cache(maxsize=1)
def _zoo_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The zoo tokenizer's BPE tables (:func:`fastgen.text.prefix_chain_bpe` over :data:`ZOO_WORDS`, sorted).
    They must reproduce the shipped models' token ids: ``tests/test_zoo_models.py`` checks them against the
    shipped ``tokenizer.json``, so a change to the builder cannot slip through.

    Known quirk, kept on purpose: the merges are per-word prefix chains in alphabetical order, so merges
    of earlier words can pre-empt a later word's chain; "triangle(s)" (6 tokens), "squares" and "three"
    (3 tokens) are not single tokens. 48 of the 552 prompts then exceed 16 tokens and are truncated (the
    pipeline logs a warning), but the truncated ids still identify every prompt uniquely.
    """
    vocab, merges = prefix_chain_bpe(sorted(set(ZOO_WORDS)))
    return vocab, tuple(merges)


def word_tokenizer():
    """The zoo's ``CLIPTokenizer`` (16 tokens long; built offline from :data:`ZOO_WORDS`)."""
    from transformers import CLIPTokenizer

    vocab, merges = _zoo_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    tok.model_max_length = TOKENS
    return tok


@lru_cache(maxsize=4)
def pixel_stats(size: int = 32, n: int = 2000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of world images mapped to [-1, 1] (fixed training draw)."""
    imgs, _ = shapes.sample(n, shapes.TRAIN_SEED_START - 1 + 10**6, size)
    x = np.stack(imgs).astype(np.float64) / 127.5 - 1.0
    return tuple(round(float(v), 4) for v in x.mean((0, 1, 2))), tuple(round(float(v), 4) for v in x.std((0, 1, 2)))


def identity_vae(mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None, size: int = 32):
    """A one-block pixel-space ``AutoencoderKL`` whose ``encode`` is ``(x - mean) / std`` per channel and
    whose ``decode`` is the inverse, built from hand-set weights.

    How: ``conv_in`` writes, for each channel ``c``, the group ``(z_c, -z_c, K, -K)`` (K = 100); every
    resnet's last conv is zero (so the resnets are identities; no attention); the group norm over such a
    group has mean 0 and variance ``(K^2 + mean(z_c^2)) / 2``, i.e. it divides by ``K / sqrt(2)`` to
    relative precision ``mean(z^2) / (2 K^2)`` (< 1e-4); its affine maps ``z_c`` to ``z_c + 12``, where
    SiLU is the identity to < 2e-4, and ``conv_out`` removes the 12 and applies the affine map.
    """
    from diffusers import AutoencoderKL

    if mean is None or std is None:
        mean, std = pixel_stats(size)
    k, b = 100.0, 12.0
    ch = 12
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(ch,), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), latent_channels=3,
        norm_num_groups=3, sample_size=size, scaling_factor=1.0, shift_factor=0.0, force_upcast=False,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    )
    m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)

    def set_in(conv: torch.nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
        # channel c of the input -> z_c = scale_c * x_c + shift_c and its group (z, -z, K, -K)
        w = torch.zeros_like(conv.weight, dtype=torch.float64)
        bias = torch.zeros(conv.out_channels, dtype=torch.float64)
        for c in range(3):
            w[4 * c, c, 1, 1], w[4 * c + 1, c, 1, 1] = scale[c], -scale[c]
            bias[4 * c], bias[4 * c + 1] = shift[c], -shift[c]
            bias[4 * c + 2], bias[4 * c + 3] = k, -k
        conv.weight.data.copy_(w)
        conv.bias.data.copy_(bias)

    def set_norm(norm: torch.nn.GroupNorm) -> None:
        norm.weight.data.fill_(k / math.sqrt(2.0))
        norm.bias.data.zero_()
        norm.bias.data[0::4] = b

    def set_out(conv: torch.nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor, extra: int = 0) -> None:
        # out_c = scale_c * (silu(z_c + b) - b) + shift_c
        w = torch.zeros_like(conv.weight, dtype=torch.float64)
        bias = torch.zeros(conv.out_channels, dtype=torch.float64)
        for c in range(3):
            w[c, 4 * c, 1, 1] = scale[c]
            bias[c] = shift[c] - scale[c] * b
        bias[3:] = -30.0  # encoder log-variance: std = exp(-15), i.e. deterministic
        conv.weight.data.copy_(w)
        conv.bias.data.copy_(bias)

    with torch.no_grad():
        for coder in (vae.encoder, vae.decoder):
            for mod in coder.modules():
                if mod.__class__.__name__ == "ResnetBlock2D":
                    mod.conv2.weight.zero_()
                    mod.conv2.bias.zero_()
            set_norm(coder.conv_norm_out)
        set_in(vae.encoder.conv_in, 1.0 / s, -m / s)  # z = (x - m) / s
        set_out(vae.encoder.conv_out, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
        set_in(vae.decoder.conv_in, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
        set_out(vae.decoder.conv_out, s, m)  # x = s * z + m
    vae.requires_grad_(False)
    return vae.eval()


def _clip(with_projection: bool, tok, hidden: int, layers: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    v = len(tok)
    cfg = CLIPTextConfig(
        vocab_size=v, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 16), max_position_embeddings=TOKENS, hidden_act="gelu",
        layer_norm_eps=1e-5, projection_dim=hidden, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def zero_t5(tok, dim: int):
    """A ``T5EncoderModel`` stub (no layers, final norm weight 0) whose output is exactly zero.

    ``StableDiffusion3Pipeline`` with ``text_encoder_3=None`` appends ``max_sequence_length`` all-zero tokens
    to the CLIP embeddings; with this stub as ``text_encoder_3`` it appends exactly the same zeros, but the
    folder loads with a plain ``DiffusionPipeline.from_pretrained(path)`` (diffusers refuses a null
    ``text_encoder_3`` in ``model_index.json`` unless the caller passes ``text_encoder_3=None``).
    """
    from transformers import T5Config, T5EncoderModel

    v = len(tok)
    cfg = T5Config(vocab_size=v, d_model=dim, d_kv=8, d_ff=8, num_layers=0, num_heads=1,
                   relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id, dropout_rate=0.0)
    model = T5EncoderModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model.requires_grad_(False).eval()


def _zero_init_adaln(transformer) -> None:
    """adaLN-zero (DiT): modulation and output projections start at zero, so every block starts as the identity."""
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            for norm in (block.norm1, block.norm1_context):
                norm.linear.weight.zero_()
                norm.linear.bias.zero_()
        transformer.norm_out.linear.weight.zero_()
        transformer.norm_out.linear.bias.zero_()
        transformer.proj_out.weight.zero_()
        transformer.proj_out.bias.zero_()


def build_pipeline(name: str, arch: dict[str, Any] | None = None, seed: int = 0, size: int = 32):
    """A freshly initialised (untrained) zoo pipeline; weights are deterministic from ``seed``.

    Args:
        name: ``"shapes-mmdit"`` or ``"shapes-unet"``.
        arch: overrides of :data:`ARCH`.
        seed: initialisation seed (the global torch RNG is left untouched).
        size: image side in pixels.
    """
    check_model(name)
    a = {**ARCH[name], **(arch or {})}
    tok = word_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = identity_vae(size=size)
        if name == "shapes-mmdit":
            from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

            th = a["text_hidden"]
            te1 = _clip(True, tok, th, a["text_layers"])
            te2 = _clip(True, tok, th, a["text_layers"])
            transformer = SD3Transformer2DModel(
                sample_size=size, patch_size=a["patch"], in_channels=3, out_channels=3, num_layers=a["layers"],
                attention_head_dim=a["hidden"] // a["heads"], num_attention_heads=a["heads"],
                joint_attention_dim=2 * th, caption_projection_dim=a["hidden"], pooled_projection_dim=2 * th,
                pos_embed_max_size=size // a["patch"], qk_norm=a["qk_norm"],
            )
            _zero_init_adaln(transformer)
            pipe = StableDiffusion3Pipeline(
                transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=float(a["shift"])),
                vae=vae, text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=copy.deepcopy(tok),
                text_encoder_3=zero_t5(tok, 2 * th), tokenizer_3=copy.deepcopy(tok),
            )
        else:
            from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

            te = _clip(False, tok, a["text_hidden"], a["text_layers"])
            blocks = tuple(a["blocks"])
            n_attn = int(a.get("attn_levels", len(blocks) - 1))
            if not 1 <= n_attn <= len(blocks):
                raise ValueError(f"attn_levels must be in 1..{len(blocks)} for blocks {blocks}, got {n_attn}")
            down = ("DownBlock2D",) * (len(blocks) - n_attn) + ("CrossAttnDownBlock2D",) * n_attn
            up = ("CrossAttnUpBlock2D",) * n_attn + ("UpBlock2D",) * (len(blocks) - n_attn)
            unet = UNet2DConditionModel(
                sample_size=size, in_channels=3, out_channels=3, layers_per_block=a["layers_per_block"],
                block_out_channels=blocks, down_block_types=down, up_block_types=up,
                cross_attention_dim=a["text_hidden"], attention_head_dim=a["heads"], norm_num_groups=32,
            )
            # Stable Diffusion's own noise schedule (scaled linear 0.00085 -> 0.012): terminal alpha_bar 0.0047,
            # where the DDPM linear 1e-4 -> 0.02 schedule's 4e-5 amplified epsilon errors 150x at the first step
            sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  timestep_spacing="trailing", prediction_type="epsilon")
            pipe = StableDiffusionPipeline(
                unet=unet, scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False,
            )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_collapsed_zeros(transformer, on: bool) -> None:
    """Switch a zoo SD3 transformer's collapsed-zero-token attention on (``on=True``) or back off."""
    use_collapsed_zeros(transformer, on, n_text=TOKENS)


# --------------------------------------------------------------------------------------------------
# Pipeline folders
# --------------------------------------------------------------------------------------------------


def save_pipeline(pipe, path: str | os.PathLike, meta: dict[str, Any] | None = None,
                  dtype: torch.dtype | None = None) -> Path:
    """``pipe.save_pretrained`` (safetensors) into ``path`` atomically, with ``fastgen_zoo.json`` metadata.

    ``dtype`` (e.g. ``torch.float16``) casts every saved weight (a plain ``from_pretrained`` then gives a
    pipeline of that dtype; ``fastgen.zoo.load_pipeline`` loads float32 unless told otherwise); the
    pipeline passed in is not changed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if dtype is not None:
        pipe = copy.deepcopy(pipe)
        for name, comp in pipe.components.items():
            if isinstance(comp, torch.nn.Module):
                comp.to(dtype)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if meta is not None:
        (tmp / "fastgen_zoo.json").write_text(json.dumps(meta, indent=1, default=str))
    return swap_in_dir(tmp, path)


def export_pipeline(src: str | os.PathLike, dst: str | os.PathLike, half: bool = False) -> Path:
    """Copy a trained ``pipeline`` folder to ``dst`` (e.g. ``fastgen/zoo/weights/<name>``) in safetensors,
    adding the zero T5 stub to SD3 folders that lack it; ``half=True`` stores float16 weights (half the
    size; a plain ``DiffusionPipeline.from_pretrained`` then loads a float16 pipeline)."""
    from diffusers import DiffusionPipeline

    src = Path(src)
    spec = json.loads((src / "model_index.json").read_text())
    is_sd3 = spec.get("_class_name") == "StableDiffusion3Pipeline"
    extra = {"text_encoder_3": None, "tokenizer_3": None} if is_sd3 else {}
    pipe = DiffusionPipeline.from_pretrained(src, local_files_only=True, **extra)
    if is_sd3:  # (re)attach the zero T5 stub so that a plain from_pretrained(dst) works
        pipe.register_modules(text_encoder_3=zero_t5(pipe.tokenizer, pipe.transformer.config.joint_attention_dim),
                              tokenizer_3=copy.deepcopy(pipe.tokenizer))
    meta_path = src / "fastgen_zoo.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta["weights_dtype"] = "float16" if half else "float32"
    return save_pipeline(pipe, dst, meta=meta, dtype=torch.float16 if half else None)
