"""The app's compute functions (no gradio, no browser) and the ``fastgen app`` entry point."""

import importlib.util
import math
import threading

import numpy as np
import pytest
import torch

import fastgen
import fastgen.bench
from fastgen.apps import app as A
from fastgen.cli import main
from fastgen.errors import RecipeError, UnsupportedPipelineError

TINY_ZOO = {"shapes-mmdit": dict(hidden=32, layers=1, heads=2, text_hidden=16, text_layers=1)}

HAS_EXECUTORCH = importlib.util.find_spec("executorch") is not None


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache():
    return A.PipelineCache()


def _compare(cache, recipe="sampler:dpm++2m@1", base="baseline", model="tiny-sd3", prompt="a red circle", seed=1,
             target="CPU", **kw):
    return A.compare(model, prompt, seed, 2, None, base, recipe, target, repeats=1, cache=cache, **kw)


def test_compare_returns_images_and_numbers(cache):
    seen = []
    r = _compare(cache, progress=lambda f, what: seen.append((f, what)))
    assert r["baseline_image"].shape == r["image"].shape == (32, 32, 3)
    assert r["baseline_image"].dtype == r["image"].dtype == np.uint8
    assert r["baseline_latency_s"] > 0 and r["latency_s"] > 0 and r["speedup"] > 0
    assert r["baseline_peak_mem_mb"] > 0 and r["peak_mem_mb"] > 0
    assert math.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1  # 1 step vs 2 steps: not identical
    assert r["baseline_steps_run"] == 2 and r["steps_run"] == 1
    assert r["recipe"] == "sampler:dpm++2m@1" and r["baseline_recipe"] == "baseline"
    assert r["verdict"] is None and r["warnings"] == []
    assert [row["recipe"] for row in r["rows"]] == ["baseline", "sampler:dpm++2m@1"]
    assert all("images" not in row for row in r["rows"])
    assert seen[0][0] < seen[-1][0] == 1.0
    pipe = cache.get("tiny-sd3", "cpu").pipe
    assert fastgen.summary(pipe)["recipe"] == "baseline"
    # the same seed gives the same baseline image again (the pipeline state did not leak)
    again = _compare(cache, recipe="steps:1")
    assert np.array_equal(again["baseline_image"], r["baseline_image"])


def test_compare_against_a_non_baseline_recipe(cache):
    r = _compare(cache, recipe="sampler:dpm++2m@1", base="steps:1")
    assert r["baseline_recipe"] == "steps:1" and r["baseline_steps_run"] == 1
    assert r["speedup"] == pytest.approx(r["baseline_latency_s"] / r["latency_s"], rel=1e-2)
    assert [row["recipe"] for row in r["rows"]] == ["baseline", "steps:1", "sampler:dpm++2m@1"]
    same = _compare(cache, recipe="steps:1", base="steps:1")
    assert same["psnr"] == math.inf and np.array_equal(same["image"], same["baseline_image"])


@pytest.mark.parametrize("kw, err, match", [
    (dict(recipe="nosuch:1"), RecipeError, "accelerated recipe: unknown technique 'nosuch'"),
    (dict(base="sampler:nope@2"), RecipeError, "baseline recipe: "),
    (dict(recipe="tome:0.99"), RecipeError, "accelerated recipe"),
    (dict(recipe="deepcache:3"), UnsupportedPipelineError, "blockcache"),
    (dict(prompt="  "), fastgen.FastgenError, "enter a prompt"),
    (dict(model="no-such-model"), fastgen.FastgenError, "unknown model"),
])
def test_compare_errors_are_clear_and_leave_pipeline_clean(cache, kw, err, match):
    with pytest.raises(err, match=match):
        _compare(cache, **kw)
    assert fastgen.summary(cache.get("tiny-sd3", "cpu").pipe)["recipe"] == "baseline"
    assert ("no-such-model", "cpu") not in cache.keys()  # a failed load is not cached


