"""Data-free calibration from the teacher's own trajectories (EfficientDM / Q-Diffusion style).

:func:`capture_calibration` runs the **full-precision** pipeline on prompts (no images, no dataset) and
records every denoiser call: all of its inputs (latents with the CFG batch, timestep, text embeddings,
pooled embeddings, ids, masks, ...) and the FP output. These records are

* the calibration set of the activation ranges (:func:`calibrate`: one range per layer and **per
  timestep**, from which the per-timestep step sizes and zero points are initialised), and
* the distillation data of the QALoRA fine-tune (the student matches the stored FP outputs on exactly
  these inputs; the trajectory is advanced by the FP model, as in EfficientDM).

Works on any pipeline whose denoiser takes a timestep (SD/SDXL/SD3/FLUX/PixArt/Sana/Lumina2/DiT);
for ``DiTPipeline`` the "prompts" are class labels (ints or label names).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from fastgen.hooks import add_hook, remove_hook
from fastgen.utils.io import torch_save_atomic
from fastgen.utils.logging import get_logger

from diffusers.hooks import ModelHook

from fastgen.prompts import GENERIC_PROMPTS, default_prompts

from .apply import qalora_layers, quant_mode, require_qalora
from .common import TIMESTEP_NAMES, get_denoiser, timestep_values
from .quantizers import search_act_qparams

logger = get_logger(__name__)

__all__ = ["CalibrationRecord", "CalibrationSet", "capture_calibration", "calibrate", "replay", "first_tensor",
           "DEFAULT_PROMPTS"]

_CAPTURE_HOOK = "fastgen_qalora_capture"

#: The generic prompt set used when none are given (:data:`fastgen.prompts.GENERIC_PROMPTS`; zoo models get their
#: own world's prompts, class-conditional pipelines their labels: :func:`fastgen.prompts.default_prompts`).
DEFAULT_PROMPTS: tuple[str, ...] = GENERIC_PROMPTS


def _map(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [_map(v, fn) for v in obj]
        return type(obj)(out) if isinstance(obj, tuple) and not hasattr(obj, "_fields") else out
    return obj


def first_tensor(output) -> torch.Tensor:
    """The prediction tensor of a denoiser output (``tuple[0]``, ``.sample`` or the tensor itself)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the prediction tensor in a denoiser output of type {type(output).__name__}")


@dataclass
class CalibrationRecord:
    """One denoiser call: its keyword arguments (tensors detached), timestep value(s) and FP output."""

    kwargs: dict[str, Any]
    timesteps: list[float]
    output: torch.Tensor

    @property
    def timestep(self) -> float:
        return self.timesteps[0]


