"""Guidance distillation (Meng, Rombach, Gao, Kingma, Ermon, Ho, Salimans, "On Distillation of Guided
Diffusion Models", CVPR 2023, arXiv 2210.03142): a student that takes the guidance weight as input and
needs **one** denoiser forward per step instead of CFG's two, then (optionally) progressive distillation
(Salimans & Ho, ICLR 2022) that halves its sampling steps round by round.

Convention: diffusers' ``guidance_scale`` ``g`` (``uncond + g (cond - uncond)``); the paper's ``w = g - 1``
(``(1 + w) cond - w uncond``). ``w_min``/``w_max`` below are in the paper's ``w``.

**Stage 1** (:class:`GuidanceTrainer`). Student = the teacher's denoiser plus a zero-initialised guidance
input (:mod:`distill.models`), so at step 0 it equals the conditional teacher for every ``w``. Per sample
``w ~ U[w_min, w_max]``, a time (UNet: integer ``t ~ U{0..T-1}``; flow: ``s`` logit-normal or uniform),
clean latents ``x_0`` from the teacher's own samples (:class:`~distill.trainer.TeacherPool`, data-free),
``x_t`` = the forward process; loss = MSE between the student's output at ``(x_t, t, c, w)`` and the
teacher's CFG output ``u + (1 + w)(c - u)``, in the model's output space (epsilon / v / flow velocity;
for these parametrisations CFG is linear, so this is the paper's x-space target with an SNR weighting).

**Stage 2** (:class:`ProgressiveTrainer`, ``progressive_rounds > 0``). Round ``r`` distils the previous
student sampled with ``2N`` steps into one sampled with ``N`` (same ``w`` given to both): from
``z_t`` the teacher takes two deterministic steps ``t -> t' -> t''`` (DDIM for UNets, Euler for flow
models), the target ``x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)``
is the clean image that makes one student step from ``t`` land on ``z_t''``, converted to the student's
output space (MSE there). ``t`` runs over the student's inference grid (``DDIMScheduler`` /
``FlowMatchEulerDiscreteScheduler`` at ``N`` steps), so the saved student matches the saved scheduler.

**What the user calls** (the saved folder loads with ``DiffusionPipeline.from_pretrained``):

* UNet students (SD/SDXL): ``pipe(prompt, num_inference_steps=N, guidance_scale=g)``. diffusers feeds
  ``time_cond_proj_dim`` models ``timestep_cond = emb(g - 1)`` and switches CFG off by itself
  (``do_classifier_free_guidance`` is ``g > 1 and time_cond_proj_dim is None``): one UNet call per step.
* SD3 students: ``import distill`` first (the folder names the class ``distill.models.
  GuidanceSD3Transformer2DModel``), then ``pipe(prompt, num_inference_steps=N, guidance_scale=1.0,
  joint_attention_kwargs={"guidance_scale": g})``. ``guidance_scale=1`` is required: the SD3 pipeline
  batches CFG whenever ``guidance_scale > 1`` and cannot pass ``g`` to the transformer; without the
  ``joint_attention_kwargs`` entry the student uses its saved ``default_guidance_scale``.
  :func:`call_kwargs_for` returns the right dict for either.

CLI (also ``accelerate launch -m fastgen.distill.guidance ...``)::

    fastgen train guidance --teacher shapes-unet --output runs/gd-unet --steps 2000 [--progressive-rounds 3]
    fastgen train guidance --teacher path/to/sd3 --prompts prompts.txt --output runs/gd-sd3 --resume
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fastgen.utils.commands import CommandParser
from fastgen.utils.logging import get_logger

from .cli import add_common_args, check_fresh_or_resume, config_from_args, setup_cli_logging
from .models import GuidanceSD3Transformer2DModel, sd3_with_guidance_input, unet_with_guidance_input
from .schedule import FlowFamily, UNetFamily
from .trainer import DistillConfig, DistillTrainer, load_teacher

__all__ = ["GuidanceConfig", "GuidanceTrainer", "ProgressiveTrainer", "distill_guidance", "call_kwargs_for",
           "sample_flow_sigmas", "main"]

logger = get_logger(__name__)


@dataclass
class GuidanceConfig(DistillConfig):
    """Guidance distillation settings (stage 1, and stage 2 when ``progressive_rounds > 0``)."""

    lr: float = 5e-5
    """Full-weight AdamW lr (the student starts at the teacher; 1e-5..1e-4)."""
    w_min: float = 0.0
    """Smallest guidance weight w = g - 1 trained on (paper convention)."""
    w_max: float = 8.0
    """Largest w. The zoo default g = 5 is w = 4; SD-style models use g 3..13."""
    guidance_embed_dim: int = 256
    """Width of the sinusoidal w embedding (UNet ``time_cond_proj_dim``)."""
    t_sampling: str = "uniform"
    """Flow models: "uniform" or "logit-normal" sigma; UNets always sample t uniformly."""
    default_guidance_scale: float | None = None
    """g the saved SD3 student uses when a call gives none, and the evaluation's g (default: the zoo
    default g, else 1 + (w_min + w_max) / 2)."""
    eval_steps: int | None = None
    """Sampling steps of the stage-1 evaluation (default: the zoo default, else 25)."""
    progressive_rounds: int = 0
    """Stage 2: number of step halvings after stage 1 (0: stage 1 only). 3 rounds from 16 -> 2 steps."""
    progressive_start_steps: int = 16
    """Teacher steps of the first halving round (student: half of it). A power of two is cleanest."""
    progressive_steps_per_round: int = 500
    """Optimisation steps per halving round."""

    # stage-2 settings may change on resume (a finished stage 1 can get more rounds); each round's
    # checkpoint records its own step count, which ProgressiveTrainer checks
    RESUME_FREE = DistillConfig.RESUME_FREE + ("progressive_rounds", "progressive_start_steps",
                                               "progressive_steps_per_round")

    def check(self) -> None:
        super().check()
        if not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 0 <= w_min <= w_max (w = guidance_scale - 1), got {self.w_min}, {self.w_max}")
        if self.t_sampling not in ("uniform", "logit-normal"):
            raise ValueError(f"t_sampling must be 'uniform' or 'logit-normal', got {self.t_sampling!r}")
        if self.progressive_rounds < 0:
            raise ValueError("progressive_rounds must be >= 0")
        if self.progressive_rounds and self.progressive_start_steps >> self.progressive_rounds < 1:
            raise ValueError(f"progressive_start_steps={self.progressive_start_steps} cannot be halved "
                             f"{self.progressive_rounds} times")


def sample_flow_sigmas(n: int, g: torch.Generator, mode: str = "uniform") -> torch.Tensor:
    """``n`` flow times in (0, 1): uniform or logit-normal (SD3's training density)."""
    if mode == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=g)).clamp(1e-4, 1 - 1e-4)
    return torch.rand(n, generator=g).clamp(1e-4, 1.0)