def test_targets():
    choices = A.target_choices()
    assert "CPU" in choices and "mobile (ExecuTorch)" in choices
    assert ("GPU (CUDA)" in choices) == torch.cuda.is_available()
    assert A.resolve_target("CPU") == "cpu"
    if HAS_EXECUTORCH:
        assert A.resolve_target("mobile (ExecuTorch)") == "cpu"
    else:
        with pytest.raises(A.TargetUnavailableError, match='pip install "fastgen\\[mobile\\]"'):
            A.resolve_target("mobile")
    if not torch.cuda.is_available():
        with pytest.raises(A.TargetUnavailableError, match="CUDA"):
            A.resolve_target("GPU (CUDA)")
    with pytest.raises(A.TargetUnavailableError, match="unknown target"):
        A.resolve_target("tpu")


def test_recipe_on_mobile_target_runs_the_denoiser_as_an_executorch_program():
    assert A.recipe_on_target("steps:2", "CPU") == "steps:2"
    assert A.recipe_on_target("baseline", "mobile (ExecuTorch)") == "executorch:fp32"
    assert A.recipe_on_target("sampler:unipc@4", "mobile") == "sampler:unipc@4+executorch:fp32"
    assert A.recipe_on_target("steps:3+executorch:w4", "mobile") == "steps:3+executorch:w4"


def test_mobile_target_errors_are_clear(cache):
    if HAS_EXECUTORCH:  # a technique inside the denoiser cannot run in a fixed exported program
        with pytest.raises(fastgen.FastgenError, match="cannot stack.*act around the denoiser"):
            _compare(cache, recipe="blockcache:0.1", target="mobile (ExecuTorch)")
    else:
        with pytest.raises(A.TargetUnavailableError, match="fastgen\\[mobile\\]"):
            _compare(cache, recipe="steps:1", target="mobile (ExecuTorch)")
    with pytest.raises(fastgen.FastgenError, match="mobile target"):
        A.find_fastest("tiny-sd3", "psnr>=30", 2, None, target="mobile (ExecuTorch)", cache=cache)
    assert fastgen.summary(cache.get("tiny-sd3", "cpu").pipe)["recipe"] == "baseline"


def test_class_conditional_prompt(cache):
    with pytest.raises(fastgen.FastgenError, match="class-conditional.*circle, square, triangle"):
        _compare(cache, model="tiny-dit", prompt="dog", recipe="steps:1")
    r = _compare(cache, model="tiny-dit", prompt="square", recipe="steps:1")
    assert r["image"].ndim == 3 and r["steps_run"] == 1
    assert A.model_defaults("tiny-dit")["class_conditional"] and A.model_defaults("tiny-dit")["prompt"] == "circle"


def test_zoo_model_gets_the_evaluator_verdict():
    from fastgen.zoo.builders import build_pipeline

    zoo_cache = A.PipelineCache(loader=lambda m, d: build_pipeline(m, TINY_ZOO[m]))
    r = A.compare("shapes-mmdit", "a red circle", 0, 2, None, "baseline", "steps:1", "CPU", repeats=1, cache=zoo_cache)
    v = r["verdict"]
    assert set(v) == {"baseline", "accelerated"}
    for side in v.values():
        assert {"overall", "color", "shape", "count", "position", "detected"} <= set(side)
        assert isinstance(side["overall"], bool) and side["position"] is None  # no relation in this prompt
    assert r["guidance_scale"] == 5.0 and r["image"].shape == (32, 32, 3)  # the zoo's default call
    off = A.compare("shapes-mmdit", "a photo of a cat", 0, 2, None, "baseline", "steps:1", "CPU", repeats=1,
                    cache=zoo_cache)
    assert "outside the shapes grammar" in off["verdict"]["note"]
    assert "criterion" in A._verdict_markdown(v) and "outside" in A._verdict_markdown(off["verdict"])


