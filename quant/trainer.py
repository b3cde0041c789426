"""The EfficientDM distillation fine-tune of a QALoRA-quantized denoiser, and its CLI.

EfficientDM (arXiv 2310.03270) trains only the LoRA ``A``/``B`` of every quantized layer and the
quantizers' step sizes, so that the quantized denoiser reproduces the full-precision (FP) denoiser on
the FP model's own sampling trajectories (data-free: prompts only):

    loss = mean over captured calls c of || eps_quant(c) - eps_fp(c) ||^2   (+ optional block features)

Here the captured calls come from :func:`quant.capture_calibration` (latents, timestep, text embeddings,
CFG batch and the FP output of every denoiser call of FP sampling runs), so the teacher output costs
nothing at training time. Each optimisation step draws ``records_per_step`` calls, deterministically from
``(seed, step)``.

Learning rates are **per layer and relative** (EfficientDM's scale-aware LoRA optimisation gives every
layer its own AdamW group with ``lr = mean(weight step) / 2500``; Adam is invariant to gradient scale,
so this is the same as rescaling the gradients): LoRA lr = ``lora_lr * mean(weight step of the layer)``,
weight-step lr = ``weight_step_lr * mean(weight step)``, activation-step lr = ``act_lr * mean(activation
steps)`` of the layer. A linear decay to 0 over ``steps`` follows (EfficientDM: linear, no warm-up).

Checkpoints (``OUT/checkpoint.pt``: trainable tensors, optimizer, step, loss history, configs) are
written atomically every ``ckpt_every`` steps; the draws of step ``k`` depend only on ``(seed, k)`` and the
calibration set is stored in ``OUT/calibration.pt``, so a resumed run reproduces the uninterrupted loss
curve exactly.

CLI (works under ``accelerate launch -m fastgen.quant.qalora`` too, single process)::

    fastgen train qalora --model shapes-mmdit --bits w4a8 --out runs/q-w4a8 --steps 400
    fastgen train qalora --model path/to/diffusers_folder --bits w8a8 --out DIR --prompt-file prompts.txt
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from fastgen.utils.io import Resumable, check_same_config
from fastgen.utils.logging import get_logger, log_to_stderr_with_time
from fastgen.prompts import default_prompts, is_class_conditional, read_prompts

from .calibration import CalibrationSet, calibrate, capture_calibration, first_tensor, replay
from .apply import apply_qalora, qalora_layers, qalora_state, quant_mode, remove_qalora, require_qalora, trainable_parameters
from .common import get_denoiser
from .config import QALoRAConfig

logger = get_logger(__name__)

__all__ = ["FinetuneConfig", "QALoRATrainer", "finetune_qalora", "distillation_error", "main"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of the EfficientDM distillation fine-tune (stored in the checkpoint; resume checks them).

    Attributes:
        steps: optimisation steps (default 400; EfficientDM runs 160 epochs x 100 steps = 16k at lr
            ``mean(s)/2500``; with the default ``lora_lr`` a few hundred steps recover most of W4's error
            on small models). The linear lr decay ends at ``steps``.
        records_per_step: captured denoiser calls per step (gradient accumulation; default 2).
        lora_lr: LoRA lr of a layer = ``lora_lr * mean(weight step of the layer)`` (default 0.05; EfficientDM
            uses 1/2500 = 4e-4 for 16k steps; sensible 1e-3-0.2, larger for shorter runs).
        weight_step_lr: weight-step lr relative to the layer's mean weight step (default 1e-3; EfficientDM
            1e-6 absolute). 0 freezes them.
        act_lr: activation-step lr relative to the layer's mean activation step (default 5e-3; EfficientDM
            5e-4 absolute). 0 freezes them.
        zero_point_lr: lr of the activation zero points, in integer levels (default 0: frozen at their
            calibrated values, as EfficientDM effectively does).
        feature_weight: weight of the per-block feature loss (relative MSE of every block output;
            default 0 = output only).
        warmup: linear lr warm-up steps (default 0).
        grad_clip: gradient-norm clipping (default 1.0; 0 = off).
        seed: seed of the call draws (default 0).
        ckpt_every: checkpoint every this many steps (default 50; 0 = only at the end).
    """

    steps: int = 400
    records_per_step: int = 2
    lora_lr: float = 0.05
    weight_step_lr: float = 1e-3
    act_lr: float = 5e-3
    zero_point_lr: float = 0.0
    feature_weight: float = 0.0
    warmup: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 50

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.records_per_step, int) or self.records_per_step < 1:
            raise ValueError(f"records_per_step must be an integer >= 1, got {self.records_per_step!r}")
        for k in ("lora_lr", "weight_step_lr", "act_lr", "zero_point_lr", "feature_weight", "grad_clip"):
            if not float(getattr(self, k)) >= 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)!r}")

    def with_(self, **kw) -> "FinetuneConfig":
        d = asdict(self)
        unknown = sorted(set(kw) - set(d))
        if unknown:
            raise TypeError(f"unknown FinetuneConfig fields {unknown}; fields: {sorted(d)}")
        d.update(kw)
        return FinetuneConfig(**d)


