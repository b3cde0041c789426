import json
import math
import subprocess
import sys

import numpy as np
import pytest

import fastgen
from fastgen.bench import BenchSettings, benchmark, markdown_table, paired_ratio, paired_timing, plot_pareto, psnr, ssim, write_json
from fastgen.cli import main
from fastgen.testing import tiny_pipeline

ROW_FIELDS = {"recipe", "model", "device", "latency_s", "speedup", "peak_mem_mb", "psnr", "ssim"}


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    a = rng.random((2, 16, 16, 3))
    assert psnr(a, a) == math.inf and ssim(a, a) == pytest.approx(1.0)
    b = np.clip(a + 0.1, 0, 1)
    assert psnr(a, a * 0 + 0.5) < psnr(a, b)
    # known value: constant error e -> 10 log10(1 / e^2)
    c = np.full((1, 8, 8, 3), 0.5)
    assert psnr(c, c + 0.01) == pytest.approx(40.0, abs=1e-6)
    noisy = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    assert 0 < ssim(a, noisy) < ssim(a, b) <= 1
    assert ssim(a, noisy) == pytest.approx(ssim(noisy, a))
    u8 = (a * 255).astype(np.uint8)
    assert psnr(u8, u8) == math.inf
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(a, a[:1])


def test_paired_timing_interleaves_and_wraps():
    calls = []
    times = paired_timing({"A": lambda: calls.append("A"), "B": lambda: calls.append("B")}, repeats=3, warmup=1,
                          setup=lambda n: calls.append("+" + n), teardown=lambda n: calls.append("-" + n))
    order = [c for c in calls if c in "AB"]
    assert order == ["A", "B"] + ["A", "B"] * 3  # warm-up each, then interleaved rounds
    assert calls[:3] == ["+A", "A", "-A"]
    assert len(times["A"]) == len(times["B"]) == 3
    assert paired_ratio([2.0, 4.0, 6.0], [1.0, 1.0, 2.0]) == 3.0
    with pytest.raises(ValueError, match="repeats"):
        paired_timing({"A": lambda: None}, repeats=0)


def test_benchmark_rows_quality_and_reports(tmp_path):
    pipe = tiny_pipeline("sd3")
    settings = BenchSettings(steps=6, prompts=("a red circle", "two blue squares"), height=32, width=32, repeats=1)
    rows = benchmark(pipe, ["sampler:dpm++2m@3"], settings, model_name="tiny-sd3", progress=False)
    assert [r["recipe"] for r in rows] == ["baseline", "sampler:dpm++2m@3"]
    for r in rows:
        assert ROW_FIELDS <= set(r) and r["model"] == "tiny-sd3" and r["device"] == "cpu"
        assert r["latency_s"] > 0 and r["peak_mem_mb"] > 0 and r["n_images"] == 2
    base, fast = rows
    assert base["psnr"] == math.inf and base["speedup"] == 1.0 and base["steps"] == 6
    assert math.isfinite(fast["psnr"]) and fast["steps"] == 3 and fast["denoiser_calls"] == 3
    assert base["denoiser_calls"] == 6
    assert fastgen.summary(pipe)["recipe"] == "baseline" and not hasattr(pipe, "_fastgen")
    write_json(rows, tmp_path / "rows.json")
    loaded = json.loads((tmp_path / "rows.json").read_text())
    assert loaded[0]["psnr"] == "inf" and ROW_FIELDS <= set(loaded[1])
    assert "| sampler:dpm++2m@3 |" in markdown_table(rows)
    png = plot_pareto(rows, str(tmp_path / "pareto.png"))
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and png.endswith(".png")


def test_benchmark_quality_fn_and_control_rows():
    pipe = tiny_pipeline("dit")
    seen = {}

    def quality_fn(prompts, images):
        seen["n"] = len(prompts)
        assert images.dtype == np.uint8 and images.shape[0] == len(prompts)
        return {"overall": 0.5, "color": 1.0}

    rows = benchmark(pipe, ["sampler:ddim@2"], BenchSettings(steps=8, prompts=("circle",), seeds=(0, 1), repeats=1, control=True),
                     quality_fn=quality_fn, progress=False)
    assert seen["n"] == 2 and rows[0]["score"] == 0.5 and rows[0]["score_color"] == 1.0
    ctrl = [r for r in rows if r.get("control")]
    assert all(r["recipe"].startswith("steps:") for r in ctrl)


