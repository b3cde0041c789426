import dataclasses

import numpy as np
import pytest
import torch

import fastgen
from fastgen.errors import RecipeError, UnsupportedPipelineError
from fastgen.registry import Technique, register_technique, _REGISTRY
from fastgen.testing import default_call_kwargs, tiny_pipeline
from fastgen import samplers


def _run(pipe, steps=4):
    kw = default_call_kwargs(pipe, steps=steps)
    if "prompt" in kw:
        kw.update(height=32, width=32)
    return pipe(**kw, output_type="np").images


def _snapshot(pipe):
    return {
        "class": type(pipe),
        "scheduler": pipe.scheduler,
        "config": dict(pipe.config),
        "dicts": {n: set(m.__dict__) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)},
        "state": {k: v.clone() for k, v in fastgen.get_adapter(pipe).denoiser(pipe).state_dict().items()},
    }


@pytest.mark.parametrize("kind,recipe", [("sd3", "sampler:dpm++2m@6"), ("sd", "sampler:unipc@5"),
                                         ("pixart", "sampler:euler"), ("flux", "sampler:dpm++2m@3+steps:2")])
def test_accelerate_then_remove_is_bit_exact(kind, recipe):
    pipe = tiny_pipeline(kind)
    ref = _run(pipe)
    before = _snapshot(pipe)  # after a first call: FLUX's own cache_context adds a hook registry on first use
    assert fastgen.accelerate(pipe, recipe) is pipe
    assert isinstance(pipe, before["class"]) and type(pipe).__name__ == before["class"].__name__
    out = _run(pipe)
    assert not np.array_equal(out, ref)
    last = fastgen.summary(pipe)["last_call"]
    assert last["denoiser_calls"] >= 1 and last["steps_run"] == last["num_inference_steps"]
    assert fastgen.remove(pipe) is pipe
    after = _snapshot(pipe)
    assert after["class"] is before["class"] and after["scheduler"] is before["scheduler"]
    assert after["config"] == before["config"] and after["dicts"] == before["dicts"]
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    np.testing.assert_array_equal(_run(pipe), ref)
    assert fastgen.summary(pipe)["recipe"] == "baseline"


def test_summary_reports_the_last_call():
    pipe = tiny_pipeline("sd3")
    fastgen.accelerate(pipe, samplers.SamplerConfig("dpm++2m", steps=5))
    assert fastgen.summary(pipe)["last_call"] is None
    _run(pipe, steps=20)
    s = fastgen.summary(pipe)
    assert s["recipe"] == "sampler:dpm++2m@5" and s["family"] == "sd3"
    assert s["techniques"]["sampler"] == {"name": "dpm++2m", "steps": 5}
    assert s["last_call"]["num_inference_steps"] == 5 and s["last_call"]["steps_run"] == 5
    # CFG is batched in SD3: one denoiser call per step
    assert s["last_call"]["denoiser_calls"] == 5
    _run(pipe, steps=3)  # state is per call: a second call starts clean
    assert fastgen.summary(pipe)["last_call"]["denoiser_calls"] == 5


def test_double_application_replaces_config():
    pipe = tiny_pipeline("sd3")
    original = pipe.scheduler
    fastgen.accelerate(pipe, "sampler:dpm++2m@8")
    fastgen.accelerate(pipe, "sampler:unipc@4")
    assert fastgen.summary(pipe)["recipe"] == "sampler:unipc@4"
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    fastgen.remove(pipe)
    assert pipe.scheduler is original
    with pytest.raises(RecipeError, match="appears twice"):
        fastgen.accelerate(pipe, "sampler:euler+sampler:unipc")
    with pytest.raises(RecipeError, match="given twice"):
        fastgen.accelerate(pipe, "sampler:euler", "sampler:unipc")
    assert fastgen.summary(pipe)["recipe"] == "baseline"


def test_two_pipelines_do_not_interfere():
    a, b = tiny_pipeline("sd3"), tiny_pipeline("sd3")
    ref_b = _run(b)
    fastgen.accelerate(a, "sampler:dpm++2m@3")
    _run(a)
    np.testing.assert_array_equal(_run(b), ref_b)
    assert fastgen.summary(b)["last_call"] is None
    assert type(b).__name__ == type(a).__name__ and type(b) is not type(a)


@pytest.mark.parametrize("bad", ["nonsense:1", "sampler:foo", "sampler:dpm++2m@x", "steps:0", "steps:-3",
                                 "sampler:euler+", "+steps:3", 42])
def test_bad_recipes_raise_clearly_and_leave_pipe_alone(bad):
    pipe = tiny_pipeline("dit")
    with pytest.raises(RecipeError) as e:
        fastgen.accelerate(pipe, bad)
    assert "\n" not in str(e.value)
    assert fastgen.summary(pipe)["recipe"] == "baseline" and not hasattr(pipe, "_fastgen")


def test_unknown_technique_message_lists_known_ones():
    with pytest.raises(RecipeError, match=r"unknown technique 'nonsense'.*sampler"):
        fastgen.parse_recipe("nonsense:1")