@dataclass
class CalibrationSet:
    """The captured denoiser calls of the FP pipeline (see the module docstring)."""

    records: list[CalibrationRecord]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def timesteps(self) -> list[float]:
        """Distinct timesteps seen (ascending)."""
        return sorted({t for r in self.records for t in r.timesteps})

    def save(self, path: str | os.PathLike) -> Path:
        """``torch.save`` atomically (tmp file + ``os.replace``)."""
        return torch_save_atomic({"format": "fastgen-calibration-v1", "meta": self.meta,
                                  "records": [{"kwargs": r.kwargs, "timesteps": r.timesteps, "output": r.output}
                                              for r in self.records]}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationSet":
        d = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(d, dict) or d.get("format") != "fastgen-calibration-v1":
            raise ValueError(f"{path} is not a fastgen calibration set (saved by CalibrationSet.save)")
        return cls([CalibrationRecord(r["kwargs"], list(r["timesteps"]), r["output"]) for r in d["records"]],
                   dict(d["meta"]))


class _CaptureHook(ModelHook):
    def __init__(self, signature: inspect.Signature, store: torch.device | None, records: list):
        super().__init__()
        self.signature = signature
        self.store = store
        self.records = records
        self.pending = None

    def pre_forward(self, module, *args, **kwargs):
        bound = self.signature.bind(None, *args, **kwargs)
        kw = {k: v for k, v in list(bound.arguments.items())[1:]}
        for name, p in self.signature.parameters.items():
            if p.kind == p.VAR_KEYWORD and name in kw:  # **kwargs of forward: flatten
                kw.update(kw.pop(name))
        ts = []
        for n in TIMESTEP_NAMES:
            if n in kw:
                ts = timestep_values(kw[n])
                break
        dev = self.store
        self.pending = (_map(kw, lambda t: t.detach().clone() if dev is None else t.detach().to(dev, copy=True)), ts)
        return args, kwargs

    def post_forward(self, module, output):
        kw, ts = self.pending
        out = first_tensor(output).detach()
        out = out.clone() if self.store is None else out.to(self.store, copy=True)
        self.records.append(CalibrationRecord(kw, ts, out))
        self.pending = None
        return output


def _call_kwargs(pipe, prompts: Sequence, seed0: int, steps: int | None, guidance: float | None,
                 height: int | None, width: int | None, extra: dict) -> dict[str, Any]:
    params = inspect.signature(type(pipe).__call__).parameters
    kw: dict[str, Any] = {}
    if "class_labels" in params and "prompt" not in params:
        labels = []
        for p in prompts:
            if isinstance(p, str):
                ids = pipe.get_label_ids(p) if hasattr(pipe, "get_label_ids") else None
                if not ids:
                    raise ValueError(f"{type(pipe).__name__} is class-conditional: give class labels, got {p!r}")
                labels.append(int(ids[0]))
            else:
                labels.append(int(p))
        kw["class_labels"] = labels
        kw["output_type"] = "pt"
    else:
        kw["prompt"] = [str(p) for p in prompts]
        if "output_type" in params:
            kw["output_type"] = "latent"
    kw["generator"] = [torch.Generator("cpu").manual_seed(seed0 + i) for i in range(len(prompts))]
    if steps is not None:
        kw["num_inference_steps"] = int(steps)
    if guidance is not None and "guidance_scale" in params:
        kw["guidance_scale"] = float(guidance)
    if height is not None and "height" in params:
        kw["height"] = int(height)
    if width is not None and "width" in params:
        kw["width"] = int(width)
    if "use_resolution_binning" in params:
        kw["use_resolution_binning"] = False
    if "clean_caption" in params:
        kw["clean_caption"] = False
    kw.update(extra)
    return kw


@torch.no_grad()
def capture_calibration(pipe, prompts: Sequence | None = None, *, num_inference_steps: int | None = None,
                        guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                        batch_size: int = 4, seed: int = 0, store_device: str | torch.device | None = "cpu",
                        progress: bool = False, **call_kwargs) -> CalibrationSet:
    """Run the FP pipeline on ``prompts`` and record every denoiser call (inputs and FP output).

    If QALoRA is already applied, the capture runs the original FP modules (the teacher).

    Args:
        pipe: a diffusers pipeline.
        prompts: prompts (class labels for DiT); default :func:`fastgen.prompts.default_prompts` (8 generic
            prompts; a zoo model's own world; DiT: labels 0-7 of its ``id2label``). Data-free: nothing but prompts is needed.
        num_inference_steps, guidance_scale, height, width: the pipeline call settings (default: the
            pipeline's own defaults). Calibrate with the settings you will sample with; other step
            counts still work (nearest calibrated timestep).
        batch_size: prompts per pipeline call (each call records ``steps`` denoiser calls, or twice that
            for pipelines that run CFG as two calls).
        seed: prompt ``i`` uses ``torch.Generator().manual_seed(seed + i)``.
        store_device: where records are kept (default CPU; ``None``: where they were produced).
        call_kwargs: any other pipeline call arguments (e.g. ``max_sequence_length``).

    Returns:
        a :class:`CalibrationSet` (``len`` = number of denoiser calls).
    """
    model = get_denoiser(pipe)
    if prompts is None:
        prompts = default_prompts(pipe, 8)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("capture_calibration needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records: list[CalibrationRecord] = []
    store = torch.device(store_device) if store_device is not None else None
    hook = _CaptureHook(inspect.signature(type(model).forward), store, records)
    add_hook(model, hook, _CAPTURE_HOOK)
    try:
        with quant_mode(model, "fp"):
            rng = range(0, len(prompts), batch_size)
            if progress:
                from tqdm.auto import tqdm

                rng = tqdm(rng, desc="capture", unit="batch")
            for i in rng:
                chunk = prompts[i:i + batch_size]
                kw = _call_kwargs(pipe, chunk, seed + i, num_inference_steps, guidance_scale, height, width, call_kwargs)
                pipe(**kw)
    finally:
        remove_hook(model, _CAPTURE_HOOK)
    meta = {"prompts": [p if isinstance(p, (int, str)) else str(p) for p in prompts],
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "height": height,
            "width": width, "batch_size": batch_size, "seed": seed, "pipeline": type(pipe).__name__,
            "denoiser": type(model).__name__,
            "call_kwargs": {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str, bool))}}
    calib = CalibrationSet(records, meta)
    logger.info("captured %d denoiser calls (%d distinct timesteps) from %d prompts", len(records),
                len(calib.timesteps), len(prompts))
    return calib


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def replay(model: torch.nn.Module, record: CalibrationRecord):
    """Call ``model`` with a record's inputs (moved to the model's device); returns the raw output."""
    dev = _device_of(model)
    return model(**_map(record.kwargs, lambda t: t.to(dev)))


