import json
import math

import numpy as np
import pytest

import fastgen
from fastgen.bench import BenchSettings
from fastgen.cli import main
from fastgen.testing import tiny_pipeline
from fastgen.tune import (
    Budget,
    BudgetError,
    TuneConfig,
    candidate_space,
    combinations,
    format_result,
    parse_budget,
    step_levels,
    tune,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sd3():
    return tiny_pipeline("sd3")


def _tiny_settings(**kw):
    return BenchSettings(**{"steps": 2, "prompts": ("a red circle", "two blue squares"), "height": 32, "width": 32,
                            "repeats": 1, **kw})


@pytest.mark.parametrize("text, want", [
    ("score>=0.97*baseline", Budget("score", 0.97, True)),
    ("psnr>=30", Budget("psnr", 30.0)),
    ("  SSIM >= 0.9 ", Budget("ssim", 0.9)),
    ("score>=0.8", Budget("score", 0.8)),
    ("score >= 0.95 * baseline", Budget("score", 0.95, True)),
    ("psnr>=1e1", Budget("psnr", 10.0)),
])
def test_parse_budget(text, want):
    b = parse_budget(text)
    assert b == want
    assert parse_budget(str(b)) == b


@pytest.mark.parametrize("text, match", [
    ("psnr>30", "cannot parse budget"),
    ("psnr<=30", "cannot parse budget"),
    ("psnr>=30dB", "cannot parse budget"),
    ("", "cannot parse budget"),
    ("score>=0.9*base", "cannot parse budget"),
    ("lpips>=0.3", "unknown budget metric 'lpips'"),
    ("psnr>=0.9*baseline", "absolute floor"),
    ("score>=97*baseline", "fraction of the baseline"),
    ("ssim>=1.5", "at most 1"),
    (30, "a budget is a string"),
])
def test_parse_budget_errors(text, match):
    with pytest.raises(BudgetError, match=match):
        parse_budget(text)


def test_budget_meets():
    base = {"recipe": "baseline", "score": 0.5, "psnr": math.inf}
    rel = parse_budget("score>=0.9*baseline")
    assert rel.floor(base) == pytest.approx(0.45)
    assert rel.meets({"score": 0.46}, base) and not rel.meets({"score": 0.44}, base)
    assert not rel.meets({"score": 0.9, "error": "non-finite values"}, base)
    assert not rel.meets({"psnr": 40.0}, base)  # no score measured: never meets a score budget
    assert parse_budget("psnr>=30").meets({"psnr": math.inf}, base)
    assert not parse_budget("psnr>=30").meets({"psnr": float("nan")}, base)
    with pytest.raises(BudgetError, match="needs the baseline's score"):
        rel.floor({"recipe": "baseline"})


def test_step_levels():
    assert step_levels(28) == [14, 10, 7]
    assert step_levels(50) == [25, 17, 12]
    assert step_levels(4) == [2, 1]
    assert step_levels(2) == [1]
    assert step_levels(1) == []


def _techs(recipes):
    return {r.split(":")[0] for r in recipes}


def test_candidates_dit_family(sd3):
    cands, skipped = candidate_space(sd3, 28)
    assert {"sampler", "steps", "blockcache", "ras", "tome"} <= _techs(cands)
    assert "deepcache" not in _techs(cands)
    why = {s["recipe"]: s["reason"] for s in skipped}
    assert "blockcache" in why["deepcache:3"]  # the technique's own message says what to use instead
    assert "sampler:pseudo-corrector@14" in cands and "steps:7" in cands and "ras:0.25" in cands
    # round-robin: the first candidates cover different techniques (a trial cap keeps them all)
    assert len(_techs(cands[:5])) == 5
    assert len(cands) == len(set(cands))
    for r in cands:  # normalised recipe strings
        assert fastgen.recipe_string(fastgen.parse_recipe(r)) == r
    assert fastgen.summary(sd3)["recipe"] == "baseline"


def test_candidates_unet_and_class_families():
    unet = tiny_pipeline("sd")
    cands, skipped = candidate_space(unet, 20)
    assert {"deepcache", "sampler", "steps", "tome"} <= _techs(cands)
    assert not {"ras", "blockcache"} & _techs(cands)
    assert not any("pseudo-corrector" in r for r in cands)  # flow-only sampler on an epsilon model
    assert any(s["recipe"].startswith("ras:") for s in skipped)
    dit = tiny_pipeline("dit")
    cands, _ = candidate_space(dit, 20, extra=["tome:0.4"])
    assert cands[0] == "tome:0.4" and "deepcache" not in _techs(cands) and "ras" in _techs(cands)
    with pytest.raises(fastgen.RecipeError):
        candidate_space(dit, 20, extra=["nosuch:1"])
    fastgen.accelerate(dit, "steps:3")
    with pytest.raises(fastgen.FastgenError, match="unpatched"):
        candidate_space(dit, 20)
    fastgen.remove(dit)


def test_combinations_only_stackable(sd3):
    passed = [{"recipe": "steps:10", "speedup": 2.5}, {"recipe": "sampler:dpm++2m@14", "speedup": 1.9},
              {"recipe": "ras:0.5", "speedup": 1.3}, {"recipe": "tome:0.5", "speedup": 1.2},
              {"recipe": "blockcache:0.08", "speedup": 1.1}]
    combos = combinations(sd3, passed)
    assert "steps:10+ras:0.5" in combos and "sampler:dpm++2m@14+blockcache:0.08" in combos
    assert "ras:0.5+tome:0.5" not in combos  # RAS and ToMe both change the token set: incompatible
    assert not any("steps:" in c and "sampler:" in c for c in combos)  # two step reducers never stack
    assert combinations(sd3, passed, limit=2) == combos[:2]
    assert fastgen.summary(sd3)["recipe"] == "baseline"
    # multi-technique extras that share a technique are never paired (it would name it twice)
    extras = [{"recipe": "steps:10+cfg-interval:0.6", "speedup": 3.0}, {"recipe": "cfg-interval:0.4+tome:0.5", "speedup": 1.5},
              {"recipe": "cfg-interval:0.8", "speedup": 1.1}]
    combos = combinations(sd3, extras)
    assert combos == [] or all(c.count("cfg-interval") == 1 for c in combos)
    assert combinations(sd3, [*extras, {"recipe": "tome:0.3", "speedup": 1.2}]) == ["steps:10+cfg-interval:0.6+tome:0.3",
                                                                                    "tome:0.3+cfg-interval:0.8"]


def test_tune_tiny_writes_schema(sd3, tmp_path):
    seen = []
    cfg = TuneConfig(max_trials=3, screen_prompts=1, confirm_top=1, confirm_prompts=2, confirm_repeats=1, batch=2)
    res = tune(sd3, _tiny_settings(), "psnr>=5", config=cfg, model_name="tiny-sd3",
               progress=lambda f, what: seen.append(f))
    assert fastgen.summary(sd3)["recipe"] == "baseline"
    screened = [t for t in res.trials if t["stage"] == "screen" and t["recipe"] != "baseline"]
    assert 1 <= len(screened) <= 3
    assert res.trials[0]["recipe"] == "baseline" and res.trials[0]["speedup"] == 1.0
    assert all(t["latency_s"] > 0 for t in res.trials if not t.get("error"))
    assert seen and seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    best = res.best
    if best["found"]:
        confirmed = [t for t in res.trials if t["stage"] == "confirm" and t["recipe"] == best["recipe"]]
        assert confirmed and best["speedup"] > 1.0 and best["psnr"] >= 5
    else:
        assert best["recipe"] == "baseline"
    assert res.front and sorted(t["speedup"] for t in res.front) == [t["speedup"] for t in res.front]
    path = tmp_path / "tune.json"
    res.write_json(str(path))
    doc = json.loads(path.read_text())
    assert {"best", "front", "trials"} <= set(doc)
    assert {"recipe", "speedup", "score_ratio", "psnr"} <= set(doc["best"])
    assert doc["trials"][0]["psnr"] == "inf"  # JSON-safe
    assert all({"recipe", "stage", "speedup", "meets_budget"} <= set(t) for t in doc["trials"])
    assert "| baseline | screen |" in format_result(res)


def test_tune_score_budget_uses_quality_fn(sd3):
    def fake_evaluator(prompts, images):
        assert images.dtype == np.uint8
        return {"overall": 0.5 if images.mean() > 0 else 0.0, "color": 1.0}

    with pytest.raises(BudgetError, match="exact evaluator"):
        tune(sd3, _tiny_settings(), "score>=0.9*baseline")
    cfg = TuneConfig(max_trials=2, screen_prompts=1, confirm_top=1, confirm_prompts=1, confirm_repeats=1,
                     combos=False, extra=("steps:1",))
    res = tune(sd3, _tiny_settings(), "score>=0.9*baseline", config=cfg, quality_fn=fake_evaluator)
    assert res.trials[0]["score"] == 0.5 and res.trials[0]["score_ratio"] == 1.0
    assert res.trials[1]["recipe"] == "steps:1" and res.trials[1]["score_ratio"] == 1.0
    assert res.budget == "score>=0.9*baseline" and res.best["score_ratio"] == 1.0
    assert fastgen.summary(sd3)["recipe"] == "baseline"


def test_tune_config_validation():
    with pytest.raises(ValueError, match="max_trials"):
        TuneConfig(max_trials=0)
    with pytest.raises(ValueError, match="step_fractions"):
        TuneConfig(step_fractions=(1.5,))


def test_cli_tune(tmp_path, capsys):
    path = tmp_path / "t.json"
    rc = main(["tune", "--model", "tiny-sd3", "--target", "cpu", "--steps", "2", "--max-trials", "1", "--no-combos",
               "--confirm-top", "1", "--prompts-n", "1", "--repeats", "1", "--screen-prompts", "1",
               "--budget", "ssim>=0.5", "--json", str(path), "--no-progress"])
    assert rc == 0
    doc = json.loads(path.read_text())
    assert doc["budget"] == "ssim>=0.5" and doc["device"] == "cpu" and doc["model"] == "tiny-sd3"
    assert {"recipe", "speedup", "score_ratio", "psnr"} <= set(doc["best"])
    out = capsys.readouterr().out
    assert "budget `ssim>=0.5`" in out and "| recipe | stage |" in out


@pytest.mark.parametrize("argv, match", [
    (["--budget", "psnr>30"], "cannot parse budget"),
    (["--budget", "score>=0.97*baseline"], "exact evaluator"),
    (["--candidate", "nosuch:2"], "unknown technique"),
])
def test_cli_tune_errors(argv, match, capsys):
    rc = main(["tune", "--model", "tiny-sd3", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1


def test_score_screening_slack_then_strict_confirmation(sd3):
    ref = {}

    def strict_evaluator(prompts, images):  # 1.0 for the baseline's own images, 0.5 for anything else
        key = len(prompts)
        ref.setdefault(key, images)  # the runner scores the baseline first in every call
        return {"overall": 1.0 if np.array_equal(ref[key], images) else 0.5}

    settings = _tiny_settings(prompts=("a red circle", "two blue squares", "a green square"))
    kw = dict(screen_prompts=2, confirm_top=1, confirm_prompts=3, confirm_repeats=1, combos=False, max_trials=1,
              extra=("steps:1",))
    res = tune(sd3, settings, "score>=0.97*baseline", config=TuneConfig(**kw), quality_fn=strict_evaluator)
    screened = res.trials[1]
    assert screened["recipe"] == "steps:1" and screened["score"] == 0.5 and not screened["meets_budget"]
    confirm = [t for t in res.trials if t["stage"] == "confirm" and t["recipe"] == "steps:1"]
    if screened["speedup"] > 1.0:  # within one image of the floor: confirmed, and rejected there
        assert confirm and not confirm[0]["meets_budget"]
    assert res.best["recipe"] == "baseline" and not res.best["found"]
    res = tune(sd3, settings, "score>=0.97*baseline", config=TuneConfig(**kw, screen_slack=False),
               quality_fn=strict_evaluator)
    assert not [t for t in res.trials if t["stage"] == "confirm"]
