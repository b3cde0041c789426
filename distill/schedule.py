"""The teachers' side of distillation: per pipeline family, its noise schedule and model parametrisation.

* Teacher families (:func:`family_for`): how to encode prompts, call a denoiser at a time ``t`` and convert
  its output, for ``StableDiffusionPipeline``/``StableDiffusionXLPipeline`` (epsilon or v UNets on a DDPM
  schedule: :meth:`UNetFamily.ab`, :meth:`UNetFamily.x0_eps`, :meth:`UNetFamily.pred_from_x0_eps`) and
  ``StableDiffusion3Pipeline`` (rectified-flow MMDiT, ``x_s = (1 - s) x_0 + s eps``, ``v = eps - x_0``), with
  batched classifier-free guidance (:meth:`Family.cfg_predict`). Any other pipeline class raises
  :class:`~fastgen.errors.UnsupportedPipelineError` naming it.
* :func:`pseudo_huber`: the distance between a student output and its target (LCM/iCT loss).

The methods' own solver steps and targets (LCM boundary scalings, TrigFlow, progressive halving) live in
:mod:`fastgen.distill.consistency` and :mod:`fastgen.distill.guidance`; the training loop in
:mod:`fastgen.distill.trainer`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from fastgen.errors import UnsupportedPipelineError

from .models import GuidanceSD3Transformer2DModel, guidance_embedding

__all__ = ["SUPPORTED_PIPELINES", "Family", "UNetFamily", "FlowFamily", "family_for", "pseudo_huber"]

#: Pipeline classes the trainers accept (UNet families: epsilon/v; SD3: flow matching).
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline")


# --------------------------------------------------------------------------------------------------
# Teacher families
# --------------------------------------------------------------------------------------------------


def _cat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([a[k], b[k]]) for k in a}


class Family:
    """How to drive one pipeline family's denoiser. Conditions are dicts of batch-first tensors."""

    #: "unet" or "transformer": the pipeline attribute holding the denoiser.
    model_attr: ClassVar[str]
    #: True for flow-matching (velocity) models.
    is_flow: ClassVar[bool]

    def __init__(self, pipe, max_sequence_length: int | None = None):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length

    @property
    def model(self) -> torch.nn.Module:
        return getattr(self.pipe, self.model_attr)

    def describe(self) -> str:
        return f"{type(self.pipe).__name__} ({type(self.model).__name__})"

    def encode(self, prompts: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(cond, uncond) exactly as the pipeline builds them for CFG (no gradient)."""
        raise NotImplementedError

    def call_extra(self) -> dict[str, Any]:
        """Extra keyword arguments of a pipeline call (e.g. SD3 ``max_sequence_length``)."""
        return {}

    def predict(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        """The raw model output at ``x``, time ``t`` (UNet: integer timesteps; flow: sigma in [0, 1]).
        ``guidance`` (diffusers ``g`` per sample) is fed to students with a guidance input."""
        raise NotImplementedError

    def cfg_predict(self, model, x, t, cond, uncond, g: torch.Tensor) -> torch.Tensor:
        """CFG output ``uncond + g (cond - uncond)`` in one batched call (``g`` per sample)."""
        both = self.predict(model, torch.cat([x, x]), torch.cat([t, t]), _cat(uncond, cond))
        u, c = both.chunk(2)
        return u + g.view(-1, *([1] * (x.ndim - 1))).to(u.dtype) * (c - u)


class UNetFamily(Family):
    """SD / SDXL UNets on the DDPM schedule of the pipeline's scheduler (epsilon or v prediction)."""

    model_attr = "unet"
    is_flow = False

    def __init__(self, pipe, max_sequence_length: int | None = None):
        super().__init__(pipe, max_sequence_length)
        from diffusers import DDPMScheduler, StableDiffusionXLPipeline

        self.sdxl = isinstance(pipe, StableDiffusionXLPipeline)
        cfg = pipe.scheduler.config
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UnsupportedPipelineError(
                f"{self.describe()} predicts {self.prediction_type!r}; distill supports epsilon and v_prediction UNets")
        self.num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
        ddpm = DDPMScheduler.from_config(cfg)
        self.alphas_cumprod = ddpm.alphas_cumprod.double()

    def ab(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha_bar`` at integer timesteps ``t`` (``t < 0``: 1, the clean end)."""
        t = t.long().cpu()
        out = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones((), dtype=torch.float64))
        return out.float()

    def encode(self, prompts):
        p = self.pipe
        dev = self.model.device
        with torch.no_grad():
            if self.sdxl:
                pe, npe, pooled, npooled = p.encode_prompt(prompts, device=dev, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=True)
                te2 = p.text_encoder_2
                proj = int(pooled.shape[-1]) if te2 is None else te2.config.projection_dim
                h, w = self._hw()
                ids = p._get_add_time_ids((h, w), (0, 0), (h, w), dtype=pe.dtype,
                                          text_encoder_projection_dim=proj).to(dev).repeat(len(prompts), 1)
                return ({"ctx": pe, "text_embeds": pooled, "time_ids": ids},
                        {"ctx": npe, "text_embeds": npooled, "time_ids": ids.clone()})
            pe, npe = p.encode_prompt(prompts, dev, 1, True)
            return {"ctx": pe}, {"ctx": npe}

    def _hw(self) -> tuple[int, int]:
        s = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return getattr(self, "hw", (s, s))

    def predict(self, model, x, t, cond, guidance=None):
        kw: dict[str, Any] = {}
        if guidance is not None:
            dim = model.config.time_cond_proj_dim
            assert dim is not None, "guidance given to a UNet without time_cond_proj_dim"
            kw["timestep_cond"] = guidance_embedding(guidance.float() - 1.0, dim).to(x.device, x.dtype)
        if "text_embeds" in cond:
            kw["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return model(x, t.to(x.device), encoder_hidden_states=cond["ctx"], return_dict=False, **kw)[0]

    def x0_eps(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a model output at integer timesteps ``t``."""
        ab = self.ab(t).to(x.device).view(-1, 1, 1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        if self.prediction_type == "epsilon":
            return (x - s * pred) / a, pred
        return a * x - s * pred, s * x + a * pred  # v-prediction

    def pred_from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model output that corresponds to ``(x0, eps)`` at ``t``."""
        if self.prediction_type == "epsilon":
            return eps
        ab = self.ab(t).to(x0.device).view(-1, 1, 1, 1)
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0


class FlowFamily(Family):
    """``StableDiffusion3Pipeline`` (rectified flow; the transformer takes ``timestep = sigma * 1000``)."""

    model_attr = "transformer"
    is_flow = True

    def __init__(self, pipe, max_sequence_length: int | None = None):
        super().__init__(pipe, max_sequence_length)
        self.num_train_timesteps = int(pipe.scheduler.config.get("num_train_timesteps", 1000))

    def call_extra(self):
        return {} if self.max_sequence_length is None else {"max_sequence_length": int(self.max_sequence_length)}

    def encode(self, prompts):
        with torch.no_grad():
            pe, npe, pooled, npooled = self.pipe.encode_prompt(
                prompts, None, None, device=self.model.device, num_images_per_prompt=1,
                do_classifier_free_guidance=True, **self.call_extra())
        return {"ctx": pe, "pooled": pooled}, {"ctx": npe, "pooled": npooled}

    def predict(self, model, x, t, cond, guidance=None):
        kw: dict[str, Any] = {}
        if guidance is not None:
            assert isinstance(model, GuidanceSD3Transformer2DModel), "guidance given to a model without input for it"
            kw["guidance"] = guidance
        elif isinstance(model, GuidanceSD3Transformer2DModel):
            kw["guidance"] = 1.0  # a guidance student used as a plain conditional model
        ts = (t.to(x.device, torch.float32) * self.num_train_timesteps)
        return model(x, encoder_hidden_states=cond["ctx"], pooled_projections=cond["pooled"], timestep=ts,
                     return_dict=False, **kw)[0]


def family_for(pipe, max_sequence_length: int | None = None) -> Family:
    """The :class:`Family` of ``pipe``; :class:`UnsupportedPipelineError` names any other class."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if isinstance(pipe, StableDiffusion3Pipeline):
        return FlowFamily(pipe, max_sequence_length)
    if isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        return UNetFamily(pipe, max_sequence_length)
    model = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    raise UnsupportedPipelineError(
        f"distill does not support {type(pipe).__name__} ({type(model).__name__ if model is not None else 'no denoiser'}): "
        f"supported pipeline classes are {', '.join(SUPPORTED_PIPELINES)}. For other models use the training-free "
        "few-step samplers (`samplers.set_sampler(pipe, 'dpm++2m', steps=8)`) or the caches in fastgen.")


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """``mean(sqrt((a - b)^2 + c^2) - c)`` (elementwise pseudo-Huber, the LCM/iCT loss); ``c <= 0``: MSE."""
    if c <= 0:
        return F.mse_loss(a.float(), b.float())
    d = a.float() - b.float()
    return (torch.sqrt(d * d + c * c) - c).mean()
