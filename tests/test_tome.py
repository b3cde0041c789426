import numpy as np
import pytest
import torch

import fastgen
from fastgen.caches import tome as tome_mod
from fastgen.caches.tome import ToMeConfig, bipartite_matching
from fastgen.errors import RecipeError, UnsupportedPipelineError
from fastgen.testing import default_call_kwargs, tiny_pipeline


def _run(pipe, steps=3, **kw):
    args = default_call_kwargs(pipe, steps=steps)
    if "prompt" in args:
        args.update(height=32, width=32)
    args.update(kw)
    return pipe(**args, output_type="np").images


def test_matching_merges_r_tokens_and_round_trips():
    x = torch.randn(2, 64, 8)
    m = bipartite_matching(x, 8, 8, 2, 2, r=20, generator=torch.Generator().manual_seed(0))
    assert m.num_rows == 44 and m.assign.shape == (2, 64)
    assert torch.equal(m.counts.sum(1).squeeze(-1), torch.tensor([64.0, 64.0]))
    merged = m.merge(x)
    assert merged.shape == (2, 44, 8)
    # unmerged tokens that were alone in their row come back exactly
    alone = (m.counts.squeeze(-1).gather(1, m.assign) == 1)
    assert torch.allclose(m.unmerge(merged)[alone], x[alone])
    # r = 0 is a permutation: merge then unmerge is the identity
    m0 = bipartite_matching(x, 8, 8, 2, 2, r=0)
    assert torch.equal(m0.unmerge(m0.merge(x)), x)
    with pytest.raises(ValueError, match="only 48 sources"):
        bipartite_matching(x, 8, 8, 2, 2, r=49)


def test_matching_merges_duplicates_first():
    base = torch.randn(1, 16, 4)
    x = base.clone()
    x[0, 1] = x[0, 0]  # token 1 duplicates token 0 (its window's top-left destination)
    m = bipartite_matching(x, 4, 4, 2, 2, r=1)  # no generator: top-left is the destination
    assert m.assign[0, 1] == m.assign[0, 0]


def test_config_errors():
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 0.750\]"):
        ToMeConfig(ratio=0.9)
    assert ToMeConfig(ratio=0.85, sx=4, sy=4).ratio == 0.85
    with pytest.raises(ValueError, match="max_downsample"):
        ToMeConfig(max_downsample=3)
    with pytest.raises(ValueError, match="nothing to merge"):
        ToMeConfig(merge_attn=False)
    with pytest.raises(RecipeError, match="unknown ToMe option 'speed'"):
        fastgen.parse_recipe("tome:0.5,speed=2")
    cfg = fastgen.parse_recipe("tome:fast,max_downsample=2,use_rand=false")[0]
    assert cfg == ToMeConfig(ratio=0.6, max_downsample=2, use_rand=False)
    assert fastgen.recipe_string([cfg]) == "tome:0.6,max_downsample=2,use_rand=False"


@pytest.mark.parametrize("kind,recipe", [("sd", "tome:0.5"), ("sdxl", "tome:0.5,max_downsample=2"), ("sd3", "tome:0.5"),
                                         ("pixart", "tome:0.5,merge_mlp=true"), ("dit", "tome:0.3")])
def test_apply_remove_bit_exact_and_merging_happens(kind, recipe):
    pipe = tiny_pipeline(kind)
    ref = _run(pipe)
    procs = {n: m.processor for n, m in pipe.components[fastgen.get_adapter(pipe).denoiser_attr].named_modules() if hasattr(m, "processor")}
    fastgen.accelerate(pipe, recipe)
    out = _run(pipe)
    rec = fastgen.summary(pipe)["last_call"]["tome"]
    assert rec["merged_calls"] > 0 and rec["tokens_to_rows"]
    for n, rows in rec["tokens_to_rows"].items():
        assert rows == n - int(n * fastgen.parse_recipe(recipe)[0].ratio)
    assert not np.array_equal(out, ref) and np.isfinite(out).all()
    fastgen.remove(pipe)
    denoiser = pipe.components[fastgen.get_adapter(pipe).denoiser_attr]
    assert {n: m.processor for n, m in denoiser.named_modules() if hasattr(m, "processor")} == procs
    np.testing.assert_array_equal(_run(pipe), ref)
    assert not hasattr(denoiser, "_diffusers_hook") or not denoiser._diffusers_hook.hooks