def _eval_guidance(cfg: GuidanceConfig, zoo_name: str | None) -> float:
    if cfg.default_guidance_scale is not None:
        return float(cfg.default_guidance_scale)
    if zoo_name is not None:
        from fastgen.zoo import DEFAULTS

        return float(DEFAULTS[zoo_name]["guidance_scale"])
    return 1.0 + 0.5 * (cfg.w_min + cfg.w_max)


def call_kwargs_for(pipe, guidance_scale: float, num_inference_steps: int) -> dict[str, Any]:
    """Keyword arguments that run a guidance student ``pipe`` at CFG scale ``guidance_scale`` with one
    denoiser call per step (see the module docstring)."""
    model = getattr(pipe, "transformer", None)
    if isinstance(model, GuidanceSD3Transformer2DModel):
        return {"num_inference_steps": int(num_inference_steps), "guidance_scale": 1.0,
                "joint_attention_kwargs": {"guidance_scale": float(guidance_scale)}}
    unet = getattr(pipe, "unet", None)
    if unet is not None and unet.config.time_cond_proj_dim is not None:
        return {"num_inference_steps": int(num_inference_steps), "guidance_scale": float(guidance_scale)}
    raise ValueError(f"{type(pipe).__name__} has no guidance-conditioned denoiser (a UNet with time_cond_proj_dim "
                     "or a GuidanceSD3Transformer2DModel)")


