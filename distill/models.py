"""Student denoisers that carry a guidance weight, and the guidance embedding they share with diffusers.

Guidance-distilled students (Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023,
arXiv 2210.03142) take the guidance weight as an input so that one forward per step replaces the two of
classifier-free guidance (CFG).

Convention (the same as diffusers' LCM code): the pipeline's ``guidance_scale`` ``g`` is diffusers' CFG
scale, ``uncond + g (cond - uncond)``; the paper's weight is ``w = g - 1`` (``(1 + w) cond - w uncond``),
and the student is fed ``guidance_embedding(w)``, a sinusoid of ``1000 w``, exactly what
``StableDiffusionPipeline.get_guidance_scale_embedding(g - 1)`` computes.

* **UNets** (SD/SDXL) need no new class: ``UNet2DConditionModel(time_cond_proj_dim=D)`` adds a bias-free
  ``time_embedding.cond_proj`` that the stock pipelines feed with that embedding whenever
  ``time_cond_proj_dim`` is set, and then skip CFG. :func:`unet_with_guidance_input` builds it from a
  teacher with ``cond_proj`` zero-initialised, so the student starts equal to the conditional teacher.
* **SD3 MMDiTs**: ``SD3Transformer2DModel`` has no guidance input and ``StableDiffusion3Pipeline`` always
  batches CFG when ``guidance_scale > 1`` and passes the transformer nothing about ``g``. The choice made
  here: :class:`GuidanceSD3Transformer2DModel`, a subclass that adds a zero-initialised bias-free
  ``guidance_proj`` (``guidance_embed_dim -> pooled_projection_dim``) whose output is added to
  ``pooled_projections`` (the pooled text vector feeds only the time/text embedding, so this is where
  FLUX's guidance embedding also lands). ``forward`` is the parent's; the weight comes from, in order,
  the ``guidance`` argument, ``joint_attention_kwargs["guidance_scale"]`` (removed before the attention
  processors see it), or :attr:`GuidanceSD3Transformer2DModel.default_guidance_scale` (initialised
  from the config). The stock pipeline then runs it with one forward per step when called with
  ``guidance_scale=1`` (no CFG batching) and ``joint_attention_kwargs={"guidance_scale": g}``. Its folder
  loads with a plain ``DiffusionPipeline.from_pretrained`` once ``distill`` has been imported (diffusers
  resolves the class from ``model_index.json``'s ``["distill.models", ...]`` entry through
  ``sys.modules``); every SD3 fastgen technique still applies (it *is* an ``SD3Transformer2DModel``).
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import torch
from diffusers import ModelMixin, SD3Transformer2DModel, UNet2DConditionModel  # noqa: F401
from diffusers.configuration_utils import register_to_config

__all__ = ["guidance_embedding", "unet_with_guidance_input", "GuidanceSD3Transformer2DModel",
           "sd3_with_guidance_input", "has_guidance_input", "DEFAULT_GUIDANCE_EMBED_DIM"]

#: Width of the sinusoidal guidance embedding (the LCM / diffusers scripts' ``--unet_time_cond_proj_dim``).
DEFAULT_GUIDANCE_EMBED_DIM = 256


def guidance_embedding(w: torch.Tensor, dim: int = DEFAULT_GUIDANCE_EMBED_DIM,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight ``w`` (``= g - 1``), shape ``(B, dim)``.

    Identical to ``StableDiffusionPipeline.get_guidance_scale_embedding(w, dim)`` (VDM-style: ``sin`` half
    then ``cos`` half of ``1000 w`` times ``10000^(-k / (dim/2 - 1))``), which is what the pipelines feed
    a UNet with ``time_cond_proj_dim``; a student trained on it works in unmodified pipelines.
    """
    assert w.ndim == 1, f"w must be 1-D (batch), got shape {tuple(w.shape)}"
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half - 1)))
    arg_BH = (w.to(dtype) * 1000.0)[:, None] * freqs[None, :]
    emb_BD = torch.cat([torch.sin(arg_BH), torch.cos(arg_BH)], dim=1)
    if dim % 2 == 1:
        emb_BD = torch.nn.functional.pad(emb_BD, (0, 1))
    return emb_BD


def _like(model: torch.nn.Module, ref: torch.nn.Module) -> torch.nn.Module:
    """``model`` on ``ref``'s device and dtype (no ``.to`` call when already there)."""
    if model.device != ref.device:
        model = model.to(ref.device)
    if model.dtype != ref.dtype:
        model = model.to(ref.dtype)
    return model


def unet_with_guidance_input(unet: UNet2DConditionModel, dim: int = DEFAULT_GUIDANCE_EMBED_DIM) -> UNet2DConditionModel:
    """A copy of ``unet`` with ``time_cond_proj_dim=dim`` whose new ``cond_proj`` is zero (so it equals
    ``unet`` for every ``w``). Raises when ``unet`` already has a guidance input of another width."""
    have = unet.config.time_cond_proj_dim
    if have is not None:
        if have != dim:
            raise ValueError(f"{type(unet).__name__} already has time_cond_proj_dim={have}; pass "
                             f"guidance_embed_dim={have} to keep it")
        return copy.deepcopy(unet)
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}  # (_use_default_values would
    student = UNet2DConditionModel.from_config({**cfg, "time_cond_proj_dim": dim})  # reset time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"time_embedding.cond_proj.weight"}, (missing, unexpected)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    student.set_attn_processor(dict(unet.attn_processors))
    return _like(student, unet)


