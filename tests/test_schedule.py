"""Tuned timestep schedules (samplers/schedule.py): search, save/load, the ``schedule:`` recipe."""

import json

import numpy as np
import pytest
import torch

import fastgen
from fastgen import samplers
from fastgen.errors import RecipeError
from fastgen.testing import default_call_kwargs, tiny_pipeline
from fastgen.samplers.schedule import Schedule, _default_values, _latents, schedule_kwarg, search_schedule


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _kw(pipe):
    return {k: v for k, v in default_call_kwargs(pipe).items() if k not in ("prompt", "num_inference_steps", "generator")}


@pytest.mark.parametrize("kind, sampler, kwarg", [("sd3", None, "sigmas"), ("sd", "dpm++2m", "timesteps"),
                                                  ("sd", "euler", "timesteps")])
def test_stock_values_reproduce_the_default_call(kind, sampler, kwarg):
    pipe = tiny_pipeline(kind)
    if sampler:
        samplers.set_sampler(pipe, sampler)
    assert schedule_kwarg(pipe.scheduler) == kwarg
    a = _latents(pipe, ["a red circle"], [0], _kw(pipe), num_inference_steps=4)
    b = _latents(pipe, ["a red circle"], [0], _kw(pipe), **{kwarg: _default_values(pipe, 4, kwarg)})
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ddim_takes_no_custom_schedule():
    pipe = tiny_pipeline("sd")
    samplers.set_sampler(pipe, "ddim")
    with pytest.raises(ValueError, match="takes no custom timesteps.*'euler'"):
        schedule_kwarg(pipe.scheduler)


@pytest.mark.parametrize("kind, sampler", [("sd3", None), ("sd", "dpm++2m")])
def test_search_never_worse_than_stock_and_recipe_reproduces_it(kind, sampler, tmp_path):
    pipe = tiny_pipeline(kind)
    if sampler:
        samplers.set_sampler(pipe, sampler)
    prompts = ["a red circle", "a blue square"]
    sch = search_schedule(pipe, 3, prompts, reference_steps=10, call_kwargs=_kw(pipe), sweeps=2, progress=False)
    assert sch.steps == 3 and sch.loss <= sch.default_loss and sch.history == sorted(sch.history, reverse=True)
    assert all(b < a for a, b in zip(sch.values, sch.values[1:]))
    path = sch.save(tmp_path / "s.json")
    assert Schedule.load(path) == sch
    direct = _latents(pipe, prompts, [0, 1], _kw(pipe), **sch.call_kwargs())
    base = pipe(**default_call_kwargs(pipe, steps=5)).images
    fastgen.accelerate(pipe, f"schedule:{path}")
    got = _latents(pipe, prompts, [0, 1], _kw(pipe), num_inference_steps=7)  # the schedule fixes the steps
    assert torch.equal(got, direct)
    assert fastgen.summary(pipe)["last_call"]["steps_run"] == 3
    fastgen.remove(pipe, "schedule")
    assert np.array_equal(np.asarray(pipe(**default_call_kwargs(pipe, steps=5)).images[0]), np.asarray(base[0]))


def test_bad_schedules_are_clear(tmp_path):
    with pytest.raises(ValueError, match="strictly decreasing"):
        Schedule("sigmas", [1.0, 0.5, 0.6])
    with pytest.raises(ValueError, match="'sigmas' or 'timesteps'"):
        Schedule("steps", [3, 2])
    with pytest.raises(RecipeError, match="schedule needs a name or a path"):
        fastgen.parse_recipe("schedule")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"values": [1, 2]}))
    pipe = tiny_pipeline("sd3")
    with pytest.raises(ValueError, match="not a fastgen schedule"):
        fastgen.accelerate(pipe, f"schedule:{bad}")
    with pytest.raises(FileNotFoundError, match="shipped schedules"):
        fastgen.accelerate(pipe, "schedule:no-such-schedule")
    eps = tmp_path / "eps.json"
    Schedule("timesteps", [801, 401]).save(eps)
    with pytest.raises(ValueError, match="holds timesteps but FlowMatchEulerDiscreteScheduler takes sigmas"):
        fastgen.accelerate(pipe, f"schedule:{eps}")
    assert fastgen.summary(pipe)["recipe"] == "baseline"


