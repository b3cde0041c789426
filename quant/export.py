"""Mobile / portable export of a diffusers denoiser: an ExecuTorch ``.pte`` (XNNPACK) and ONNX (QDQ int8, ``.ort``).

Both exporters take **one real denoiser call** of the pipeline as the fixed example inputs (latents,
timestep, text context and pooled text embedding: the CFG batch, 2 for one prompt; captured with
:func:`quant.deploy.capture_denoiser_inputs`), export the denoiser alone (the scheduler loop, the text
encoders and the VAE stay in host code, as in mobile diffusion apps), run the artifact back through its
Python runtime and compare it with the PyTorch denoiser on the same inputs (max abs / relative error,
latency per call). The result is an :class:`ExportReport`.

* :func:`export_executorch`: ``torch.export`` → torchao ``IntxUnpackedToInt8Tensor`` weights on the
  Linear layers (**8-bit dynamic per-token activations with 8-bit per-channel or 4-bit per-group
  weights**, "8da8w"/"8da4w"; a QALoRA/PTQ model exports its own integer weights and learned per-channel
  scales) → ``to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` → ``.pte``. **Norms:**
  XNNPACK takes no ``native_layer_norm``/``native_group_norm`` (nor the ``mean`` of an RMSNorm); they
  stay in ExecuTorch's portable CPU kernels between the XNNPACK segments (the report lists every op
  that was not delegated, and how many delegate segments there are). Every non-delegated op is checked
  against the operators the runtime registers; one without a kernel is an error naming the op and the
  layer (module path and class) it comes from. Attention is traced as explicit ``softmax(q kᵀ) v`` so
  XNNPACK takes it whole (torch's decomposed "safe softmax" leaves mask ops on the full attention
  matrix in the portable kernels: 4.6x slower at 1024 tokens).
* :func:`export_onnx`: ``torch.onnx.export`` (dynamo exporter) → optional onnxruntime quantization
  (``"static"``: QDQ int8, per-channel int8 weights and uint8 activations calibrated on the pipeline's own
  denoiser calls; ``"dynamic"``: int8 weights, activation ranges per call) → optional ``.ort`` (the ONNX
  Runtime Mobile format) → ``onnxruntime.InferenceSession`` check.

Export failures name the layer that was being traced (``torch.export`` runs the modules' Python; a
hook stack records where it was). ExecuTorch and ONNX need the ``mobile`` extra
(``pip install 'fastgen[mobile]'``; ExecuTorch also needs torchao, which it pins).
"""

from __future__ import annotations

import ast
import copy
import os
import statistics
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from fastgen.errors import UnsupportedPipelineError, require_extra
from fastgen.utils.logging import get_logger

from .apply import plan_layers, qalora_state, remove_qalora
from .common import get_denoiser
from .config import QALoRAConfig

logger = get_logger(__name__)

__all__ = ["ExportReport", "ExportError", "export_executorch", "export_onnx", "DenoiserExportWrapper", "float_copy",
           "load_program", "output_errors", "run_program", "split_inputs", "write_pte"]


class ExportError(UnsupportedPipelineError):
    """The denoiser (one of its layers or ops) cannot be exported to / run on the target; the message names it."""


