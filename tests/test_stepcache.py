"""Step caches: DeepCache-style UNet reuse, the DiT block cache, and the anchor recipes."""

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

import fastgen
from fastgen.caches.blockcache import BlockCacheConfig, apply_blockcache, remove_blockcache
from fastgen.caches.deepcache import (DeepCacheConfig, apply_deepcache, deepcache_full_steps, remove_deepcache,
                                      unet_branches)
from fastgen.errors import RecipeError, UnsupportedPipelineError
from fastgen.testing import default_call_kwargs, tiny_pipeline

DITS = ["sd3", "flux", "pixart", "sana", "lumina2", "dit"]
HAS_DEEPCACHE = importlib.util.find_spec("DeepCache") is not None
HAS_CACHEDIT = importlib.util.find_spec("cache_dit") is not None


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _pipe(kind, **kw):
    if kind == "sana":  # the tiny Sana has one block; the cache needs a head and a cached span
        kw.setdefault("transformer", {"num_layers": 2})
    return tiny_pipeline(kind, **kw)


def _run(pipe, steps=6, **extra):
    kw = default_call_kwargs(pipe, steps=steps)
    if "prompt" in kw:
        s = 64 if type(pipe).__name__.startswith("Lumina") else 32
        kw.update(height=s, width=s)
    kw.update(extra)
    return pipe(**kw, output_type="np").images


def _snapshot(pipe):
    model = fastgen.get_adapter(pipe).denoiser(pipe)
    return {
        "class": type(pipe),
        "dicts": {n: set(m.__dict__) for n, m in model.named_modules()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _last(pipe, name):
    return fastgen.summary(pipe)["last_call"][name]


class _Count:
    """Counts real forwards of ``module`` (a torch forward hook on an inner module never reached when skipped)."""

    def __init__(self, module):
        self.n = 0
        self.h = module.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))

    def close(self):
        self.h.remove()


# ------------------------------------------------------------------------------------------------ DeepCache


@pytest.mark.parametrize("kind,recipe", [("sd", "deepcache:3"), ("sdxl", "deepcache:2,b1"), ("sd", "deepcache:4,quad")])
def test_deepcache_apply_remove_bit_exact(kind, recipe):
    pipe = _pipe(kind)
    ref = _run(pipe)
    before = _snapshot(pipe)
    fastgen.accelerate(pipe, recipe)
    assert fastgen.summary(pipe)["recipe"] == recipe
    out = _run(pipe)
    assert np.isfinite(out).all() and not np.array_equal(out, ref)
    assert _last(pipe, "deepcache")["calls_reused"] > 0
    fastgen.accelerate(pipe, "deepcache:2")  # applying again replaces
    assert fastgen.summary(pipe)["recipe"] == "deepcache:2"
    fastgen.remove(pipe)
    after = _snapshot(pipe)
    assert after["class"] is before["class"] and after["dicts"] == before["dicts"]
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    np.testing.assert_array_equal(_run(pipe), ref)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_deepcache_interval_one_is_baseline(kind):
    pipe = _pipe(kind)
    ref = _run(pipe)
    apply_deepcache(pipe, DeepCacheConfig(interval=1))
    np.testing.assert_array_equal(_run(pipe), ref)
    assert _last(pipe, "deepcache")["calls_reused"] == 0
    remove_deepcache(pipe)


@pytest.mark.parametrize("interval", [2, 3, 4])
def test_deepcache_skips_deep_blocks_on_n_minus_1_of_n_steps(interval):
    pipe = _pipe("sd")
    unet = pipe.unet
    steps = 3 * interval
    deep = _Count(unet.mid_block.resnets[0])
    deepest_down = _Count(unet.down_blocks[-1].resnets[0])
    shallow = _Count(unet.up_blocks[-1].resnets[-1])  # consumes skip connection 0: always computed
    apply_deepcache(pipe, DeepCacheConfig(interval=interval))
    _run(pipe, steps=steps)
    rec = _last(pipe, "deepcache")
    assert deep.n == deepest_down.n == 3, "the deep blocks run on 1 of every N steps"
    assert shallow.n == steps
    assert rec["full_steps"] == list(range(0, steps, interval))
    assert rec["cached_steps"] == [s for s in range(steps) if s % interval]
    assert rec["calls_full"] == 3 and rec["calls_reused"] == steps - 3
    for c in (deep, deepest_down, shallow):
        c.close()
    remove_deepcache(pipe)


