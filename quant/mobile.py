"""The ``executorch`` recipe: run a pipeline's denoiser as an ExecuTorch (XNNPACK) program, the way a phone would.

This is the app's and the benchmark's **mobile target** on this machine: the scheduler loop, text encoders and
VAE stay in PyTorch (as in mobile diffusion apps), and every denoiser call goes through
``executorch.runtime`` running the ``.pte`` that :mod:`quant.export` writes (8-bit dynamic activations with
8- or 4-bit weights on the Linear layers, or float32; XNNPACK delegate, norms in portable kernels). Latency
measured here is the runtime's on this CPU, not a phone's; the program is the one a phone would load.

How: a diffusers ``ModelHook`` whose ``new_forward`` replaces the denoiser's computation and sits
*under* every other hook on it (so ``cfg-interval``'s half batch and ``gd``'s student inputs reach it).
The program is exported for **one sample** (batch 1) and a call's batch (the CFG batch, 2 for one prompt)
runs sample by sample, so any batch size and guidance on/off work with one program. A program is built
lazily on the first call with a new input signature (latent size, text length, dtypes) from a float copy
of the denoiser taken when the recipe is applied, and cached for the pipeline's lifetime under the
recipe and across re-applications while the denoiser's weights are unchanged (about 10-60 s per signature for
the default models; the benchmark's untimed quality pass pays it).

Stacks with techniques that work around the denoiser (``steps``, ``sampler``, ``schedule``, ``cfg-interval``, ``gd``;
``qalora`` exports its own integer weights and learned per-channel scales). Techniques that patch inside
the denoiser (block/step caches, ToMe, RAS, real int8 kernels) cannot run inside a fixed exported graph
and are refused with that reason. Needs the ``mobile`` extra (``pip install 'fastgen[mobile]'``).

>>> fastgen.accelerate(pipe, "sampler:unipc@14+executorch:w8")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
import tempfile
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fastgen.errors import FastgenError, RecipeError, require_extra
from fastgen.api import apply_technique, handle_of, remove_technique
from fastgen.hooks import HookBase, add_hook, remove_hook
from fastgen.adapters import DIFFUSION_FAMILIES
from fastgen.registry import Technique, register_technique
from fastgen.utils.logging import get_logger

from .export import float_copy, load_program, output_errors, run_program, split_inputs, write_pte
from .qalora import get_denoiser

logger = get_logger(__name__)

__all__ = ["ExecuTorchConfig", "apply_executorch", "remove_executorch", "executorch_summary"]

_NAME = "executorch"
_HOOK = "fastgen_executorch"
#: Techniques that act around the denoiser and so still run with it as an exported program.
STACKS_WITH = ("steps", "sampler", "schedule", "cfg-interval", "gd", "qalora")


@dataclass(frozen=True)
class ExecuTorchConfig:
    """Which program the denoiser is exported to.

    Attributes:
        bits: Linear weight bits with 8-bit dynamic per-token activations: 8 (default; per channel, the
            usual phone deployment, ~4x smaller weights, error ~3% of the output range on the default
            MMDiT), 4 (per group of ``group_size``; ~8x smaller, more error) or 0 (float32 XNNPACK: the
            float baseline on the same runtime). A QALoRA/PTQ-quantized pipeline exports its own
            integer weights whatever ``bits`` says (except 0).
        group_size: group of the 4-bit weights (default 32; 16-128). Layers whose input width is not a
            multiple fall back to per-channel.
    """

    bits: int = 8
    group_size: int = 32

    def __post_init__(self):
        if self.bits not in (0, 4, 8):
            raise ValueError(f"ExecuTorchConfig.bits must be 8, 4 (int weights, int8 dynamic activations) or 0 "
                             f"(float32), got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"ExecuTorchConfig.group_size must be a positive integer, got {self.group_size!r}")

    def to_string(self) -> str:
        return _NAME + ("" if self == ExecuTorchConfig() else ":" + ("fp32" if self.bits == 0 else f"w{self.bits}")
                        + ("" if self.group_size == 32 else f",g{self.group_size}"))


def _parse(arg: str | None) -> ExecuTorchConfig:
    """``executorch``, ``executorch:w8``, ``executorch:w4[,g64]``, ``executorch:fp32``."""
    if arg is None or not arg.strip():
        return ExecuTorchConfig()
    bits, group = 8, 32
    for part in (p.strip().lower() for p in arg.split(",") if p.strip()):
        if part in ("fp32", "float", "float32", "w0"):
            bits = 0
        elif part in ("w8", "8", "w8a8", "8da8w"):
            bits = 8
        elif part in ("w4", "4", "w4a8", "8da4w"):
            bits = 4
        elif part.startswith("g") and part[1:].isdigit():
            group = int(part[1:])
        else:
            raise RecipeError(f"executorch: unknown option {part!r}; use w8 (default), w4, fp32 and optionally g<N> "
                              "(4-bit group size), e.g. 'executorch:w4,g32'")
    return ExecuTorchConfig(bits=bits, group_size=group)


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name (positional ones bound to the forward signature; ``**kwargs`` flattened)."""
    sig = inspect.signature(type(module).forward)
    bound = sig.bind(module, *args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif sig.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise FastgenError(f"{type(module).__name__}: extra positional arguments cannot be exported")
        else:
            out[name] = value
    return out


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A copy with ordinary strides (ExecuTorch rejects the 0-strides of ``t.expand(B)`` timesteps)."""
    return t.clone(memory_format=torch.contiguous_format) if 0 in t.stride() or not t.is_contiguous() else t


def _strip_hooks(model: nn.Module) -> None:
    """Take every diffusers hook off ``model`` and its submodules (a deep copy carries the original's)."""
    for m in model.modules():
        registry = m.__dict__.get("_diffusers_hook")
        if registry is None:
            continue
        for n in reversed(list(registry._hook_order)):  # outermost first
            remove_hook(m, n)
        m.__dict__.pop("_diffusers_hook", None)  # a registry diffusers created stays behind empty


@dataclass
class _Program:
    method: Any
    path: str
    seconds: float
    bytes: int
    quantized_layers: int
    portable_ops: dict[str, int]
    inputs: dict[str, list[int]]
    rel_err: float | None = None

    @property
    def info(self) -> dict[str, Any]:
        """What :func:`executorch_summary` reports of this program."""
        return {"inputs": self.inputs, "path": self.path, "mb": round(self.bytes / 2**20, 3),
                "export_s": round(self.seconds, 1), "quantized_layers": self.quantized_layers, "rel_err": self.rel_err}


@dataclass
class _Stats:
    calls: int = 0
    samples: int = 0
    runtime_s: float = 0.0


class _ExecuTorchHook(HookBase):
    """Replaces the denoiser's computation with ExecuTorch programs (one per input signature, batch 1)."""

    fastgen_inner = True

    def __init__(self, config: ExecuTorchConfig, float_model: nn.Module, ints: dict, workdir: str, owner: str,
                 programs: dict[tuple, _Program]):
        super().__init__()
        self.config, self.float_model, self.ints, self.workdir, self.owner = config, float_model, ints, workdir, owner
        self.programs = programs  # shared with _CACHE: a re-applied recipe reuses its programs
        self.stats = _Stats()

    def _signature(self, tensors: dict[str, torch.Tensor], fixed: dict[str, Any]) -> tuple:
        return (tuple((k, tuple(v.shape), str(v.dtype)) for k, v in tensors.items()),
                tuple(sorted((k, repr(v)) for k, v in fixed.items())))

    def _build(self, key: tuple, sample: dict[str, Any]) -> _Program:
        names, args, fixed = split_inputs(sample)
        out = Path(self.workdir) / f"denoiser-{len(self.programs)}.pte"
        notes: list[str] = []
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in zip(names, args))
        logger.info("executorch: exporting %s for one sample (%s) ...", self.owner, shapes)
        t0 = time.perf_counter()
        model = copy.deepcopy(self.float_model)
        with torch.no_grad():
            ref = model(**sample)[0]
        with warnings.catch_warnings():  # torch.export's pytree deprecation notices, once per traced leaf
            warnings.simplefilter("ignore", FutureWarning)
            nq, _, _, portable = write_pte(model, self.ints, self.config.bits, self.config.group_size, names, args,
                                           fixed, out, f"ExecuTorch export of {self.owner}", notes)
        method = load_program(out)
        prog = _Program(method=method, path=str(out), seconds=time.perf_counter() - t0, bytes=out.stat().st_size,
                        quantized_layers=nq, portable_ops=dict(portable),
                        inputs={k: list(v.shape) for k, v in zip(names, args)})
        prog.rel_err = output_errors(run_program(method, args, out), ref)[1]
        logger.info("executorch: wrote %s (%.2f MB, %d quantized Linear layers) in %.1fs; rel err vs PyTorch %.2e",
                    out, prog.bytes / 2**20, nq, prog.seconds, prog.rel_err)
        self.programs[key] = prog
        return prog

    def new_forward(self, module, *args, **kwargs):
        inputs = _bind(module, args, kwargs)
        return_dict = inputs.pop("return_dict", True)
        inputs["return_dict"] = False
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        fixed = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
        if not tensors:
            raise FastgenError(f"{self.owner}: the denoiser was called without tensor inputs")
        first = next(iter(tensors.values()))
        batch = first.shape[0]
        per = [k for k, v in tensors.items() if v.ndim >= 1 and v.shape[0] == batch]
        sample0 = {k: _dense(v[:1] if k in per else v) for k, v in tensors.items()}
        key = self._signature(sample0, fixed)
        prog = self.programs.get(key) or self._build(key, {**fixed, **sample0})
        t0 = time.perf_counter()
        outs = []
        for i in range(batch):
            xs = [_dense(v[i:i + 1] if k in per else v) for k, v in tensors.items()]
            outs.append(prog.method.execute(xs)[0])
        self.stats.runtime_s += time.perf_counter() - t0
        self.stats.calls += 1
        self.stats.samples += batch
        out = torch.cat(outs).to(first.dtype)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)