class _Observer:
    """Collects per-layer, per-timestep activation ranges and value samples in ``"observe"`` mode."""

    def __init__(self, per_timestep: bool, sample_size: int, seed: int):
        self.per_timestep = per_timestep
        self.sample_size = sample_size
        self.gen = torch.Generator().manual_seed(int(seed))
        self.keys: list[float] = []
        self.stats: dict[str, dict[int, list]] = {}

    def _key(self, t: float) -> int:
        for i, k in enumerate(self.keys):
            if abs(k - t) <= 1e-5 * max(1.0, abs(t)):
                return i
        self.keys.append(t)
        return len(self.keys) - 1

    def select(self, vals: list[float]):
        if not self.per_timestep:
            return 0
        if not vals:
            raise RuntimeError("calibration needs the denoiser's timestep argument, but a call passed none")
        rows = [self._key(v) for v in vals]
        return rows[0] if len(set(rows)) == 1 else torch.tensor(rows, dtype=torch.long)

    def observe(self, name: str, x: torch.Tensor, index) -> None:
        x = x.detach()
        if isinstance(index, torch.Tensor):
            if index.numel() != x.shape[0]:
                raise RuntimeError(f"layer {name}: per-sample timesteps ({index.numel()}) do not match the batch "
                                   f"of its input {tuple(x.shape)}")
            groups = [(int(k), x[(index == k).to(x.device)]) for k in index.unique().tolist()]
        else:
            groups = [(int(index or 0), x)]
        per = self.stats.setdefault(name, {})
        for k, xs in groups:
            flat = xs.float().flatten()
            if flat.numel() == 0:
                continue
            m = min(flat.numel(), self.sample_size)
            idx = torch.randint(flat.numel(), (m,), generator=self.gen).to(flat.device)
            sample = flat[idx].cpu()
            lo, hi = float(flat.min()), float(flat.max())
            st = per.get(k)
            if st is None:
                per[k] = [lo, hi, sample]
                continue
            st[0], st[1] = min(st[0], lo), max(st[1], hi)
            both = torch.cat([st[2], sample])
            if both.numel() > self.sample_size:
                both = both[torch.randperm(both.numel(), generator=self.gen)[:self.sample_size]]
            st[2] = both


@torch.no_grad()
def calibrate(pipe_or_model, calibration: CalibrationSet, *, act_init: str | None = None,
              max_records: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Initialise the activation step tables of a QALoRA-quantized denoiser from captured FP calls.

    Replays the records through the FP modules while observing every quantized layer's input; for each
    layer and each captured timestep the step size / zero point come from the observed range (``"max"``)
    or the clipping of that range that minimises the L2.4 error on a value sample (``"mse"``, default from
    the config). With ``per_timestep_act=False`` all timesteps share one row. Weight steps are already
    set by ``apply_qalora`` (from the weights). Layers never executed keep a unit step (and are logged).

    Returns:
        ``{"records": n, "timesteps": [...], "layers": n}``.
    """
    model = get_denoiser(pipe_or_model)
    st = require_qalora(model)
    cfg = st.config
    method = act_init or cfg.act_init
    records = calibration.records[:max_records] if max_records else calibration.records
    if not records:
        raise ValueError("the calibration set is empty")
    layers = qalora_layers(model)
    obs = _Observer(cfg.per_timestep_act, cfg.calib_samples, cfg.seed)
    st.ctx.observer = obs
    try:
        with quant_mode(model, "observe"):
            it = records
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(records, desc="calibrate", unit="call")
            for rec in it:
                replay(model, rec)
    finally:
        st.ctx.observer = None
    order = sorted(range(len(obs.keys)), key=lambda i: obs.keys[i]) if cfg.per_timestep_act else [0]
    keys = [obs.keys[i] for i in order] if cfg.per_timestep_act else []
    missing = []
    for name, layer in layers.items():
        if layer.a_quant is None:
            continue
        per = obs.stats.get(name, {})
        if not per:
            missing.append(name)
            layer.a_quant.set_table(torch.ones(len(order)), torch.zeros(len(order)))
            continue
        steps, zps = [], []
        for old in order:
            src = old
            if src not in per:  # not run at this timestep: nearest timestep that ran it
                src = min(per, key=lambda k: abs(obs.keys[k] - obs.keys[old]))
            lo, hi, sample = per[src]
            s, z = search_act_qparams(sample, lo, hi, layer.a_quant.bits, layer.a_quant.symmetric, method)
            steps.append(s)
            zps.append(z)
        layer.a_quant.set_table(torch.tensor(steps), torch.tensor(zps))
    if missing:
        logger.warning("calibration: %d quantized layers never ran on the captured calls (unit step kept): %s",
                       len(missing), ", ".join(missing[:5]))
    st.ctx.keys = keys
    st.ctx.calibrated = True
    logger.info("calibrated %d layers on %d calls, %d timestep rows (%s)", len(layers), len(records),
                max(1, len(keys)), method)
    return {"records": len(records), "timesteps": keys, "layers": len(layers)}
