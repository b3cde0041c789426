"""distill: data-free distillation of diffusers pipelines into guidance-free and few-step students.

* :mod:`distill.guidance`: guidance distillation (Meng et al. 2023, stage 1: a w-conditioned student,
  one forward per step; stage 2: progressive distillation halving the steps).
* :mod:`distill.consistency`: consistency distillation: LCM (Luo et al. 2023) for epsilon/v UNets,
  continuous-time sCM (Lu & Song 2025) with the training-free flow->TrigFlow conversion of SANA-Sprint
  (Chen et al. 2025) for flow-matching MMDiTs (SD3).
* :mod:`distill.trainer`: the shared trainer (atomic checkpoints, exact resume, EMA, LoRA, evaluation);
  :mod:`distill.schedule`: the teacher families (noise schedules, parametrisations) and the loss;
  :mod:`distill.cli`: the command-line plumbing of both methods.
* :mod:`distill.models`: the guidance-conditioned SD3 student class (imported here so that saved
  students load with ``DiffusionPipeline.from_pretrained`` after ``import distill``).

CLI: ``fastgen train guidance --teacher shapes-unet --output runs/gd`` and
``fastgen train consistency --method lcm|scm --teacher ... --output ...`` (also under
``accelerate launch -m fastgen.distill.guidance|consistency``). See README "Distillation".
"""

from __future__ import annotations

from .models import GuidanceSD3Transformer2DModel, guidance_embedding  # noqa: F401  (registers the class)

__all__ = [
    "GuidanceSD3Transformer2DModel", "guidance_embedding", "GuidanceConfig", "distill_guidance", "LCMConfig",
    "SCMConfig", "distill_consistency", "load_teacher",
]


def __getattr__(name: str):
    if name in ("GuidanceConfig", "distill_guidance", "GuidanceTrainer", "ProgressiveTrainer"):
        from . import guidance

        return getattr(guidance, name)
    if name in ("LCMConfig", "SCMConfig", "distill_consistency", "LCMTrainer", "SCMTrainer"):
        from . import consistency

        return getattr(consistency, name)
    if name == "load_teacher":
        from .trainer import load_teacher

        return load_teacher
    raise AttributeError(f"module 'distill' has no attribute {name!r}")