def test_deepcache_branches_cut_where_documented():
    pipe = _pipe("sd", unet={"layers_per_block": 2})
    lay = unet_branches(pipe.unet)
    assert lay["n"] == 6  # conv_in + 2 layers + downsampler, + 2 layers (last block has no downsampler)
    first_down = _Count(pipe.unet.down_blocks[0].resnets[0].conv1)
    second_down = _Count(pipe.unet.down_blocks[0].resnets[1].conv1)
    apply_deepcache(pipe, DeepCacheConfig(interval=3, branch=1))  # recompute skip connections 0 and 1
    _run(pipe, steps=6)
    assert first_down.n == 6 and second_down.n == 2
    with pytest.raises(ValueError, match="branch 6 does not exist.*branches 0-5"):
        apply_deepcache(pipe, DeepCacheConfig(branch=6))
    remove_deepcache(pipe)


@pytest.mark.skipif(not HAS_DEEPCACHE, reason="the DeepCache package (extra 'anchors') is not installed")
@pytest.mark.parametrize("branch", [0, 1, 3, 5])
def test_deepcache_equals_the_deepcache_package(branch):
    """Same cut, same schedule: bit-identical to DeepCacheSDHelper (two layers per block, as SD1.5/SDXL)."""
    pipe = _pipe("sd", unet={"layers_per_block": 2})
    fastgen.accelerate(pipe, f"anchor-deepcache:3,b{branch}")
    theirs = _run(pipe, steps=7)
    fastgen.remove(pipe)
    fastgen.accelerate(pipe, DeepCacheConfig(interval=3, branch=branch))
    np.testing.assert_array_equal(_run(pipe, steps=7), theirs)
    fastgen.remove(pipe)


def test_deepcache_cfg_batched_and_batch_two():
    pipe = _pipe("sd")
    apply_deepcache(pipe, DeepCacheConfig(interval=2))
    counter = _Count(pipe.unet.mid_block.resnets[0])
    out = _run(pipe, steps=4, num_images_per_prompt=2)  # CFG batched: the UNet sees batch 4, cached whole
    assert out.shape[0] == 2 and np.isfinite(out).all()
    rec = _last(pipe, "deepcache")
    assert rec["calls_full"] == 2 and rec["calls_reused"] == 2 and counter.n == 2
    out = _run(pipe, steps=4, guidance_scale=1.0)  # no CFG: batch 1
    assert _last(pipe, "deepcache")["calls_reused"] == 2
    counter.close()
    remove_deepcache(pipe)


def test_deepcache_state_is_per_call_with_variable_steps():
    a, b = _pipe("sd"), _pipe("sd")
    for p in (a, b):
        apply_deepcache(p, DeepCacheConfig(interval=3))
    _run(a, steps=5)
    assert _last(a, "deepcache")["cached_steps"] == [1, 2, 4]
    second = _run(a, steps=8)
    assert _last(a, "deepcache")["full_steps"] == [0, 3, 6]
    np.testing.assert_array_equal(second, _run(b, steps=8))  # same as a fresh pipeline: nothing leaked


def test_deepcache_quadratic_schedule():
    cfg = DeepCacheConfig(interval=5, schedule="quadratic")
    full = deepcache_full_steps(cfg, 50)
    assert len(full) == 10 and full[0] == 0 and full == sorted(set(full))
    gaps = np.diff(full)
    mid = [g for s, g in zip(full, gaps) if 15 <= s <= 35]
    assert max(mid) < max(gaps[0], gaps[-1]), "denser around the centre than at the ends"
    assert deepcache_full_steps(DeepCacheConfig(interval=3), 7) == [0, 3, 6]
    assert deepcache_full_steps(DeepCacheConfig(interval=1, schedule="quadratic"), 4) == [0, 1, 2, 3]
    pipe = _pipe("sd")
    apply_deepcache(pipe, DeepCacheConfig(interval=3, schedule="quadratic"))
    _run(pipe, steps=9)
    rec = _last(pipe, "deepcache")
    assert rec["full_steps"] == deepcache_full_steps(DeepCacheConfig(interval=3, schedule="quadratic"), 9)