def test_attention_really_sees_fewer_tokens():
    pipe = tiny_pipeline("sd3")
    seen = []
    blk = pipe.transformer.transformer_blocks[0]
    h = blk.attn.to_q.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    fastgen.accelerate(pipe, "tome:0.5")
    _run(pipe, steps=2)
    assert seen and set(seen) == {512}
    fastgen.remove(pipe)
    seen.clear()
    _run(pipe, steps=2)
    assert set(seen) == {1024}
    h.remove()


def test_mlp_merge_and_min_tokens():
    pipe = tiny_pipeline("pixart")
    seen = []
    ff = pipe.transformer.transformer_blocks[0].ff
    h = ff.net[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    fastgen.accelerate(pipe, "tome:0.5,merge_mlp=true")
    _run(pipe, steps=1)
    assert set(seen) == {512}
    fastgen.accelerate(pipe, "tome:0.5,merge_mlp=true,min_tokens=2048")  # replaces; 1024 tokens -> left alone
    seen.clear()
    _run(pipe, steps=1)
    assert set(seen) == {1024} and fastgen.summary(pipe)["last_call"]["tome"]["merged_calls"] == 0
    h.remove()
    fastgen.remove(pipe)


def test_matching_reuse_across_steps_and_blocks(monkeypatch):
    calls = []
    real = tome_mod.bipartite_matching
    monkeypatch.setattr(tome_mod, "bipartite_matching", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipe = tiny_pipeline("sd3")  # 2 joint blocks, batched CFG
    fastgen.accelerate(pipe, "tome:0.5,share_matching=false")
    _run(pipe, steps=4)
    assert len(calls) == 8  # every block, every step
    calls.clear()
    fastgen.accelerate(pipe, "tome:0.5")  # shared per level
    _run(pipe, steps=4)
    assert len(calls) == 4
    calls.clear()
    fastgen.accelerate(pipe, "tome:0.5,recompute_every=2")
    _run(pipe, steps=4)
    assert len(calls) == 2
    calls.clear()
    _run(pipe, steps=3)  # a new call with another step count starts clean
    assert len(calls) == 2
    fastgen.remove(pipe)


def test_unsupported_and_silent_no_op_cases_raise():
    flux = tiny_pipeline("flux")
    with pytest.raises(UnsupportedPipelineError, match="tome does not support FluxPipeline.*blockcache"):
        fastgen.accelerate(flux, "tome:0.5")
    assert not hasattr(flux, "_fastgen")
    sdxl = tiny_pipeline("sdxl")
    with pytest.raises(ValueError, match="would merge nothing.*use max_downsample=2"):
        fastgen.accelerate(sdxl, "tome:0.5")
    assert not hasattr(sdxl, "_fastgen")


def test_two_pipelines_and_batch_two():
    a, b = tiny_pipeline("sd"), tiny_pipeline("sd")
    ref_b = _run(b, num_images_per_prompt=2)
    fastgen.accelerate(a, "tome:0.5")
    out = _run(a, num_images_per_prompt=2)
    assert out.shape[0] == 2
    np.testing.assert_array_equal(_run(b, num_images_per_prompt=2), ref_b)
    fastgen.remove(a)


def test_tomesd_anchor_round_trip():
    pytest.importorskip("tomesd")
    pipe = tiny_pipeline("sd")
    ref = _run(pipe)
    fastgen.accelerate(pipe, "tomesd:0.5")
    assert not np.array_equal(_run(pipe), ref)
    fastgen.remove(pipe)
    np.testing.assert_array_equal(_run(pipe), ref)
    with pytest.raises(UnsupportedPipelineError):
        fastgen.accelerate(tiny_pipeline("sd3"), "tomesd:0.5")