def test_concurrent_requests_never_share_pipeline_state(cache, monkeypatch):
    inside, peak = [0], [0]
    real = fastgen.bench.benchmark
    guard = threading.Lock()

    def counting(pipe, *a, **k):
        with guard:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        try:
            return real(pipe, *a, **k)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(fastgen.bench, "benchmark", counting)
    jobs = {"steps:1": 1, "sampler:dpm++2m@1": 1, "baseline": 2}
    results, errors = {}, []

    def work(recipe):
        try:
            results[recipe] = _compare(cache, recipe=recipe, seed=5)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and set(results) == set(jobs)
    assert peak[0] == 1  # one pipeline, one request at a time
    for recipe, steps in jobs.items():
        assert results[recipe]["recipe"] == recipe and results[recipe]["steps_run"] == steps
    base = [r["baseline_image"] for r in results.values()]
    assert all(np.array_equal(base[0], b) for b in base[1:])
    assert fastgen.summary(cache.get("tiny-sd3", "cpu").pipe)["recipe"] == "baseline"


def test_pipeline_cache_loads_once_and_evicts():
    calls = []

    def loader(model, device):
        calls.append(model)
        if model == "bad":
            raise fastgen.FastgenError("cannot load")
        return object()

    c = A.PipelineCache(max_models=2, loader=loader)
    a = c.get("a", "cpu")
    assert c.get("a", "cpu") is a and calls == ["a"]
    c.get("b", "cpu")
    c.get("a", "cpu")  # a is now the most recent
    c.get("c", "cpu")  # evicts b
    assert c.keys() == [("a", "cpu"), ("c", "cpu")]
    with pytest.raises(fastgen.FastgenError):
        c.get("bad", "cpu")
    assert ("bad", "cpu") not in c.keys()
    with pytest.raises(ValueError):
        A.PipelineCache(max_models=0)


def test_choices_come_from_the_registry():
    recipes = A.recipe_choices(28)
    assert recipes[0] == "baseline"
    for t in fastgen.list_techniques():
        if t.example:
            assert fastgen.recipe_string(fastgen.parse_recipe(t.example)) in recipes
    assert "sampler:dpm++2m@14" in recipes and "steps:7" in recipes
    models = A.model_choices()
    assert models[:2] == ["shapes-mmdit", "shapes-unet"] and "tiny-sd3" in models
    assert A.model_defaults("shapes-unet")["steps"] == 50 and A.model_defaults("shapes-mmdit")["cfg"] == 5.0


def test_cfg_field():
    assert A._parse_cfg("") is None and A._parse_cfg(" ") is None and A._parse_cfg(None) is None
    assert A._parse_cfg("4.5") == 4.5 and A._parse_cfg(3) == 3.0
    for bad in ("abc", "-1", "nan"):
        with pytest.raises(fastgen.FastgenError, match="CFG scale"):
            A._parse_cfg(bad)


def test_find_fastest_and_pareto(cache, tmp_path):
    res = A.find_fastest("tiny-sd3", "psnr>=5", 2, None, "CPU", max_trials=2, cache=cache)
    assert res.trials[0]["recipe"] == "baseline" and res.budget == "psnr>=5" and res.device == "cpu"
    assert fastgen.summary(cache.get("tiny-sd3", "cpu").pipe)["recipe"] == "baseline"
    assert "| recipe | stage |" in A._tune_markdown(res)
    history = [{"model": "tiny-sd3", **t} for t in res.trials] + [{"model": "other", "recipe": "x", "speedup": 9.0}]
    path = A.pareto_plot(history, "tiny-sd3", str(tmp_path / "p.png"))
    assert path and (tmp_path / "p.png").stat().st_size > 1000
    assert A.pareto_plot(history, "nothing-here", str(tmp_path / "q.png")) is None
    with pytest.raises(fastgen.FastgenError, match="cannot parse budget"):
        A.find_fastest("tiny-sd3", "fast please", 2, None, "CPU", cache=cache)


def test_cli_app_without_gradio(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["app", "--model", "tiny-sd3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "fastgen[app]"' in err


def test_build_app_blocks():
    gr = pytest.importorskip("gradio", reason='the app extra is not installed (pip install "fastgen[app]")')
    demo = A.build_app("tiny-sd3", steps=2, cache=A.PipelineCache())
    assert isinstance(demo, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"fastgen-generate", "fastgen-baseline-image", "fastgen-accel-image", "fastgen-speedup", "fastgen-pareto",
            "fastgen-tune", "fastgen-target"} <= ids
