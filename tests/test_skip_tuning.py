"""Skip-Tuning (samplers/skip_tuning.py): UNet skip scales through up-block hooks."""

import numpy as np
import pytest

import fastgen
from fastgen.errors import RecipeError, UnsupportedPipelineError
from fastgen.testing import default_call_kwargs, tiny_pipeline
from fastgen.samplers.skip_tuning import SkipTuningConfig, search_skip_tuning, skip_scales


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _img(pipe):
    return np.asarray(pipe(**default_call_kwargs(pipe, steps=3)).images[0], dtype=np.float64)


def test_scales_run_from_the_deepest_to_the_outermost_skip():
    pipe = tiny_pipeline("sd")
    s = skip_scales(pipe, SkipTuningConfig(0.5, 1.0))
    flat_consumed = [x for block in s for x in reversed(block)]
    assert flat_consumed[0] == 1.0 and flat_consumed[-1] == 0.5
    assert flat_consumed == sorted(flat_consumed, reverse=True)
    assert [len(b) for b in s] == [len(b.resnets) for b in pipe.unet.up_blocks]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_apply_remove_round_trip(kind):
    pipe = tiny_pipeline(kind)
    ref = _img(pipe)
    fastgen.accelerate(pipe, "skip-tuning:1,1")
    assert np.array_equal(_img(pipe), ref)  # the no-op scales are exact
    fastgen.accelerate(pipe, "skip-tuning:0.6,0.9")  # re-apply replaces
    assert fastgen.summary(pipe)["recipe"] == "skip-tuning:0.6,0.9"
    assert np.abs(_img(pipe) - ref).max() > 0
    fastgen.remove(pipe)
    assert np.array_equal(_img(pipe), ref)
    assert all(not hasattr(b, "_diffusers_hook") for b in pipe.unet.up_blocks)


def test_errors():
    with pytest.raises(UnsupportedPipelineError):
        fastgen.accelerate(tiny_pipeline("sd3"), "skip-tuning:0.9")
    with pytest.raises(RecipeError, match="RHO_TOP"):
        fastgen.parse_recipe("skip-tuning:big")
    with pytest.raises(ValueError, match="scale in \\(0, 2\\]"):
        SkipTuningConfig(0.0)


def test_search_picks_the_best_scored_grid_point():
    pipe = tiny_pipeline("sd")
    kw = {k: v for k, v in default_call_kwargs(pipe, steps=2).items() if k not in ("prompt", "generator")}

    def darker_is_better(prompts, images):  # a score that any change of the skips moves
        return -float(images.mean())

    best, rows = search_skip_tuning(pipe, ["a red circle", "a blue square"], darker_is_better, rho_top=(0.7, 1.0),
                                    rho_bottom=(1.0,), call_kwargs=kw)
    assert {(r["rho_top"], r["rho_bottom"]) for r in rows} == {(0.7, 1.0), (1.0, 1.0)}
    top = max(rows, key=lambda r: r["score"])
    assert (best.rho_top, best.rho_bottom) == (top["rho_top"], top["rho_bottom"])
    assert fastgen.summary(pipe)["recipe"] == "baseline"


def test_cli_searches_and_scores_on_the_zoo_unet(tmp_path, capsys):
    import json

    from fastgen import zoo
    from fastgen.samplers.skip_tuning import main

    if not zoo.weights_path("shapes-unet").exists():
        pytest.skip("shapes-unet weights not installed")
    out = tmp_path / "skip.json"
    assert main(["shapes-unet", "--steps", "1", "--prompts", "2", "--eval", "2", "--json", str(out),
                 "--threads", "1"]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert len(res["grid"]) == 10 and res["best"].startswith("skip-tuning:")
    assert "no-op: held-out score" in text and "grid on 2 calibration prompts" in text