@dataclass
class ExportReport:
    """What an export produced and how its runtime compares with PyTorch on the example inputs.

    ``max_abs_err``/``rel_err`` (``max |Δ| / max |y|``) are against the float32 PyTorch denoiser (for a
    QALoRA model: against its fake-quantized forward as well, ``rel_err_vs_quant_model``).
    ``runtime_ms``/``torch_ms``: median latency per denoiser call (same inputs, same thread count).
    """

    target: str
    path: str
    bytes: int
    quantization: str
    inputs: dict[str, list[int]]
    quantized_layers: int = 0
    delegated_ops: dict[str, int] = field(default_factory=dict)
    portable_ops: dict[str, int] = field(default_factory=dict)
    delegate_segments: int = 0
    max_abs_err: float | None = None
    rel_err: float | None = None
    rel_err_vs_quant_model: float | None = None
    runtime_ms: float | None = None
    torch_ms: float | None = None
    extra_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A few human-readable lines (the CLI prints these)."""
        lines = [f"{self.target}: wrote {self.path} ({self.bytes / 2**20:.2f} MB, {self.quantization}, "
                 f"{self.quantized_layers} quantized Linear layers)"]
        if self.delegate_segments:
            lines.append(f"  XNNPACK: {self.delegate_segments} delegate segments; not delegated (portable kernels): "
                         + (", ".join(f"{k} x{v}" for k, v in sorted(self.portable_ops.items())) or "none"))
        if self.rel_err is not None:
            s = f"  check vs PyTorch fp32: max abs err {self.max_abs_err:.3e}, rel err {self.rel_err:.3e}"
            if self.rel_err_vs_quant_model is not None:
                s += f" (vs the quantized PyTorch model: rel {self.rel_err_vs_quant_model:.3e})"
            lines.append(s)
        if self.runtime_ms is not None:
            lines.append(f"  latency per denoiser call: runtime {self.runtime_ms:.2f} ms, PyTorch eager "
                         f"{self.torch_ms:.2f} ms ({torch.get_num_threads()} thread(s))")
        for f in self.extra_files:
            lines.append(f"  also wrote {f}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)


class DenoiserExportWrapper(nn.Module):
    """The denoiser as a function of positional tensors (the exported program's inputs, in ``names`` order),
    returning its output tensor; non-tensor keyword arguments of the example call are fixed."""

    def __init__(self, model: nn.Module, names: list[str], fixed: dict[str, Any]):
        super().__init__()
        self.model = model
        self.names = list(names)
        self.fixed = dict(fixed)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, tensors)), **self.fixed)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif hasattr(out, "sample"):
            out = out.sample
        return out


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _example(pipe, inputs: dict[str, Any] | None, call_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    from .deploy import capture_denoiser_inputs

    if inputs is None:
        inputs = capture_denoiser_inputs(pipe, call_kwargs, index=1, steps=4)
    inputs = dict(inputs)
    inputs["return_dict"] = False
    return inputs


def split_inputs(inputs: dict[str, Any]) -> tuple[list[str], tuple[torch.Tensor, ...], dict[str, Any]]:
    """Split a denoiser call's keyword arguments into ``(tensor names, tensors, constants)``: the tensors are the
    exported program's inputs, the constants are baked into it. An :class:`ExportError` names arguments that are
    neither."""
    names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    fixed = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
    bad = [k for k, v in fixed.items() if v is not None and not isinstance(v, (bool, int, float, str))]
    if bad:
        raise ExportError(f"denoiser arguments {bad} are neither tensors nor constants; export the denoiser with "
                          "tensor inputs only")
    return names, tuple(inputs[k] for k in names), fixed


def float_copy(pipe) -> tuple[nn.Module, nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor, int]]]:
    """``(original denoiser, float copy, QALoRA integer Linear weights by layer name)``: the copy has every
    QALoRA wrapper replaced by its original module (the export's float graph)."""
    from .deploy import is_int8

    model = get_denoiser(pipe)
    if is_int8(model):
        raise ExportError("the denoiser holds real int8 kernels (quant.to_int8): call quant.remove_int8(pipe) first; "
                          "export quantizes the float or QALoRA model itself")
    ints: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    st = qalora_state(model)
    if st is not None:
        for name, (_, _, layer) in st.layers.items():
            if layer.spec.kind == "linear":
                w_int, scale = layer.int_repr()
                ints[name] = (w_int.cpu(), scale.cpu(), layer.spec.w_bits)
    m = copy.deepcopy(model)
    if st is not None:
        remove_qalora(m)
    m.eval()
    return model, m, ints


@contextmanager
def _layer_trace(model: nn.Module) -> Iterator[list[tuple[str, nn.Module]]]:
    """Record the stack of modules being executed (so an export error can name its layer)."""
    stack: list[tuple[str, nn.Module]] = []
    last: list[tuple[str, nn.Module]] = []
    handles = []
    for name, m in model.named_modules():
        def pre(mod, args, name=name):
            stack.append((name, mod))
            last[:] = list(stack)

        def post(mod, args, out):
            if stack:
                stack.pop()

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        yield last
    finally:
        for h in handles:
            h.remove()


def _where(trace: list[tuple[str, nn.Module]], prefix: str = "model.") -> str:
    for name, mod in reversed(trace):
        if name and name != "model":
            return f"layer {name.removeprefix(prefix)!r} ({type(mod).__name__})"
    return "the denoiser's top level"


def _layer_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "an unknown layer"
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    path = str(path)
    for p in ("L['self'].model.", "L__self___model_", "model."):
        path = path.removeprefix(p)
    return f"layer {path!r} ({cls_name.rsplit('.', 1)[-1]})"


@contextmanager
def _explicit_attention() -> Iterator[None]:
    """Trace ``F.scaled_dot_product_attention`` as ``softmax(q kᵀ · scale + mask) v`` (bmm + softmax, which
    XNNPACK takes). The exported SDPA otherwise decomposes into torch's "safe softmax" whose
    ``eq/any/logical_not/where`` over the full attention matrix XNNPACK cannot take: they ran in slow
    portable kernels (a 4.6x slower tiny-sd3 program at 1024 tokens). Same values except for fully masked
    rows (NaN here, 0 in torch), which diffusion denoisers do not have."""
    import torch.nn.functional as F

    orig = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p or is_causal or enable_gqa or query.shape[-3] != key.shape[-3]:
            return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        s = query.shape[-1] ** -0.5 if scale is None else scale
        w = torch.matmul(query, key.transpose(-2, -1)) * s
        if attn_mask is not None:
            w = w.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else w + attn_mask
        return torch.matmul(torch.softmax(w, dim=-1), value)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


def _export(wrapper: nn.Module, args: tuple[torch.Tensor, ...], what: str):
    with _layer_trace(wrapper) as trace:
        try:
            return torch.export.export(wrapper, args, strict=False)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{what}: torch.export failed in {_where(trace)}: {type(e).__name__}: {first}") from e


def _paired_ms(runtime_fn, torch_fn, repeats: int) -> tuple[float, float]:
    """Median ms per call of the runtime and of PyTorch, timed interleaved (A B A B ...) after a warm call."""
    runtime_fn()
    torch_fn()
    ts: tuple[list[float], list[float]] = ([], [])
    for _ in range(max(1, repeats)):
        for i, fn in enumerate((runtime_fn, torch_fn)):
            t0 = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t0)
    return statistics.median(ts[0]) * 1e3, statistics.median(ts[1]) * 1e3


_POOL = {"loaded": False, "warned": False}


def match_runtime_threads() -> int:
    """Size ExecuTorch's threadpool to torch's thread count (it defaults to every core), so runtime and PyTorch
    timings compare at equal threads; returns the runtime's thread count.

    Resizing the pool under an XNNPACK program that is already loaded crashes the process, so this resizes
    only before this process loads its first program (call it right before loading) and otherwise leaves
    the pool as it is, with one warning when the counts differ."""
    n = torch.get_num_threads()
    try:
        from executorch.extension.pybindings import portable_lib
    except ImportError:
        return n
    have = portable_lib._threadpool_get_thread_count()
    if have != n:
        if not _POOL["loaded"]:
            portable_lib._unsafe_reset_threadpool(n)
            have = n
        elif not _POOL["warned"]:
            _POOL["warned"] = True
            logger.warning("ExecuTorch runs on %d threads, torch on %d: the runtime's pool cannot be resized once a "
                           "program is loaded; set torch's threads before the first export", have, n)
    return have


def load_program(path):
    """``forward`` of the program at ``path``, loaded through ``executorch.runtime`` at torch's thread count."""
    from executorch.runtime import Runtime

    match_runtime_threads()
    _POOL["loaded"] = True
    return Runtime.get().load_program(path).load_method("forward")


def run_program(method, args: tuple[torch.Tensor, ...], path) -> torch.Tensor:
    """The first output of the loaded program ``method`` on ``args``; an :class:`ExportError` naming ``path`` if
    the runtime cannot run it."""
    try:
        return method.execute(list(args))[0]
    except Exception as e:
        raise ExportError(f"{path}: executorch.runtime could not run the program: {e}") from e


def output_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(max abs error, max abs error / max abs of ref)`` of an exported/integer model's output ``out`` against
    the PyTorch reference ``ref``; an :class:`ExportError` if the shapes differ or ``out`` is not finite."""
    out, ref = out.detach().float(), ref.detach().float()
    if out.shape != ref.shape:
        raise ExportError(f"the exported program returned shape {tuple(out.shape)}, PyTorch {tuple(ref.shape)}")
    err = (out - ref).abs().max().item()
    if not torch.isfinite(out).all():
        raise ExportError("the exported program returned NaN/inf on the example inputs")
    return err, err / max(ref.abs().max().item(), 1e-12)


def _linear_plan(model: nn.Module) -> dict[str, Any]:
    """Linear layers quantized on export: QALoRA's default plan (embeddings, time/text projections and
    modulation layers stay float)."""
    plan, _ = plan_layers(model, QALoRAConfig(w_bits=8, a_bits=8, rank=0, eight_bit=()))
    return {n: s for n, s in plan.items() if s.kind == "linear"}


# --------------------------------------------------------------------------------------------------
# ExecuTorch
# --------------------------------------------------------------------------------------------------


def _quantize_for_xnnpack(model: nn.Module, bits: int, ints: dict[str, tuple[torch.Tensor, torch.Tensor, int]],
                          group: int, notes: list[str]) -> int:
    """Put torchao ``IntxUnpackedToInt8Tensor`` weights (8-bit dynamic per-token activations) on the planned
    Linear layers of ``model`` (in place); QALoRA layers keep their integer weights and per-channel scales."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup, quantize_
    from torchao.quantization.quantize_.workflows import IntxUnpackedToInt8Tensor

    plan = _linear_plan(model)
    modules = dict(model.named_modules())
    n = 0
    mixed = False
    for name in plan:
        lin = modules[name]
        if name in ints:
            w_int, scale, w_bits = ints[name]
            mixed |= w_bits != bits
            target = torch.int4 if w_bits <= 4 else torch.int8
            t = IntxUnpackedToInt8Tensor(w_int.contiguous(), scale.float().view(-1, 1).contiguous(),
                                         torch.zeros(w_int.shape[0], 1, dtype=torch.int8), target,
                                         (1, w_int.shape[1]), torch.float32, "int8_asym_per_token")
            lin.weight = nn.Parameter(t, requires_grad=False)
        else:
            k = lin.in_features
            gran = PerAxis(0) if bits == 8 or k % group else PerGroup(group)
            if bits == 4 and k % group:
                notes.append(f"{name}: in_features {k} is not a multiple of {group}; 4-bit per-channel instead")
            quantize_(lin, Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int8 if bits == 8 else torch.int4, weight_granularity=gran),
                filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
        n += 1
    if ints:
        notes.append("Linear weights are the QALoRA/PTQ model's integers with its learned per-channel scales"
                     + (" (its own bit width, not --bits)" if mixed else "")
                     + "; activations are dynamic per-token int8 (XNNPACK has no per-timestep static tables)")
    return n


