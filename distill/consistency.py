"""Consistency distillation of diffusers pipelines into 1-8-step students, data-free.

**LCM** (:class:`LCMTrainer`; Luo et al., "Latent Consistency Models", arXiv 2310.04378) for epsilon /
v-prediction UNets (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``). Skipping-step grid of
``num_ddim_timesteps`` points (``k = T / N``; ``t_{n+k} = (n + 1) k - 1``, ``t_n = max(t_{n+k} - k, 0)``);
``x_{t_{n+k}}`` = the forward process on a teacher sample; the frozen teacher with CFG at a sampled
``w ~ U[w_min, w_max]`` (``g = 1 + w``) takes one DDIM step to ``t_n``; the student's consistency function
``f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t)`` with ``c_skip = sd^2 / ((10 t)^2 + sd^2)``,
``c_out = 10 t / sqrt((10 t)^2 + sd^2)`` (``sd = 0.5``: the boundary condition ``f(x, 0) = x``, identical to
``LCMScheduler``) is matched to the **EMA target network**'s ``f`` at ``(x_hat_{t_n}, t_n)`` with the
pseudo-Huber loss. The student is w-conditioned through ``time_cond_proj_dim`` (zero-initialised, see
:mod:`distill.models`) unless ``guidance_embed=False`` (LCM-LoRA style: ``w`` folded in). Full weights or
a peft LoRA (``lora_rank``; LCM-LoRA proper also sets ``ema_decay=0``: the target is the student under
``no_grad``). The teacher may itself be guidance-distilled (a ``distill.guidance`` student, whose UNet has
``time_cond_proj_dim``): its guided prediction is then one call at ``g`` instead of two, and the student
starts as an exact copy of it, trained w input included, so it starts at the guided quality rather than
having to pull the guidance in through the one-DDIM-step target
(:attr:`~distill.trainer.DistillTrainer.teacher_takes_guidance`). The targets are then that student's ODE;
``init_student`` instead starts the student from a guidance-distilled UNet while a CFG teacher keeps making
the targets.
Saved with ``LCMScheduler`` (``original_inference_steps = num_ddim_timesteps``)::

    pipe(prompt, num_inference_steps=4, guidance_scale=g)      # w-conditioned: one UNet call per step
    pipe(prompt, num_inference_steps=4, guidance_scale=1.0)    # guidance_embed=False: CFG baked in

*Phased* (``phases=P``; Wang et al., "Phased Consistency Models", arXiv 2405.18407; Heek et al.,
"Multistep Consistency Models", arXiv 2403.06807): the grid splits into P phases with edges
``j T / P - 1`` (``-1``: clean), the consistency function is the DDIM jump ``sqrt(ab_e) x0_hat +
sqrt(1 - ab_e) eps_hat`` to the lower edge ``e`` of the point's phase (no c_skip/c_out), and a step that
lands on its edge is its own target. The student is saved with a trailing-spacing ``DDIMScheduler``
(``set_alpha_to_one``) whose P steps visit exactly the edges, so ``pipe(prompt, num_inference_steps=P,
guidance_scale=g)`` is the chain of phase maps. Each map covers 1/P of the trajectory instead of all of
it. On ``shapes-unet`` neither form beat the guidance-distilled start's 4-step score; plain LCM from the CFG
teacher with ``init_student`` at lr 2e-6 kept it above the goal while the 1-step score rose (the shipped
``shapes-unet-lcm``; README).

**sCM** (:class:`SCMTrainer`; Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time
Consistency Models", ICLR 2025) for flow-matching MMDiTs (``StableDiffusion3Pipeline``), through the
training-free flow -> TrigFlow conversion of SANA-Sprint (Chen et al., arXiv 2503.09641): a rectified-flow
model ``v(x_s, s)`` (``x_s = (1 - s) x_0 + s eps``) *is* a TrigFlow model ``F(x_t / sd, t)`` with
``s = sin t / (sin t + cos t)``, ``x_s = (x_t / sd) / (sin t + cos t)``, ``F = ((1 - 2s) x_s + (1 - 2s + 2s^2) v)
/ sqrt(s^2 + (1 - s)^2)`` (:func:`flow_to_trigflow`), so the student keeps the teacher's class and
weights. Per step: TrigFlow data ``sd * x_0``, ``t = arctan(e^tau / sd)``, ``tau ~ N(p_mean, p_std^2)``; the
teacher's CFG velocity gives ``dx_t/dt``; one forward-mode JVP of the student (``torch.func.jvp``) along
the PF-ODE, tangents ``(cos t sin t dx_t/dt / sd, cos t sin t)``; ``g = -cos^2 t (sd F^- - dx_t/dt) -
r cos t sin t x_t - r sd dF^-`` (``r`` warms up from 0 to 1 over ``tangent_warmup`` steps) normalised
``g / (||g|| + c)``; loss ``exp(-logvar(t)) / (sd tan t) * mean((F_theta - F^- - g)^2) + logvar(t)`` with a
learned adaptive weighting ``logvar`` (:class:`LogVarHead`, kept in the checkpoint only). The teacher may
be guidance-distilled (:class:`~distill.models.GuidanceSD3Transformer2DModel`, as SANA-Sprint distils from a
guidance-embedded teacher): its velocity at ``g`` is one call instead of two, and the student starts as an
exact copy that keeps the g input and the teacher's ``default_guidance_scale``
(:attr:`~distill.trainer.DistillTrainer.teacher_takes_guidance`).

*Adversarial term* (``adv_weight > 0``; SANA-Sprint's LADD, Sauer et al., arXiv 2403.12015): the frozen
teacher is the discriminator's feature network. Each step the student also makes one-step outputs
``x0_hat`` from ``x_t`` at ``t ~ U[adv_t_min, pi/2]`` (the 1-2-step sampling regime), both ``x0_hat`` and the
pool's teacher samples (same prompts) are re-noised to one flow sigma ``sigmoid(N(adv_logit_mean, 1))``
with the same noise, and the teacher's image tokens after ``adv_blocks`` feed small trainable heads
(:class:`DiscriminatorHead`). The student adds ``adv_weight * -mean D(fake)`` (gradients through the frozen
teacher) to the sCM loss; the heads take a hinge step of their own optimiser on the detached fake and the
real features. The heads and their optimiser are in the checkpoint (exact resume). ``init_student`` starts
from a saved student (e.g. fine-tune a trained sCM student with the adversarial term).

*Attention backend for the JVP*: PyTorch's fused SDPA kernels have no forward-mode AD (torch 2.x raises
``NotImplementedError`` for ``_scaled_dot_product_flash_attention_for_cpu``; the CUDA flash/efficient/cuDNN
kernels likewise); the math backend is plain differentiable ops and supports it. The JVP therefore runs
under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` (:func:`jvp_attention`), on CPU and GPU alike;
the ordinary forward/backward passes keep the fast kernels.

In flow coordinates the TrigFlow consistency function ``f = cos t x_t - sin t sd F`` is exactly the flow
``x_0`` prediction ``x_s - s v``, so a plain ``FlowMatchEulerDiscreteScheduler`` (shift 1) samples the
student: one step from ``s = 1`` *is* the consistency map, two steps pass through ``s_mid`` (sCM's
intermediate ``t = 1.3``, ``s_mid = 0.7827``; deterministic Euler re-noising with the model's own noise
estimate). diffusers' ``SCMScheduler`` would need the model to take TrigFlow inputs (radian timesteps,
``sd``-scaled latents) and the SD3 pipeline to pass it a generator, so it is not used. The student keeps
the plain ``SD3Transformer2DModel`` class (every SD3 fastgen technique applies)::

    pipe(prompt, num_inference_steps=1, guidance_scale=1.0)                         # 1 step
    pipe(prompt, num_inference_steps=2, sigmas=[1.0, 0.7827], guidance_scale=1.0)   # 2 steps

(``guidance_scale=1``: the SD3 pipeline would batch CFG otherwise; the guidance is baked in, or, with
``guidance_embed=True``, passed as ``joint_attention_kwargs={"guidance_scale": g}``.)

CLI (also ``accelerate launch -m fastgen.distill.consistency ...``)::

    fastgen train consistency --method lcm --teacher shapes-unet --output runs/lcm --steps 2000
    fastgen train consistency --method lcm --teacher runs/gd-unet/pipeline --output runs/lcm-gd  # GD teacher
    fastgen train consistency --method lcm --teacher shapes-unet --init-student runs/gd-unet/pipeline \
        --phases 4 --num-ddim-timesteps 20 --output runs/pcm    # CFG targets, GD-initialised phased student
    fastgen train consistency --method scm --teacher shapes-mmdit --output runs/scm --steps 2000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from fastgen.errors import UnsupportedPipelineError
from fastgen.utils.commands import CommandParser
from fastgen.utils.logging import get_logger

from .cli import add_common_args, check_fresh_or_resume, config_from_args, setup_cli_logging
from .models import GuidanceSD3Transformer2DModel, sd3_with_guidance_input, unet_with_guidance_input
from .schedule import FlowFamily, UNetFamily, family_for, pseudo_huber
from .trainer import DistillConfig, DistillTrainer, init_student_folder, load_teacher, shape_differences

__all__ = [
    "LCMConfig", "SCMConfig", "LCMTrainer", "SCMTrainer", "distill_consistency", "lcm_boundary_scalings",
    "flow_to_trigflow", "trigflow_to_flow_time", "trigflow_consistency", "scm_tangent", "jvp_attention", "LogVarHead",
    "scm_call_kwargs", "scm_scheduler", "choose_mid_t", "MID_SIGMA_GRID", "SCM_MID_T", "DiscriminatorHead", "main",
]

logger = get_logger(__name__)

#: sCM's intermediate TrigFlow time for 2-step sampling (SANA-Sprint / diffusers SCMScheduler: 1.3 rad).
SCM_MID_T = 1.3


# --------------------------------------------------------------------------------------------------
# Math
# --------------------------------------------------------------------------------------------------


def lcm_boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """``(c_skip, c_out)`` of LCM at integer timesteps ``t`` (as ``LCMScheduler``): ``c_skip(0) = 1``,
    ``c_out(0) = 0``, so ``f(x, 0) = x``."""
    st = timestep_scaling * t.double()
    c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
    c_out = st / (st ** 2 + sigma_data ** 2).sqrt()
    return c_skip.float(), c_out.float()


def trigflow_to_flow_time(t: torch.Tensor) -> torch.Tensor:
    """Flow time ``s = sin t / (sin t + cos t)`` of TrigFlow time ``t`` in ``[0, pi/2]``."""
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def flow_to_trigflow(v_fn, x_unit: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """TrigFlow output ``F(x_unit, t)`` of a rectified-flow velocity model (SANA-Sprint's training-free
    conversion; ``x_unit = x_t / sigma_data``; ``v_fn(x_s, s)`` the flow model with ``s`` in [0, 1])."""
    sh = (-1,) + (1,) * (x_unit.ndim - 1)
    sin, cos = torch.sin(t).view(sh), torch.cos(t).view(sh)
    s = trigflow_to_flow_time(t)
    x_s = x_unit / (sin + cos)
    v = v_fn(x_s, s)
    s_ = s.view(sh)
    return ((1 - 2 * s_) * x_s + (1 - 2 * s_ + 2 * s_ * s_) * v) / torch.sqrt(s_ * s_ + (1 - s_) ** 2)


def trigflow_consistency(x_t: torch.Tensor, t: torch.Tensor, F_out: torch.Tensor, sigma_data: float = 0.5):
    """sCM's consistency function ``f(x_t, t) = cos t x_t - sin t sd F`` (identity at ``t = 0``)."""
    sh = (-1,) + (1,) * (x_t.ndim - 1)
    return torch.cos(t).view(sh) * x_t - torch.sin(t).view(sh) * sigma_data * F_out