#: Programs (and the float copy they are exported from) per denoiser state and config, kept across
#: apply/remove cycles: the benchmark applies a recipe before every timed round, and an export takes
#: tens of seconds. The key changes when the denoiser's parameters, structure or config do.
_CACHE: "OrderedDict[tuple, tuple[nn.Module, dict, dict, str]]" = OrderedDict()
_CACHE_SIZE = 4


def _fingerprint(model: nn.Module, config: ExecuTorchConfig) -> tuple:
    params = tuple((n, p.data_ptr(), p._version, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters())
    structure = tuple(type(m).__name__ for m in model.modules())
    return (id(model), config, params, structure)


def _check(pipe, adapter, config: ExecuTorchConfig) -> None:
    require_extra("executorch", "mobile", "the executorch recipe (mobile target)")
    from .deploy import require_torchao

    require_torchao()


def _install(pipe, st, config: ExecuTorchConfig) -> tuple:
    model = get_denoiser(pipe)
    key = _fingerprint(model, config)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        float_model, ints, programs, workdir = _CACHE[key]
    else:
        _, float_model, ints = float_copy(pipe)
        _strip_hooks(float_model)
        programs, workdir = {}, tempfile.mkdtemp(prefix="fastgen-executorch-")
        _CACHE[key] = (float_model, ints, programs, workdir)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    hook = _ExecuTorchHook(config, float_model, ints, workdir, type(model).__name__, programs)
    add_hook(model, hook, _HOOK)
    return model, hook


def _uninstall(pipe, st, handle: tuple) -> None:
    remove_hook(handle[0], _HOOK)


def apply_executorch(pipe, config: ExecuTorchConfig | None = None):
    """Run ``pipe``'s denoiser through ExecuTorch programs (see the module docstring); safe to call twice.

    Raises:
        MissingExtraError: executorch/torchao not installed (``pip install 'fastgen[mobile]'``).
        ExportError: (on the first call) a layer or op of the denoiser that cannot be exported, named.
    """
    return apply_technique(pipe, _NAME, config)


def remove_executorch(pipe):
    """Undo :func:`apply_executorch`: the denoiser's own forward again (its weights were never touched)."""
    return remove_technique(pipe, _NAME)


def executorch_summary(pipe) -> dict:
    """Programs built (inputs, size, export time, error vs PyTorch) and runtime calls so far."""
    handle = handle_of(pipe, _NAME)
    return {} if handle is None else _summary(pipe, handle)


def _summary(pipe, handle: tuple) -> dict:
    hook = handle[1]
    s = hook.stats
    return {"bits": hook.config.bits, "programs": [p.info for p in hook.programs.values()], "calls": s.calls,
            "samples": s.samples,
            "runtime_ms_per_sample": round(1e3 * s.runtime_s / s.samples, 3) if s.samples else None}


register_technique(Technique(
    families=DIFFUSION_FAMILIES,  # a diffusers denoiser; a next-scale AR model (var) is not one
    name=_NAME, config_cls=ExecuTorchConfig, parse=_parse, install=_install, uninstall=_uninstall, check=_check,
    to_string=lambda c: c.to_string(), summary=_summary,
    help="the mobile target: the denoiser runs as an ExecuTorch XNNPACK program (8-bit dynamic activations with "
         "8/4-bit weights, or fp32), one sample per call (needs the mobile extra)",
    example="executorch:w8",
    incompatible={"*": "the executorch recipe runs the denoiser as a fixed exported program; only techniques "
                       f"that act around the denoiser stack with it ({', '.join(STACKS_WITH)})"},
    stacks_with=STACKS_WITH, order=100,
))
