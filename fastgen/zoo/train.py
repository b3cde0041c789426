"""Recipes that train the zoo's default text-to-image pipelines on the shapes world, from scratch, on a CPU.

Run (in the background; one torch thread unless ``--threads`` says otherwise)::

    fastgen train zoo shapes-mmdit --out runs/shapes-mmdit [--minutes 100] [--steps N] [--batch 64] [--resume]
    fastgen train zoo shapes-unet  --out runs/shapes-unet  ...

What is trained (both 32x32 px, :mod:`fastgen.zoo.shapes` images drawn on the fly with seeds >=
:data:`~fastgen.zoo.shapes.TRAIN_SEED_START`, so the held-out evaluation images are never seen):

``shapes-mmdit``
    ``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel`` (patch 2 -> 256 image tokens, adaLN-zero
    initialisation, RMS qk-norm) trained with the rectified-flow loss (``x_t = (1 - t) x_0 + t eps``,
    target ``eps - x_0``, logit-normal ``t``) and sampled with ``FlowMatchEulerDiscreteScheduler``; two
    small ``CLIPTextModelWithProjection`` text encoders trained jointly; ``text_encoder_3`` is a stub whose
    output is exactly zero (:func:`zero_t5`): the same as ``text_encoder_3=None``, but the folder loads
    with a plain ``DiffusionPipeline.from_pretrained(path)``.
``shapes-unet``
    ``StableDiffusionPipeline``: a ``UNet2DConditionModel`` trained with the DDPM epsilon loss (linear
    betas, the pixel-space schedule), sampled with ``DDIMScheduler``; one small ``CLIPTextModel``.

Both use the same tokenizer (:func:`word_tokenizer`, a byte-level BPE ``CLIPTokenizer`` over the world's
words, 16 tokens long) and the same fixed **pixel-space** ``AutoencoderKL`` (:func:`identity_vae`): one block, no
downsampling, with weights set by hand so that ``encode`` is the per-channel standardisation of the
pixels and ``decode`` its exact inverse (error < 1e-4). Nothing of the VAE is trained. Prompts are
dropped to ``""`` with probability ``cfg_dropout`` (10 %) so classifier-free guidance works.

The 256 all-zero "T5" tokens that ``StableDiffusion3Pipeline`` appends when ``text_encoder_3`` is None
(or the zero outputs of the T5 stub) are identical all through the transformer, so training (and the periodic evaluation) uses one such
token whose attention logit is raised by ``log(256)`` (:class:`CollapsedZerosJointAttnProcessor`):
mathematically the same model as the pipeline's default call, at half the cost.

Checkpoints (``OUT/checkpoint.pt``: weights, EMA, optimizer, step, elapsed time, eval history) are
written atomically every ``ckpt_minutes``; the random draws of step ``k`` depend only on ``(seed, k)``,
so ``--resume`` continues exactly as an uninterrupted run would. Every ``eval_minutes`` (and at the end)
the EMA weights are put in a pipeline, scored on ``eval_prompts`` held-out prompts
(``shapes.sample_prompts(n, EVAL_SEED)``) with :func:`fastgen.zoo.evaluate.score` at the model's default
steps and guidance, and saved to ``OUT/pipeline`` (safetensors; ``OUT/best_pipeline`` keeps the best
score, ``OUT/history.jsonl`` every evaluation). ``--export DST`` copies ``OUT/best_pipeline`` to ``DST``
(e.g. ``fastgen/zoo/weights/shapes-mmdit``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastgen.text import bytes_to_unicode  # GPT-2's fixed byte table (the merges below stay frozen here)
from fastgen.utils.commands import CommandParser
from fastgen.utils.io import Resumable, check_same_config
from fastgen.utils.logging import get_logger, log_to_stderr_with_time, quiet_diffusers
from fastgen.zoo import AR_MODELS, DEFAULTS, MODELS, extra_call_kwargs, shapes
from fastgen.zoo.attention import CollapsedZerosJointAttnProcessor, use_collapsed_zeros

__all__ = [
    "MODELS", "ARCH", "DEFAULTS", "TrainConfig", "Trainer", "build_pipeline", "identity_vae", "word_tokenizer",
    "CollapsedZerosJointAttnProcessor", "evaluate_pipeline", "export_pipeline", "save_pipeline", "zero_t5",
    "encode_sd3", "encode_sd", "main",
]

logger = get_logger(__name__)

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
#: Zero tokens the fast evaluation call keeps (max_sequence_length; the tokenizer pads every prompt to 2).
_EVAL_ZERO_TOKENS = 2


def _check_model(name: str) -> str:
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
    """The zoo tokenizer's BPE tables, frozen here (a copy of ``fastgen.text``'s builder as of the first
    trained models) so that retraining reproduces the shipped ids whatever later happens to ``fastgen.text``.

    Known quirk, kept on purpose: the merges are per-word prefix chains in alphabetical order, so merges
    of earlier words can pre-empt a later word's chain; "triangle(s)" (6 tokens), "squares" and "three"
    (3 tokens) are not single tokens. 48 of the 552 prompts then exceed 16 tokens and are truncated (the
    pipeline logs a warning), but the truncated ids still identify every prompt uniquely.
    """
    sym = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for x in sym:
        vocab.setdefault(x, len(vocab))
    for x in sym:
        vocab.setdefault(x + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in sorted(set(ZOO_WORDS)):
        syms = list(word[:-1]) + [word[-1] + "</w>"]
        left = syms[0]
        for right in syms[1:]:
            pair = (left, right)
            left = left + right
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
                vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
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
    _check_model(name)
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


def _use_collapsed_zeros(transformer, on: bool) -> None:
    use_collapsed_zeros(transformer, on, n_text=TOKENS)


# --------------------------------------------------------------------------------------------------
# Text encoding exactly as the pipelines do it (differentiable)
# --------------------------------------------------------------------------------------------------


def _ids(tok, prompts: list[str]) -> torch.Tensor:
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def encode_sd3(pipe, prompts: list[str], zero_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, pooled)`` as ``StableDiffusion3Pipeline.encode_prompt`` builds them (clip_skip None,
    no T5), with ``zero_tokens`` all-zero T5 tokens; gradients flow into both text encoders."""
    hs, pooled = [], []
    for tok, te in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = te(_ids(tok, prompts).to(te.device), output_hidden_states=True)
        pooled.append(out[0])
        hs.append(out.hidden_states[-2])
    clip = torch.cat(hs, -1)
    dim = pipe.transformer.config.joint_attention_dim
    clip = F.pad(clip, (0, dim - clip.shape[-1]))
    zeros = clip.new_zeros(clip.shape[0], zero_tokens, dim)
    return torch.cat([clip, zeros], 1), torch.cat(pooled, -1)


