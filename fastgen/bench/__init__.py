"""Benchmark harness: paired interleaved timing, peak memory, same-seed PSNR/SSIM, reports (DESIGN.md §6)."""

from .memory import PeakMemory
from .metrics import psnr, ssim
from .report import environment, markdown_table, plot_pareto, write_json, write_markdown
from .runner import BenchSettings, benchmark, call_kwargs
from .timing import paired_ratio, paired_timing

__all__ = ["BenchSettings", "benchmark", "call_kwargs", "paired_timing", "paired_ratio", "PeakMemory", "psnr", "ssim",
           "environment", "markdown_table", "write_json", "write_markdown", "plot_pareto"]
