"""The library surface: every technique config at ``fastgen.*``, user-facing prompt defaults that know nothing of
the zoo's shapes world, and quantization's building blocks visible to ``fastgen.summary``/``fastgen.remove``."""

from __future__ import annotations

import pytest
import torch

import fastgen
from fastgen import prompts as P
from fastgen.errors import FastgenError, RecipeError
from fastgen.registry import list_techniques
from fastgen.testing import tiny_pipeline
from fastgen.zoo import shapes


def _is_anchor(tech) -> bool:
    return tech.config_cls.__module__.startswith("fastgen.bench")


def test_every_technique_config_is_exported_at_fastgen():
    names = {t.config_cls.__name__ for t in list_techniques() if not _is_anchor(t)}
    assert names == set(fastgen.CONFIGS), "keep fastgen.CONFIGS in step with the registry"
    for t in list_techniques():
        if not _is_anchor(t):
            assert getattr(fastgen, t.config_cls.__name__) is t.config_cls
            assert t.config_cls.__name__ in fastgen.__all__ and t.config_cls.__name__ in dir(fastgen)
    with pytest.raises(AttributeError, match="no attribute"):
        fastgen.NoSuchConfig  # noqa: B018


def test_exported_config_round_trips_through_accelerate():
    pipe = tiny_pipeline("sd3")
    fastgen.accelerate(pipe, fastgen.SamplerConfig("dpm++2m", steps=4), fastgen.ToMeConfig(ratio=0.5))
    assert fastgen.summary(pipe)["recipe"].startswith("sampler:dpm++2m@4+tome:")
    fastgen.remove(pipe)


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def test_default_prompts_user_pipeline_is_generic_not_shapes():
    pipe = tiny_pipeline("sd3")
    got = P.default_prompts(pipe, 20)
    assert len(got) == 20 and set(got) <= set(P.GENERIC_PROMPTS)
    for word in ("circle", "square", "triangle"):
        assert not any(word in p for p in P.GENERIC_PROMPTS)


def test_default_prompts_class_conditional_gives_labels():
    pipe = tiny_pipeline("dit")
    got = P.default_prompts(pipe, 10)
    assert all(isinstance(x, int) for x in got) and max(got) < 8


def test_default_prompts_zoo_model_uses_its_world(monkeypatch):
    from fastgen import zoo

    pipe = tiny_pipeline("sd3")
    monkeypatch.setattr(zoo, "name_of", lambda p: "shapes-mmdit")
    assert P.default_prompts(pipe, 4, seed=123) == shapes.sample_prompts(4, 123)
    assert P.default_prompts(pipe, 4) == shapes.sample_prompts(4, shapes.CALIBRATION_SEED)


