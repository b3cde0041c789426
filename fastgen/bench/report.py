"""Benchmark reports: environment header, JSON rows, a Markdown table and a Pareto plot."""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Any

import torch

__all__ = ["environment", "write_json", "markdown_table", "write_markdown", "plot_pareto"]

_COLUMNS = ("recipe", "steps", "latency_s", "speedup", "peak_mem_mb", "psnr", "ssim", "score", "denoiser_calls")


def environment(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Device, dtype, threads and library versions, recorded with every benchmark."""
    import diffusers
    import transformers

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    if dev.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
    return {
        "device": str(dev), "device_name": name, "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def write_json(rows: list[dict], path: str) -> None:
    """Write ``rows`` (a list of flat dicts) as JSON; inf PSNR (identical images) is written as "inf"."""
    with open(path, "w") as f:
        json.dump([{k: _clean(v) for k, v in r.items()} for r in rows], f, indent=2)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table of the main columns, headed by the environment of the first row."""
    if not rows:
        return "(no rows)\n"
    cols = [c for c in _COLUMNS if any(c in r for r in rows)]
    r0 = rows[0]
    head = (f"model `{r0.get('model')}` on {r0.get('device_name', r0.get('device'))} ({r0.get('device')}, "
            f"{r0.get('dtype')}, {r0.get('threads')} threads), torch {r0.get('torch')}, diffusers {r0.get('diffusers')}; "
            f"{r0.get('repeats')} paired rounds, medians\n\n")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return head + "\n".join(lines) + "\n"


def write_markdown(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        f.write(markdown_table(rows))


def plot_pareto(rows: list[dict], path: str, quality: str = "psnr") -> str:
    """Scatter speedup vs quality (``"psnr"``, ``"ssim"`` or ``"score"``) with the Pareto front; returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = [(float(r["speedup"]), float(r[quality]), r["recipe"]) for r in rows
           if r.get(quality) is not None and r.get("speedup") is not None]
    finite = [q for _, q, _ in raw if math.isfinite(q)]
    # identical images (infinite PSNR) plot just above the best finite value, so the axis stays readable
    top = max([60.0] + [q + 5.0 for q in finite]) if quality == "psnr" else 1.0
    pts = [(x, q if math.isfinite(q) else top, label) for x, q, label in raw]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        for x, y, label in pts:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front, best = [], -math.inf
        for x, y, _ in sorted(pts, key=lambda p: -p[0]):
            if y > best:
                front.append((x, y))
                best = y
        front.sort()
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", alpha=0.6, label="Pareto front")
        ax.legend(fontsize=7)
    ax.set_xlabel("speedup vs baseline (x)")
    ax.set_ylabel(quality + (f" (dB; identical = {top:.0f})" if quality == "psnr" else ""))
    ax.set_title(f"{rows[0].get('model') if rows else ''}: speed vs quality", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