def encode_sd(pipe, prompts: list[str]) -> torch.Tensor:
    """``prompt_embeds`` as ``StableDiffusionPipeline.encode_prompt`` builds them (no attention mask)."""
    return pipe.text_encoder(_ids(pipe.tokenizer, prompts).to(pipe.text_encoder.device))[0]


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def evaluate_pipeline(pipe, name: str, n: int = 100, seed: int = shapes.EVAL_SEED, steps: int | None = None,
                      guidance: float | None = None, batch: int = 100, fast: bool = True,
                      return_images: bool = False) -> dict[str, Any]:
    """Score ``pipe`` on ``n`` held-out prompts (``shapes.sample_prompts(n, seed)``).

    Image ``i`` uses ``torch.Generator().manual_seed(i)``, so results do not depend on ``batch``.
    ``fast=True`` (SD3 only) runs the mathematically identical collapsed-zero-token call
    (:class:`CollapsedZerosJointAttnProcessor`); the pipeline's own attention processors are restored after.

    Returns:
        :func:`fastgen.zoo.evaluate.score`'s dict plus ``steps``, ``guidance``, ``seconds``
        (and ``images``, a uint8 array, with ``return_images``).
    """
    from fastgen.zoo import evaluate

    if name not in DEFAULTS or name in AR_MODELS:
        raise ValueError(f"evaluate_pipeline: {name!r} is not a shapes-world zoo model")
    d = DEFAULTS[name]  # a student (e.g. shapes-mmdit-gd) is scored with its own default call
    steps = int(steps or d["num_inference_steps"])
    guidance = float(d["guidance_scale"] if guidance is None else guidance)
    prompts = shapes.sample_prompts(n, seed)
    is_sd3 = hasattr(pipe, "transformer") and pipe.transformer is not None
    extra: dict[str, Any] = {}
    sigmas = extra_call_kwargs(name, steps).get("sigmas")  # e.g. the sCM student's 2-step grid, at its step count
    if sigmas is not None:
        extra["sigmas"] = list(sigmas)
    saved_procs = pipe.transformer.attn_processors if is_sd3 else None
    if is_sd3 and fast:
        _use_collapsed_zeros(pipe.transformer, True)
        extra["max_sequence_length"] = _EVAL_ZERO_TOKENS
    t0 = time.time()
    images = []
    try:
        with torch.no_grad(), quiet_diffusers():
            for i in range(0, n, batch):
                ps = prompts[i:i + batch]
                gens = [torch.Generator().manual_seed(j) for j in range(i, i + len(ps))]
                out = pipe(ps, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                           height=d["height"], width=d["width"], output_type="np", **extra).images
                images.append(np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8))
    finally:
        if is_sd3 and fast:
            pipe.transformer.set_attn_processor(saved_procs)
    imgs = np.concatenate(images)
    res: dict[str, Any] = dict(evaluate.score(prompts, imgs))
    res.update(steps=steps, guidance=guidance, seconds=round(time.time() - t0, 1))
    if return_images:
        res["images"] = imgs
    return res


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoint; ``--resume`` checks it)."""

    model: str = "shapes-mmdit"
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    t_sampling: str = "logit-normal"  # or "uniform" (flow matching only)
    snr_gamma: float = 5.0  # Min-SNR-gamma loss weight (UNet epsilon loss only; 0 = plain MSE)
    seed: int = 0
    size: int = 32
    arch: dict[str, Any] = field(default_factory=dict)


class Trainer(Resumable):
    """One training run of a zoo model (see the module docstring).

    Args:
        cfg: the run's :class:`TrainConfig`.
        out: output folder (``checkpoint.pt``, ``pipeline/``, ``best_pipeline/``, ``history.jsonl``).
    """

    def __init__(self, cfg: TrainConfig, out: str | os.PathLike):
        _check_model(cfg.model)
        self.cfg = cfg
        self.out = Path(out)
        self.arch = {**ARCH[cfg.model], **cfg.arch}
        self.pipe = build_pipeline(cfg.model, self.arch, seed=cfg.seed, size=cfg.size)
        self.is_sd3 = cfg.model == "shapes-mmdit"
        p = self.pipe
        names = ("transformer", "text_encoder", "text_encoder_2") if self.is_sd3 else ("unet", "text_encoder")
        self.modules = torch.nn.ModuleDict({k: getattr(p, k) for k in names})
        self.modules.train()
        self.ema = copy.deepcopy(self.modules).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.modules.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                     weight_decay=cfg.weight_decay)
        if self.is_sd3:
            _use_collapsed_zeros(p.transformer, True)
        else:
            from diffusers import DDPMScheduler

            train_sched = DDPMScheduler.from_config(p.scheduler.config)
            self.alphas_cumprod = train_sched.alphas_cumprod.float()
        self.step = 0
        self.elapsed = 0.0
        self.lr_scale = 1.0  # set by run()'s cooldown
        self.history: list[dict[str, Any]] = []
        self.best = -1.0

    # ---- one optimisation step --------------------------------------------------------------------

    def batch(self, step: int) -> tuple[torch.Tensor, list[str], torch.Generator]:
        """The data and the random generator of ``step`` (deterministic from ``(seed, step)``)."""
        cfg = self.cfg
        imgs, prompts = shapes.sample(cfg.batch, shapes.TRAIN_SEED_START + cfg.seed * 10**7 + step, cfg.size)
        g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + step)
        drop = torch.rand(len(prompts), generator=g) < cfg.cfg_dropout
        prompts = ["" if d else pr for pr, d in zip(prompts, drop.tolist())]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            lat = self.pipe.vae.encode(x).latent_dist.mode()
            sf, sh = self.pipe.vae.config.scaling_factor, self.pipe.vae.config.shift_factor or 0.0
            lat = (lat - sh) * sf if self.is_sd3 else lat * sf
        return lat, prompts, g

    def loss(self, step: int) -> torch.Tensor:
        x0, prompts, g = self.batch(step)
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=g)
        if self.is_sd3:
            if self.cfg.t_sampling == "logit-normal":
                t = torch.sigmoid(torch.randn(b, generator=g))
            elif self.cfg.t_sampling == "uniform":
                t = torch.rand(b, generator=g)
            else:
                raise ValueError(f"t_sampling must be 'logit-normal' or 'uniform', got {self.cfg.t_sampling!r}")
            tt = t.view(-1, 1, 1, 1)
            xt = (1 - tt) * x0 + tt * noise
            ctx, pooled = encode_sd3(self.pipe, prompts, zero_tokens=1)
            pred = self.pipe.transformer(xt, encoder_hidden_states=ctx, pooled_projections=pooled,
                                         timestep=t * 1000.0, return_dict=False)[0]
            return F.mse_loss(pred, noise - x0)
        t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=g)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        ctx = encode_sd(self.pipe, prompts)
        pred = self.pipe.unet(xt, t, encoder_hidden_states=ctx, return_dict=False)[0]
        if not self.cfg.snr_gamma:
            return F.mse_loss(pred, noise)
        # Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556), epsilon form: weight min(SNR, gamma) / SNR
        snr = (ab / (1 - ab)).view(-1)
        w = torch.clamp(snr, max=self.cfg.snr_gamma) / snr
        return (w * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()

    def train_step(self) -> float:
        """Run one optimisation step (lr warm-up, grad clipping, EMA update); returns the loss."""
        cfg = self.cfg
        lr = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup)) * self.lr_scale
        for gr in self.opt.param_groups:
            gr["lr"] = lr
        loss = self.loss(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.modules.parameters(), cfg.grad_clip)
        self.opt.step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.modules.parameters()):
                e.lerp_(p, 1.0 - decay)
        self.step += 1
        return float(loss.detach())

    # ---- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "fastgen-zoo-train-v1", "config": asdict(self.cfg), "step": self.step, "elapsed": self.elapsed,
            "model": self.modules.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
            "history": self.history, "best": self.best, "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        # fields added to TrainConfig after the checkpoint was written take their defaults
        check_same_config(sd["config"], asdict(self.cfg), defaults=asdict(TrainConfig()))
        self.modules.load_state_dict(sd["model"])
        self.ema.load_state_dict(sd["ema"])
        self.opt.load_state_dict(sd["opt"])
        self.step, self.elapsed = int(sd["step"]), float(sd["elapsed"])
        self.history, self.best = list(sd["history"]), float(sd["best"])
        torch.set_rng_state(sd["torch_rng"])

    def resumed_message(self) -> str:
        return f"at step {self.step} ({self.elapsed / 60:.1f} min trained)"

    def init_from(self, path: str | os.PathLike) -> None:
        """Start from the weights of a saved zoo pipeline folder (e.g. the shipped ``fastgen/zoo/weights/<name>``
        or another run's ``best_pipeline``) instead of a checkpoint: weights and EMA are set to the folder's,
        the optimizer starts fresh, and the step and elapsed-time counters continue from the folder's
        ``fastgen_zoo.json`` (so the data stream continues with unseen seeds). Use it when the run's
        ``checkpoint.pt`` is gone; prefer ``--resume`` when it exists (exact continuation).
        """
        from fastgen import zoo

        path = Path(path)
        meta_file = path / "fastgen_zoo.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        if meta.get("model", self.cfg.model) != self.cfg.model:
            raise ValueError(f"--init-from {path}: that folder holds {meta['model']!r}, this run trains {self.cfg.model!r}")
        if meta.get("arch") is not None and meta["arch"] != json.loads(json.dumps(self.arch, default=str)):
            raise ValueError(f"--init-from {path}: architecture {meta['arch']} differs from this run's {self.arch}; "
                             f"pass the same --arch overrides")
        pipe = zoo.load_pipeline(path)
        for k, m in self.modules.items():
            src = getattr(pipe, k).state_dict()
            m.load_state_dict(src)
            self.ema[k].load_state_dict(src)
        ev = meta.get("eval", {})
        self.step = int(ev.get("step", 0))
        self.elapsed = float(ev.get("minutes", 0.0)) * 60.0
        logger.info("initialised from %s (step %d, %.1f min trained before)", path, self.step, self.elapsed / 60)

    # ---- pipelines ------------------------------------------------------------------------------------

    def ema_pipeline(self):
        """A pipeline holding copies of the EMA weights (default attention processors, eval mode)."""
        pipe = build_pipeline(self.cfg.model, self.arch, seed=self.cfg.seed, size=self.cfg.size)
        for k, m in self.ema.items():
            getattr(pipe, k).load_state_dict(m.state_dict())
            getattr(pipe, k).eval()
        return pipe

    def evaluate_and_save(self, n: int = 100) -> dict[str, Any]:
        """Score the EMA pipeline on ``n`` held-out prompts, save it to ``OUT/pipeline`` (and
        ``OUT/best_pipeline`` when it is the best so far), append to ``OUT/history.jsonl``."""
        pipe = self.ema_pipeline()
        res = evaluate_pipeline(pipe, self.cfg.model, n=n) if n > 0 else {"overall": float("nan")}
        row = {"step": self.step, "minutes": round(self.elapsed / 60, 2), **{k: v for k, v in res.items()}}
        self.history.append(row)
        save_pipeline(pipe, self.out / "pipeline", meta={"model": self.cfg.model, "eval": row,
                                                          "config": asdict(self.cfg), "arch": self.arch})
        overall = res["overall"]
        if n > 0 and overall == overall and overall > self.best:
            self.best = float(overall)
            _replace_dir(self.out / "pipeline", self.out / "best_pipeline")
        with open(self.out / "history.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        crit = " ".join(f"{k}={res[k]:.3f}" for k in ("color", "shape", "count", "position", "single", "counting",
                                                      "relation") if k in res)
        logger.info("eval step %d (%.1f min): overall=%.3f %s [%ss]", self.step, self.elapsed / 60, overall, crit,
                    res.get("seconds"))
        return row

    # ---- the loop -------------------------------------------------------------------------------------

    def run(self, minutes: float | None = None, steps: int | None = None, ckpt_minutes: float = 5.0,
            eval_minutes: float = 15.0, eval_prompts: int = 100, log_every: int = 20,
            final_eval: bool = True, cooldown: float = 0.0) -> dict[str, Any]:
        """Train until ``minutes`` of training time (in total, resumed time included) or ``steps`` steps.

        ``cooldown`` decays the learning rate linearly to 5% of ``lr`` over the last that fraction of the
        budget (a warmup-stable-decay schedule: the loss drops markedly in the decay phase). Progress is the
        larger of ``elapsed / minutes`` and ``step / steps``; with a ``minutes`` budget it follows elapsed
        training time, so a resumed run then matches an uninterrupted one only up to step timing (with a
        ``steps`` budget alone it is exact).

        Returns:
            the last evaluation row (``{}`` when ``final_eval`` is False).
        """
        if minutes is None and steps is None:
            raise ValueError("give minutes or steps (or both)")
        self.out.mkdir(parents=True, exist_ok=True)
        last_ckpt = last_eval = self.elapsed
        losses: list[float] = []
        t_log = time.time()
        stop: list[int] = []
        restore = _on_stop_signals(lambda signum, frame: stop.append(signum))
        try:
            while not stop:
                if steps is not None and self.step >= steps:
                    break
                if minutes is not None and self.elapsed >= minutes * 60:
                    break
                self.lr_scale = cooldown_factor(_progress(self.elapsed / 60, minutes, self.step, steps), cooldown)
                t0 = time.time()
                losses.append(self.train_step())
                self.elapsed += time.time() - t0
                if self.step % log_every == 0:
                    dt = time.time() - t_log
                    logger.info("step %d  loss %.4f  %.2f s/step  %.1f min", self.step, float(np.mean(losses)),
                                dt / len(losses), self.elapsed / 60)
                    losses, t_log = [], time.time()
                if eval_minutes and self.elapsed - last_eval >= eval_minutes * 60:
                    self.evaluate_and_save(eval_prompts)
                    last_eval = self.elapsed
                    self.save_checkpoint()
                    last_ckpt = self.elapsed
                if ckpt_minutes and self.elapsed - last_ckpt >= ckpt_minutes * 60:
                    self.save_checkpoint()
                    last_ckpt = self.elapsed
        finally:
            restore()
        if stop:  # SIGTERM/SIGINT: keep everything up to the last finished step, skip the final evaluation
            self.save_checkpoint()
            logger.warning("stopped by signal %d at step %d; checkpoint saved, resume with --resume", stop[0], self.step)
            return {}
        row = self.evaluate_and_save(eval_prompts) if final_eval else {}
        self.save_checkpoint()
        return row


def _progress(elapsed_minutes: float, minutes: float | None, step: int, steps: int | None) -> float:
    """Fraction of the training budget used: the larger of the time and step fractions."""
    fr = [elapsed_minutes / minutes if minutes else 0.0, step / steps if steps else 0.0]
    return max(fr)


def cooldown_factor(progress: float, cooldown: float, floor: float = 0.05) -> float:
    """Learning-rate factor of the linear cooldown: 1 until ``1 - cooldown`` of the budget, then down to ``floor``."""
    if cooldown <= 0:
        return 1.0
    return float(min(1.0, max(floor, (1.0 - progress) / cooldown)))


def _on_stop_signals(handler) -> Any:
    """Route SIGTERM/SIGINT to ``handler`` (main thread only); returns a function that restores the old handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(sig, h) for sig, h in old.items()]