def test_read_prompts_and_errors(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# my prompts\na lighthouse\n\n  a red fox  \n")
    assert P.read_prompts(f) == ["a lighthouse", "a red fox"]
    with pytest.raises(FastgenError, match="does not exist"):
        P.read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(FastgenError, match="no prompts"):
        P.read_prompts(tmp_path / "empty.txt")
    pipe = tiny_pipeline("sd3")
    assert P.resolve_prompts(pipe, ["x"], 4) == ["x"]
    assert P.resolve_prompts(pipe, str(f), 4) == ["a lighthouse", "a red fox"]
    with pytest.raises(FastgenError, match="empty"):
        P.resolve_prompts(pipe, [], 4)


def _captured_prompts(monkeypatch, recipe):
    from fastgen.quant import calibration

    seen = []
    real = calibration.capture_calibration

    def spy(pipe, prompts=None, **kw):
        seen.append(prompts)
        return real(pipe, prompts, **kw)

    monkeypatch.setattr(calibration, "capture_calibration", spy)
    pipe = tiny_pipeline("sd3")
    fastgen.accelerate(pipe, recipe)
    fastgen.remove(pipe)
    return seen


def test_qalora_recipe_calibrates_a_user_pipeline_on_generic_prompts(monkeypatch):
    from fastgen.quant.recipe import CALIBRATION_PROMPTS

    seen = _captured_prompts(monkeypatch, "qalora:w8a8")
    assert seen == [list(P.GENERIC_PROMPTS[:CALIBRATION_PROMPTS])]


def test_qalora_and_int8_recipes_take_a_prompt_file(monkeypatch, tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("a lighthouse at dusk\na bowl of ramen\n")
    assert _captured_prompts(monkeypatch, f"qalora:w8a8,prompts={f}") == [["a lighthouse at dusk", "a bowl of ramen"]]
    assert _captured_prompts(monkeypatch, f"int8:static,eager,prompts={f}") == [["a lighthouse at dusk",
                                                                                   "a bowl of ramen"]]
    cfg = fastgen.QALoRAConfig.from_string(f"w8a8,prompts={f}")
    assert cfg.calibration_prompts == str(f) and "calibration_prompts" not in cfg.to_dict()
    assert fastgen.QALoRAConfig.from_string(cfg.to_string()) == cfg
    assert fastgen.QALoRAConfig(calibration_prompts=["a", "b"]).calibration_prompts == ("a", "b")
    with pytest.raises(ValueError, match="calibration_prompts"):
        fastgen.QALoRAConfig(calibration_prompts=[])
    with pytest.raises(RecipeError, match="calibration_prompts"):
        fastgen.Int8Config.from_string("static,prompts=")


def test_missing_prompt_file_is_a_clear_error_and_leaves_the_pipeline_untouched(tmp_path):
    pipe = tiny_pipeline("sd3")
    with pytest.raises(FastgenError, match="does not exist"):
        fastgen.accelerate(pipe, f"qalora:w8a8,prompts={tmp_path / 'nope.txt'}")
    assert fastgen.summary(pipe)["recipe"] == "baseline"
    from fastgen import quant

    assert not quant.is_quantized(pipe)


# --------------------------------------------------------------------------------------------------
# Building blocks called directly are seen by the core
# --------------------------------------------------------------------------------------------------


def _images(pipe):
    return pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_quant_building_blocks_show_in_summary_and_remove_restores():
    from fastgen import quant

    pipe = tiny_pipeline("sd3")
    ref = _images(pipe)
    quant.apply_qalora(pipe, quant.QALoRAConfig(a_bits=None))
    quant.to_int8(pipe, compile=False)
    assert fastgen.summary(pipe)["recipe"] == "qalora:w8a16+int8:dynamic,eager"
    assert not torch.equal(_images(pipe), ref)
    fastgen.remove(pipe)
    assert not quant.is_quantized(pipe) and not quant.is_int8(pipe)
    assert fastgen.summary(pipe)["recipe"] == "baseline" and torch.equal(_images(pipe), ref)
    # the building block's own undo drops the record too
    quant.apply_qalora(pipe, quant.QALoRAConfig(a_bits=None))
    quant.remove_qalora(pipe)
    assert fastgen.summary(pipe)["recipe"] == "baseline" and not hasattr(pipe, "_fastgen")
    # inside a technique's install the building blocks are that technique's: one record
    fastgen.accelerate(pipe, "int8:static,eager")
    assert list(fastgen.summary(pipe)["techniques"]) == ["int8"]
    fastgen.remove(pipe)
    assert torch.equal(_images(pipe), ref)


# --------------------------------------------------------------------------------------------------
# One error hierarchy at the core's boundary
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, recipe, kind", [
    ("sd3", "sampler:ddim@8", ValueError),          # a sampler for the other kind of model
    ("sd3", "schedule:nosuch", FileNotFoundError),  # no such shipped schedule
    ("sana", "blockcache:0.9", ValueError),         # the tiny Sana has too few blocks to cache
])
def test_technique_refusals_are_fastgen_errors(family, recipe, kind):
    """A refusal raised as a plain ValueError/FileNotFoundError inside a technique reaches the user as a
    FastgenError (still the built-in type, for old ``except`` clauses), and nothing is patched."""
    pipe = tiny_pipeline(family)
    scheduler = pipe.scheduler
    with pytest.raises(FastgenError) as info:
        fastgen.accelerate(pipe, recipe)
    assert isinstance(info.value, kind)
    assert str(info.value).startswith(recipe.split(":")[0] + ":") or "schedule" in str(info.value)
    assert not hasattr(pipe, "_fastgen") and pipe.scheduler is scheduler