def test_parse_recipe_grammar():
    assert fastgen.parse_recipe("baseline") == [] == fastgen.parse_recipe("  ")
    cfgs = fastgen.parse_recipe("sampler:dpm++2m-karras@8+steps:4")
    assert cfgs == [samplers.SamplerConfig("dpm++2m-karras", 8), fastgen.StepsConfig(4)]
    assert fastgen.recipe_string(cfgs) == "sampler:dpm++2m-karras@8+steps:4"
    assert fastgen.parse_recipe("SAMPLER:euler") == [samplers.SamplerConfig("euler")]


def test_unsupported_pipeline_is_named_and_untouched():
    from diffusers import DiffusionPipeline

    class MyPipeline(DiffusionPipeline):
        def __init__(self, unet):
            super().__init__()
            self.register_modules(unet=unet)

    pipe = MyPipeline(unet=torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedPipelineError, match="MyPipeline.*supported pipelines: .*StableDiffusion3Pipeline"):
        fastgen.accelerate(pipe, "sampler:euler")
    assert type(pipe) is MyPipeline and not hasattr(pipe, "_fastgen")
    with pytest.raises(UnsupportedPipelineError, match="Linear"):
        sd = tiny_pipeline("sd")
        sd.unet = torch.nn.Linear(2, 2)
        fastgen.accelerate(sd, "sampler:euler")


def test_sampler_family_mismatch_raises_before_patching():
    pipe = tiny_pipeline("sd3")
    with pytest.raises(ValueError, match="ddim is for epsilon"):
        fastgen.accelerate(pipe, "sampler:ddim")
    assert not hasattr(pipe, "_fastgen")


def test_failure_half_way_rolls_back():
    @dataclasses.dataclass(frozen=True)
    class BoomConfig:
        pass

    def boom(pipe, state, cfg):
        raise RuntimeError("boom")

    register_technique(Technique("boom", BoomConfig, parse=lambda a: BoomConfig(), to_string=lambda c: "boom",
                                 install=boom, uninstall=lambda pipe, state, handle: None))
    try:
        pipe = tiny_pipeline("sd3")
        original = pipe.scheduler
        fastgen.accelerate(pipe, "sampler:unipc@3")
        with pytest.raises(RuntimeError, match="boom"):
            fastgen.accelerate(pipe, "sampler:euler@2", BoomConfig())
        # the sampler applied before the failing call is back to its earlier config
        assert fastgen.summary(pipe)["recipe"] == "sampler:unipc@3"
        fastgen.remove(pipe)
        assert pipe.scheduler is original and not hasattr(pipe, "_fastgen")
    finally:
        _REGISTRY.pop("boom")


def test_remove_by_name_and_errors():
    pipe = tiny_pipeline("sd3")
    fastgen.accelerate(pipe, "sampler:euler+steps:3")
    fastgen.remove(pipe, "steps")
    assert fastgen.summary(pipe)["recipe"] == "sampler:euler"
    with pytest.raises(RecipeError, match="cannot remove"):
        fastgen.remove(pipe, "tome")
    fastgen.remove(pipe)
    fastgen.remove(pipe)  # no-op when nothing is applied


def test_step_index_ignores_the_schedule():
    """Repeated timesteps (Heun evaluates twice) and custom sigmas still count steps from the call."""
    pipe = tiny_pipeline("sd3")
    fastgen.accelerate(pipe, "sampler:heun@3")
    _run(pipe)
    last = fastgen.summary(pipe)["last_call"]
    assert last["denoiser_calls"] == 5  # Heun: 2 calls per step, the last step first order
    fastgen.remove(pipe)
    fastgen.accelerate(pipe, "steps:3")
    kw = default_call_kwargs(pipe, steps=3)
    pipe(**kw, height=32, width=32, sigmas=[1.0, 0.7, 0.2], output_type="np")
    assert fastgen.summary(pipe)["last_call"]["steps_run"] == 3


def test_samplers_registry():
    assert {"euler", "dpm++2m", "unipc", "ddim"} <= set(samplers.list())
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.SamplerConfig("nope")
    pipe = tiny_pipeline("sd")
    samplers.set_sampler(pipe, "dpm++2m-karras", steps=4)
    assert pipe.scheduler.config.use_karras_sigmas and pipe.scheduler.config.beta_schedule == "scaled_linear"
    samplers.remove_sampler(pipe)
    flux = tiny_pipeline("flux")
    samplers.set_sampler(flux, "dpm++2m")
    assert flux.scheduler.config.use_flow_sigmas and flux.scheduler.config.use_dynamic_shifting
    _run(flux, steps=3)
    samplers.remove_sampler(flux)


def test_missing_extra_names_the_extra():
    from fastgen.errors import MissingExtraError, require_extra

    with pytest.raises(MissingExtraError, match=r"pip install 'fastgen\[app\]'") as e:
        require_extra("surely_not_installed_module_xyz", "app", "the Gradio app")
    assert isinstance(e.value, ImportError) and "the Gradio app" in str(e.value)
    assert require_extra("json", "dev").dumps([1]) == "[1]"