def _feature_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    if hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
        mods = list(model.down_blocks) + ([model.mid_block] if getattr(model, "mid_block", None) is not None else [])
        return mods + list(model.up_blocks)
    out: list[torch.nn.Module] = []
    for attr in ("transformer_blocks", "single_transformer_blocks", "noise_refiner", "context_refiner", "layers"):
        out += list(getattr(model, attr, None) or [])
    return out


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


@torch.no_grad()
def distillation_error(pipe_or_model, calibration: CalibrationSet, records: Sequence[int] | None = None) -> dict[str, float]:
    """How far the (quantized) denoiser is from the stored FP outputs on ``calibration``'s calls.

    Returns ``{"mse": mean squared error, "rel": mean relative L2 error ||q - fp|| / ||fp||}`` over the
    records (all, or the given indices).
    """
    model = get_denoiser(pipe_or_model)
    idx = range(len(calibration)) if records is None else records
    mse, rel, n = 0.0, 0.0, 0
    for i in idx:
        rec = calibration.records[i]
        out = first_tensor(replay(model, rec)).float()
        tgt = rec.output.to(out.device).float()
        mse += float(F.mse_loss(out, tgt))
        rel += float((out - tgt).norm() / tgt.norm().clamp_min(1e-12))
        n += 1
    return {"mse": mse / max(1, n), "rel": rel / max(1, n)}


