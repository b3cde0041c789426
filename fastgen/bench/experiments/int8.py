"""Per-denoiser-call latency of fp32 vs real int8 kernels (:func:`quant.to_int8`), measured in one process.

    fastgen experiment int8 --model shapes-mmdit --model bench-sd3 --threads 1

For each model: one real denoiser call's inputs are captured from the pipeline (batch 2: the CFG batch of
one prompt), then these variants of the same denoiser are timed **interleaved** (A B C A B C …, after
warm-up; compile time reported separately) and the medians and the median of the per-round paired ratios
are reported:

* ``fp32`` eager (the reference of every ratio and error), ``fp32+compile`` (the same regional
  ``torch.compile`` the int8 variants get: the honest baseline for "int8 with compile");
* ``int8 dynamic`` (``torch._int_mm``, eager and compiled), ``int8 dynamic torchao`` (compiled),
  ``int8 static`` (learned per-timestep scales of a PTQ-calibrated QALoRA W8A8 model, compiled).

Columns: median ms per call, speed-up vs fp32 eager and vs fp32+compile, max abs / relative error vs fp32
(relative: max |Δ| / max |y|), weight memory of the module as its forward uses it (MB; int8 part), compile
seconds. Zoo models use their trained weights when installed, else the untrained architecture (speed is
the same; errors are then those of random weights with a randomized adaLN).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

from fastgen.utils.commands import CommandParser

__all__ = ["build", "bench_model", "main"]


def _perturb_adaln(model: torch.nn.Module, seed: int = 1) -> None:
    """Untrained zoo MMDiTs start adaLN-zero (output 0): give them a random output so errors mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "proj_out" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def build(name: str) -> tuple[Any, dict[str, Any], str]:
    """``(pipeline, call kwargs for capture, description)`` for a model name."""
    from fastgen import zoo
    from fastgen.testing import bench_resolution

    if name in zoo.list():
        kw = zoo.call_kwargs(name)
        prompt = "a red circle left of a blue square"
        if (zoo.weights_path(name) / "model_index.json").exists():
            pipe, what = zoo.load_default(name), f"{name} (trained weights)"
        else:
            from fastgen.zoo.builders import build_pipeline

            pipe, what = build_pipeline(name), f"{name} (untrained architecture, random adaLN)"
            _perturb_adaln(pipe.transformer if hasattr(pipe, "transformer") else pipe.unet)
        kw.update(prompt=prompt, num_inference_steps=4)
        return pipe, kw, what
    if name.startswith(("bench-", "tiny-")):
        from fastgen.testing import tiny_pipeline

        size, kind = name.split("-", 1)
        pipe = tiny_pipeline(kind, size=size)
        kw: dict[str, Any] = {"prompt": "a red circle", "num_inference_steps": 4, "guidance_scale": 5.0}
        if size == "bench":
            kw["height"], kw["width"] = bench_resolution(kind, 1024)
        return pipe, kw, f"{name} (random weights{', 1024 image tokens' if size == 'bench' else ''})"
    raise SystemExit(f"unknown model {name!r}: use a zoo name (shapes-mmdit), bench-<kind> or tiny-<kind>")


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_model(name: str, *, repeats: int = 15, warmup: int = 2, variants: list[str] | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time the variants on ``name``; returns ``{"model", "tokens", "rows": [...]}``."""
    from fastgen import quant
    from fastgen.quant.deploy import capture_denoiser_inputs, to_int8, weight_memory

    pipe, kw, what = build(name)
    den = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    den.eval()
    inputs = capture_denoiser_inputs(pipe, kw, index=1, steps=kw["num_inference_steps"])
    shapes = {k: tuple(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    n_params = sum(p.numel() for p in den.parameters())
    log(f"# {what}: {n_params / 1e6:.2f} M params, denoiser inputs {shapes}")
    variants = variants or ["fp32", "fp32+compile", "int8 dynamic (eager)", "int8 dynamic", "int8 dynamic torchao",
                            "int8 static"]
    models: dict[str, torch.nn.Module] = {}
    compile_s: dict[str, float] = {}
    base = copy.deepcopy(den)
    for v in variants:
        if v == "fp32":
            models[v] = den
        elif v == "fp32+compile":
            m = copy.deepcopy(base)
            from fastgen.quant.deploy import compile_blocks

            compile_blocks(m)
            models[v] = m
        elif v.startswith("int8 dynamic"):
            m = copy.deepcopy(base)
            to_int8(m, "dynamic", compile="eager" not in v, backend="torchao" if "torchao" in v else "intmm")
            models[v] = m
        elif v.startswith("int8 static"):
            calib = quant.capture_calibration(pipe, ["a red circle", "two blue squares"],
                                              num_inference_steps=kw["num_inference_steps"],
                                              **{k: kw[k] for k in ("height", "width", "guidance_scale",
                                                                    "max_sequence_length") if k in kw})
            m = copy.deepcopy(base)
            quant.apply_qalora(m, quant.QALoRAConfig(w_bits=8, a_bits=8, rank=0, eight_bit=()))
            quant.calibrate(m, calib)
            to_int8(m, "static", compile="eager" not in v, backend="torchao" if "torchao" in v else "intmm")
            models[v] = m
        else:
            raise SystemExit(f"unknown variant {v!r}")
    with torch.inference_mode():
        ref = den(**inputs)[0]
        outs = {}
        for v, m in models.items():
            compile_s[v] = _timed(lambda: m(**inputs))  # first call: compilation
            for _ in range(warmup):
                m(**inputs)
            outs[v] = m(**inputs)[0]
        times: dict[str, list[float]] = {v: [] for v in models}
        for _ in range(repeats):  # interleaved A B C ... rounds
            for v, m in models.items():
                times[v].append(_timed(lambda: m(**inputs)))
    rows = []
    fp, fpc = times["fp32"], times.get("fp32+compile")
    for v, ts in times.items():
        err = (outs[v] - ref).abs().max().item()
        mem = weight_memory(models[v])
        row = {"model": name, "variant": v, "ms": statistics.median(ts) * 1e3,
               "speedup_vs_fp32": statistics.median(a / b for a, b in zip(fp, ts)),
               "speedup_vs_fp32_compile": statistics.median(a / b for a, b in zip(fpc, ts)) if fpc else None,
               "max_abs_err": err, "rel_err": err / max(ref.abs().max().item(), 1e-12),
               "weight_mb": mem["total"] / 2**20, "int8_mb": mem["int8"] / 2**20,
               "first_call_s": compile_s[v]}
        rows.append(row)
    return {"model": name, "what": what, "params_m": n_params / 1e6, "inputs": {k: list(s) for k, s in shapes.items()},
            "threads": torch.get_num_threads(), "repeats": repeats, "torch": torch.__version__, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"**{result['what']}** — {result['params_m']:.2f} M params, inputs {result['inputs']}, "
             f"{result['threads']} thread(s), {result['repeats']} interleaved rounds, torch {result['torch']}", "",
             "| variant | ms / call | × vs fp32 | × vs fp32+compile | max abs err | rel err | weights MB (int8) "
             "| first call s |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        vc = "–" if r["speedup_vs_fp32_compile"] is None else f"{r['speedup_vs_fp32_compile']:.2f}"
        lines.append(f"| {r['variant']} | {r['ms']:.2f} | {r['speedup_vs_fp32']:.2f} | {vc} | {r['max_abs_err']:.2e} "
                     f"| {r['rel_err']:.2e} | {r['weight_mb']:.2f} ({r['int8_mb']:.2f}) | {r['first_call_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``fastgen experiment int8 [--model M ...]`` (see ``--help``)."""
    p = CommandParser(prog="fastgen experiment int8", description=__doc__.split("\n\n")[0],
                      example="fastgen experiment int8 --model shapes-mmdit --model bench-sd3 --threads 1")
    p.add_argument("--model", action="append", help="shapes-mmdit (default), bench-sd3, tiny-sd3, ... (repeatable)")
    p.add_argument("--variant", action="append", help="subset of variants (repeatable; default: all)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    results = []
    for name in args.model or ["shapes-mmdit"]:
        res = bench_model(name, repeats=args.repeats, warmup=args.warmup, variants=args.variant,
                          log=lambda s: sys.stderr.write(s + "\n"))
        results.append(res)
        sys.stdout.write(markdown(res) + "\n")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0