class _GuidanceBase(DistillTrainer):
    """Shared by both stages: w sampling, the guidance student, how to call it."""

    cfg: GuidanceConfig

    def check_family(self) -> None:
        model = self.family.model
        if self.teacher_takes_guidance and not isinstance(self, ProgressiveTrainer):
            what = "a GuidanceSD3Transformer2DModel" if isinstance(model, GuidanceSD3Transformer2DModel) else \
                f"a {type(model).__name__} with time_cond_proj_dim={model.config.time_cond_proj_dim}"
            raise ValueError(f"the teacher is {what}: it already has a guidance input (guidance-distilled already); "
                             "guidance distillation needs a CFG teacher")

    @property
    def eval_g(self) -> float:
        return _eval_guidance(self.cfg, self.zoo_name)

    def sample_g(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Per-sample diffusers scales g = 1 + w, w ~ U[w_min, w_max]."""
        w = self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * torch.rand(n, generator=gen)
        return (1.0 + w).to(self.device)

    def new_layer_prefixes(self) -> tuple[str, ...]:
        return ("time_embedding.cond_proj",) if isinstance(self.family, UNetFamily) else ("guidance_proj",)

    def _eval_steps(self) -> int:
        if self.cfg.eval_steps is not None:
            return int(self.cfg.eval_steps)
        if self.zoo_name is not None:
            from fastgen.zoo import DEFAULTS

            return int(DEFAULTS[self.zoo_name]["num_inference_steps"])
        return 25

    def call_kwargs(self) -> dict[str, Any]:
        if isinstance(self.family, FlowFamily):
            return {"num_inference_steps": self._eval_steps(), "guidance_scale": 1.0,
                    "joint_attention_kwargs": {"guidance_scale": self.eval_g}}
        return {"num_inference_steps": self._eval_steps(), "guidance_scale": self.eval_g}

    def prepare_eval_pipeline(self, pipe) -> None:
        if isinstance(self.family, FlowFamily):
            pipe.transformer.default_guidance_scale = self.eval_g  # evaluate_pipeline cannot pass kwargs


class GuidanceTrainer(_GuidanceBase):
    """Stage 1: a w-conditioned student matching the CFG teacher (see the module docstring)."""

    method = "guidance"

    def build_student(self) -> torch.nn.Module:
        m = self.teacher_model
        if isinstance(self.family, UNetFamily):
            return unet_with_guidance_input(m, self.cfg.guidance_embed_dim)
        return sd3_with_guidance_input(m, self.cfg.guidance_embed_dim, default_guidance_scale=self.eval_g)

    def loss(self, step: int):
        cfg, fam = self.cfg, self.family
        gen = self.generator(step)
        x0, cond, uncond = self.pool.batch(step, cfg.batch, gen)
        b = x0.shape[0]
        g = self.sample_g(b, gen)
        noise = self.randn(x0.shape, gen)
        if isinstance(fam, FlowFamily):
            t = sample_flow_sigmas(b, gen, cfg.t_sampling).to(self.device)
            tt = t.view(-1, 1, 1, 1)
            xt = (1 - tt) * x0 + tt * noise
        else:
            t = torch.randint(0, fam.num_train_timesteps, (b,), generator=gen).to(self.device)
            ab = fam.ab(t).to(self.device).view(-1, 1, 1, 1)
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        with torch.no_grad(), self.autocast():
            target = fam.cfg_predict(self.teacher_model, xt, t, cond, uncond, g).float()
        with self.autocast():
            pred = fam.predict(self.student, xt, t, cond, guidance=g)
        loss = F.mse_loss(pred.float(), target)
        return loss, {}


class ProgressiveTrainer(_GuidanceBase):
    """Stage 2, one round: distil ``round_teacher`` (a w-conditioned student) sampled with
    ``2 * student_steps`` deterministic steps into a student sampled with ``student_steps``.

    Args:
        teacher: the original pipeline (text encoders, VAE, pool).
        round_teacher: the previous round's (or stage 1's) student module, frozen.
        student_steps: the new student's sampling steps ``N`` (the round teacher uses ``2N``).
    """

    method = "progressive"

    def __init__(self, teacher, cfg: GuidanceConfig, out, round_teacher: torch.nn.Module, student_steps: int,
                 **kw: Any):
        self.round_teacher = round_teacher.requires_grad_(False).eval()
        self.student_steps = int(student_steps)
        if self.student_steps < 1:
            raise ValueError("student_steps must be >= 1")
        super().__init__(teacher, cfg, out, **kw)
        self.round_teacher.to(self.device)
        self._grid = self._build_grid()

    def extra_state(self) -> dict[str, Any]:
        return {"student_steps": self.student_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if int(state.get("student_steps", -1)) != self.student_steps:
            raise ValueError(f"cannot resume: this round's checkpoint trains a {state.get('student_steps')}-step "
                             f"student, not {self.student_steps} steps (progressive settings changed?)")

    def check_family(self) -> None:
        sched = self.teacher.scheduler
        if isinstance(self.family, FlowFamily) and sched.config.get("use_dynamic_shifting", False):
            raise NotImplementedError(f"progressive distillation of {self.family.describe()} needs a static flow "
                                      "shift (use_dynamic_shifting=False in the scheduler)")

    def build_student(self) -> torch.nn.Module:
        return copy.deepcopy(self.round_teacher)

    def student_scheduler(self):
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        cfg = dict(self.teacher.scheduler.config)
        if isinstance(self.family, FlowFamily):
            return FlowMatchEulerDiscreteScheduler.from_config(cfg)
        # the targets assume the plain DDIM update: no x0 clipping / dynamic thresholding
        return DDIMScheduler.from_config(cfg, clip_sample=False, thresholding=False)

    def _eval_steps(self) -> int:
        return self.student_steps

    def _build_grid(self) -> dict[str, torch.Tensor]:
        """Student steps (from, to) and the teacher's midpoints on the student scheduler's ``N``-step grid."""
        n = self.student_steps
        sched = self.student_scheduler()
        if isinstance(self.family, FlowFamily):
            sched.set_timesteps(n)
            s_n = sched.sigmas.double()
            sched2 = self.student_scheduler()
            sched2.set_timesteps(2 * n)
            s_2n = sched2.sigmas.double()
            nested = torch.allclose(s_2n[::2], s_n, atol=1e-6)
            mid = s_2n[1::2] if nested else 0.5 * (s_n[:-1] + s_n[1:])
            return {"from": s_n[:-1].float(), "mid": mid.float(), "to": s_n[1:].float()}
        sched.set_timesteps(n)
        ts = sched.timesteps.long()
        step = sched.config.num_train_timesteps // n
        prev = ts - step
        mid = ts - max(1, step // 2)
        self._final_ab = float(sched.final_alpha_cumprod)
        return {"from": ts, "mid": mid, "to": prev}

    def _ab(self, t: torch.Tensor) -> torch.Tensor:
        fam = self.family
        t = t.long()
        ab = fam.ab(t.clamp(min=0))
        return torch.where(t.cpu() >= 0, ab, torch.full_like(ab, self._final_ab))

    def targets(self, step: int) -> dict[str, Any]:
        """The round's training example of ``step``: ``z_t`` on the student grid, the round teacher's
        two-step result ``z_p``, and the student-output ``target`` whose one step from ``z_t`` lands on
        ``z_p`` (keys ``z_t, t, p, cond, g, z_p, target``)."""
        cfg, fam = self.cfg, self.family
        gen = self.generator(step)
        x0, cond, uncond = self.pool.batch(step, cfg.batch, gen)
        b = x0.shape[0]
        g = self.sample_g(b, gen)
        noise = self.randn(x0.shape, gen)
        i = torch.randint(0, self.student_steps, (b,), generator=gen)
        t, m, p = (self._grid[k][i] for k in ("from", "mid", "to"))
        sh = (-1, 1, 1, 1)
        if isinstance(fam, FlowFamily):
            t, m, p = (v.to(self.device) for v in (t, m, p))
            z_t = (1 - t.view(sh)) * x0 + t.view(sh) * noise
            with torch.no_grad(), self.autocast():
                v1 = fam.predict(self.round_teacher, z_t, t, cond, guidance=g).float()
                z_m = z_t + (m - t).view(sh) * v1
                v2 = fam.predict(self.round_teacher, z_m, m, cond, guidance=g).float()
                z_p = z_m + (p - m).view(sh) * v2
            r = (p / t).view(sh)
            x_tilde = (z_p - r * z_t) / ((1 - p).view(sh) - r * (1 - t).view(sh))
            target = (z_t - x_tilde) / t.view(sh)
        else:
            ab_t, ab_m, ab_p = (self._ab(v).to(self.device).view(sh) for v in (t, m, p))
            t, m = t.to(self.device), m.to(self.device)
            z_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * noise
            with torch.no_grad(), self.autocast():
                x0_1, e1 = fam.x0_eps(fam.predict(self.round_teacher, z_t, t, cond, guidance=g).float(), z_t, t)
                z_m = ab_m.sqrt() * x0_1 + (1 - ab_m).sqrt() * e1
                x0_2, e2 = fam.x0_eps(fam.predict(self.round_teacher, z_m, m, cond, guidance=g).float(), z_m, m)
                z_p = ab_p.sqrt() * x0_2 + (1 - ab_p).sqrt() * e2
            r = ((1 - ab_p) / (1 - ab_t)).sqrt()
            x_tilde = (z_p - r * z_t) / (ab_p.sqrt() - r * ab_t.sqrt())
            eps_tilde = (z_t - ab_t.sqrt() * x_tilde) / (1 - ab_t).sqrt()
            target = fam.pred_from_x0_eps(x_tilde, eps_tilde, t)
        return {"z_t": z_t, "t": t, "p": p, "cond": cond, "g": g, "z_p": z_p, "target": target}

    def loss(self, step: int):
        ex = self.targets(step)
        with self.autocast():
            pred = self.family.predict(self.student, ex["z_t"], ex["t"], ex["cond"], guidance=ex["g"])
        return F.mse_loss(pred.float(), ex["target"].float()), {}


def distill_guidance(teacher_pipe, cfg: GuidanceConfig, out: str | os.PathLike, *, zoo_name: str | None = None,
                     prompts: list[str] | None = None, resume: bool = False, eval_fn=None):
    """Guidance distillation of ``teacher_pipe`` into ``out`` (Python API of ``fastgen train guidance``).

    Stage 1 runs ``cfg.steps`` steps in ``out``; each of ``cfg.progressive_rounds`` halving rounds runs
    ``cfg.progressive_steps_per_round`` steps in ``out/round{r}`` (student ``start/2^r`` steps). The final
    student is saved to ``out/student`` (and every stage's to its ``pipeline/``).

    Returns:
        ``(student_pipe, call_kwargs)``: the final student pipeline and the keyword arguments to call it with.
    """
    out = Path(out)
    tr = GuidanceTrainer(teacher_pipe, cfg, out, zoo_name=zoo_name, prompts=prompts, eval_fn=eval_fn)
    if resume:
        tr.resume()
    tr.run()
    model = tr.export_model()
    last: DistillTrainer = tr
    for r in range(1, cfg.progressive_rounds + 1):
        n = cfg.progressive_start_steps >> r
        rcfg = replace(cfg, steps=cfg.progressive_steps_per_round)
        pt = ProgressiveTrainer(teacher_pipe, rcfg, out / f"round{r}", round_teacher=model, student_steps=n,
                                zoo_name=zoo_name, prompts=prompts, eval_fn=eval_fn)
        if resume:
            pt.resume()
        logger.info("progressive round %d: %d -> %d steps", r, 2 * n, n)
        pt.run()
        model = pt.export_model()
        last = pt
    pipe = last.export_pipeline()
    last.save(out / "student", pipe=pipe)
    return pipe, last.call_kwargs()


def main(argv: list[str] | None = None) -> int:
    """``fastgen train guidance --teacher T --output DIR [...]`` (see ``--help``; also
    ``accelerate launch -m fastgen.distill.guidance``)."""
    ap = CommandParser(prog="fastgen train guidance", description=__doc__.split("\n\n")[0],
                       example="fastgen train guidance --teacher shapes-unet --output runs/gd-unet --steps 2000 "
                               "--progressive-rounds 3\n"
                               "accelerate launch -m fastgen.distill.guidance --teacher path/to/sd3 --prompts "
                               "prompts.txt --output runs/gd-sd3 --resume")
    add_common_args(ap, GuidanceConfig())
    args = ap.parse_args(argv)
    setup_cli_logging(args.threads)
    check_fresh_or_resume(args.output, args.resume)
    cfg = config_from_args(GuidanceConfig, args)
    pipe, name = load_teacher(args.teacher)
    _, kw = distill_guidance(pipe, cfg, args.output, zoo_name=name, resume=args.resume)
    logger.info("student saved to %s; call it with %s", Path(args.output) / "student", kw)
    return 0


if __name__ == "__main__":
    from .cli import run_cli

    raise SystemExit(run_cli(main))