def test_two_patched_pipelines_do_not_interfere():
    a, b, c = _pipe("sd"), _pipe("sd"), _pipe("sd")
    ref_c = _run(c)
    apply_deepcache(a, DeepCacheConfig(interval=2))
    alone_a = _run(a)
    apply_deepcache(b, DeepCacheConfig(interval=3, branch=2))
    alone_b = _run(b)
    np.testing.assert_array_equal(_run(a), alone_a)
    np.testing.assert_array_equal(_run(c), ref_c)
    np.testing.assert_array_equal(_run(b), alone_b)
    assert _last(a, "deepcache")["interval"] == 2 and _last(b, "deepcache")["interval"] == 3
    x, y = _pipe("pixart"), _pipe("pixart")
    ref_y = _run(y)
    apply_blockcache(x, BlockCacheConfig(threshold=5.0, warmup_steps=1))
    _run(x)
    np.testing.assert_array_equal(_run(y), ref_y)


# ------------------------------------------------------------------------------------------------ block cache


@pytest.mark.parametrize("kind", DITS)
def test_blockcache_apply_remove_bit_exact_and_fires(kind):
    pipe = _pipe(kind)
    ref = _run(pipe)
    before = _snapshot(pipe)  # after a first call: FLUX's own cache_context adds a registry on first use
    fastgen.accelerate(pipe, "blockcache:0")  # threshold 0 never skips: bit-exact
    np.testing.assert_array_equal(_run(pipe), ref)
    rec = _last(pipe, "blockcache")
    assert rec["cached_steps"] == [] and rec["rel_change"]["max"] > 0
    fastgen.accelerate(pipe, "blockcache:10,W1,MC-1")  # forced: every step after the warm-up is cached
    out = _run(pipe)
    assert np.isfinite(out).all() and not np.array_equal(out, ref)
    rec = _last(pipe, "blockcache")
    calls_per_step = 2 if kind == "lumina2" else 1  # Lumina2 runs cond and uncond as separate calls
    assert rec["cached_steps"] == [1, 2, 3, 4, 5] and rec["forwards_cached"] == 5 * calls_per_step
    assert rec["blocks_skipped"] > 0
    fastgen.remove(pipe)
    after = _snapshot(pipe)
    assert after["class"] is before["class"] and after["dicts"] == before["dicts"]
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    np.testing.assert_array_equal(_run(pipe), ref)


def test_blockcache_really_skips_the_middle_blocks():
    pipe = _pipe("pixart", transformer={"num_layers": 4})
    counts = [_Count(b.attn1) for b in pipe.transformer.transformer_blocks]
    apply_blockcache(pipe, BlockCacheConfig(threshold=10.0, fn_blocks=1, bn_blocks=1, warmup_steps=2,
                                            max_cached_steps=2))
    _run(pipe, steps=10)
    rec = _last(pipe, "blockcache")
    assert rec["full_steps"] == [0, 1, 4, 7] and rec["cached_steps"] == [2, 3, 5, 6, 8, 9]
    assert [c.n for c in counts] == [10, 4, 4, 10]  # head and tail always run, the middle on full steps
    assert rec["blocks_skipped"] == 2 * 6
    for c in counts:
        c.close()
    remove_blockcache(pipe)


@pytest.mark.parametrize("overrides", [dict(), dict(fn_blocks=2), dict(bn_blocks=1), dict(fn_blocks=1, taylor=True)])
def test_blockcache_sd3_last_block_returns_no_context(overrides):
    """SD3's last JointTransformerBlock (context_pre_only) returns encoder_hidden_states=None."""
    pipe = _pipe("sd3", transformer={"num_layers": 4})
    assert pipe.transformer.transformer_blocks[-1].context_pre_only
    ref = _run(pipe, steps=8)
    apply_blockcache(pipe, BlockCacheConfig(threshold=10.0, warmup_steps=1, **overrides))
    out = _run(pipe, steps=8)
    assert np.isfinite(out).all() and not np.array_equal(out, ref)
    assert _last(pipe, "blockcache")["forwards_cached"] > 0
    remove_blockcache(pipe)
    np.testing.assert_array_equal(_run(pipe, steps=8), ref)


