"""What the samplers' search CLIs (``samplers.schedule``, ``samplers.skip_tuning``) share: the zoo model with the
sampler to tune, and calibration prompts that are not the evaluator's held-out prompts."""

from __future__ import annotations


def zoo_pipeline_and_prompts(model: str, sampler: str | None, n_prompts: int, threads: int | None = None):
    """``(pipe, prompts)``: the zoo ``model`` (with ``sampler`` set when given) and ``n_prompts`` calibration prompts."""
    import torch

    from fastgen import samplers
    from fastgen import zoo
    from fastgen.zoo import shapes

    if threads:
        torch.set_num_threads(threads)
    pipe = zoo.load_default(model)
    if sampler:
        samplers.set_sampler(pipe, sampler)
    return pipe, shapes.sample_prompts(n_prompts, shapes.CALIBRATION_SEED)  # not the held-out EVAL_SEED prompts