def scm_tangent(F_fn, x_t: torch.Tensor, t: torch.Tensor, edge: torch.Tensor, dxdt: torch.Tensor,
                sigma_data: float = 0.5, r: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F^-, g)``: sCM's training direction for the consistency function ``f = cos(t - e) x_t -
    sin(t - e) sd F(x_t / sd, t)`` that maps ``x_t`` to the ODE's point at ``e`` (``edge``; 0: plain sCM).

    ``g = cos(t - e) df/dt`` along the PF-ODE (``dxdt``), i.e. ``-cos^2(t - e) (sd F^- - dx_t/dt) - r cos(t - e)
    sin(t - e) (x_t + sd dF/dt)``, with ``dF/dt`` from one forward-mode JVP of ``F_fn(x_unit, t)`` along the
    tangent ``cos(t - e) sin(t - e) (dx_t/dt / sd, 1)`` (under :func:`jvp_attention`); ``r`` ramps the
    second term in (tangent warm-up). Un-normalised; no grad."""
    sh = (-1,) + (1,) * (x_t.ndim - 1)
    cos_p, sin_p = torch.cos(t - edge).view(sh), torch.sin(t - edge).view(sh)
    sd = sigma_data
    with torch.no_grad(), jvp_attention():
        F_minus, dF = torch.func.jvp(F_fn, (x_t / sd, t), (cos_p * sin_p * dxdt / sd, (cos_p * sin_p).view(-1)))
    return F_minus, -(cos_p ** 2) * (sd * F_minus - dxdt) - r * (cos_p * sin_p * x_t + sd * dF)


@contextlib.contextmanager
def jvp_attention():
    """Force PyTorch's math SDPA backend (the only one with forward-mode AD) inside the block."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