def test_diffusers_fbc_really_crashes_on_sd3_and_the_anchor_refuses():
    """Why diffusers-fbc refuses SD3: diffusers' own FirstBlockCache fails there (diffusers 0.42)."""
    from diffusers import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    pipe = _pipe("sd3")
    with pytest.raises(UnsupportedPipelineError, match="crashes on SD3Transformer2DModel.*blockcache"):
        fastgen.accelerate(pipe, "diffusers-fbc:0.05")
    assert not hasattr(pipe, "_fastgen")
    tr = pipe.transformer
    apply_first_block_cache(tr, FirstBlockCacheConfig(threshold=10.0))
    x = torch.randn(1, 4, 8, 8)
    kw = dict(encoder_hidden_states=torch.randn(1, 5, 64), pooled_projections=torch.randn(1, 64))
    _set_cache_context(tr, CacheContext("cond"))
    try:
        with pytest.raises(TypeError, match="NoneType"):
            tr(x, timestep=torch.tensor([900.0]), **kw)
    finally:
        _set_cache_context(tr, None)
    # ... while ours takes the same SD3 transformer
    apply_blockcache(_pipe("sd3"), BlockCacheConfig(threshold=10.0))


@pytest.mark.parametrize("kind", ["pixart", "flux"])
def test_blockcache_f1b0_equals_diffusers_first_block_cache(kind):
    """With FBC's settings (1 head block, no tail, no warm-up, no limit) the two are bit-identical."""
    pipe = _pipe(kind)
    fastgen.accelerate(pipe, "diffusers-fbc:0.35")
    theirs = _run(pipe, steps=8)
    fastgen.remove(pipe)
    fastgen.accelerate(pipe, "blockcache:0.35,W0,MC-1")
    ours = _run(pipe, steps=8)
    assert _last(pipe, "blockcache")["forwards_cached"] > 0
    np.testing.assert_array_equal(ours, theirs)
    fastgen.remove(pipe)


def test_blockcache_taylor_extrapolates():
    pipe = _pipe("pixart")
    apply_blockcache(pipe, BlockCacheConfig(threshold=10.0, warmup_steps=2, max_cached_steps=1))
    plain = _run(pipe, steps=8)
    apply_blockcache(pipe, BlockCacheConfig(threshold=10.0, warmup_steps=2, max_cached_steps=1, taylor=True))
    taylor = _run(pipe, steps=8)
    assert _last(pipe, "blockcache")["cached_steps"] == [2, 4, 6]
    assert not np.array_equal(plain, taylor)
    remove_blockcache(pipe)


def test_blockcache_per_call_state_and_variable_steps():
    a, b = _pipe("sd3"), _pipe("sd3")
    cfg = BlockCacheConfig(threshold=10.0, warmup_steps=1, max_cached_steps=1)
    apply_blockcache(a, cfg)
    apply_blockcache(b, cfg)
    _run(a, steps=4)
    second = _run(a, steps=7)
    assert _last(a, "blockcache")["full_steps"] == [0, 2, 4, 6]
    np.testing.assert_array_equal(second, _run(b, steps=7))
    out = _run(a, steps=5, num_images_per_prompt=2, guidance_scale=3.0)  # CFG batched, batch 2 -> 4
    assert out.shape[0] == 2 and np.isfinite(out).all() and _last(a, "blockcache")["forwards_cached"] == 2


@pytest.mark.parametrize("kind,recipe,name", [("sd", "deepcache:3+sampler:dpm++2m@6", "deepcache"),
                                              ("sd3", "blockcache:10,W1+sampler:dpm++2m@6", "blockcache")])
