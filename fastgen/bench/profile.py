"""Where a denoiser forward spends its time, per recipe: the Amdahl bound of a technique.

``fastgen profile --model bench-sd --tokens 4096 --recipe baseline --recipe tome:0.5 --recipe tomesd:0.5``
captures the denoiser's inputs at the first step of a real pipeline call, then for every recipe:

* times single denoiser forwards, interleaved across recipes (median of ``repeats``), and
* runs one forward under ``torch.profiler`` and groups self CPU time by op *kind* (attention, convolution,
  matmul, norm, elementwise/other) and by ``(op, input shapes)``.

The op table tells what a technique can possibly win: token merging only shrinks the attention (and
optionally the MLP) of the levels it merges, so the attention rows at those token counts bound its
speedup, whatever the merging costs. Step-dependent techniques (caches, RAS) see one forward outside a
call here (step 0, a full step); use ``fastgen bench`` for them.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any, Sequence

import torch

from ..adapters import capture_denoiser_calls, get_adapter
from ..api import accelerate, remove
from ..registry import parse_recipe
from .timing import paired_ratio, paired_timing

__all__ = ["capture_denoiser_call", "op_kind", "profile_forward", "profile_recipes", "markdown"]

_KINDS = ("attention", "convolution", "matmul", "norm", "other")


def capture_denoiser_call(pipe, call_kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """The denoiser's ``(args, kwargs)`` at the first step of ``pipe(**call_kwargs)`` (the run stops there)."""
    calls = capture_denoiser_calls(pipe, call_kwargs, stop_after=1)
    if not calls:
        raise RuntimeError(f"{type(pipe).__name__} made no denoiser call")
    return calls[0]


def op_kind(name: str) -> str:
    """Coarse kind of an aten op name (``aten::addmm`` -> ``matmul``)."""
    n = name.lower()
    if "attention" in n or "softmax" in n or "baddbmm" in n or n.endswith("::bmm"):
        return "attention"
    if "conv" in n:
        return "convolution"
    if n.endswith(("::mm", "::addmm", "::matmul", "::linear")) or "_mm" in n or "gemm" in n:
        return "matmul"
    if "norm" in n:
        return "norm"
    return "other"


def profile_forward(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[dict]:
    """Self CPU time of one forward, one row per ``(op, input shapes)``, slowest first."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(*args, **kwargs)  # warm-up outside the profile
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(*args, **kwargs)
    rows = []
    for ev in prof.key_averages(group_by_input_shape=True):
        if not ev.key.startswith("aten::") or ev.self_cpu_time_total <= 0:
            continue
        shapes = [list(s) for s in (ev.input_shapes or []) if s]
        rows.append({"op": ev.key, "kind": op_kind(ev.key), "shapes": shapes, "calls": int(ev.count),
                     "self_ms": ev.self_cpu_time_total / 1e3})
    rows.sort(key=lambda r: -r["self_ms"])
    return rows


def profile_recipes(pipe, recipes: Sequence[str], call_kwargs: dict[str, Any], repeats: int = 3) -> list[dict]:
    """Per recipe: median forward time, speedup over the first recipe, time per op kind and the op rows.

    Every recipe is applied and removed around its own forwards; the forwards are interleaved across
    recipes so load drift hits them alike.
    """
    if not recipes:
        raise ValueError("give at least one recipe (the first is the reference, usually 'baseline')")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    parsed = {r: parse_recipe(r) for r in recipes}  # a bad recipe fails before any work
    args, kwargs = capture_denoiser_call(pipe, call_kwargs)
    model = get_adapter(pipe).denoiser(pipe)

    def setup(r: str) -> None:
        if parsed[r]:
            accelerate(pipe, *parsed[r])

    def forward():
        with torch.no_grad():
            model(*args, **kwargs)

    ops = {}
    for r in recipes:  # op profile (and warm-up) of each recipe
        setup(r)
        try:
            ops[r] = profile_forward(model, args, kwargs)
        finally:
            remove(pipe)
    times = paired_timing({r: forward for r in recipes}, repeats=repeats, warmup=0, setup=setup,
                          teardown=lambda r: remove(pipe))
    ref = times[recipes[0]]
    rows = []
    for r in recipes:
        by_kind = defaultdict(float)
        for op in ops[r]:
            by_kind[op["kind"]] += op["self_ms"]
        rows.append({"recipe": r, "forward_s": statistics.median(times[r]), "speedup": paired_ratio(ref, times[r]),
                     "kind_ms": {k: by_kind.get(k, 0.0) for k in _KINDS}, "ops": ops[r]})
    return rows


def markdown(rows: list[dict], top: int = 12) -> str:
    """A summary table (forward time, speedup, ms per op kind) and each recipe's ``top`` op rows."""
    head = "| recipe | forward s | speedup | " + " | ".join(f"{k} ms" for k in _KINDS) + " |"
    lines = [head, "|" + "---|" * (3 + len(_KINDS))]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['forward_s']:.3f} | {r['speedup']:.3f} | "
                     + " | ".join(f"{r['kind_ms'][k]:.0f}" for k in _KINDS) + " |")
    for r in rows:
        lines += ["", f"**{r['recipe']}**: top {top} ops by self CPU time", "",
                  "| op | kind | input shapes | calls | self ms |", "|---|---|---|---|---|"]
        for op in r["ops"][:top]:
            shapes = " ".join("x".join(map(str, s)) for s in op["shapes"][:3])
            lines.append(f"| {op['op'][6:]} | {op['kind']} | {shapes} | {op['calls']} | {op['self_ms']:.1f} |")
    return "\n".join(lines) + "\n"