def _lowering_error(e: Exception, ep) -> str:
    """Name the op (and the layer it comes from) a lowering error is about, when the message names one."""
    import re

    text = str(e)
    m = re.search(r"aten\.(\w+)\.(\w+)", text)
    if m:
        why = "it is not in the Core ATen op set ExecuTorch lowers" if "Core ATen" in text else type(e).__name__
        return f"aten::{m.group(1)}{_op_layers(m.group(1), ep)}: {why}; replace that layer (or keep it out of the " \
               "exported denoiser)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}"


def _op_layers(op: str, ep) -> str:
    """`` (from layer 'a.b' (Cls), ...)`` for the graph nodes of ``ep`` whose op matches ``op`` (names compared
    without underscores, so a decomposed ``prims.erf_inv`` finds ``aten.special_erfinv``); empty if none."""
    def norm(name: str) -> str:
        parts = name.split(".")  # "aten.special_erfinv.default" -> "specialerfinv"
        return (parts[-2] if len(parts) >= 3 else parts[-1]).replace("_", "").lower()

    key = op.rsplit(".", 1)[-1].replace("_", "").lower()
    layers = sorted({_layer_of(n) for n in ep.graph.nodes if n.op == "call_function" and key in norm(str(n.target))})
    return f" (from {', '.join(layers[:3])})" if layers else ""