def test_stacks_with_a_sampler(kind, recipe, name):
    pipe = _pipe(kind)
    ref = _run(pipe)
    fastgen.accelerate(pipe, recipe)
    out = _run(pipe, steps=20)  # the sampler sets 6 steps; the cache follows the call's own step count
    assert np.isfinite(out).all()
    last = fastgen.summary(pipe)["last_call"]
    assert last["steps_run"] == 6 and len(last[name]["cached_steps"]) >= 3
    fastgen.remove(pipe)
    np.testing.assert_array_equal(_run(pipe), ref)


# ------------------------------------------------------------------------------------------------ errors, recipes


def test_clear_errors_for_unsupported_families():
    sd, sd3 = _pipe("sd"), _pipe("sd3")
    with pytest.raises(UnsupportedPipelineError, match="StableDiffusion3Pipeline.*blockcache"):
        fastgen.accelerate(sd3, "deepcache:3")
    with pytest.raises(UnsupportedPipelineError, match="SD3Transformer2DModel.*blockcache"):
        apply_deepcache(sd3)
    with pytest.raises(UnsupportedPipelineError, match="StableDiffusionPipeline.*UNet.*deepcache"):
        fastgen.accelerate(sd, "blockcache:0.08")
    with pytest.raises(UnsupportedPipelineError, match="UNet.*deepcache"):
        apply_blockcache(sd)
    with pytest.raises(ValueError, match=r"fn_blocks \(2\) \+ bn_blocks \(0\) must leave.*has 2 blocks"):
        fastgen.accelerate(sd3, "blockcache:0.1,F2")
    with pytest.raises(ValueError, match="branch 40 does not exist"):
        fastgen.accelerate(sd, "deepcache:3,b40")
    with pytest.raises(UnsupportedPipelineError, match="does not know SanaTransformerBlock"):
        fastgen.accelerate(_pipe("sana"), "diffusers-fbc:0.05")
    with pytest.raises(UnsupportedPipelineError, match="UNet"):
        fastgen.accelerate(sd, "diffusers-fbc:0.05")
    for p in (sd, sd3):
        assert not hasattr(p, "_fastgen")


@pytest.mark.parametrize("bad", ["deepcache:0", "deepcache:x", "deepcache:3,zz", "deepcache:3,schedule=cubic",
                                 "blockcache:-1", "blockcache:0.1,F0", "blockcache:0.1,Q3", "diffusers-taylorseer:0"])
def test_bad_recipes(bad):
    with pytest.raises(RecipeError):
        fastgen.parse_recipe(bad)


@pytest.mark.parametrize("recipe,config", [
    ("deepcache:3", DeepCacheConfig(3)),
    ("deepcache:5,b2,quad", DeepCacheConfig(5, branch=2, schedule="quadratic")),
    ("deepcache:4,quad,c0.3,p1.5", DeepCacheConfig(4, schedule="quadratic", center=0.3, power=1.5)),
    ("blockcache:0.08", BlockCacheConfig()),
    ("blockcache:0.12,F2,B1,W4,MC-1,taylor", BlockCacheConfig(0.12, 2, 1, 4, -1, True)),
    ("diffusers-fbc:0.05", None), ("diffusers-taylorseer:5", None), ("diffusers-taylorseer:3,W2,O2", None),
    ("anchor-deepcache:3", None),
    ("anchor-cachedit:0.08", None), ("anchor-cachedit:0.2,F2,B1,W3,MC4", None),
])
def test_recipes_round_trip(recipe, config):
    cfgs = fastgen.parse_recipe(recipe)
    if config is not None:
        assert cfgs == [config]
    assert fastgen.recipe_string(cfgs) == recipe


def test_presets():
    assert fastgen.parse_recipe("deepcache:fast") == [DeepCacheConfig(5)]
    assert fastgen.parse_recipe("blockcache:slow") == [BlockCacheConfig(0.05)]
    assert dataclasses.replace(BlockCacheConfig.preset("fast"), taylor=False).threshold == 0.15


# ------------------------------------------------------------------------------------------------ anchors