def _replace_dir(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old.exists():
        shutil.rmtree(old)


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
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


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


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _parse_arch(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"--arch expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = json.loads(v) if v[:1] in "[{0123456789-." or v in ("true", "false") else v
        if isinstance(out[k], list):
            out[k] = tuple(out[k])
    return out


def main(argv: list[str] | None = None) -> int:
    """``fastgen train zoo MODEL --out DIR [...]`` (see ``--help``)."""
    ap = CommandParser(prog="fastgen train zoo", description=__doc__.split("\n\n")[0],
                       example="fastgen train zoo shapes-mmdit --out runs/shapes-mmdit --minutes 100\n"
                               "fastgen train zoo shapes-mmdit --out runs/shapes-mmdit --export fastgen/zoo/weights/"
                               "shapes-mmdit")
    ap.add_argument("model", choices=[m for m in MODELS if m in ARCH])
    ap.add_argument("--out", required=True, help="run folder (checkpoint.pt, pipeline/, best_pipeline/, history)")
    ap.add_argument("--minutes", type=float, default=None, help="training time budget in total (default 170)")
    ap.add_argument("--steps", type=int, default=None, help="stop after this many optimisation steps in total")
    ap.add_argument("--batch", type=int, default=TrainConfig.batch)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    ap.add_argument("--ema-decay", type=float, default=TrainConfig.ema_decay)
    ap.add_argument("--cfg-dropout", type=float, default=TrainConfig.cfg_dropout)
    ap.add_argument("--t-sampling", default=TrainConfig.t_sampling, choices=("logit-normal", "uniform"))
    ap.add_argument("--snr-gamma", type=float, default=TrainConfig.snr_gamma,
                    help="Min-SNR-gamma weight of the UNet epsilon loss (0: plain MSE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", nargs="*", default=[], help="architecture overrides key=value (see ARCH)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--init-from", metavar="FOLDER", default=None,
                    help="start from a saved zoo pipeline's weights (e.g. the shipped one) when no checkpoint exists")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the cores are shared)")
    ap.add_argument("--cooldown", type=float, default=0.25,
                    help="decay the lr linearly to 5%% over the last this fraction of the budget (0: constant lr)")
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--eval-minutes", type=float, default=15.0)
    ap.add_argument("--eval-prompts", type=int, default=100)
    ap.add_argument("--export", metavar="DST", default=None,
                    help="do not train: copy OUT/best_pipeline to DST (e.g. fastgen/zoo/weights/MODEL)")
    ap.add_argument("--fp16", action="store_true", help="with --export: store float16 weights")
    ap.add_argument("--final", action="store_true",
                    help="with --export: copy OUT/pipeline (the weights at the end of the run) instead of "
                         "OUT/best_pipeline (the best periodic evaluation, which is picked on the held-out prompts)")
    args = ap.parse_args(argv)

    log_to_stderr_with_time()
    torch.set_num_threads(max(1, args.threads))

    if args.export:
        src = Path(args.out) / ("pipeline" if args.final else "best_pipeline")
        dst = export_pipeline(src, args.export, half=args.fp16)
        size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
        logger.info("exported %s -> %s (%.1f MB)", src, dst, size / 1e6)
        return 0

    cfg = TrainConfig(model=args.model, batch=args.batch, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
                      cfg_dropout=args.cfg_dropout, t_sampling=args.t_sampling, snr_gamma=args.snr_gamma, seed=args.seed,
                      arch=_parse_arch(args.arch))
    tr = Trainer(cfg, args.out)
    if args.resume and tr.resume():
        pass
    elif args.init_from:
        if (Path(args.out) / "checkpoint.pt").exists():
            raise SystemExit(f"{args.out}/checkpoint.pt exists: use --resume (exact) instead of --init-from")
        tr.init_from(args.init_from)
    elif args.resume:
        logger.info("no checkpoint in %s: starting from scratch", args.out)
    elif (Path(args.out) / "checkpoint.pt").exists():
        raise SystemExit(f"{args.out}/checkpoint.pt exists: pass --resume to continue it or choose another --out")
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in tr.modules.items()}
    logger.info("training %s: %s params, config %s", args.model, n_params, asdict(cfg))
    minutes = args.minutes if (args.minutes is not None or args.steps is not None) else 170.0
    row = tr.run(minutes=minutes, steps=args.steps, ckpt_minutes=args.ckpt_minutes, eval_minutes=args.eval_minutes,
                 eval_prompts=args.eval_prompts, cooldown=args.cooldown)
    if row:
        logger.info("done: step %d, %.1f min, overall %.3f; pipeline in %s", tr.step, tr.elapsed / 60,
                    row.get("overall", float("nan")), Path(args.out) / "pipeline")
    return 0