# (ModelMixin is imported above on purpose: diffusers' pipeline loader finds a custom component's load
# method by looking its base classes up *in the component's module*, i.e. ``distill.models.ModelMixin``.)
_SD3_PARAMS = [p for n, p in inspect.signature(SD3Transformer2DModel.__init__).parameters.items() if n != "self"]


class GuidanceSD3Transformer2DModel(SD3Transformer2DModel):
    """``SD3Transformer2DModel`` with a guidance-weight input added to ``pooled_projections`` (see the
    module docstring for why and how the pipeline feeds it).

    Extra config:
        guidance_embed_dim: width of :func:`guidance_embedding` (default 256).
        default_guidance_scale: the ``g`` used when a call gives none (diffusers convention; default 1.0,
            i.e. the conditional model). Set it on a loaded model with ``model.default_guidance_scale = g``.
    """

    def __init__(self, guidance_embed_dim: int = DEFAULT_GUIDANCE_EMBED_DIM, default_guidance_scale: float = 1.0,
                 **sd3_kwargs: Any):
        super().__init__(**sd3_kwargs)
        self.register_to_config(guidance_embed_dim=int(guidance_embed_dim),
                                default_guidance_scale=float(default_guidance_scale))
        self.guidance_proj = torch.nn.Linear(int(guidance_embed_dim), self.config.pooled_projection_dim, bias=False)
        torch.nn.init.zeros_(self.guidance_proj.weight)
        self.default_guidance_scale = float(default_guidance_scale)

    # diffusers' ConfigMixin reads the constructor's signature to know the config keys: advertise the
    # parent's parameters plus ours (kept in step with whatever diffusers version is installed).
    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in _SD3_PARAMS]
        + [inspect.Parameter("guidance_embed_dim", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT_GUIDANCE_EMBED_DIM),
           inspect.Parameter("default_guidance_scale", inspect.Parameter.KEYWORD_ONLY, default=1.0)]
    )
    __init__ = register_to_config(__init__)

    def guidance_pooled_offset(self, guidance_scale: torch.Tensor) -> torch.Tensor:
        """What is added to ``pooled_projections`` for diffusers-convention scales ``g`` (shape ``(B,)``)."""
        emb = guidance_embedding(guidance_scale.float() - 1.0, self.config.guidance_embed_dim)
        # device/dtype from the module's parameters, not ``.weight``: a wrapped layer (int8, LoRA) may have none
        p = next(self.guidance_proj.parameters(), None)
        p = p if p is not None else next(self.parameters())
        return self.guidance_proj(emb.to(device=p.device, dtype=p.dtype))

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                pooled_projections: torch.Tensor = None, timestep: torch.Tensor = None, *args,
                guidance: torch.Tensor | float | None = None, joint_attention_kwargs: dict | None = None, **kwargs):
        """The parent's forward with ``pooled_projections + guidance_proj(emb(g - 1))``.

        Args:
            guidance: ``g`` per sample (tensor ``(B,)``) or one float; default
                ``joint_attention_kwargs["guidance_scale"]``, else :attr:`default_guidance_scale`.
        """
        if joint_attention_kwargs is not None and "guidance_scale" in joint_attention_kwargs:
            joint_attention_kwargs = dict(joint_attention_kwargs)
            g_kw = joint_attention_kwargs.pop("guidance_scale")
            guidance = g_kw if guidance is None else guidance
            joint_attention_kwargs = joint_attention_kwargs or None
        if guidance is None:
            guidance = self.default_guidance_scale
        b = hidden_states.shape[0]
        g_B = torch.as_tensor(guidance, dtype=torch.float32, device=hidden_states.device).reshape(-1)
        if g_B.numel() == 1:
            g_B = g_B.expand(b)
        assert g_B.shape == (b,), f"guidance must be one value or one per sample ({b}), got {tuple(g_B.shape)}"
        pooled = pooled_projections + self.guidance_pooled_offset(g_B).to(pooled_projections.dtype)
        return super().forward(hidden_states, encoder_hidden_states, pooled, timestep, *args,
                               joint_attention_kwargs=joint_attention_kwargs, **kwargs)


def has_guidance_input(model: torch.nn.Module) -> bool:
    """Whether the denoiser ``model`` takes the guidance weight as an input (it is guidance-distilled): a
    UNet with ``time_cond_proj_dim`` or a :class:`GuidanceSD3Transformer2DModel`."""
    if isinstance(model, GuidanceSD3Transformer2DModel):
        return True
    config = getattr(model, "config", None)
    return config is not None and config.get("time_cond_proj_dim") is not None


def sd3_with_guidance_input(transformer: SD3Transformer2DModel, dim: int = DEFAULT_GUIDANCE_EMBED_DIM,
                            default_guidance_scale: float = 1.0) -> GuidanceSD3Transformer2DModel:
    """A :class:`GuidanceSD3Transformer2DModel` with ``transformer``'s weights and a zero ``guidance_proj``
    (so it equals ``transformer`` for every ``g``); attention processors are carried over."""
    if isinstance(transformer, GuidanceSD3Transformer2DModel):
        return copy.deepcopy(transformer)
    cfg = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    student = GuidanceSD3Transformer2DModel(guidance_embed_dim=dim, default_guidance_scale=default_guidance_scale,
                                            **cfg)
    missing, unexpected = student.load_state_dict(transformer.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"guidance_proj.weight"}, (missing, unexpected)
    student.set_attn_processor(dict(transformer.attn_processors))
    return _like(student, transformer)