class LogVarHead(torch.nn.Module):
    """sCM's adaptive weighting ``logvar(t)``: fixed Fourier features of ``t`` and a zero-initialised
    linear layer (``logvar = 0`` at the start)."""

    def __init__(self, n_freq: int = 32):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), n_freq)), persistent=False)
        self.linear = torch.nn.Linear(2 * n_freq, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t.float()[:, None] * self.freqs[None, :]
        return self.linear(torch.cat([torch.cos(arg), torch.sin(arg)], 1)).squeeze(1)


class DiscriminatorHead(torch.nn.Module):
    """One LADD discriminator head: a per-token MLP on a frozen teacher block's image tokens, averaged to
    one logit per sample. The tokens have attended to the prompt and carry the block's noise-level
    modulation, so the head judges "is this a teacher sample *for this prompt*"."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim), torch.nn.SiLU(),
                                       torch.nn.Linear(dim, 1))

    def forward(self, h_BLC: torch.Tensor) -> torch.Tensor:
        assert h_BLC.ndim == 3, h_BLC.shape
        return self.net(h_BLC.float()).mean(dim=(1, 2))


def scm_scheduler(num_train_timesteps: int = 1000, mid_t: float | None = None):
    """The sCM student's scheduler: flow-Euler with shift 1 (one step from sigma 1 is the consistency map).

    With ``mid_t`` its 2-step grid is ``[1, sigma(mid_t)]`` (``shift_terminal``): for evaluating 2-step
    calls that pass no ``sigmas``. Such a scheduler is wrong for any other step count (1 step gives NaN
    sigmas, 4 steps stop at ``sigma(mid_t)``), so students are saved with the plain one and 2-step calls
    pass ``sigmas`` (:func:`scm_call_kwargs`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s_mid = None if mid_t is None else float(trigflow_to_flow_time(torch.tensor(mid_t, dtype=torch.float64)))
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0, shift_terminal=s_mid)


#: Flow sigmas of the 2-step intermediate point that :func:`choose_mid_t` tries (0.7827 is sCM's t = 1.3).
MID_SIGMA_GRID: tuple[float, ...] = (0.6, 0.7, 0.7827, 0.85, 0.9, 0.93)


def choose_mid_t(pipe, zoo_name: str, sigmas=MID_SIGMA_GRID, n: int = 100) -> tuple[float, list[dict[str, float]]]:
    """Pick the 2-step intermediate time of an sCM student of a zoo model by the evaluator's score on ``n``
    calibration prompts (``shapes.CALIBRATION_SEED``, never the held-out ones the report uses).

    ``pipe`` keeps its scheduler. Returns ``(mid_t, rows)`` with one ``{"sigma", "mid_t", "score"}`` row per
    candidate (the first best on a tie)."""
    from fastgen.zoo import shapes
    from fastgen.zoo.evaluate import evaluate_pipeline

    for sigma in sigmas:
        if not 0.0 < sigma < 1.0:
            raise ValueError(f"intermediate flow sigmas must be in (0, 1), got {sigma}")
    saved = pipe.scheduler
    T = int(saved.config.get("num_train_timesteps", 1000))
    rows = []
    try:
        for sigma in sigmas:
            mid_t = math.atan(sigma / (1.0 - sigma))  # inverse of trigflow_to_flow_time
            pipe.scheduler = scm_scheduler(T, mid_t)
            r = evaluate_pipeline(pipe, zoo_name, n=n, seed=shapes.CALIBRATION_SEED, steps=2, guidance=1.0)
            rows.append({"sigma": float(sigma), "mid_t": mid_t, "score": float(r["overall"])})
            logger.info("sCM 2-step, sigma_mid %.4f (t %.3f): calibration score %.3f", sigma, mid_t, r["overall"])
    finally:
        pipe.scheduler = saved
    return max(rows, key=lambda r: r["score"])["mid_t"], rows


def scm_call_kwargs(steps: int = 1, mid_t: float = SCM_MID_T, guidance_scale: float | None = None) -> dict[str, Any]:
    """Pipeline keyword arguments for an sCM student saved by :class:`SCMTrainer` (1 or 2 steps; more
    steps use TrigFlow times ``linspace(pi/2, 0, steps + 1)``); ``guidance_scale`` for w-conditioned ones."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if steps == 2:
        sig = [1.0, float(trigflow_to_flow_time(torch.tensor(mid_t, dtype=torch.float64)))]
    else:
        ts = torch.linspace(math.pi / 2, 0.0, steps + 1, dtype=torch.float64)[:-1]
        sig = [float(v) for v in trigflow_to_flow_time(ts)]
    kw: dict[str, Any] = {"num_inference_steps": int(steps), "guidance_scale": 1.0}
    if steps > 1:
        kw["sigmas"] = sig
    if guidance_scale is not None:
        kw["joint_attention_kwargs"] = {"guidance_scale": float(guidance_scale)}
    return kw


# --------------------------------------------------------------------------------------------------
# LCM
# --------------------------------------------------------------------------------------------------


@dataclass
class LCMConfig(DistillConfig):
    """Latent consistency distillation settings (diffusers' LCM scripts use lr 1e-6, EMA 0.95, huber)."""

    lr: float = 1e-5
    """AdamW lr (full weights 1e-6..1e-5; LoRA 1e-4)."""
    ema_decay: float = 0.95
    """Decay of the EMA *target network* (0: the student itself under no_grad, as LCM-LoRA)."""
    num_ddim_timesteps: int = 50
    """N of the skipping-step DDIM grid (LCMScheduler's original_inference_steps)."""
    w_min: float = 2.0
    """Smallest CFG weight w = g - 1 of the teacher (LCM form)."""
    w_max: float = 8.0
    """Largest w (diffusers' SD scripts: 5..15 at 512 px; the zoo default g = 5 is w = 4)."""
    guidance_embed: bool = True
    """Condition the student on w (time_cond_proj_dim); False folds the sampled w in (LCM-LoRA)."""
    guidance_embed_dim: int = 256
    huber_c: float = 0.001
    """Pseudo-Huber c (0: L2)."""
    timestep_scaling: float = 10.0
    """LCM boundary-condition time scaling (LCMScheduler's timestep_scaling)."""
    sigma_data: float = 0.5
    eval_steps: int = 4
    """Sampling steps of the evaluation / the advertised call (phased: always ``phases``)."""
    eval_guidance: float | None = None
    """g of the evaluation for w-conditioned students (default: zoo default, else 1 + mean w)."""
    init_student: str | None = None
    """A pipeline folder (or its ``unet`` folder) whose UNet starts the student, e.g. a ``distill.guidance``
    student of the same teacher: the student then starts with a trained w input while the targets stay the
    CFG teacher's own ODE (a guidance-distilled *teacher* would make the student learn that student's ODE,
    which on ``shapes-unet`` scores lower at many steps than the CFG teacher's). None: a copy of the teacher."""
    phases: int = 0
    """0: plain LCM (every point maps to t = 0). P > 0: phased consistency (PCM, Wang et al. 2024;
    multistep consistency, Heek et al. 2024): the timesteps split into P phases at grid points, each point
    maps by a DDIM jump to its phase's lower edge, and the student samples in exactly P deterministic DDIM
    steps (saved with a trailing-spacing ``DDIMScheduler``). Each map covers 1/P of the trajectory; use
    P = the step count you want (2-4); num_ddim_timesteps must be a multiple of P."""

    def check(self) -> None:
        super().check()
        if not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 0 <= w_min <= w_max (w = guidance_scale - 1), got {self.w_min}, {self.w_max}")
        if self.num_ddim_timesteps < 2:
            raise ValueError("num_ddim_timesteps must be >= 2")
        if self.phases < 0 or (self.phases and self.num_ddim_timesteps % self.phases):
            raise ValueError(f"phases must be 0 or a divisor of num_ddim_timesteps={self.num_ddim_timesteps}, "
                             f"got {self.phases}")


def _method_error(method: str, fam, reason: str) -> UnsupportedPipelineError:
    return UnsupportedPipelineError(f"{method} cannot distil {fam.describe()}: {reason}")


class LCMTrainer(DistillTrainer):
    """LCM consistency distillation of an epsilon/v UNet teacher (see the module docstring)."""

    method = "lcm"
    cfg: LCMConfig

    def check_family(self) -> None:
        fam = self.family
        if isinstance(fam, FlowFamily):
            raise _method_error("LCM", fam, "it is a flow-matching model (velocity prediction); LCM here needs an "
                                "epsilon or v-prediction UNet. Use sCM: `fastgen train consistency --method scm`")
        if self.teacher_takes_guidance and not self.cfg.guidance_embed:
            raise _method_error("LCM", fam, "its UNet already takes the guidance weight (time_cond_proj_dim, a "
                                "guidance-distilled teacher), so the student keeps that input: drop "
                                "--no-guidance-embed (guidance_embed=False)")
        T = fam.num_train_timesteps
        if T % self.cfg.num_ddim_timesteps:
            raise ValueError(f"num_ddim_timesteps={self.cfg.num_ddim_timesteps} must divide the teacher's "
                             f"num_train_timesteps={T}")

    def build_student(self) -> torch.nn.Module:
        import copy

        m = self.teacher_model
        if self.cfg.init_student:
            return self._load_init_student()
        if self.cfg.guidance_embed and not self.teacher_takes_guidance:  # a GD teacher keeps its own trained w input
            return unet_with_guidance_input(m, self.cfg.guidance_embed_dim)
        return copy.deepcopy(m)

    def _load_init_student(self) -> torch.nn.Module:
        """The UNet of ``cfg.init_student``, checked against the teacher's architecture and the w input."""
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(init_student_folder(self.cfg.init_student, "unet", "UNet"))
        want = self.cfg.guidance_embed_dim if self.cfg.guidance_embed else None
        have = unet.config.time_cond_proj_dim
        if have != want:
            raise ValueError(f"init_student's UNet has time_cond_proj_dim={have}, the student needs {want} "
                             "(guidance_embed/guidance_embed_dim); start from a distill.guidance student of this teacher")
        bad = shape_differences(self.teacher_model, unet, skip_prefix="time_embedding.cond_proj")
        if bad:
            raise ValueError(f"init_student's UNet is not the teacher's architecture (first differences: {bad})")
        return unet.to(self.device, self.teacher_model.dtype)

    def new_layer_prefixes(self) -> tuple[str, ...]:
        if self.teacher_takes_guidance or self.cfg.init_student:
            return ()
        return ("time_embedding.cond_proj",) if self.cfg.guidance_embed else ()

    def teacher_guided(self, x_t, t, cond, uncond, g) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's guided ``(x0, eps)`` at ``(x_t, t)``: CFG ``u + g (c - u)`` from two calls, or one
        call of a guidance-distilled teacher at ``g``."""
        fam: UNetFamily = self.family  # type: ignore[assignment]
        if self.teacher_takes_guidance:
            return fam.x0_eps(fam.predict(self.teacher_model, x_t, t, cond, guidance=g).float(), x_t, t)
        b = x_t.shape[0]
        both = fam.predict(self.teacher_model, torch.cat([x_t, x_t]), torch.cat([t, t]),
                           {kk: torch.cat([uncond[kk], cond[kk]]) for kk in cond}).float()
        x0_u, e_u = fam.x0_eps(both[:b], x_t, t)
        x0_c, e_c = fam.x0_eps(both[b:], x_t, t)
        gv = g.view(-1, 1, 1, 1)
        return x0_u + gv * (x0_c - x0_u), e_u + gv * (e_c - e_u)

    @property
    def eval_g(self) -> float:
        cfg = self.cfg
        if cfg.eval_guidance is not None:
            return float(cfg.eval_guidance)
        if self.zoo_name is not None:
            from fastgen.zoo import DEFAULTS

            return float(DEFAULTS[self.zoo_name]["guidance_scale"])
        return 1.0 + 0.5 * (cfg.w_min + cfg.w_max)

    def student_scheduler(self):
        from diffusers import DDIMScheduler, LCMScheduler

        cfg = {k: v for k, v in dict(self.teacher.scheduler.config).items() if not k.startswith("_")}
        if self.cfg.phases:  # DDIM at the phase edges: trailing spacing visits T-1, T-1-T/P, ... and ends clean
            cfg.update(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, thresholding=False,
                       prediction_type=self.family.prediction_type)
            return DDIMScheduler.from_config(cfg)
        cfg.update(original_inference_steps=self.cfg.num_ddim_timesteps, timestep_scaling=self.cfg.timestep_scaling,
                   prediction_type=self.family.prediction_type)
        return LCMScheduler.from_config(cfg)

    def call_kwargs(self) -> dict[str, Any]:
        return {"num_inference_steps": self.cfg.phases or self.cfg.eval_steps,
                "guidance_scale": self.eval_g if self.cfg.guidance_embed else 1.0}

    def phase_edge(self, t: torch.Tensor) -> torch.Tensor:
        """The lower edge of the phase of integer timesteps ``t`` (-1: the clean end). Edges are the grid
        points ``j T / P - 1`` (the timesteps trailing-spacing DDIM visits with P steps), and a point on an
        edge belongs to the phase below it, as DDIM steps from it to the next edge."""
        span = self.family.num_train_timesteps // self.cfg.phases
        return torch.div(t, span, rounding_mode="floor") * span - 1

    def f(self, model, x, t, cond, g) -> torch.Tensor:
        """The consistency function of ``model`` at integer timesteps ``t``: LCM's ``c_skip x + c_out
        x0_hat``, or (phased) the DDIM jump ``sqrt(ab_e) x0_hat + sqrt(1 - ab_e) eps_hat`` to the phase edge."""
        fam: UNetFamily = self.family  # type: ignore[assignment]
        pred = fam.predict(model, x, t, cond, guidance=g if self.cfg.guidance_embed else None).float()
        x0, eps = fam.x0_eps(pred, x, t)
        sh = (-1, 1, 1, 1)
        if self.cfg.phases:
            ab_e = fam.ab(self.phase_edge(t)).to(x.device).view(sh)
            return ab_e.sqrt() * x0 + (1 - ab_e).sqrt() * eps
        c_skip, c_out = lcm_boundary_scalings(t.cpu(), self.cfg.sigma_data, self.cfg.timestep_scaling)
        return c_skip.to(x.device).view(sh) * x + c_out.to(x.device).view(sh) * x0

    def loss(self, step: int):
        cfg, fam = self.cfg, self.family
        gen = self.generator(step)
        x0, cond, uncond = self.pool.batch(step, cfg.batch, gen)
        b = x0.shape[0]
        k = fam.num_train_timesteps // cfg.num_ddim_timesteps
        n = torch.randint(0, cfg.num_ddim_timesteps, (b,), generator=gen)
        t = ((n + 1) * k - 1).to(self.device)
        s = (t - k).clamp(min=-1 if cfg.phases else 0)  # phased: -1 is the clean end (alpha_bar = 1)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b, generator=gen)
        g = (1.0 + w).to(self.device)
        noise = self.randn(x0.shape, gen)
        sh = (-1, 1, 1, 1)
        ab_t = fam.ab(t).to(self.device).view(sh)
        x_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * noise
        with self.autocast():
            pred = self.f(self.student, x_t, t, cond, g)
        with torch.no_grad(), self.autocast():
            x0_g, e_g = self.teacher_guided(x_t, t, cond, uncond, g)
            ab_s = fam.ab(s).to(self.device).view(sh)
            x_s = ab_s.sqrt() * x0_g + (1 - ab_s).sqrt() * e_g
            target_model = self.ema if self.ema is not None else self.student
            target = self.f(target_model, x_s, s.clamp(min=0), cond, g)  # (s = -1 is replaced just below)
            if cfg.phases:  # a step that lands on its phase edge is its own target (the phase's boundary condition)
                on_edge = (s == self.phase_edge(t)).view(sh)
                target = torch.where(on_edge, x_s, target)
        return pseudo_huber(pred, target, cfg.huber_c), {}


# --------------------------------------------------------------------------------------------------
# sCM
# --------------------------------------------------------------------------------------------------


@dataclass
class SCMConfig(DistillConfig):
    """Continuous-time consistency distillation (sCM) settings for flow-matching teachers."""

    lr: float = 2e-5
    """AdamW lr (SANA-Sprint: 2e-6 with CAME at 1.6B; small models tolerate more)."""
    ema_decay: float = 0.99
    grad_clip: float = 0.1
    """SANA-Sprint clips at 0.1."""
    sigma_data: float = 0.5
    p_mean: float = 0.2
    """tau ~ N(p_mean, p_std^2), t = arctan(e^tau / sigma_data) (SANA-Sprint: 0.2, 1.6)."""
    p_std: float = 1.6
    t_min: float = 1e-3
    """Clamp of t away from 0 and pi/2 (radians)."""
    guidance_scale: float | None = None
    """Teacher CFG g baked into the student (default: a guidance-distilled teacher's
    ``default_guidance_scale``, else the zoo default, else 4.5). Ignored with guidance_embed."""
    guidance_embed: bool = False
    """Student takes g as input (GuidanceSD3Transformer2DModel), g ~ U[g_min, g_max] per sample. A
    guidance-distilled teacher's student always keeps that input (False: trained at the fixed g only)."""
    g_min: float = 3.0
    g_max: float = 6.0
    tangent_warmup: int = 1000
    """Steps over which the second tangent term is ramped in (SANA-Sprint: 4000)."""
    tangent_norm_c: float = 0.1
    """c of the tangent normalisation g / (||g|| + c)."""
    RESUME_FREE: ClassVar[tuple[str, ...]] = DistillConfig.RESUME_FREE + ("mid_t",)  # a sampling setting

    eval_steps: int = 1
    """Sampling steps of the evaluation and advertised call (1 or 2; 2 passes through ``mid_t``)."""
    mid_t: float = SCM_MID_T
    """TrigFlow time (radians) of the 2-step sampler's intermediate point (sCM / SANA-Sprint: 1.3, flow
    sigma 0.78). Later is noisier; :func:`choose_mid_t` picks it on calibration prompts (shapes-mmdit:
    1.496, sigma 0.93, for the plain-sCM stage; the shipped two-phase student's edge is 1.3). Range 1.0-1.5."""

    phased: bool = False
    """Two-phase (multistep) sCM, for 2-step students (Heek et al., "Multistep Consistency Models", arXiv
    2403.06807; phased consistency, Wang et al. 2024): times above ``mid_t`` map along the teacher's ODE to
    ``mid_t`` (the consistency function is the TrigFlow DDIM jump ``cos(t - mid_t) x_t - sin(t - mid_t) sd F``),
    times below it to 0 as in plain sCM. Each map then covers part of the trajectory, and the 2-step call
    (sigmas ``[1, sigma(mid_t)]``, flow-Euler) is exactly the chain of the two maps. ``mid_t`` becomes a
    training setting (fixed on resume; :func:`choose_mid_t` is refused). Needs ``eval_steps=2``."""
    init_student: str | None = None
    """A pipeline folder (or its ``transformer`` folder) whose transformer starts the student, e.g. an sCM
    student of the same teacher to fine-tune with the adversarial term. None: a copy of the teacher."""
    adv_weight: float = 0.0
    """Weight of SANA-Sprint's LADD adversarial term (Sauer et al., "Fast High-Resolution Image Synthesis
    with Latent Adversarial Diffusion Distillation", arXiv 2403.12015) added to the sCM loss. 0 (default): pure
    sCM. SANA-Sprint: 0.5. Costs one more student forward/backward, a frozen-teacher forward/backward and a
    teacher forward per step (about +80% step time). Range 0.1-1. On shapes-mmdit (3.5M parameters) it did
    not raise the 2-step score and at 0.5 lowered it after 750 steps (README)."""
    adv_lr: float = 1e-3
    """AdamW lr of the discriminator heads (their own optimiser, beta1 = 0; hinge loss). At 1e-4 the heads
    of the 6-block shapes-mmdit did not separate teacher from student samples within 200 steps. Range
    1e-4-2e-3."""
    adv_t_min: float = 1.3
    """The generator term's inputs are the student's one-step outputs from x_t at TrigFlow t ~ U[adv_t_min,
    pi/2] (pure noise at pi/2): the regime of 1-2-step sampling, where the output is a generation rather
    than a denoised training sample. Range 1.0-1.5 (sCM's 2-step intermediate t is 1.3)."""
    adv_blocks: tuple[int, ...] = ()
    """Teacher transformer blocks whose image-token features feed one discriminator head each (negative
    counts from the end). Empty (default): up to three evenly spaced blocks ending at the last (6 blocks:
    1, 3, 5)."""
    adv_logit_mean: float = 0.0
    """The re-noising level of the discriminator's inputs: flow sigma = sigmoid(N(adv_logit_mean, 1)) (SD3's
    logit-normal). Higher judges coarser structure; range -1..1."""

    def check(self) -> None:
        super().check()
        if self.adv_weight < 0 or self.adv_lr <= 0:
            raise ValueError(f"need adv_weight >= 0 and adv_lr > 0, got {self.adv_weight}, {self.adv_lr}")
        if self.phased and self.eval_steps != 2:
            raise ValueError("phased sCM trains a 2-step student (its phase edge is mid_t): set eval_steps=2")
        if not 0.0 <= self.adv_t_min <= math.pi / 2:
            raise ValueError(f"adv_t_min is a TrigFlow time in [0, pi/2] radians, got {self.adv_t_min}")
        if not 0.0 < self.mid_t < math.pi / 2:
            raise ValueError(f"mid_t is a TrigFlow time in (0, pi/2) radians, got {self.mid_t}")
        if self.sigma_data <= 0 or self.p_std <= 0:
            raise ValueError("sigma_data and p_std must be > 0")
        if not 0 < self.t_min < 0.5:
            raise ValueError("t_min must be in (0, 0.5) radians")
        if self.guidance_embed and not 1.0 <= self.g_min <= self.g_max:
            raise ValueError(f"need 1 <= g_min <= g_max, got {self.g_min}, {self.g_max}")


class SCMTrainer(DistillTrainer):
    """sCM of a flow-matching SD3 teacher through the TrigFlow conversion (see the module docstring)."""

    method = "scm"
    cfg: SCMConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.disc: torch.nn.ModuleDict | None = None
        self.d_opt: torch.optim.Optimizer | None = None
        self._adv_batch: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.adv_blocks: tuple[int, ...] = ()
        if cfg.adv_weight > 0:
            n = len(self.teacher_model.transformer_blocks)
            bad = [i for i in cfg.adv_blocks if not -n <= int(i) < n]
            if bad:
                raise ValueError(f"adv_blocks {bad} out of range: the teacher has {n} transformer blocks "
                                 f"(0-{n - 1}, or -{n}..-1 from the end)")
            picked = [int(i) % n for i in cfg.adv_blocks] or [n - 1 - k * max(1, n // 3) for k in range(min(3, n))]
            self.adv_blocks = tuple(sorted(set(picked)))
            dim = int(self.teacher_model.config.num_attention_heads * self.teacher_model.config.attention_head_dim)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 1)
                self.disc = torch.nn.ModuleDict({str(i): DiscriminatorHead(dim) for i in self.adv_blocks})
            self.disc.to(self.device)
            # GAN-style momentum (beta1 = 0): the target moves with the student
            self.d_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.adv_lr, betas=(0.0, 0.99), weight_decay=0.0)

    def check_family(self) -> None:
        fam = self.family
        if not isinstance(fam, FlowFamily):
            raise _method_error("sCM", fam, f"it is a {fam.prediction_type}-prediction diffusion UNet, not a "
                                "flow-matching model; sCM's training-free TrigFlow conversion needs a rectified-flow "
                                "teacher. Use LCM: `fastgen train consistency --method lcm`")

    @property
    def student_takes_g(self) -> bool:
        return self.cfg.guidance_embed or self.teacher_takes_guidance

    @property
    def teacher_g(self) -> float:
        if self.cfg.guidance_scale is not None:
            return float(self.cfg.guidance_scale)
        if self.teacher_takes_guidance:
            return float(self.teacher_model.default_guidance_scale)
        if self.zoo_name is not None:
            from fastgen.zoo import DEFAULTS

            return float(DEFAULTS[self.zoo_name]["guidance_scale"])
        return 4.5

    def build_student(self) -> torch.nn.Module:
        if self.cfg.init_student:
            return self._load_init_student(self._fresh_student())
        return self._fresh_student()

    def _fresh_student(self) -> torch.nn.Module:
        import copy

        if self.teacher_takes_guidance:  # keeps the teacher's trained guidance input; its default g is the one baked in
            student = copy.deepcopy(self.teacher_model)
            student.register_to_config(default_guidance_scale=self.teacher_g)
            student.default_guidance_scale = self.teacher_g
            return student
        if self.cfg.guidance_embed:
            return sd3_with_guidance_input(self.teacher_model, default_guidance_scale=self.teacher_g)
        return copy.deepcopy(self.teacher_model)

    def _load_init_student(self, fresh: torch.nn.Module) -> torch.nn.Module:
        """The transformer of ``cfg.init_student``, checked against ``fresh`` (the student this run would
        otherwise start from: same class and architecture)."""
        from diffusers import SD3Transformer2DModel

        folder = init_student_folder(self.cfg.init_student, "transformer", "transformer")
        guided = isinstance(fresh, GuidanceSD3Transformer2DModel)
        saved_cls = json.loads((folder / "config.json").read_text()).get("_class_name")
        if saved_cls != type(fresh).__name__:
            raise ValueError(f"init_student's transformer is a {saved_cls}, this run's student is a "
                             f"{type(fresh).__name__} (same architecture needed); start from an sCM student of this "
                             "teacher with the same guidance_embed setting")
        model = (GuidanceSD3Transformer2DModel if guided else SD3Transformer2DModel).from_pretrained(folder)
        bad = shape_differences(fresh, model)
        if bad:
            raise ValueError(f"init_student's transformer is not this run's student architecture "
                             f"({type(fresh).__name__}; first differences: {bad}); start from an sCM student of "
                             "this teacher with the same guidance_embed setting")
        if guided:
            model.register_to_config(default_guidance_scale=fresh.default_guidance_scale)
            model.default_guidance_scale = fresh.default_guidance_scale
        return model.to(self.device, self.teacher_model.dtype)

    def build_aux(self) -> dict[str, torch.nn.Module]:
        return {"logvar": LogVarHead()}

    # ---- LADD (adversarial term) ---------------------------------------------------------------------

    def disc_features(self, x0: torch.Tensor, s: torch.Tensor, eps: torch.Tensor, cond, g) -> list[torch.Tensor]:
        """The frozen teacher's image tokens after each of ``adv_blocks`` for clean latents ``x0`` re-noised
        to flow sigma ``s`` with ``eps`` (differentiable in ``x0``)."""
        fam: FlowFamily = self.family  # type: ignore[assignment]
        sh = (-1,) + (1,) * (x0.ndim - 1)
        x_s = (1 - s.view(sh)) * x0 + s.view(sh) * eps
        feats: dict[int, torch.Tensor] = {}
        blocks = self.teacher_model.transformer_blocks
        hooks = [blocks[i].register_forward_hook(lambda m, a, out, i=i: feats.__setitem__(i, out[1]))
                 for i in self.adv_blocks]
        try:
            with self.autocast():
                fam.predict(self.teacher_model, x_s, s, cond, guidance=g if self.teacher_takes_guidance else None)
        finally:
            for h in hooks:
                h.remove()
        return [feats[i] for i in self.adv_blocks]

    def adversarial_g_loss(self, x0_hat, x0_real, cond, g, gen: torch.Generator) -> torch.Tensor:
        """LADD generator term ``-mean D(fake)`` over the heads; stores the detached fake and the real
        features for the discriminator's hinge step in :meth:`train_step`."""
        b = x0_hat.shape[0]
        s = torch.sigmoid(self.cfg.adv_logit_mean + torch.randn(b, generator=gen)).to(self.device)
        eps = self.randn(x0_hat.shape, gen)
        fake = self.disc_features(x0_hat, s, eps, cond, g)
        with torch.no_grad():
            real = self.disc_features(x0_real, s, eps, cond, g)
        self._adv_batch = ([f.detach() for f in fake], real)
        return -torch.stack([self.disc[str(i)](f).mean() for i, f in zip(self.adv_blocks, fake)]).mean()

    def train_step(self) -> float:
        value = super().train_step()
        if self.disc is not None:
            fake, real = self._adv_batch
            self._adv_batch = None
            heads = [self.disc[str(i)] for i in self.adv_blocks]
            d_loss = torch.stack([torch.relu(1 - h(r)).mean() + torch.relu(1 + h(f)).mean()
                                  for h, f, r in zip(heads, fake, real)]).mean()
            self.d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.d_opt.step()
            self.history[-1]["d_loss"] = float(d_loss.detach())
        return value

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"phase_t": float(self.cfg.mid_t)} if self.cfg.phased else {}
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), d_opt=self.d_opt.state_dict())
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.cfg.phased and state.get("phase_t") != float(self.cfg.mid_t):
            raise ValueError(f"cannot resume: the checkpoint's phase edge mid_t is {state.get('phase_t')}, this run's "
                             f"is {self.cfg.mid_t} (a phased student's mid_t is a training setting)")
        if self.disc is not None:
            if "disc" not in state:
                raise ValueError("cannot resume: the checkpoint has no discriminator (it was made with adv_weight 0)")
            self.disc.load_state_dict(state["disc"])
            self.d_opt.load_state_dict(state["d_opt"])

    def new_layer_prefixes(self) -> tuple[str, ...]:
        if self.cfg.init_student:
            return ()
        return ("guidance_proj",) if self.cfg.guidance_embed and not self.teacher_takes_guidance else ()

    def student_scheduler(self):
        return scm_scheduler(int(self.teacher.scheduler.config.get("num_train_timesteps", 1000)))

    def call_kwargs(self) -> dict[str, Any]:
        return scm_call_kwargs(self.cfg.eval_steps, self.cfg.mid_t,
                               guidance_scale=self.teacher_g if self.student_takes_g else None)

    def eval_settings(self) -> tuple[int, float]:
        return int(self.cfg.eval_steps), 1.0

    def prepare_eval_pipeline(self, pipe) -> None:
        if self.student_takes_g:
            pipe.transformer.default_guidance_scale = self.teacher_g
        if self.cfg.eval_steps == 2:  # evaluate_pipeline passes no sigmas: a scheduler whose 2-step grid is [1, s_mid]
            pipe.scheduler = scm_scheduler(pipe.scheduler.config.num_train_timesteps, self.cfg.mid_t)

    def trig_F(self, model, x_unit: torch.Tensor, t: torch.Tensor, cond, g: torch.Tensor | None) -> torch.Tensor:
        """TrigFlow output of a flow ``model`` (student or, with CFG, teacher) at ``(x_t / sd, t)``."""
        fam: FlowFamily = self.family  # type: ignore[assignment]
        return flow_to_trigflow(lambda xs, s: fam.predict(model, xs, s, cond, guidance=g), x_unit, t)

    def loss(self, step: int):
        cfg, fam = self.cfg, self.family
        sd = cfg.sigma_data
        gen = self.generator(step)
        x0, cond, uncond = self.pool.batch(step, cfg.batch, gen)
        b = x0.shape[0]
        tau = cfg.p_mean + cfg.p_std * torch.randn(b, generator=gen)
        t = torch.atan(torch.exp(tau) / sd).clamp(cfg.t_min, math.pi / 2 - cfg.t_min).to(self.device)
        edge = torch.zeros_like(t)  # each point's phase edge: 0 (plain sCM), or mid_t for points above it
        if cfg.phased:  # (a point within t_min above the edge moves just above it)
            edge = torch.where(t > cfg.mid_t, torch.full_like(t, cfg.mid_t), edge)
            t = torch.maximum(t, edge + cfg.t_min)
        if cfg.guidance_embed:
            g = (cfg.g_min + (cfg.g_max - cfg.g_min) * torch.rand(b, generator=gen)).to(self.device)
        else:
            g = torch.full((b,), self.teacher_g, device=self.device)
        z = sd * self.randn(x0.shape, gen)
        sh = (-1, 1, 1, 1)
        cos, sin = torch.cos(t).view(sh), torch.sin(t).view(sh)
        x_t = cos * (sd * x0) + sin * z
        g_student = g if self.student_takes_g else None
        with torch.no_grad(), self.autocast():
            if self.teacher_takes_guidance:
                v_fn = lambda xs, s: fam.predict(self.teacher_model, xs, s, cond, guidance=g).float()  # noqa: E731
            else:
                v_fn = lambda xs, s: fam.cfg_predict(self.teacher_model, xs, s, cond, uncond, g).float()  # noqa: E731
            dxdt = sd * flow_to_trigflow(v_fn, x_t / sd, t)
            F_minus, grad = scm_tangent(lambda xu, tt: self.trig_F(self.student, xu, tt, cond, g_student).float(),
                                        x_t, t, edge, dxdt, sd, r=min(1.0, step / max(1, cfg.tangent_warmup)))
            norm = grad.flatten(1).norm(dim=1).view(sh)
            grad = grad / (norm + cfg.tangent_norm_c)
        with self.autocast():
            F_theta = self.trig_F(self.student, x_t / sd, t, cond, g_student).float()
        logvar = self.aux["logvar"](t)
        weight = 1.0 / (sd * torch.tan((t - edge).clamp(min=cfg.t_min)))  # (t >= t_min already when edge = 0)
        per = ((F_theta - F_minus - grad) ** 2).flatten(1).mean(1)
        loss = (weight * torch.exp(-logvar) * per + logvar).mean()
        logs = {"mse": float(per.detach().mean())}
        if cfg.adv_weight > 0:  # (its draws come after the sCM ones: adv_weight 0 runs are unchanged)
            t_adv = (cfg.adv_t_min + (math.pi / 2 - cfg.adv_t_min) * torch.rand(b, generator=gen)).to(self.device)
            x_adv = torch.cos(t_adv).view(sh) * (sd * x0) + torch.sin(t_adv).view(sh) * z
            with self.autocast():
                F_adv = self.trig_F(self.student, x_adv / sd, t_adv, cond, g_student).float()
            x0_hat = trigflow_consistency(x_adv, t_adv, F_adv, sd) / sd
            g_adv = self.adversarial_g_loss(x0_hat, x0, cond, g, gen)
            loss = loss + cfg.adv_weight * g_adv
            logs["g_adv"] = float(g_adv.detach())
        return loss, logs