@pytest.mark.parametrize("kind", ["sd", "sd3", "pixart", "lumina2"])
def test_diffusers_taylorseer_runs_with_our_context_and_removes_cleanly(kind):
    pipe = _pipe(kind)
    ref = _run(pipe, steps=7)
    before = _snapshot(pipe)
    fastgen.accelerate(pipe, "diffusers-taylorseer:2,W2")
    first = _run(pipe, steps=7)
    assert np.isfinite(first).all() and not np.array_equal(first, ref)
    np.testing.assert_array_equal(_run(pipe, steps=7), first)  # the hook state is reset between calls
    fastgen.remove(pipe)
    assert _snapshot(pipe)["dicts"] == before["dicts"]
    np.testing.assert_array_equal(_run(pipe, steps=7), ref)


# ------------------------------------------------------------------------------------------------ latency (slow)


@pytest.mark.slow
def test_deepcache_is_faster_on_a_bench_size_unet():
    """bench-sd (SD1.5 layout, 160-640 channels) at 256 px, 6 DDIM steps, CFG: interval 3 pays clearly."""
    import time

    pipe = tiny_pipeline("sd", size="bench")

    def timed():
        t0 = time.perf_counter()
        _run(pipe, steps=6, height=256, width=256)
        return time.perf_counter() - t0

    timed()
    base, cached = [], []
    for _ in range(2):
        base.append(timed())
        apply_deepcache(pipe, DeepCacheConfig(interval=3))
        cached.append(timed())
        remove_deepcache(pipe)
    assert min(base) / min(cached) > 1.5


# ------------------------------------------------------------------------------------------------ cache-dit anchor


@pytest.mark.skipif(not HAS_CACHEDIT, reason="cache-dit (extra 'anchors') is not installed")
@pytest.mark.parametrize("kind", ["sd3", "pixart", "flux"])
def test_cachedit_anchor_caches_and_removes_bit_exactly_without_touching_other_pipelines(kind):
    """cache-dit patches ``pipe.__class__.__call__``: the anchor gives the pipeline a class of its own, so a
    second pipeline of the same class (here patched by fastgen too) is untouched; remove is bit-exact."""
    pipe, other = _pipe(kind), _pipe(kind)
    ref, other_ref = _run(pipe), _run(other)
    before = _snapshot(pipe)
    fastgen.accelerate(other, "sampler:euler@6")
    fastgen.accelerate(pipe, "anchor-cachedit:1,W1")  # threshold 1 caches every step after the warm-up
    assert type(pipe) is not type(other)
    assert fastgen.summary(pipe)["recipe"] == "anchor-cachedit:1,W1"
    out = _run(pipe)
    assert np.isfinite(out).all() and not np.array_equal(out, ref)
    np.testing.assert_array_equal(_run(pipe), out)  # cache-dit's context is reset at every call
    fastgen.remove(other)
    np.testing.assert_array_equal(_run(other), other_ref)
    fastgen.accelerate(pipe, "anchor-cachedit:0")  # applying again replaces; threshold 0 never caches
    np.testing.assert_array_equal(_run(pipe), ref)
    fastgen.remove(pipe)
    after = _snapshot(pipe)
    assert after["class"] is before["class"] and after["dicts"] == before["dicts"]
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    np.testing.assert_array_equal(_run(pipe), ref)


@pytest.mark.skipif(not HAS_CACHEDIT, reason="cache-dit (extra 'anchors') is not installed")
def test_cachedit_anchor_refuses_what_it_cannot_do_and_leaves_nothing_patched():
    from fastgen.errors import IncompatibleTechniquesError

    pipe = _pipe("sd3")  # 2 blocks
    with pytest.raises(ValueError, match="must leave blocks to cache"):
        fastgen.accelerate(pipe, "anchor-cachedit:0.1,F2")
    assert fastgen.summary(pipe)["recipe"] == "baseline" and type(pipe).__name__ == "StableDiffusion3Pipeline"
    with pytest.raises(IncompatibleTechniquesError, match="runs alone"):
        fastgen.accelerate(pipe, "anchor-cachedit:0.1+blockcache:0.1")
    fastgen.accelerate(pipe, "ras:0.5")
    with pytest.raises(IncompatibleTechniquesError, match="runs alone"):
        fastgen.accelerate(pipe, "anchor-cachedit:0.1")
    fastgen.remove(pipe)
    with pytest.raises(UnsupportedPipelineError):
        fastgen.accelerate(_pipe("sd"), "anchor-cachedit:0.1")
