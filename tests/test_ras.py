"""Region-adaptive sampling (fastgen.caches.ras) on tiny real pipelines of every DiT family."""

import numpy as np
import pytest
import torch

import fastgen
from fastgen.caches.ras import RASConfig, apply_ras, remove_ras, select_tokens
from fastgen.bench.profile import capture_denoiser_call
from fastgen.bench.experiments.ras import _Driver
from fastgen.errors import RecipeError, UnsupportedPipelineError
from fastgen.testing import default_call_kwargs, tiny_pipeline

FAMILIES = ["sd3", "pixart", "dit", "sana", "flux", "lumina2"]
# pixel sizes giving a 48x32 latent (DiT is class-conditional with a fixed square size)
NON_SQUARE = {"sd3": (48, 32), "pixart": (48, 32), "sana": (96, 64), "flux": (96, 64), "lumina2": (384, 256)}
SPARSE = RASConfig(sample_ratio=0.5, warmup_steps=2, dense_steps=(4,))


def _kwargs(pipe, kind, steps=6, batch=1, hw=None, **extra):
    kw = default_call_kwargs(pipe, steps=steps)
    if kind == "dit":
        kw["class_labels"] = [0, 2][:batch]
    else:
        kw["prompt"] = ["a red circle left of a blue square", "two green triangles"][:batch]
        h, w = hw or ((64, 64) if kind == "lumina2" else (32, 32))
        kw.update(height=h, width=w)
    kw.update(extra)
    return kw


def _run(pipe, kind, **kw):
    return pipe(**_kwargs(pipe, kind, **kw), output_type="np").images