class QALoRATrainer(Resumable):
    """EfficientDM distillation of a QALoRA-quantized denoiser on captured FP calls (module docstring).

    Args:
        pipe: a pipeline (or denoiser). QALoRA is applied with ``config`` if it is not applied yet (if it
            is, its config must equal ``config``); it is calibrated on ``calibration`` if not calibrated.
        config: the quantization settings.
        calibration: the captured FP calls (:func:`quant.capture_calibration`).
        out: run folder (``checkpoint.pt``, ``history.jsonl``); None keeps everything in memory.
        finetune: the fine-tune settings (default ``FinetuneConfig()``).
    """

    def __init__(self, pipe, config: QALoRAConfig, calibration: CalibrationSet, out: str | os.PathLike | None = None,
                 finetune: FinetuneConfig | None = None):
        self.pipe = pipe
        self.model = get_denoiser(pipe)
        self.config = config
        self.cfg = finetune or FinetuneConfig()
        self.calibration = calibration
        self.out = Path(out) if out is not None else None
        if len(calibration) == 0:
            raise ValueError("the calibration set is empty")
        st = qalora_state(self.model)
        if st is None:
            apply_qalora(self.model, config)
            st = require_qalora(self.model)
        elif st.config != config:
            raise ValueError(f"QALoRA is applied with another config ({st.config.bits}, rank {st.config.rank}) than "
                             f"the trainer's ({config.bits}, rank {config.rank}); remove_qalora(pipe) first")
        if not st.ctx.calibrated and config.a_bits is not None:
            calibrate(self.model, calibration)
        self.state = st
        # freeze everything but the trainable parameters
        self.model.requires_grad_(False)
        groups = self._param_groups()
        self.opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), weight_decay=0.0)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.ptq: dict[str, float] | None = None

    # ---- parameters -----------------------------------------------------------------------------------

    def _param_groups(self) -> list[dict[str, Any]]:
        c = self.cfg
        groups = []
        self.named_trainable: dict[str, torch.nn.Parameter] = {}
        for name, layer in qalora_layers(self.model).items():
            if layer.merged:
                raise RuntimeError(f"layer {name!r} is merged (integer weights): a merged model cannot be fine-tuned")
            s_w = float(layer.w_quant.step.detach().abs().mean())
            if layer.rank and c.lora_lr > 0:
                ps = [layer.lora_A.weight, layer.lora_B.weight]
                groups.append({"params": ps, "base_lr": c.lora_lr * s_w, "name": f"{name}.lora"})
                self.named_trainable[f"{name}.lora_A.weight"] = layer.lora_A.weight
                self.named_trainable[f"{name}.lora_B.weight"] = layer.lora_B.weight
            if c.weight_step_lr > 0:
                groups.append({"params": [layer.w_quant.step], "base_lr": c.weight_step_lr * s_w,
                               "name": f"{name}.w_step"})
                self.named_trainable[f"{name}.w_quant.step"] = layer.w_quant.step
            aq = layer.a_quant
            if aq is not None and aq.rows:
                if c.act_lr > 0:
                    s_a = float(aq.step.detach().abs().mean())
                    groups.append({"params": [aq.step], "base_lr": c.act_lr * s_a, "name": f"{name}.a_step"})
                    self.named_trainable[f"{name}.a_quant.step"] = aq.step
                if c.zero_point_lr > 0 and not aq.symmetric:
                    groups.append({"params": [aq.zero_point], "base_lr": c.zero_point_lr, "name": f"{name}.a_zp"})
                    self.named_trainable[f"{name}.a_quant.zero_point"] = aq.zero_point
        if not groups:
            raise ValueError("nothing to train: rank 0 and every learning rate 0")
        for p in self.named_trainable.values():
            p.requires_grad_(True)
        return groups

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every quantizer/LoRA tensor of the quantized layers (trainable or not), by name."""
        out = {}
        for group in trainable_parameters(self.model).values():
            for n, p in group:
                out[n] = p.detach().clone()
        return out

    def load_trainable_state(self, sd: dict[str, torch.Tensor]) -> None:
        mine = {n: p for g in trainable_parameters(self.model).values() for n, p in g}
        missing = sorted(set(mine) - set(sd))
        extra = sorted(set(sd) - set(mine))
        if missing or extra:
            raise ValueError(f"checkpoint does not match the quantized model: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for n, p in mine.items():
                if p.shape != sd[n].shape:
                    raise ValueError(f"checkpoint tensor {n!r} has shape {list(sd[n].shape)}, the model {list(p.shape)}")
                p.copy_(sd[n])

    # ---- loss -----------------------------------------------------------------------------------------

    def records_for(self, step: int) -> list[int]:
        """The calibration records drawn at ``step`` (deterministic from ``(seed, step)``)."""
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + int(step))
        return torch.randint(len(self.calibration), (self.cfg.records_per_step,), generator=g).tolist()

    def loss(self, index: int) -> torch.Tensor:
        """Distillation loss on calibration record ``index`` (graph attached)."""
        rec = self.calibration.records[index]
        feats_t: list[torch.Tensor] = []
        feats_s: list[torch.Tensor] = []
        handles = []
        if self.cfg.feature_weight > 0:
            sink: list[list[torch.Tensor]] = [feats_t]
            for m in _feature_modules(self.model):
                handles.append(m.register_forward_hook(lambda mod, a, o: sink[0].extend(_tensors(o))))
        try:
            if handles:
                with torch.no_grad(), quant_mode(self.model, "fp"):
                    replay(self.model, rec)
                sink[0] = feats_s
            out = first_tensor(replay(self.model, rec)).float()
        finally:
            for h in handles:
                h.remove()
        loss = F.mse_loss(out, rec.output.to(out.device).float())
        if feats_s:
            assert len(feats_s) == len(feats_t), (len(feats_s), len(feats_t))
            fl = sum(F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12)
                     for s, t in zip(feats_s, feats_t)) / len(feats_s)
            loss = loss + self.cfg.feature_weight * fl
        return loss

    def lr_factor(self, step: int) -> float:
        c = self.cfg
        warm = min(1.0, (step + 1) / c.warmup) if c.warmup else 1.0
        return warm * max(0.0, 1.0 - step / c.steps)

    def train_step(self) -> float:
        """One optimisation step on ``records_per_step`` captured calls; returns the mean loss."""
        f = self.lr_factor(self.step)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f
        self.opt.zero_grad(set_to_none=True)
        idx = self.records_for(self.step)
        total = 0.0
        with quant_mode(self.model, "quant"):
            for i in idx:
                loss = self.loss(i) / len(idx)
                loss.backward()
                total += float(loss.detach())
        if total != total or total in (float("inf"), float("-inf")):
            raise FloatingPointError(f"QALoRA fine-tune: the loss is {total} at step {self.step}; lower the learning "
                                     "rates (lora_lr, act_lr) or check the calibration set")
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], self.cfg.grad_clip)
        self.opt.step()
        self.step += 1
        self.history.append({"step": self.step, "loss": total, "lr_factor": f})
        return total

    def evaluate(self, calibration: CalibrationSet | None = None) -> dict[str, float]:
        """:func:`distillation_error` of the quantized model on ``calibration`` (default: the training set)."""
        with quant_mode(self.model, "quant"):
            return distillation_error(self.model, calibration or self.calibration)

    # ---- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"format": "fastgen-qalora-train-v1", "qalora": self.config.to_dict(), "finetune": asdict(self.cfg),
                "step": self.step, "history": self.history, "ptq": self.ptq, "trainable": self.trainable_state(),
                "opt": self.opt.state_dict(), "timesteps": list(self.state.ctx.keys)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("format") != "fastgen-qalora-train-v1":
            raise ValueError("not a QALoRA training checkpoint")
        check_same_config(sd["qalora"], self.config.to_dict(), what="quantization settings")
        check_same_config(sd["finetune"], asdict(self.cfg), what="fine-tune settings")
        keys = list(self.state.ctx.keys)
        if [round(k, 4) for k in keys] != [round(k, 4) for k in sd["timesteps"]]:
            raise ValueError("cannot resume: the calibration timesteps differ from the checkpoint's "
                             f"({len(keys)} vs {len(sd['timesteps'])} rows); resume with the run's calibration.pt")
        self.load_trainable_state(sd["trainable"])
        self.opt.load_state_dict(sd["opt"])
        self.step = int(sd["step"])
        self.history = list(sd["history"])
        self.ptq = sd.get("ptq")

    def save_checkpoint(self) -> Path:
        """Write ``OUT/checkpoint.pt`` atomically (tmp file then ``os.replace``) and ``OUT/history.jsonl``."""
        path = super().save_checkpoint()
        hist_tmp = self.out / "history.jsonl.tmp"
        with open(hist_tmp, "w") as f:
            for row in self.history:
                f.write(json.dumps(row) + "\n")
        os.replace(hist_tmp, self.out / "history.jsonl")
        return path


    # ---- the loop -------------------------------------------------------------------------------------

    def run(self, steps: int | None = None, progress: bool = True,
            callback: Callable[["QALoRATrainer", float], None] | None = None) -> list[dict[str, Any]]:
        """Train until ``steps`` steps in total (default ``FinetuneConfig.steps``); checkpoints every
        ``ckpt_every`` steps and at the end (with an output folder). Returns the loss history."""
        target = min(self.cfg.steps, steps if steps is not None else self.cfg.steps)
        if self.ptq is None:
            self.ptq = self.evaluate()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=target, initial=self.step, desc=f"qalora {self.config.bits}", unit="step")
        try:
            while self.step < target:
                loss = self.train_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4g}")
                if callback is not None:
                    callback(self, loss)
                if self.out is not None and self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        if self.out is not None:
            self.save_checkpoint()
        return self.history


def finetune_qalora(pipe, config: QALoRAConfig | str | None = None, prompts: Sequence | None = None,
                    out: str | os.PathLike | None = None, steps: int | None = None, *,
                    finetune: FinetuneConfig | None = None, calibration: CalibrationSet | None = None,
                    holdout: CalibrationSet | None = None, resume: bool = True, progress: bool = True,
                    capture: dict[str, Any] | None = None, **finetune_kwargs) -> QALoRATrainer:
    """Quantize ``pipe`` with QALoRA and fine-tune it by distilling its own FP denoiser (EfficientDM).

    1. capture the FP pipeline's denoiser calls on ``prompts`` (or use ``calibration``; with ``out`` the set
       is stored in ``OUT/calibration.pt`` and reused on resume),
    2. :func:`quant.apply_qalora` + :func:`quant.calibrate` (the PTQ starting point; its distillation
       error is recorded),
    3. train ``steps`` steps (:class:`QALoRATrainer`; resumes ``OUT/checkpoint.pt`` when ``resume``),
    4. with ``out``: write ``OUT/report.json`` (PTQ vs QALoRA distillation error on the training calls and
       on ``holdout`` if given) and the integer form ``OUT/quantized.safetensors`` (:func:`quant.save`).

    Args:
        pipe: a diffusers pipeline (quantized in place; remove with :func:`quant.remove_qalora`).
        config: a :class:`QALoRAConfig` or a recipe argument string like ``"w4a8"``.
        prompts: calibration prompts (default: :func:`fastgen.prompts.default_prompts`).
        out: run folder, or None (nothing written).
        steps: shortcut for ``finetune.steps``.
        capture: keyword arguments of :func:`quant.capture_calibration` (``num_inference_steps``,
            ``guidance_scale``, ``height``, ``width``, ``batch_size``, call kwargs...).
        finetune_kwargs: other :class:`FinetuneConfig` fields.

    Returns:
        the :class:`QALoRATrainer` (``.pipe`` is the quantized pipeline, ``.history`` the loss curve,
        ``.report`` the PTQ vs QALoRA numbers).
    """
    if isinstance(config, str) or config is None:
        config = QALoRAConfig.from_string(config)
    fc = finetune or FinetuneConfig()
    kw = dict(finetune_kwargs)
    if steps is not None:
        kw["steps"] = int(steps)
    if kw:
        fc = fc.with_(**kw)
    outp = Path(out) if out is not None else None
    if outp is not None and not resume and (outp / "checkpoint.pt").exists():
        raise FileExistsError(f"{outp / 'checkpoint.pt'} exists: pass resume=True to continue it or use another folder")
    if calibration is None:
        cpath = outp / "calibration.pt" if outp is not None else None
        if cpath is not None and resume and cpath.exists():
            calibration = CalibrationSet.load(cpath)
        else:
            calibration = capture_calibration(pipe, prompts, progress=progress, **(capture or {}))
            if cpath is not None:
                calibration.save(cpath)
    elif outp is not None and not (outp / "calibration.pt").exists():
        calibration.save(outp / "calibration.pt")
    trainer = QALoRATrainer(pipe, config, calibration, outp, fc)
    if resume and outp is not None:
        trainer.resume()
    ptq_holdout = trainer.evaluate(holdout) if holdout is not None and trainer.step == 0 else None
    t0 = time.time()
    trainer.run(progress=progress)
    report: dict[str, Any] = {"bits": config.bits, "rank": config.rank, "steps": trainer.step,
                              "records": len(calibration), "timesteps": len(calibration.timesteps),
                              "ptq_train": trainer.ptq, "qalora_train": trainer.evaluate(),
                              "seconds_this_run": round(time.time() - t0, 1)}
    if holdout is not None:
        report["ptq_holdout"] = ptq_holdout
        report["qalora_holdout"] = trainer.evaluate(holdout)
    trainer.report = report
    if outp is not None:
        from .io import save

        save(trainer.model, outp / "quantized.safetensors")
        (outp / "report.json").write_text(json.dumps(report, indent=1))
    logger.info("qalora %s: distillation rel. error %.4f (PTQ) -> %.4f after %d steps", config.bits,
                report["ptq_train"]["rel"], report["qalora_train"]["rel"], trainer.step)
    return trainer


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _load_model(spec: str, device: torch.device):
    """``shapes-mmdit``/``shapes-unet`` (zoo), ``zoo-init:<name>`` (untrained zoo architecture),
    ``tiny:<kind>`` (fastgen.testing) or a diffusers folder."""
    from fastgen.zoo import MODELS, call_kwargs

    if spec in MODELS:
        from fastgen.zoo import load_default

        return load_default(spec, device=device), dict(call_kwargs(spec)), spec
    if spec.startswith("zoo-init:"):
        from fastgen.zoo.builders import build_pipeline

        name = spec.split(":", 1)[1]
        return build_pipeline(name).to(device), dict(call_kwargs(name)), name
    if spec.startswith("tiny:"):
        from fastgen.testing import tiny_pipeline

        kind = spec.split(":", 1)[1]
        ck = {} if kind == "dit" else {"height": 16, "width": 16}
        return tiny_pipeline(kind, device=device), {"num_inference_steps": 4, **ck}, None
    if os.path.isdir(spec):
        from fastgen.zoo import load_pipeline

        meta = Path(spec) / "fastgen_zoo.json"
        name = json.loads(meta.read_text()).get("model") if meta.exists() else None
        if name in MODELS:  # a zoo folder (e.g. a training run's best_pipeline): its default call and prompts
            return load_pipeline(spec, device=device), dict(call_kwargs(name)), name
        return load_pipeline(spec, device=device), {}, None
    raise SystemExit(f"--model: {spec!r} is not a zoo model ({', '.join(MODELS)}), zoo-init:NAME, tiny:KIND or a "
                     "diffusers folder")


def main(argv: list[str] | None = None) -> int:
    """``fastgen train qalora --model M --bits w4a8 --out DIR [...]`` (see ``--help``)."""
    from fastgen.utils.commands import CommandParser

    ap = CommandParser(prog="fastgen train qalora",
                                 example="fastgen train qalora --model shapes-mmdit --bits w4a8 --out runs/q-w4a8 --steps 400\n"
                                         "fastgen train qalora --model path/to/diffusers_folder --bits w8a8 --out DIR "
                                         "--prompt-file prompts.txt",
                                 description="EfficientDM QALoRA: quantize a diffusers pipeline's denoiser and "
                                             "fine-tune it by distilling its FP self (data-free, prompts only).")
    ap.add_argument("--model", required=True, help="shapes-mmdit | shapes-unet | zoo-init:NAME | tiny:KIND | FOLDER")
    ap.add_argument("--bits", default="w4a8", help="recipe arguments, e.g. w4a8, w8a8, w4a16, 'w4a8,r16,flat'")
    ap.add_argument("--out", required=True, help="run folder (calibration.pt, checkpoint.pt, history.jsonl, "
                                                 "report.json, quantized.safetensors)")
    ap.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank (default from --bits, else 32)")
    ap.add_argument("--prompts", type=int, default=32, help="number of calibration prompts (zoo: held-out-free "
                                                            "training prompts of the shapes world)")
    ap.add_argument("--prompt-file", default=None, help="calibration prompts, one per line")
    ap.add_argument("--holdout-prompts", type=int, default=0, help="prompts of a held-out capture for the report")
    ap.add_argument("--calib-steps", type=int, default=None, help="sampling steps of the capture (default: model's)")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--batch", type=int, default=4, help="prompts per capture call")
    ap.add_argument("--records-per-step", type=int, default=FinetuneConfig.records_per_step)
    ap.add_argument("--lora-lr", type=float, default=FinetuneConfig.lora_lr)
    ap.add_argument("--act-lr", type=float, default=FinetuneConfig.act_lr)
    ap.add_argument("--feature-weight", type=float, default=0.0)
    ap.add_argument("--ckpt-every", type=int, default=FinetuneConfig.ckpt_every)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", type=int, default=0, metavar="N",
                    help="zoo models: score FP, PTQ and QALoRA pipelines on N held-out prompts (exact evaluator)")
    ap.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    log_to_stderr_with_time()
    torch.set_num_threads(max(1, args.threads))

    device = torch.device("cpu")
    try:
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes > 1:
            raise SystemExit("quant.qalora trains in one process; launch it with --num_processes 1")
        device = state.device
    except ImportError:
        pass

    config = QALoRAConfig.from_string(args.bits)
    if args.rank is not None:
        config = QALoRAConfig.from_dict({**config.to_dict(), "rank": args.rank, "seed": args.seed})
    elif args.seed:
        config = QALoRAConfig.from_dict({**config.to_dict(), "seed": args.seed})
    out = Path(args.out)
    if not args.resume and (out / "checkpoint.pt").exists():
        raise SystemExit(f"{out}/checkpoint.pt exists: pass --resume to continue it or choose another --out")
    pipe, ck, zoo_name = _load_model(args.model, device)
    pipe.set_progress_bar_config(disable=True)
    if args.prompt_file:
        prompts = read_prompts(args.prompt_file)
        holdout_prompts = []
    elif zoo_name is not None:
        from fastgen.zoo import shapes

        prompts = shapes.sample_prompts(args.prompts, 10_000 + args.seed)
        holdout_prompts = shapes.sample_prompts(args.holdout_prompts, 20_000 + args.seed) if args.holdout_prompts else []
    elif is_class_conditional(pipe):
        prompts, holdout_prompts = list(range(min(args.prompts, 3))), []
    else:
        prompts, holdout_prompts = default_prompts(pipe, args.prompts), []
    capture = {"batch_size": args.batch, **ck}
    if args.calib_steps is not None:
        capture["num_inference_steps"] = args.calib_steps
    if args.guidance is not None:
        capture["guidance_scale"] = args.guidance
    holdout = None
    if holdout_prompts:
        holdout = capture_calibration(pipe, holdout_prompts, seed=10_000, **capture)
    scores: dict[str, Any] = {}
    if args.eval and zoo_name is not None:
        from fastgen.zoo.evaluate import evaluate_pipeline

        scores["fp"] = evaluate_pipeline(pipe, zoo_name, n=args.eval)
    fc = FinetuneConfig(steps=args.steps, records_per_step=args.records_per_step, lora_lr=args.lora_lr,
                        act_lr=args.act_lr, feature_weight=args.feature_weight, ckpt_every=args.ckpt_every,
                        seed=args.seed)
    if args.eval and zoo_name is not None and not (out / "checkpoint.pt").exists():
        from fastgen.zoo.evaluate import evaluate_pipeline

        calib = capture_calibration(pipe, prompts, **capture)
        out.mkdir(parents=True, exist_ok=True)
        calib.save(out / "calibration.pt")
        apply_qalora(pipe, config)
        calibrate(pipe, calib)
        scores["ptq"] = evaluate_pipeline(pipe, zoo_name, n=args.eval)
        remove_qalora(pipe)
    tr = finetune_qalora(pipe, config, prompts, out, finetune=fc, holdout=holdout, resume=True,
                         progress=not args.no_progress, capture=capture)
    if args.eval and zoo_name is not None:
        from fastgen.zoo.evaluate import evaluate_pipeline

        scores["qalora"] = evaluate_pipeline(pipe, zoo_name, n=args.eval)
        tr.report["scores"] = {k: {m: v for m, v in s.items() if isinstance(v, (int, float))} for k, s in scores.items()}
        (out / "report.json").write_text(json.dumps(tr.report, indent=1))
    logger.info("report: %s", json.dumps(tr.report))
    return 0