def test_shipped_schedule_loads_on_its_model():
    from fastgen.samplers.schedule import SCHEDULES_DIR, shipped_schedules

    assert "shapes-mmdit-euler8" in shipped_schedules()
    sch = Schedule.load(SCHEDULES_DIR / "shapes-mmdit-euler8.json")
    assert sch.kwarg == "sigmas" and sch.steps == 8 and sch.loss < sch.default_loss
    from fastgen import zoo

    if not zoo.weights_path("shapes-mmdit").exists():
        pytest.skip("shapes-mmdit weights not installed")
    pipe = zoo.load_default("shapes-mmdit")
    fastgen.accelerate(pipe, "schedule:shapes-mmdit-euler8")
    kw = zoo.call_kwargs("shapes-mmdit")
    kw.pop("num_inference_steps", None)
    pipe("a red circle", num_inference_steps=28, generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
    assert fastgen.summary(pipe)["last_call"]["steps_run"] == 8


def test_cli_searches_and_scores_on_the_zoo_model(tmp_path, capsys):
    from fastgen import zoo
    from fastgen.samplers.schedule import main

    if not zoo.weights_path("shapes-mmdit").exists():
        pytest.skip("shapes-mmdit weights not installed")
    out = tmp_path / "s2.json"
    assert main(["shapes-mmdit", "--steps", "2", "--sweeps", "1", "--prompts", "2", "--eval", "2", "--reference", "4",
                 "--out", str(out), "--threads", "1"]) == 0
    text = capsys.readouterr().out
    sch = Schedule.load(out)
    assert sch.steps == 2 and sch.loss <= sch.default_loss and sch.model == "shapes-mmdit"
    assert "stock 2 steps: score" in text and "tuned: score" in text and "PSNR vs 4 steps" in text


def test_tune_searches_the_schedules_shipped_for_the_model():
    from fastgen import zoo
    from fastgen.tune import candidate_space

    tiny = tiny_pipeline("sd3")
    assert not [c for c in candidate_space(tiny, 28)[0] if c.startswith("schedule:")]
    if not zoo.weights_path("shapes-mmdit").exists():
        pytest.skip("shapes-mmdit weights not installed")
    pipe = zoo.load_default("shapes-mmdit")
    cands, _ = candidate_space(pipe, 28)
    assert "schedule:shapes-mmdit-euler8" in cands
    assert fastgen.summary(pipe)["recipe"] == "baseline"
    with pytest.raises(fastgen.FastgenError, match="fixes the step count"):
        fastgen.accelerate(pipe, "steps:4+schedule:shapes-mmdit-euler8")


def test_flow_samplers_derived_from_flowmatch_take_sigmas():
    pipe = tiny_pipeline("sd3")
    for name in ("pseudo-corrector", "lpl"):
        samplers.set_sampler(pipe, name)
        assert samplers.is_flow_scheduler(pipe.scheduler) and schedule_kwarg(pipe.scheduler) == "sigmas"
        _latents(pipe, ["a red circle"], [0], _kw(pipe), sigmas=[1.0, 0.6, 0.2])
        samplers.remove_sampler(pipe)


def test_search_refuses_bad_arguments_before_running():
    pipe = tiny_pipeline("sd3")
    for kw, match in ((dict(steps=1), "steps must be an integer in \\[2, 50\\]"),
                      (dict(steps=4, reference_steps=4), "reference_steps \\(4\\) must exceed steps \\(4\\)"),
                      (dict(steps=4, prompts=[]), "needs calibration prompts"),
                      (dict(steps=4, seeds=[1]), "1 seeds for 2 prompts")):
        args = {"prompts": ["a red circle", "a blue square"], **kw}
        with pytest.raises(ValueError, match=match):
            search_schedule(pipe, **args)
    assert fastgen.summary(pipe)["recipe"] == "baseline"