def test_benchmark_refuses_patched_pipe_and_bad_recipe():
    pipe = tiny_pipeline("dit")
    with pytest.raises(fastgen.RecipeError):
        benchmark(pipe, ["nonsense:1"], progress=False)
    fastgen.accelerate(pipe, "steps:2")
    with pytest.raises(ValueError, match="unpatched"):
        benchmark(pipe, ["baseline"], progress=False)


def test_cli_bad_recipe_is_one_clear_line():
    proc = subprocess.run([sys.executable, "-m", "fastgen.cli", "bench", "--recipe", "nonsense:1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.strip() and "torchvision" not in ln]
    assert len(err) == 1 and err[0].startswith("fastgen: error: unknown technique 'nonsense'")
    assert "Traceback" not in proc.stderr


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "out.json"
    rc = main(["bench", "--model", "tiny-sd3", "--recipe", "baseline", "--recipe", "sampler:dpm++2m@2", "--steps", "4",
               "--repeats", "1", "--prompt", "a red circle", "--json", str(out), "--markdown", str(tmp_path / "t.md"),
               "--plot", str(tmp_path / "p.png"), "--no-progress"])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["recipe"] for r in rows] == ["baseline", "sampler:dpm++2m@2"]
    assert all(ROW_FIELDS <= set(r) for r in rows)
    assert "sampler:dpm++2m@2" in capsys.readouterr().out
    assert (tmp_path / "p.png").exists() and (tmp_path / "t.md").exists()


def test_cli_errors(capsys):
    assert main(["bench", "--model", "tiny-nope"]) == 2
    assert "unknown model 'tiny-nope'" in capsys.readouterr().err
    assert main(["bench", "--model", "tiny-sd3", "--dtype", "int3"]) == 2
    assert main(["bench", "--model", "./no/such/folder"]) == 2


def test_cli_info_and_demo(tmp_path, capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "sampler" in info["techniques"] and "StableDiffusion3Pipeline" in info["pipelines"]
    assert set(info["extras"]) >= {"app", "quant", "mobile", "gpu"}
    assert main(["demo", "--steps", "4", "--repeats", "1", "--out", str(tmp_path), "--no-progress",
                 "--recipe", "sampler:dpm++2m@2"]) == 0
    assert (tmp_path / "grid.png").exists() and (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_acceptance_8_step_sampler_is_over_2x_faster(tmp_path):
    out = tmp_path / "out.json"
    assert main(["bench", "--model", "tiny-sd3", "--recipe", "baseline", "--recipe", "sampler:dpm++2m@8",
                 "--steps", "28", "--json", str(out), "--no-progress"]) == 0
    rows = {r["recipe"]: r for r in json.loads(out.read_text())}
    assert rows["sampler:dpm++2m@8"]["speedup"] > 2


def test_demo_and_bench_default_to_the_zoo_model_with_evaluator_scores(tmp_path, monkeypatch):
    """With shapes-mmdit weights installed (here a tiny untrained stand-in), `fastgen demo` and `bench` use it
    by default, with its default call (collapsed zero tokens) and the evaluator's score on every row."""
    import fastgen.zoo as zoo
    from fastgen import cli
    from fastgen.zoo import builders as B

    pipe = B.build_pipeline("shapes-mmdit", dict(hidden=32, layers=1, heads=2, text_hidden=16, text_layers=1))
    B.save_pipeline(pipe, tmp_path / "w" / "shapes-mmdit", meta={"model": "shapes-mmdit"})
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "w")
    assert fastgen.models.default_model() == "shapes-mmdit"
    out = tmp_path / "demo"
    assert cli.main(["demo", "--steps", "2", "--prompts-n", "3", "--repeats", "1", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [r["recipe"] for r in rows] == ["baseline", "schedule:shapes-mmdit-euler8"]  # the model's tuned schedule
    for r in rows:
        assert r["model"] == "shapes-mmdit" and r["n_images"] == 3 and 0.0 <= r["score"] <= 1.0
        assert "score_color" in r
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "none")
    assert fastgen.models.default_model() == cli.FALLBACK_MODEL


def test_demo_on_an_ar_zoo_model_is_one_clear_error(capsys):
    assert main(["demo", "--model", "digits-var", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "next-scale AR model" in err and "fastgen experiment var-eval" in err and "Traceback" not in err


# --- fastgen profile: one denoiser forward per recipe, op kinds -------------------------------------------

def test_op_kind_classifies_aten_ops():
    from fastgen.bench.profile import op_kind

    assert op_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert op_kind("aten::mkldnn_convolution") == "convolution"
    assert op_kind("aten::addmm") == "matmul" and op_kind("aten::mm") == "matmul"
    assert op_kind("aten::native_group_norm") == "norm"
    assert op_kind("aten::gelu") == "other"


def test_capture_denoiser_call_is_the_first_step_of_the_real_call():
    from fastgen.bench.profile import capture_denoiser_call
    from fastgen.testing import default_call_kwargs, tiny_pipeline

    pipe = tiny_pipeline("sd")
    kw = default_call_kwargs(pipe, steps=4)
    args, kwargs = capture_denoiser_call(pipe, kw)
    pipe.scheduler.set_timesteps(4)
    assert int(args[1]) == int(pipe.scheduler.timesteps[0])  # UNets take (sample, t) positionally
    assert args[0].shape[0] == 2  # CFG batch
    assert "encoder_hidden_states" in kwargs


def test_profile_recipes_shows_tome_cutting_attention_time(one_thread):
    from fastgen.bench.profile import markdown, profile_recipes
    from fastgen.testing import default_call_kwargs, tiny_pipeline

    pipe = tiny_pipeline("sd")
    kw = default_call_kwargs(pipe, steps=2)  # 32x32 latent: 1024 tokens at the top level
    rows = profile_recipes(pipe, ["baseline", "tome:0.5,min_tokens=0"], kw, repeats=1)
    base, tome = rows
    assert base["speedup"] == 1.0 and base["forward_s"] > 0
    attn = [op for op in base["ops"] if op["kind"] == "attention" and op["shapes"] and op["shapes"][0][2] == 1024]
    merged = [op for op in tome["ops"] if op["kind"] == "attention" and op["shapes"] and op["shapes"][0][2] == 512]
    assert attn and merged  # full 1024-token self-attention vs merged 512-row attention
    assert tome["kind_ms"]["attention"] < base["kind_ms"]["attention"]
    assert fastgen_state_is_clean(pipe)
    text = markdown(rows, top=3)
    assert "tome:0.5,min_tokens=0" in text and "attention ms" in text


def fastgen_state_is_clean(pipe) -> bool:
    from fastgen.hooks import get_state

    return get_state(pipe) is None


def test_profile_cli_rejects_a_bad_recipe_before_loading(capsys):
    assert main(["profile", "--model", "tiny-sd", "--recipe", "nosuchtechnique:1"]) == 2
    assert "unknown technique 'nosuchtechnique'" in capsys.readouterr().err


def test_profile_recipes_rejects_bad_arguments_and_leaves_the_pipeline_unpatched():
    from fastgen.bench.profile import profile_recipes
    from fastgen.errors import RecipeError
    from fastgen.hooks import get_state
    from fastgen.testing import default_call_kwargs

    pipe = tiny_pipeline("sd")
    kw = default_call_kwargs(pipe, steps=2)
    with pytest.raises(ValueError, match="at least one recipe"):
        profile_recipes(pipe, [], kw)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        profile_recipes(pipe, ["baseline"], kw, repeats=0)
    with pytest.raises(RecipeError, match="unknown technique"):
        profile_recipes(pipe, ["baseline", "nosuchtechnique:1"], kw, repeats=1)
    assert get_state(pipe) is None


def test_demo_recipe_of_every_zoo_model_parses_for_that_model():
    """`fastgen demo --model M` uses DEMO_RECIPES[M] (e.g. the LCM student's own sampler at 2 of its 4 steps):
    each is a valid recipe, and a step-count recipe is fewer steps than the model's default call."""
    import fastgen
    import fastgen.zoo as zoo
    from fastgen import cli

    for model, recipe in cli.DEMO_RECIPES.items():
        assert model in zoo.MODELS
        cfgs = fastgen.parse_recipe(recipe)
        assert cfgs
        n = getattr(cfgs[0], "num_inference_steps", None)
        if n is not None:
            assert n < zoo.DEFAULTS[model]["num_inference_steps"]
