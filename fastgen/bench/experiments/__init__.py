"""Research scripts: the measurements behind the README's tables, run with ``fastgen experiment NAME``.

* :mod:`~fastgen.bench.experiments.ras` (``ras``): RAS FLOP-ideal speedup, the selection-rule experiment, RAS vs
  fewer steps at equal latency.
* :mod:`~fastgen.bench.experiments.int8` (``int8``): per-call latency of fp32 vs real int8 kernels.
* :mod:`~fastgen.bench.experiments.ptq` (``ptq``): PTQ vs QALoRA against FP from a ``fastgen train qalora`` run.
* :mod:`~fastgen.bench.experiments.sampler_table` (``sampler-table``): every sampler on a zoo model.
* :mod:`~fastgen.bench.experiments.zoo_report` (``zoo-report``): a zoo model's quality table.
* :mod:`~fastgen.bench.experiments.var_eval` (``var-eval``): VAR recipes on ``digits-var``, the VAR-d16 speed probe.

Each module has ``main(argv: list[str] | None = None) -> int``; ``fastgen experiment --help`` lists them (with
the samplers' ``schedule-search`` and ``skip-tuning``). They may import anything (the core, training, the
benchmark); nothing in the library imports them.
"""