# --------------------------------------------------------------------------------------------------
# API and CLI
# --------------------------------------------------------------------------------------------------

_METHODS = {"lcm": (LCMConfig, LCMTrainer), "scm": (SCMConfig, SCMTrainer)}


def distill_consistency(teacher_pipe, method: str, cfg: DistillConfig | None = None,
                        out: str | os.PathLike = "runs/consistency", *, zoo_name: str | None = None,
                        prompts: list[str] | None = None, resume: bool = False, eval_fn=None,
                        choose_mid_t_prompts: int = 0):
    """Consistency distillation (``method`` ``"lcm"`` or ``"scm"``) of ``teacher_pipe`` into ``out``
    (Python API of ``fastgen train consistency``).

    ``choose_mid_t_prompts`` (sCM, zoo teachers, 2-step students): after training, pick the intermediate
    time with :func:`choose_mid_t` on that many calibration prompts, then evaluate and save with it.

    Returns:
        ``(student_pipe, call_kwargs)``; the student is also saved to ``out/pipeline``.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown consistency method {method!r}; choose 'lcm' (epsilon/v UNets) or 'scm' (flow models)")
    cfg_cls, tr_cls = _METHODS[method]
    cfg = cfg if cfg is not None else cfg_cls()
    if not isinstance(cfg, cfg_cls):
        raise TypeError(f"method {method!r} takes a {cfg_cls.__name__}, got {type(cfg).__name__}")
    if choose_mid_t_prompts and (method != "scm" or zoo_name is None or cfg.eval_steps != 2):
        raise ValueError("choosing the intermediate time needs method 'scm', a zoo teacher and eval_steps=2")
    if choose_mid_t_prompts and cfg.phased:
        raise ValueError("a phased sCM student's intermediate time is its training phase edge (mid_t); "
                         "drop choose_mid_t / --choose-mid-t")
    tr = tr_cls(teacher_pipe, cfg, out, zoo_name=zoo_name, prompts=prompts, eval_fn=eval_fn)
    if resume:
        tr.resume()
    tr.run()
    if choose_mid_t_prompts:
        import dataclasses

        mid_t, rows = choose_mid_t(tr.export_pipeline(), zoo_name, n=choose_mid_t_prompts)
        tr._log_row({"choose_mid_t": rows, "mid_t": mid_t})
        tr.cfg = dataclasses.replace(tr.cfg, mid_t=mid_t)
        pipe = tr.export_pipeline()
        tr.evaluate(pipe)
        tr.save(pipe=pipe)
    return tr.export_pipeline(), tr.call_kwargs()


def main(argv: list[str] | None = None) -> int:
    """``fastgen train consistency --method lcm|scm --teacher T --output DIR [...]`` (see ``--help``; also
    ``accelerate launch -m fastgen.distill.consistency``)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", choices=sorted(_METHODS), default=None)
    known, _ = pre.parse_known_args(argv)
    method = known.method or "lcm"
    cfg_cls = _METHODS[method][0]
    ap = CommandParser(prog="fastgen train consistency", description=__doc__.split("\n\n")[0],
                       example="fastgen train consistency --method lcm --teacher shapes-unet --output runs/lcm "
                               "--steps 2000\n"
                               "fastgen train consistency --method scm --teacher shapes-mmdit --output runs/scm "
                               "--steps 2000\n"
                               "accelerate launch -m fastgen.distill.consistency --method scm --teacher path/to/sd3 "
                               "--output runs/scm-sd3")
    ap.add_argument("--method", choices=sorted(_METHODS), required=True,
                    help="lcm: epsilon/v UNets (SD, SDXL); scm: flow-matching MMDiTs (SD3)")
    add_common_args(ap, cfg_cls())
    ap.add_argument("--choose-mid-t", type=int, default=0, metavar="N",
                    help="scm with --eval-steps 2 on a zoo teacher: after training, pick the 2-step intermediate time "
                         "on N calibration prompts and save the student with it")
    args = ap.parse_args(argv)
    setup_cli_logging(args.threads)
    check_fresh_or_resume(args.output, args.resume)
    cfg = config_from_args(cfg_cls, args)
    pipe, name = load_teacher(args.teacher)
    family_for(pipe)  # unsupported classes fail before anything is built
    _, kw = distill_consistency(pipe, method, cfg, args.output, zoo_name=name, resume=args.resume,
                                choose_mid_t_prompts=args.choose_mid_t)
    logger.info("student saved to %s; call it with %s", Path(args.output) / "pipeline", kw)
    return 0


if __name__ == "__main__":
    from .cli import run_cli

    raise SystemExit(run_cli(main))
