"""Saving and loading the integer form of a QALoRA/PTQ-quantized denoiser (safetensors + JSON header).

``quant.save(pipe, "model.safetensors")`` writes, for every quantized layer, the int8 weight (LoRA folded
in; 4-bit weights are int8 tensors with values in ``[-8, 7]``), its per-output-channel float32 scale,
the float32 bias and the per-timestep activation tables (scale and int32 zero point per calibrated
timestep), plus the calibrated timesteps. The safetensors metadata entry ``"fastgen_quant"`` holds a JSON
header: format, denoiser class, bits, the :class:`~quant.QALoRAConfig`, and for every layer its kind,
weight shape, bits and integer ranges. This is the input of a real-kernel deployment step (torchao
static int8, ExecuTorch), which is not part of this package.

``quant.load(pipe, path)`` puts those layers (merged, integer weights) on a pipeline of the same
architecture; everything else (embeddings, norms, FP layers, text encoders, VAE) comes from ``pipe``.
With ``expect=`` (a config or ``"w4a8"``), or when ``pipe`` is already quantized, the checkpoint's layers
and bits must match what the loader expects; otherwise :class:`QuantCheckpointError` names every
mismatching layer and how it differs, and the pipeline is left as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fastgen.errors import FastgenError

from .apply import apply_qalora, plan_layers, qalora_layers, qalora_state, remove_qalora, require_qalora
from .common import get_denoiser, layer_kind
from .config import LayerSpec, QALoRAConfig
from .layers import QALoRALayer

__all__ = ["save", "load", "read_header", "merge", "quantized_state", "QuantCheckpointError", "FORMAT"]

_META_KEY = "fastgen_quant"

FORMAT = "fastgen-quant-v1"


def quantized_state(pipe_or_model) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The integer form of a quantized denoiser, without changing it: ``(tensors, header)``.

    Tensors per quantized layer ``L``: ``L.weight_int`` (int8; values in the ``w_bits`` range),
    ``L.weight_scale`` (float32 ``[out]``; weight = ``weight_int * weight_scale``), ``L.bias`` (if any,
    float32), and with activation quantization ``L.act_scale`` (float32 ``[T]``) and ``L.act_zero_point``
    (int32 ``[T]``; ``x_int = clamp(round(x / act_scale[t]) + act_zero_point[t], range)``), row ``t``
    belonging to ``timesteps[t]`` (float64 ``[T]``, ascending; absent for ``per_timestep_act=False``).
    The header (JSON) holds the format, denoiser class, config and per-layer ``LayerSpec`` + act range.
    """
    model = get_denoiser(pipe_or_model)
    st = require_qalora(model)
    if st.config.a_bits is not None and not st.ctx.calibrated:
        raise RuntimeError("the activation quantizers are not calibrated: run quant.calibrate(pipe, calibration) "
                           "before exporting")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, (_, _, layer) in st.layers.items():
        w_int, scale = layer.int_repr()
        tensors[f"{name}.weight_int"] = w_int.contiguous().cpu()
        tensors[f"{name}.weight_scale"] = scale.float().contiguous().cpu()
        bias = layer.bias_q if layer.merged else layer.base.bias
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().float().contiguous().cpu()
        info = layer.spec.to_dict()
        if layer.a_quant is not None:
            s, z = layer.a_quant.qparams()
            tensors[f"{name}.act_scale"] = s.contiguous().cpu()
            tensors[f"{name}.act_zero_point"] = z.contiguous().cpu()
            info["act_symmetric"] = layer.a_quant.symmetric
            info["act_range"] = [layer.a_quant.qmin, layer.a_quant.qmax]
        info["weight_range"] = [layer.w_quant.qmin, layer.w_quant.qmax]
        layers[name] = info
    if st.config.per_timestep_act and st.ctx.calibrated:
        tensors["timesteps"] = torch.tensor(st.ctx.keys, dtype=torch.float64)
    header = {"format": FORMAT, "method": "qalora", "denoiser": type(model).__name__, "bits": st.config.bits,
              "config": st.config.to_dict(), "per_timestep_act": st.config.per_timestep_act,
              "timesteps": list(st.ctx.keys) if st.config.per_timestep_act else None, "layers": layers,
              "kept_fp": dict(st.kept)}
    return tensors, header