def _snapshot(pipe):
    model = pipe.transformer
    return {
        "class": type(pipe), "scheduler": pipe.scheduler,
        "dicts": {n: set(m.__dict__) for n, m in model.named_modules()},
        "procs": {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


@pytest.mark.parametrize("kind", FAMILIES)
def test_apply_run_remove_is_bit_exact(kind):
    pipe = tiny_pipeline(kind)
    ref = _run(pipe, kind)
    before = _snapshot(pipe)
    assert fastgen.accelerate(pipe, SPARSE) is pipe
    out = _run(pipe, kind)
    assert np.isfinite(out).all() and not np.array_equal(out, ref)
    rec = fastgen.summary(pipe)["last_call"]["ras"]
    assert rec["dense_steps"] == [0, 1, 4] and rec["sparse_steps"] == 3
    assert 0.5 < rec["token_fraction"] < 1.0
    fastgen.remove(pipe)
    after = _snapshot(pipe)
    assert after["class"] is before["class"] and after["scheduler"] is before["scheduler"]
    assert after["dicts"] == before["dicts"] and after["procs"] == before["procs"]
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    np.testing.assert_array_equal(_run(pipe, kind), ref)
    assert not hasattr(pipe, "_fastgen")


@pytest.mark.parametrize("kind", FAMILIES)
def test_ratio_one_equals_baseline_bit_exactly(kind):
    """All-dense RAS still routes K/V through the caches and processors: the output must not change."""
    pipe = tiny_pipeline(kind)
    ref = _run(pipe, kind, batch=2)
    apply_ras(pipe, RASConfig(sample_ratio=1.0))
    np.testing.assert_array_equal(_run(pipe, kind, batch=2), ref)
    assert fastgen.summary(pipe)["last_call"]["ras"]["token_fraction"] == 1.0
    remove_ras(pipe)


@pytest.mark.parametrize("kind,rule", [(k, "high") for k in FAMILIES] + [("flux", "low"), ("lumina2", "middle")])
def test_sparse_forward_reproduces_dense_forward_on_identical_inputs(kind, rule):
    """Right after a dense forward, a sparse forward of the same input sees exact K/V for every skipped
    token, so it must give the dense output: this checks gather/scatter, K/V recovery, RoPE positions
    (FLUX, Lumina2) and Sana's conv FFN, per sample (batch 2 + CFG), on a non-square latent."""
    pipe = tiny_pipeline(kind)
    hw = None if kind == "dit" else NON_SQUARE[kind]
    kw = _kwargs(pipe, kind, batch=2, hw=hw, guidance_scale=4.0)
    args, fkw = capture_denoiser_call(pipe, kw)
    fkw = {**fkw, "return_dict": False}
    with torch.no_grad():
        ref = pipe.transformer(*args, **fkw)[0]
    d = _Driver(pipe, args, fkw, RASConfig(sample_ratio=0.3, rule=rule, share="sample"), 4.0)
    try:
        dense = d.forward(False)[0]
        sparse = d.forward(True)[0]
        calls = d.rt.record["calls"]
    finally:
        d.close()
    assert torch.equal(dense, ref)
    assert [c["mode"] for c in calls] == ["dense", "sparse"] and calls[1]["tokens"] < calls[1]["of"]
    torch.testing.assert_close(sparse, ref, rtol=0, atol=1e-5)


def test_sparse_steps_skip_compute_in_the_blocks():
    pipe = tiny_pipeline("sd3")
    seen = []
    handles = [blk.ff.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1])) for blk in pipe.transformer.transformer_blocks]
    n = 32 * 32  # tiny sd3: patch 1, VAE factor 1
    apply_ras(pipe, RASConfig(sample_ratio=0.25, warmup_steps=2, dense_steps=(5,)))
    _run(pipe, "sd3", steps=8)
    for h in handles:
        h.remove()
    per_step = [seen[i] for i in range(0, len(seen), len(pipe.transformer.transformer_blocks))]
    assert per_step == [n, n, n // 4, n // 4, n // 4, n, n // 4, n // 4]
    steps = fastgen.summary(pipe)["last_call"]["ras"]["steps"]
    assert [s["dense"] for s in steps] == [True, True, False, False, False, True, False, False]
    assert [s["tokens"] for s in steps] == per_step
    remove_ras(pipe)


def test_cfg_pair_shares_the_selection_and_prompts_do_not():
    pipe = tiny_pipeline("sd3")
    apply_ras(pipe, SPARSE)
    rt = fastgen.hooks.get_state(pipe).saved["ras"]["runtime"]
    picks = []
    begin = rt.begin

    def spy(*a, **k):
        ctx = begin(*a, **k)
        if ctx is not None and ctx.mode == "sparse":
            picks.append(ctx.idx.clone())
        return ctx

    rt.begin = spy
    _run(pipe, "sd3", batch=2, guidance_scale=5.0)
    assert picks and all(p.shape[0] == 4 for p in picks)  # [uncond x2, cond x2]
    for p in picks:
        assert torch.equal(p[0], p[2]) and torch.equal(p[1], p[3])
    assert any(not torch.equal(p[0], p[1]) for p in picks)
    remove_ras(pipe)


@pytest.mark.parametrize("kind", ["flux", "pixart", "sana", "lumina2", "dit"])
def test_batch2_cfg_non_square_runs_and_restores(kind):
    pipe = tiny_pipeline(kind)
    hw = None if kind == "dit" else NON_SQUARE[kind]
    extra = {"true_cfg_scale": 2.0, "negative_prompt": ["blue", "red"]} if kind == "flux" else {"guidance_scale": 4.0}
    ref = _run(pipe, kind, batch=2, hw=hw, steps=5, **extra)
    apply_ras(pipe, RASConfig(sample_ratio=0.4, warmup_steps=1, dense_steps=(3,)))
    out = _run(pipe, kind, batch=2, hw=hw, steps=5, **extra)
    assert out.shape == ref.shape and np.isfinite(out).all()
    rec = fastgen.summary(pipe)["last_call"]["ras"]
    assert rec["sparse_steps"] == 3 and not rec["off_calls"]
    if kind in ("flux", "lumina2"):  # CFG as separate calls: the second call of a step is sparse too
        assert any(c["slot"] == 1 and c["mode"] == "sparse" for c in rec["calls"])
    remove_ras(pipe)
    np.testing.assert_array_equal(_run(pipe, kind, batch=2, hw=hw, steps=5, **extra), ref)


@pytest.mark.parametrize("recipe", ["ras:0.5", "sampler:dpm++2m+ras:0.5", "sampler:unipc@6+ras:fast"])
def test_scheduler_agnostic(recipe):
    pipe = tiny_pipeline("sd3")
    fastgen.accelerate(pipe, recipe)
    out = _run(pipe, "sd3", steps=8)
    assert np.isfinite(out).all()
    assert fastgen.summary(pipe)["last_call"]["ras"]["sparse_steps"] > 0
    fastgen.remove(pipe)


def test_recipes_and_presets():
    assert fastgen.parse_recipe("ras:0.5") == [RASConfig(sample_ratio=0.5)]
    assert fastgen.parse_recipe("ras:fast") == [RASConfig.preset("fast")] == [RASConfig(sample_ratio=0.25)]
    assert fastgen.parse_recipe("ras") == [RASConfig()]
    cfg = fastgen.parse_recipe("ras:0.25,rule=low,starvation=0,warmup=4,dense=12/20,every=5,schedule=1/0.5,share=sample")[0]
    assert cfg == RASConfig(sample_ratio=0.25, rule="low", starvation=0, warmup_steps=4, dense_steps=(12, 20),
                            dense_every=5, ratio_schedule=(1.0, 0.5), share="sample")
    assert fastgen.parse_recipe(fastgen.recipe_string([cfg])) == [cfg]
    assert fastgen.recipe_string([RASConfig(0.5)]) == "ras:0.5"


def test_schedule():
    c = RASConfig(sample_ratio=0.25)
    assert [s for s in range(28) if c.step_plan(s, 28)[0]] == [0, 1, 2, 3, 12, 20]
    c = RASConfig(ratio_schedule=(1.0, 1.0, 0.5, 0.3), warmup_steps=0, dense_steps=(), dense_every=3)
    assert [c.step_plan(s, 10)[:2] for s in range(7)] == [(True, 1.0), (True, 1.0), (False, 0.5), (True, 1.0),
                                                          (False, 0.3), (False, 0.3), (True, 1.0)]


def test_select_tokens_rules():
    score = torch.tensor([[1.0, 5.0, 2.0, 4.0, 3.0, 0.5]])
    assert select_tokens(score, 2, "high").tolist() == [[1, 3]]
    assert select_tokens(score, 2, "low").tolist() == [[0, 5]]
    assert select_tokens(score, 2, "ends", high_fraction=0.5).tolist() == [[1, 5]]
    # middle: skip 4 tokens: 1 from the top (5.0), 3 from the bottom (0.5, 1.0, 2.0) -> keep 4.0, 3.0
    assert select_tokens(score, 2, "middle", high_fraction=0.25).tolist() == [[3, 4]]
    age = torch.tensor([[0, 0, 0, 0, 0, 30]])
    assert select_tokens(score, 2, "high", starvation=0.1, age_GN=age).tolist() == [[1, 5]]  # starved token wins


@pytest.mark.parametrize("bad", [dict(sample_ratio=0), dict(sample_ratio=1.5), dict(rule="top"), dict(metric="var"),
                                 dict(share="all"), dict(warmup_steps=-1), dict(dense_steps=5), dict(dense_steps=(2.5,)),
                                 dict(high_fraction=2), dict(starvation=-1), dict(ratio_schedule=()),
                                 dict(ratio_schedule=(0.5, 0)), dict(dense_every=0)])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        RASConfig(**bad)


@pytest.mark.parametrize("bad", ["ras:abc", "ras:0.5,foo=1", "ras:0.5,rule", "ras:2", "ras:0.5,rule=sideways"])
def test_bad_recipe_raises_and_leaves_pipe_alone(bad):
    pipe = tiny_pipeline("dit")
    with pytest.raises(RecipeError):
        fastgen.accelerate(pipe, bad)
    assert not hasattr(pipe, "_fastgen")


def test_unet_is_rejected_by_name():
    pipe = tiny_pipeline("sd")
    with pytest.raises(UnsupportedPipelineError, match="StableDiffusionPipeline.*SD3"):
        fastgen.accelerate(pipe, "ras:0.5")
    with pytest.raises(UnsupportedPipelineError, match="UNet2DConditionModel.*tome"):
        apply_ras(pipe, RASConfig())
    assert not hasattr(pipe, "_fastgen")


def test_custom_processor_is_rejected():
    from diffusers.models.attention_processor import AttnProcessor

    pipe = tiny_pipeline("pixart")
    pipe.transformer.transformer_blocks[0].attn1.set_processor(AttnProcessor())
    with pytest.raises(UnsupportedPipelineError, match="AttnProcessor"):
        apply_ras(pipe, RASConfig())
    assert not hasattr(pipe, "_fastgen")


def test_apply_twice_replaces_and_calls_start_clean():
    pipe = tiny_pipeline("sd3")
    ref = _run(pipe, "sd3")
    apply_ras(pipe, SPARSE)
    apply_ras(pipe, RASConfig(sample_ratio=0.25, warmup_steps=1, dense_steps=()))
    assert fastgen.summary(pipe)["recipe"] == "ras:0.25,warmup=1,dense=none"
    a = _run(pipe, "sd3")
    b = _run(pipe, "sd3")  # no state leaks from one call into the next
    np.testing.assert_array_equal(a, b)
    rec = fastgen.summary(pipe)["last_call"]["ras"]
    assert rec["dense_steps"] == [0] and rec["token_fraction"] < 0.5
    remove_ras(pipe)
    np.testing.assert_array_equal(_run(pipe, "sd3"), ref)


def test_ras_and_tome_in_one_recipe_are_refused_before_patching():
    import fastgen
    from fastgen.errors import IncompatibleTechniquesError

    pipe = tiny_pipeline("sd3")
    for recipe in ("ras:0.5+tome:0.5", "tome:0.5+ras:0.5"):
        with pytest.raises(IncompatibleTechniquesError, match="same recipe"):
            fastgen.accelerate(pipe, recipe)
        assert fastgen.summary(pipe)["recipe"] == "baseline"
    fastgen.accelerate(pipe, "tome:0.5")
    with pytest.raises(IncompatibleTechniquesError, match="already applied|apply only one"):
        fastgen.accelerate(pipe, "ras:0.5")
    assert fastgen.summary(pipe)["recipe"] == "tome:0.5"
    fastgen.remove(pipe)