def _runtime_ops() -> set[str]:
    from executorch.extension.pybindings import portable_lib

    return {n.split(".")[0] for n in portable_lib._get_operator_names()}


def _op_name(target) -> str:
    s = getattr(target, "_name", None) or getattr(getattr(target, "_op", None), "_name", None) or str(target)
    if "::" not in s and s.startswith("aten."):
        s = "aten::" + s.split(".")[1]
    return s.split(".")[0]


def write_pte(model: nn.Module, ints: dict[str, tuple[torch.Tensor, torch.Tensor, int]], bits: int, group_size: int,
              names: list[str], args: tuple[torch.Tensor, ...], fixed: dict[str, Any], out: Path, what: str,
              notes: list[str]) -> tuple[int, int, Counter, Counter]:
    """Quantize the float denoiser ``model`` (in place), export it with ``args`` as the fixed example inputs, lower
    it to XNNPACK and write ``out`` atomically. Returns ``(quantized layers, delegate segments, delegated ops,
    portable ops)``; raises :class:`ExportError` naming the layer/op that cannot be exported or run."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    nq = _quantize_for_xnnpack(model, bits, ints, group_size, notes) if bits else 0
    if not bits and ints:
        notes.append("bits=0: exported the float weights of the QALoRA model's original layers")
    wrapper = DenoiserExportWrapper(model, names, fixed).eval()
    with _explicit_attention():
        ep = _export(wrapper, args, what)
    try:
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    except Exception as e:
        raise ExportError(f"{what}: lowering to XNNPACK failed: {_lowering_error(e, ep)}") from e
    gm = edge.exported_program().graph_module
    portable: Counter = Counter()
    segments = 0
    known = _runtime_ops()
    missing: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if "call_delegate" in str(node.target):
            segments += 1
            continue
        if node.target.__class__.__name__ == "builtin_function_or_method" or "getitem" in str(node.target):
            continue
        op = _op_name(node.target)
        portable[op] += 1
        if op not in known and op.split("::")[0] in ("aten", "dim_order_ops", "quantized_decomposed", "torchao"):
            missing.append(f"{op} (from {_layer_of(node)})")
    delegated: Counter = Counter()
    for _, sub in gm.named_children():
        if hasattr(sub, "processed_bytes") or sub.__class__.__name__ == "LoweredBackendModule":
            for node in sub.original_module.graph.nodes if hasattr(sub, "original_module") else []:
                if node.op == "call_function":
                    delegated[_op_name(node.target)] += 1
    if missing:
        raise ExportError(f"{what}: ops with no ExecuTorch kernel and not taken by XNNPACK: " + "; ".join(missing[:8])
                          + ". Replace those layers (or keep them out of the exported denoiser)")
    prog = edge.to_executorch()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        prog.write_to_file(f)
    os.replace(tmp, out)
    return nq, segments, delegated, portable


def export_executorch(pipe, out: str | os.PathLike, bits: int = 8, *, inputs: dict[str, Any] | None = None,
                      call_kwargs: dict[str, Any] | None = None, group_size: int = 32, check: bool = True,
                      repeats: int = 5) -> ExportReport:
    """Write ``pipe``'s denoiser as an ExecuTorch program (XNNPACK) and check it (see the module docstring).

    Args:
        pipe: a diffusers pipeline (or a denoiser with ``inputs``); a QALoRA/PTQ-quantized one exports its
            integer Linear weights.
        out: the ``.pte`` path.
        bits: weight bits of the quantized Linear layers: 8 (per channel) or 4 (per group of
            ``group_size``), with 8-bit dynamic activations; 0 exports float32 (XNNPACK fp32).
        inputs: example denoiser keyword arguments (default: captured from a short call of ``pipe`` with
            ``call_kwargs``). The program has these fixed shapes.
        check: run the ``.pte`` through ``executorch.runtime`` and compare with PyTorch.
        repeats: timed runtime / PyTorch calls for the latency medians.

    Raises:
        MissingExtraError: executorch or torchao not installed (``pip install 'fastgen[mobile]'``).
        ExportError: a layer that cannot be traced or an op without an ExecuTorch kernel (named).
    """
    if bits not in (0, 4, 8):
        raise ValueError(f"bits must be 8, 4 (weights; activations are dynamic int8) or 0 (float32), got {bits!r}")
    require_extra("executorch", "mobile", "ExecuTorch export")
    from .deploy import require_torchao

    require_torchao()
    inputs = _example(pipe, inputs, call_kwargs)
    names, args, fixed = split_inputs(inputs)
    original, model, ints = float_copy(pipe)
    notes: list[str] = []
    with torch.no_grad():
        ref_quant = original(**inputs)[0] if ints else None
        ref = model(**inputs)[0]
    out = Path(out)
    nq, segments, delegated, portable = write_pte(model, ints, bits, group_size, names, args, fixed, out,
                                                   f"ExecuTorch export of {type(original).__name__}", notes)
    norm_ops = sorted(o for o in portable if "norm" in o or o.endswith("::mean"))
    if norm_ops:
        notes.append(f"norms run in ExecuTorch's portable kernels, not XNNPACK: {', '.join(norm_ops)}")
    rep = ExportReport(
        target="executorch", path=str(out), bytes=out.stat().st_size,
        quantization=(f"8-bit dynamic activations, {bits}-bit weights" if bits else "float32"),
        inputs={k: list(v.shape) for k, v in zip(names, args)}, quantized_layers=nq,
        delegated_ops=dict(delegated), portable_ops=dict(portable), delegate_segments=segments, notes=notes)
    if check:
        method = load_program(out)
        got = run_program(method, args, out)
        rep.max_abs_err, rep.rel_err = output_errors(got, ref)
        if ref_quant is not None:
            rep.rel_err_vs_quant_model = output_errors(got, ref_quant)[1]
        with torch.no_grad():
            rep.runtime_ms, rep.torch_ms = _paired_ms(lambda: method.execute(list(args)), lambda: original(**inputs),
                                                      repeats)
    logger.info("%s", rep.format())
    return rep


# --------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------


def _onnx_exclude(onnx_model, model: nn.Module) -> tuple[list[str], int]:
    """``(names of MatMul/Gemm nodes to keep float, number of nodes to quantize)``: only the Linear layers of
    the plan are quantized (found through the exporter's module-scope metadata); attention matmuls and
    layers kept in float (embeddings, modulation) are excluded, as in :func:`quant.to_int8`."""
    plan = set(_linear_plan(model))
    exclude, n = [], 0
    for node in onnx_model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            scopes = []
        if any(str(sc).removeprefix("model.") in plan for sc in scopes):
            n += 1
        else:
            exclude.append(node.name)
    return exclude, n


def export_onnx(pipe, out: str | os.PathLike, qdq_int8: bool = True, *, mode: str = "static", ort: bool = False,
                inputs: dict[str, Any] | None = None, call_kwargs: dict[str, Any] | None = None,
                calibration: list[dict[str, Any]] | None = None, check: bool = True, repeats: int = 5,
                opset: int | None = None) -> ExportReport:
    """Write ``pipe``'s denoiser as ONNX, optionally int8-quantized, and check it with onnxruntime.

    Args:
        pipe: a diffusers pipeline (or a denoiser with ``inputs``). A QALoRA model is exported as its
            float original (onnxruntime re-quantizes it; the QALoRA tables do not carry over).
        out: the ``.onnx`` path (the float model is written beside it as ``*.fp32.onnx`` when quantizing).
        qdq_int8: quantize with onnxruntime (default True).
        mode: ``"static"`` (QDQ int8: per-channel int8 weights, uint8 activations calibrated on the
            pipeline's own denoiser calls) or ``"dynamic"`` (int8 weights; activation ranges per call).
        ort: also write ``.ort`` (ONNX Runtime Mobile format) beside ``out``.
        inputs: example denoiser keyword arguments (default: captured from a short call of ``pipe``).
        calibration: denoiser call kwargs for static calibration (default: every call of a 4-step run).
        check, repeats: compare with PyTorch through ``onnxruntime.InferenceSession``; latency medians.
    """
    if mode not in ("static", "dynamic"):
        raise ValueError(f"mode must be 'static' or 'dynamic', got {mode!r}")
    require_extra("onnx", "mobile", "ONNX export")
    require_extra("onnxscript", "mobile", "ONNX export (torch's dynamo exporter)")
    ortm = require_extra("onnxruntime", "mobile", "ONNX Runtime")
    import numpy as np
    import onnx

    inputs = _example(pipe, inputs, call_kwargs)
    names, args, fixed = split_inputs(inputs)
    original, model, ints = float_copy(pipe)
    notes: list[str] = []
    if ints:
        notes.append("QALoRA model: exported its float original; onnxruntime re-quantizes it (the learned tables do "
                     "not carry over to ONNX QDQ)")
    with torch.no_grad():
        ref = model(**inputs)[0]
        ref_quant = original(**inputs)[0] if ints else None
    wrapper = DenoiserExportWrapper(model, names, fixed).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fp_path = out.with_name(out.stem + ".fp32.onnx") if qdq_int8 else out
    what = f"ONNX export of {type(original).__name__}"
    import io
    import contextlib as _cl

    ep = _export(wrapper, args, what)
    log = io.StringIO()
    try:
        with _cl.redirect_stdout(log):
            kw: dict[str, Any] = dict(dynamo=True, input_names=names, output_names=["out"], external_data=False)
            if opset:
                kw["opset_version"] = opset
            torch.onnx.export(ep, args, str(fp_path), **kw)
    except Exception as e:
        import re

        text = str(e)
        m = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)'", text) or \
            re.search(r"target=torch\.ops\.([\w.]+)\.default", text)
        if m:
            raise ExportError(f"{what}: op {m.group(1)}{_op_layers(m.group(1).split('.')[-1], ep)} has no ONNX "
                              "translation; replace that layer (or keep it out of the exported denoiser)") from e
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
        raise ExportError(f"{what} failed: {type(e).__name__}: {first}") from e
    path = fp_path
    nq = 0
    if qdq_int8:
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                              quantize_static)

        fp_model = onnx.load(str(fp_path))
        exclude, nq = _onnx_exclude(fp_model, model)
        # the exporter's value_info can disagree with onnx's own shape inference (the quantizer re-runs it)
        del fp_model.graph.value_info[:]
        onnx.save(fp_model, str(fp_path))
        if mode == "static":
            if calibration is None:
                from .deploy import capture_denoiser_calls

                calibration = [inputs] if pipe is original else capture_denoiser_calls(pipe, call_kwargs, steps=4)
            feeds = [{k: c[k].detach().cpu().numpy() for k in names} for c in calibration]

            class _Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = iter(feeds)

                def get_next(self):
                    return next(self.it, None)

            quantize_static(str(fp_path), str(out), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=exclude)
            quant_desc = f"QDQ int8 static (per-channel int8 weights, uint8 activations, {len(feeds)} calibration calls)"
        else:
            quantize_dynamic(str(fp_path), str(out), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=exclude)
            quant_desc = "int8 dynamic (int8 weights, activation ranges per call)"
        path = out
    else:
        quant_desc = "float32"
    extra = [str(fp_path)] if qdq_int8 else []
    qmodel = onnx.load(str(path))
    ops = Counter(n.op_type for n in qmodel.graph.node)
    rep = ExportReport(target="onnx", path=str(path), bytes=path.stat().st_size, quantization=quant_desc,
                       inputs={k: list(v.shape) for k, v in zip(names, args)}, quantized_layers=nq,
                       portable_ops=dict(ops), extra_files=extra, notes=notes)
    so = ortm.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.log_severity_level = 3
    if ort:
        import subprocess
        import sys

        res = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(path),
                              "--output_dir", str(path.parent)], capture_output=True, text=True)
        ort_path = path.with_suffix(".ort")
        if res.returncode != 0 or not ort_path.exists():
            raise ExportError(f"converting {path} to .ort failed: {(res.stderr or res.stdout).strip()[-500:]}")
        rep.extra_files.append(str(ort_path))
    if check:
        try:
            sess = ortm.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ExportError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from e
        feeds = {k: v.detach().cpu().numpy() for k, v in zip(names, args)}
        got = torch.from_numpy(np.asarray(sess.run(None, feeds)[0]))
        rep.max_abs_err, rep.rel_err = output_errors(got, ref)
        if ref_quant is not None:
            rep.rel_err_vs_quant_model = output_errors(got, ref_quant)[1]
        with torch.no_grad():
            rep.runtime_ms, rep.torch_ms = _paired_ms(lambda: sess.run(None, feeds), lambda: original(**inputs),
                                                      repeats)
        if ort:
            sess_ort = ortm.InferenceSession(str(path.with_suffix(".ort")), so, providers=["CPUExecutionProvider"])
            got2 = torch.from_numpy(np.asarray(sess_ort.run(None, feeds)[0]))
            rep.notes.append(f".ort runs: rel err vs PyTorch {output_errors(got2, ref)[1]:.3e}")
    logger.info("%s", rep.format())
    return rep