def merge(pipe_or_model) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fold every LoRA into its weight and switch the layers to integer weights + scales, in place.

    The outputs do not change (bit-identical); the LoRA and weight-step parameters are dropped, so the
    model cannot be fine-tuned further (:func:`remove_qalora` still restores the FP model). Returns
    :func:`quantized_state` (the int8 weights, per-channel scales and per-timestep activation tables that
    a real-kernel deployment step consumes; save it with :func:`quant.save`).
    """
    for layer in qalora_layers(pipe_or_model).values():
        layer.merge_()
    return quantized_state(pipe_or_model)



class QuantCheckpointError(FastgenError, ValueError):
    """A quantized checkpoint does not fit the pipeline or what the loader expects (the message lists how)."""


def save(pipe_or_model, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write the integer form of a quantized pipeline/denoiser to ``path`` (safetensors, atomically).

    The pipeline is not changed (an un-merged one is merged on the fly: see :func:`quant.merge`).
    ``metadata`` (JSON-serialisable) is stored in the header under ``"user"``.
    """
    from safetensors.torch import save_file

    tensors, header = quantized_state(pipe_or_model)
    if metadata:
        header["user"] = metadata
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={_META_KEY: json.dumps(header)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates the file 0600
    os.replace(tmp, path)
    return path


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a quantized checkpoint (raises :class:`QuantCheckpointError` if it is not one)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"quantized checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own types for damaged files
        raise QuantCheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if _META_KEY not in meta:
        raise QuantCheckpointError(f"{path} has no {_META_KEY!r} header: it was not written by quant.save")
    header = json.loads(meta[_META_KEY])
    if header.get("format") != FORMAT:
        raise QuantCheckpointError(f"{path}: unknown format {header.get('format')!r} (this version reads {FORMAT!r})")
    return header


def _compare(expected: dict[str, LayerSpec], got: dict[str, LayerSpec], exp_cfg: QALoRAConfig,
             header: dict[str, Any]) -> list[str]:
    errs = []
    for name in sorted(set(expected) | set(got)):
        e, g = expected.get(name), got.get(name)
        if g is None:
            errs.append(f"layer {name!r}: expected {e.bits} but the checkpoint keeps it full precision")
        elif e is None:
            errs.append(f"layer {name!r}: quantized in the checkpoint ({g.bits}) but the expected config keeps it "
                        "full precision")
        elif (e.w_bits, e.a_bits) != (g.w_bits, g.a_bits):
            errs.append(f"layer {name!r}: checkpoint {g.bits}, expected {e.bits}")
    if bool(header.get("per_timestep_act")) != exp_cfg.per_timestep_act and exp_cfg.a_bits is not None:
        errs.append(f"activation tables: checkpoint per_timestep_act={header.get('per_timestep_act')}, expected "
                    f"{exp_cfg.per_timestep_act}")
    ck_sym = header.get("config", {}).get("act_symmetric")
    if exp_cfg.a_bits is not None and ck_sym is not None and bool(ck_sym) != exp_cfg.act_symmetric:
        errs.append(f"activations: checkpoint act_symmetric={ck_sym}, expected {exp_cfg.act_symmetric}")
    return errs


def load(pipe_or_model, path: str | os.PathLike, *, expect: QALoRAConfig | str | None = None):
    """Quantize ``pipe_or_model`` with the integer layers stored in ``path`` (see the module docstring).

    Args:
        pipe_or_model: a pipeline (or denoiser) of the architecture the checkpoint was made from; its FP
            weights provide every layer the checkpoint does not hold.
        path: a file written by :func:`save`.
        expect: the quantization the caller expects (a :class:`QALoRAConfig` or recipe arguments like
            ``"w4a8"``); default: the config already applied to ``pipe_or_model``, if any, else none
            (the checkpoint's own layers are used).

    Returns:
        ``pipe_or_model``, quantized (merged integer layers, calibrated activation tables).

    Raises:
        QuantCheckpointError: another denoiser class, a layer missing from the model or of another shape,
            or (with an expectation) layers/bits/activation settings that differ; the message names each
            layer and the difference. The pipeline is unchanged when this is raised.
    """
    from safetensors import safe_open

    path = Path(path)
    header = read_header(path)
    model = get_denoiser(pipe_or_model)
    if header["denoiser"] != type(model).__name__:
        raise QuantCheckpointError(f"{path} quantizes a {header['denoiser']}, but this pipeline's denoiser is a "
                                   f"{type(model).__name__}")
    cfg = QALoRAConfig.from_dict(header["config"])
    got = {n: LayerSpec.from_dict(d) for n, d in header["layers"].items()}
    st = qalora_state(model)
    if isinstance(expect, str):
        expect = QALoRAConfig.from_string(expect)
    if expect is not None or st is not None:
        exp_cfg = expect if expect is not None else st.config
        expected = plan_layers(model, exp_cfg)[0] if expect is not None else {n: l.spec for n, l in
                                                                               qalora_layers(model).items()}
        errs = _compare(expected, got, exp_cfg, header)
        if errs:
            more = f" (and {len(errs) - 10} more)" if len(errs) > 10 else ""
            raise QuantCheckpointError(
                f"{path} ({header.get('bits')}) does not match what the loader expects ({exp_cfg.bits}): "
                + "; ".join(errs[:10]) + more)
    # every checkpoint layer must exist in the model with the same shape
    modules = dict(model.named_modules())
    shape_errs = []
    for name, spec in got.items():
        m = modules.get(name)
        if isinstance(m, QALoRALayer):
            m = m.base
        if m is None or layer_kind(m) is None:
            shape_errs.append(f"layer {name!r}: not a Linear/Conv2d in {type(model).__name__}")
        elif layer_kind(m) != spec.kind or tuple(m.weight.shape) != spec.shape:
            shape_errs.append(f"layer {name!r}: checkpoint {spec.kind} {list(spec.shape)}, model {layer_kind(m)} "
                              f"{list(m.weight.shape)}")
    if shape_errs:
        raise QuantCheckpointError(f"{path} does not fit this {type(model).__name__}: " + "; ".join(shape_errs[:10]))
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        need = [f"{n}.{t}" for n in got for t in ("weight_int", "weight_scale")]
        need += [f"{n}.{t}" for n, s in got.items() if s.a_bits for t in ("act_scale", "act_zero_point")]
        lacking = [k for k in need if k not in keys]
        if lacking:
            raise QuantCheckpointError(f"{path} is incomplete: tensors {lacking[:5]} are missing")
        tensors = {k: f.get_tensor(k) for k in keys}
    keys_t = [float(v) for v in tensors["timesteps"].tolist()] if "timesteps" in tensors else []
    rows = max(1, len(keys_t)) if cfg.per_timestep_act else 1
    for n, s in got.items():
        if s.a_bits and tensors[f"{n}.act_scale"].numel() != rows:
            raise QuantCheckpointError(f"{path}: layer {n!r} has {tensors[f'{n}.act_scale'].numel()} activation rows, "
                                       f"expected {rows}")
    apply_qalora(model, cfg, specs=got, _init_weights=False)
    try:
        for name, layer in qalora_layers(model).items():
            layer.load_merged(tensors[f"{name}.weight_int"], tensors[f"{name}.weight_scale"], tensors.get(f"{name}.bias"))
            if layer.a_quant is not None:
                layer.a_quant.set_table(tensors[f"{name}.act_scale"].float(), tensors[f"{name}.act_zero_point"].float())
        st = qalora_state(model)
        st.ctx.keys = keys_t if cfg.per_timestep_act else []
        st.ctx.calibrated = True
        st.extra["loaded_from"] = str(path)
    except BaseException:
        remove_qalora(model)
        raise
    return pipe_or_model
