"""cfg-interval: guidance on an interval of the steps, conditional-only elsewhere (tiny real pipelines)."""

import numpy as np
import pytest
import torch

import fastgen
from fastgen.errors import IncompatibleTechniquesError, RecipeError, UnsupportedPipelineError
from fastgen.guidance import FAMILIES, CFGIntervalConfig, apply_cfg_interval, remove_cfg_interval
from fastgen.testing import default_call_kwargs, tiny_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _run(pipe, steps=4, guidance=5.0, **extra):
    kw = default_call_kwargs(pipe, steps=steps)
    kw.update(height=32, width=32, guidance_scale=guidance, **extra)
    return pipe(**kw, output_type="np").images


def _batches(pipe) -> list[int]:
    """Batch sizes the denoiser's real forward receives (a torch hook below the diffusers hooks)."""
    seen: list[int] = []
    den = fastgen.get_adapter(pipe).denoiser(pipe)
    first = next(m for m in den.children())
    first.register_forward_pre_hook(lambda m, a: seen.append(int(a[0].shape[0])))
    return seen


@pytest.mark.parametrize("kind", FAMILIES)
def test_interval_halves_the_batch_after_end_and_removes_bit_exactly(kind):
    pipe = tiny_pipeline(kind)
    base = _run(pipe)
    state = {k: v.clone() for k, v in fastgen.get_adapter(pipe).denoiser(pipe).state_dict().items()}

    fastgen.accelerate(pipe, "cfg-interval:1.0")  # guidance on every step: the baseline, bit for bit
    np.testing.assert_array_equal(_run(pipe), base)
    fastgen.remove(pipe)

    apply_cfg_interval(pipe, CFGIntervalConfig(end=0.5))
    apply_cfg_interval(pipe, CFGIntervalConfig(end=0.5))  # twice is safe
    seen = _batches(pipe)
    out = _run(pipe)
    assert np.isfinite(out).all() and not np.array_equal(out, base)
    assert fastgen.summary(pipe)["last_call"]["cfg-interval"]["unguided_calls"] == 2
    np.testing.assert_array_equal(_run(pipe), out)  # deterministic; the count is per call
    assert fastgen.summary(pipe)["last_call"]["cfg-interval"]["unguided_calls"] == 2
    _run(pipe, steps=8)  # another step count re-derives the interval
    assert fastgen.summary(pipe)["last_call"]["cfg-interval"]["unguided_calls"] == 4
    # a "first" child may run more than once per call; the pattern is 2B on guided steps, B after
    assert max(seen) == 2 * min(seen) and seen[-1] == min(seen) and seen[0] == max(seen)

    remove_cfg_interval(pipe)
    remove_cfg_interval(pipe)  # no-op
    np.testing.assert_array_equal(_run(pipe), base)
    assert type(pipe).__name__ == type(tiny_pipeline(kind)).__name__ and not hasattr(pipe, "_fastgen")
    for k, v in fastgen.get_adapter(pipe).denoiser(pipe).state_dict().items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_unguided_steps_are_the_conditional_prediction(kind):
    """No guided step at all (interval past the last step) equals a guidance_scale=1 call up to float noise."""
    pipe = tiny_pipeline(kind)
    ref = _run(pipe, guidance=1.0)
    fastgen.accelerate(pipe, CFGIntervalConfig(start=0.9, end=1.0))  # 4 steps: fractions 0, .25, .5, .75
    out = _run(pipe, guidance=5.0)
    np.testing.assert_allclose(out, ref, atol=2e-4)
    assert not np.allclose(_run(tiny_pipeline(kind), guidance=5.0), ref, atol=2e-4)  # CFG matters here


def test_no_cfg_call_is_untouched():
    pipe = tiny_pipeline("sd3")
    ref = _run(pipe, guidance=1.0)
    fastgen.accelerate(pipe, "cfg-interval:0.3")
    np.testing.assert_array_equal(_run(pipe, guidance=1.0), ref)
    assert fastgen.summary(pipe)["last_call"]["cfg-interval"]["unguided_calls"] == 0


def test_recipes_and_bad_input():
    assert fastgen.parse_recipe("cfg-interval:0.6") == [CFGIntervalConfig(end=0.6)]
    assert fastgen.parse_recipe("cfg-interval:0.1-0.7") == [CFGIntervalConfig(start=0.1, end=0.7)]
    assert fastgen.recipe_string([CFGIntervalConfig(start=0.1, end=0.7)]) == "cfg-interval:0.1-0.7"
    assert fastgen.recipe_string([CFGIntervalConfig()]) == "cfg-interval:0.6"
    with pytest.raises(RecipeError, match="START-END"):
        fastgen.parse_recipe("cfg-interval:abc")
    with pytest.raises(ValueError, match="start"):
        CFGIntervalConfig(start=0.5, end=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CFGIntervalConfig(end=1.5)


def test_unsupported_family_and_cache_clash_leave_the_pipeline_untouched():
    dit = tiny_pipeline("dit")
    with pytest.raises(UnsupportedPipelineError, match="DiTPipeline"):
        fastgen.accelerate(dit, "cfg-interval:0.6")
    assert not hasattr(dit, "_fastgen")
    pipe = tiny_pipeline("sd3")
    with pytest.raises(IncompatibleTechniquesError, match="batch"):
        fastgen.accelerate(pipe, "cfg-interval:0.6+blockcache:0.08")
    assert not hasattr(pipe, "_fastgen")
    fastgen.accelerate(pipe, "cfg-interval:0.6+sampler:dpm++2m@4")  # samplers stack
    assert fastgen.summary(pipe)["recipe"] in ("cfg-interval:0.6+sampler:dpm++2m@4", "sampler:dpm++2m@4+cfg-interval:0.6")
