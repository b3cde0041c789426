"""Paired, interleaved wall-clock timing (DESIGN.md §6).

Each variant is warmed up, then the variants run interleaved (A B C, A B C, ...) so that drift in
machine load hits all of them alike; medians per variant and the median of per-round ratios against the
reference are reported. On CUDA every timed region is bracketed by ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["paired_timing", "paired_ratio"]


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_timing(
    variants: dict[str, Callable[[], object]],
    repeats: int = 3,
    warmup: int = 1,
    device: str | torch.device | None = None,
    setup: Callable[[str], None] | None = None,
    teardown: Callable[[str], None] | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, interleaved, after ``warmup`` untimed calls each.

    ``setup(name)``/``teardown(name)`` run outside the timed region around every call (e.g. apply and
    remove a recipe on a shared pipeline). Returns ``{name: [seconds per round]}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = torch.device(device) if device is not None else None

    def one(name: str) -> float:
        if setup:
            setup(name)
        try:
            _sync(dev)
            t0 = time.perf_counter()
            variants[name]()
            _sync(dev)
            return time.perf_counter() - t0
        finally:
            if teardown:
                teardown(name)
            if progress:
                progress()

    for name in variants:
        for _ in range(warmup):
            one(name)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name in variants:
            times[name].append(one(name))
    return times


def paired_ratio(reference: list[float], candidate: list[float]) -> float:
    """Median over rounds of reference_time / candidate_time (the speedup of ``candidate``)."""
    return statistics.median(r / c for r, c in zip(reference, candidate))
