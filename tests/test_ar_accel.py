"""HMAR mode and the acceleration techniques of fastgen.ar (fastvar, code, cfg-share, var-attn) through
fastgen.accelerate / remove / summary. Tiny random models, CPU, seconds."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fastgen
from fastgen.ar import VAR, VARConfig, VQVAE, VQVAEConfig, load_official
from fastgen.ar.accel import CFGShareConfig, CoDeConfig, FastVARConfig
from fastgen.ar.pipeline import VARPipeline
from fastgen.ar.checkpoints import hmar_official_to_fastgen
from fastgen.ar.var import block_causal_buffers, filter_top_k_top_p, scale_contributions
from fastgen.errors import MissingExtraError, RecipeError, UnsupportedPipelineError

torch.set_num_threads(1)

PNS = (1, 2, 3, 4)
V, CVAE, NCLS = 64, 8, 10


def tiny_vae(seed: int = 0) -> VQVAE:
    torch.manual_seed(seed)
    vae = VQVAE(VQVAEConfig(vocab_size=V, z_channels=CVAE, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                            patch_nums=PNS)).eval()
    with torch.no_grad():
        vae.quantize.embedding.weight.normal_(0, 1.0)
    return vae


def tiny_var(seed: int = 1, depth: int = 2, **kw) -> VAR:
    torch.manual_seed(seed)
    var = VAR(VARConfig(depth=depth, embed_dim=32, num_heads=2, patch_nums=PNS, vocab_size=V, Cvae=CVAE,
                        num_classes=NCLS, drop_path_rate=0.0, **kw), init=False).eval()
    with torch.no_grad():  # random weights with a non-trivial output (no near-zero init of gates and head)
        for p in var.parameters():
            p.normal_(0, 0.3)
    return var


@pytest.fixture
def pipe():
    p = VARPipeline(tiny_vae(), tiny_var())
    p.set_progress_bar_config(disable=True)
    return p


def _imgs(p, **kw):
    return p([1, 2, 3], seed=0, output_type="pt", guidance_scale=2.0, **kw)


# ------------------------------------------------------------------------------------------------------
# HMAR
# ------------------------------------------------------------------------------------------------------


def test_markov_attention_mask_is_block_diagonal():
    lvl, bias = block_causal_buffers(PNS, markov=True)
    _, causal = block_causal_buffers(PNS)
    d = lvl[0]
    visible = bias[0, 0] == 0
    assert torch.equal(visible, d[:, None] == d[None, :])
    assert torch.equal(causal[0, 0] == 0, d[:, None] >= d[None, :])
    assert int(visible.sum()) == sum(p ** 4 for p in PNS)  # one pn^2 x pn^2 block per scale
    var = tiny_var(markov=True)
    assert torch.equal(var.attn_bias_for_masking, bias)
    # functionally: a scale's logits do not depend on any other scale's inputs
    g = torch.Generator().manual_seed(0)
    lab = torch.tensor([1, 2])
    x = torch.randn(2, var.L - 1, CVAE, generator=g)
    x2 = x.clone()
    x2[:, :4] += torch.randn(2, 4, CVAE, generator=g)  # change scale 1's inputs only
    with torch.no_grad():
        a, b = var(lab, x), var(lab, x2)
    torch.testing.assert_close(a[:, 5:], b[:, 5:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 1:5], b[:, 1:5])
    vcausal = tiny_var()  # VAR: later scales do depend on scale 1
    with torch.no_grad():
        assert not torch.allclose(vcausal(lab, x)[:, 5:], vcausal(lab, x2)[:, 5:])


def _ref_markov_sample(var, vae, labels, cfg, top_k, top_p, gen):
    """Teacher-forcing reference: at every scale, the full block-diagonal forward on the tokens so far."""
    B, K = labels.shape[0], len(PNS)
    cum = np.cumsum([p * p for p in PNS]).tolist()
    toks = []
    for si, pn in enumerate(PNS):
        padded = toks + [torch.zeros(B, p * p, dtype=torch.long) for p in PNS[si:]]
        x = vae.quantize.idxBl_to_var_input(padded)
        lab2 = torch.cat([labels, torch.full_like(labels, NCLS)])
        with torch.no_grad():
            lg = var(lab2, torch.cat([x, x]))[:, cum[si] - pn * pn: cum[si]]
        t = cfg * si / (K - 1)
        lg = (1 + t) * lg[:B] - t * lg[B:]
        probs = filter_top_k_top_p(lg, top_k, top_p).softmax(-1).view(-1, V)
        toks.append(torch.multinomial(probs, 1, replacement=True, generator=gen).view(B, pn * pn))
    return toks


def test_markov_sampling_needs_no_cache_and_matches_teacher_forcing():
    vae, var = tiny_vae(), tiny_var(markov=True, mask_layers=0)
    var.attach_vae(vae)
    labels = torch.tensor([1, 7, NCLS])
    ours = var.sample(3, labels, cfg=2.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(5))
    ref = _ref_markov_sample(var, vae, labels, 2.0, 20, 0.9, torch.Generator().manual_seed(5))
    for a, b in zip(ours.tokens, ref):
        assert torch.equal(a, b)
    assert var._sampling_state(labels).caches is None


@pytest.mark.parametrize("mask_layers", [0, 1])
def test_hmar_refinement_one_substep_is_plain_sampling(mask_layers):
    vae, var = tiny_vae(), tiny_var(markov=True, mask_layers=mask_layers)
    var.attach_vae(vae)
    run = lambda **kw: var.sample(2, [3, 4], cfg=1.5, generator=torch.Generator().manual_seed(0), **kw)  # noqa: E731
    plain = run()
    one = run(hmar_steps={1: 1, 2: 1, 3: 1})
    for a, b in zip(plain.tokens, one.tokens):
        assert torch.equal(a, b)
    assert torch.equal(plain.f_hat, one.f_hat)
    # 3 sub-steps at the 3x3 scale: cosine schedule re-masks floor(9 cos(pi/6)) = 7, then floor(9 cos(pi/3)) = 4
    calls = []
    blk = var.mask_blocks[0] if mask_layers else var.blocks[-1]
    h = blk.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    stats: dict = {}
    refined = run(hmar_steps={2: 3}, stats=stats)
    h.remove()
    assert calls.count(9) == (2 if mask_layers else 3)  # + the next-scale pass when the trunk is shared
    assert stats["scales"][2]["substeps"] == 3
    assert [t.shape for t in refined.tokens] == [t.shape for t in plain.tokens]
    assert torch.equal(refined.tokens[1], plain.tokens[1])  # earlier scales untouched
    assert not all(torch.equal(a, b) for a, b in zip(refined.tokens[2:], plain.tokens[2:]))
    with pytest.raises(ValueError, match="masked-refinement branch"):
        tiny_var(markov=True).sample(1, 0, vae=vae, hmar_steps={1: 2})
    with pytest.raises(ValueError, match="needs markov=True"):
        VARConfig(mask_layers=0)


def test_hmar_mask_branch_training_pass():
    vae, var = tiny_vae(), tiny_var(markov=True, mask_layers=1)
    var.train()
    g = torch.Generator().manual_seed(0)
    idx = [torch.randint(0, V, (2, p * p), generator=g) for p in PNS]
    masked = [torch.rand(2, p * p, generator=g) < 0.5 for p in PNS]
    x = vae.quantize.idxBl_to_var_input(idx)
    cur = scale_contributions(vae.quantize, idx, masked)
    assert cur.shape == (2, var.L, CVAE)
    m = torch.cat(masked, 1)
    logits = var.forward_mask(torch.tensor([1, 2]), x, cur, m)
    assert logits.shape == (2, var.L, V)
    torch.nn.functional.cross_entropy(logits[m], torch.cat(idx, 1)[m]).backward()
    assert var.mask_embed.grad.abs().sum() > 0 and var.mask_blocks[0].ffn.fc1.weight.grad.abs().sum() > 0
    # masked tokens do not leak into the known ones: changing a masked token's code changes nothing
    idx2 = [t.clone() for t in idx]
    idx2[3] = torch.where(masked[3], (idx[3] + 1) % V, idx[3])
    torch.testing.assert_close(scale_contributions(vae.quantize, idx2, masked), cur)


def test_hmar_save_load_round_trip(tmp_path):
    vae, var = tiny_vae(), tiny_var(markov=True, mask_layers=1)
    p = VARPipeline(vae, var)
    p.set_progress_bar_config(disable=True)
    sd = var.state_dict()
    assert tuple(sd["mask_embed"].shape) == (1, 1, 32)
    assert {k.split(".")[0] for k in sd} - {k.split(".")[0] for k in tiny_var().state_dict()} == {
        "mask_embed", "mask_blocks", "mask_head_nm", "mask_head"}
    out = p([1, 2], seed=3, output_type="pt", hmar_steps={2: 2, 3: 2})
    p.save_pretrained(tmp_path / "hmar")
    q = VARPipeline.from_pretrained(tmp_path / "hmar")
    q.set_progress_bar_config(disable=True)
    assert q.var.config.markov and q.var.config.mask_layers == 1
    assert torch.equal(q.var.attn_bias_for_masking, var.attn_bias_for_masking)
    out2 = q([1, 2], seed=3, output_type="pt", hmar_steps={2: 2, 3: 2})
    assert torch.equal(out.images, out2.images)
    # the official-style loader recognises HMAR from its keys (fastgen layout and the NVlabs split layout)
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    torch.save({k: v for k, v in sd.items() if k != "attn_bias_for_masking"}, tmp_path / "hmar.pth")
    _, v2 = load_official(tmp_path / "vae.pth", tmp_path / "hmar.pth", patch_nums=PNS)
    assert v2.config.markov and v2.config.mask_layers == 1
    split = {}
    for k, v in sd.items():
        if k.startswith("blocks.0."):
            k = "base_blocks.0." + k[len("blocks.0."):]
        elif k.startswith("blocks.1."):
            k = "ns_blocks.0." + k[len("blocks.1."):]
        elif k.startswith(("head.", "head_nm.")):
            k = "ns_" + k
        split[k] = v
    assert hmar_official_to_fastgen(split).keys() == sd.keys()
    torch.save(split, tmp_path / "nvlabs.pth")
    _, v3 = load_official(tmp_path / "vae.pth", tmp_path / "nvlabs.pth", patch_nums=PNS)
    x, lab = torch.randn(2, var.L - 1, CVAE), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(v3(lab, x), var(lab, x))


# ------------------------------------------------------------------------------------------------------
# Acceleration through fastgen.accelerate
# ------------------------------------------------------------------------------------------------------


def test_var_family_adapter_and_summary(pipe):
    assert fastgen.get_adapter(pipe).family == "var"
    s = fastgen.summary(pipe)
    assert s == {"pipeline": "VARPipeline", "family": "var", "recipe": "baseline", "techniques": {}, "last_call": None}
    with pytest.raises(UnsupportedPipelineError, match="ras does not support VARPipeline"):
        fastgen.accelerate(pipe, "ras:0.5")
    for recipe in ("steps:8", "sampler:dpm++2m@8"):  # diffusion step counts mean nothing to next-scale AR
        with pytest.raises(UnsupportedPipelineError, match="VARPipeline"):
            fastgen.accelerate(pipe, recipe)
    assert fastgen.summary(pipe)["recipe"] == "baseline"


def _roundtrip(pipe, config_or_recipe, expect_change=True):
    base = _imgs(pipe)
    fastgen.accelerate(pipe, config_or_recipe)
    out = _imgs(pipe)
    s = fastgen.summary(pipe)
    assert out.images.shape == base.images.shape == (3, 3, 8, 8)
    assert [t.shape for t in out.tokens] == [t.shape for t in base.tokens]
    assert s["family"] == "var" and s["last_call"]["steps_run"] == len(PNS)
    if expect_change:
        assert not torch.equal(out.images, base.images)
    fastgen.remove(pipe)
    assert fastgen.summary(pipe)["recipe"] == "baseline" and type(pipe) is VARPipeline
    assert "_diffusers_hook" not in pipe.var.__dict__ and "forward" not in pipe.var.__dict__
    after = _imgs(pipe)
    assert torch.equal(after.images, base.images)  # bit-exact after remove
    return s, out


@pytest.mark.parametrize("fill", ["cache", "logits", "zero"])
@pytest.mark.parametrize("metric", ["hf", "mean"])
def test_fastvar(pipe, fill, metric):
    s, out = _roundtrip(pipe, FastVARConfig(0.5, fill=fill, metric=metric))
    assert s["last_call"]["fastvar"]["kept_tokens"] == {2: "4/9", 3: "8/16"}
    recs = s["last_call"]["var"]["scales"]
    assert [r["tokens"] for r in recs] == [1, 4, 4, 8]
    if fill == "zero":  # pruned positions hold the code closest to zero
        zero = int(pipe.vae.quantize.embedding.weight.norm(dim=1).argmin())
        assert (out.tokens[3] == zero).sum(1).min() >= 8


def test_fastvar_ratio_zero_is_baseline_bit_exact(pipe):
    _roundtrip(pipe, FastVARConfig(0.0), expect_change=False)
    base = _imgs(pipe)
    assert torch.equal(_imgs(pipe, prune=FastVARConfig(0.0, last=4)).images, base.images)
    assert torch.equal(_imgs(pipe, prune=FastVARConfig(ratios=(0.0, 0.0))).images, base.images)
    c = FastVARConfig(ratios=(0.25, 0.5))
    assert [c.prune_ratio(k, 4) for k in range(4)] == [0, 0, 0.25, 0.5]


def test_cfg_share(pipe):
    s, _ = _roundtrip(pipe, "cfg-share:2")
    assert s["last_call"]["cfg-share"]["uncond_skipped_scales"] == [2, 3]
    assert [r["rows"] for r in s["last_call"]["var"]["scales"]] == [6, 6, 3, 3]
    s, _ = _roundtrip(pipe, CFGShareConfig(start=1, every=2, mode="drop"))
    assert s["last_call"]["cfg-share"]["uncond_skipped_scales"] == [2]
    _roundtrip(pipe, CFGShareConfig(start=1, every=1), expect_change=False)  # uncond runs everywhere: baseline


def test_code_draft_refine(pipe, tmp_path):
    small = tiny_var(seed=7, depth=1)
    s, _ = _roundtrip(pipe, CoDeConfig(draft=2, refiner=small))
    assert s["last_call"]["code"]["draft_scales"] == [0, 1] and s["last_call"]["code"]["refined_scales"] == [2, 3]
    # a refiner identical to the drafter reproduces the drafter: its KV cache is rebuilt by the prefill
    base = _imgs(pipe)
    twin = copy.deepcopy(pipe.var)
    for d in (1, 2, 3):
        out = _imgs(pipe, refiner=twin, draft_scales=d)
        for a, b in zip(out.tokens, base.tokens):
            assert torch.equal(a, b)
    # refiner from a folder (VAR folder or the pipeline's var_small)
    from fastgen.ar.train import save_module

    save_module(small, tmp_path / "small")
    fastgen.accelerate(pipe, f"code:draft=3,refiner={tmp_path / 'small'}")
    assert fastgen.summary(pipe)["recipe"] == f"code:draft=3,refiner={tmp_path / 'small'}"
    fastgen.remove(pipe)
    with pytest.raises(ValueError, match="needs a refiner"):
        fastgen.accelerate(pipe, "code:draft=2")
    with pytest.raises(ValueError, match="draft must lie in"):
        fastgen.accelerate(pipe, CoDeConfig(draft=4, refiner=small))
    bad = VAR(VARConfig(depth=1, embed_dim=32, num_heads=2, patch_nums=PNS, vocab_size=V, Cvae=CVAE, num_classes=5))
    with pytest.raises(ValueError, match="must share patch_nums"):
        fastgen.accelerate(pipe, CoDeConfig(draft=2, refiner=bad))
    assert fastgen.summary(pipe)["recipe"] == "baseline"


def test_var_attn_backends(pipe):
    base = _imgs(pipe)
    fastgen.accelerate(pipe, "var-attn:math")
    out = _imgs(pipe)
    assert all(m.backend == "math" for m in pipe.var.modules() if hasattr(m, "backend"))
    assert fastgen.summary(pipe)["last_call"]["var-attn"] == {"backend": "math", "attention_modules": 2}
    torch.testing.assert_close(out.images, base.images, atol=1e-4, rtol=1e-4)
    fastgen.remove(pipe)
    assert all(m.backend == "sdpa" for m in pipe.var.modules() if hasattr(m, "backend"))
    assert torch.equal(_imgs(pipe).images, base.images)
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        with pytest.raises(MissingExtraError, match=r"fastgen\[gpu\]"):
            fastgen.accelerate(pipe, "var-attn:xformers")
        assert fastgen.summary(pipe)["recipe"] == "baseline"


def test_stacking_and_recipes(pipe):
    small = tiny_var(seed=7, depth=1)
    base = _imgs(pipe)
    fastgen.accelerate(pipe, "fastvar:0.5+cfg-share:2+var-attn:math", CoDeConfig(draft=2, refiner=small))
    s = fastgen.summary(pipe)
    assert s["recipe"] == "fastvar:0.5+cfg-share:start=-2+var-attn:math+code:draft=2"
    out = _imgs(pipe)
    recs = fastgen.summary(pipe)["last_call"]["var"]["scales"]
    # the refiner's first scale runs dense: the drafter's hidden states cannot fill its pruned positions
    assert [(r["model"], r["tokens"], r["rows"]) for r in recs] == [
        ("main", 1, 6), ("main", 4, 6), ("refiner", 9, 3), ("refiner", 8, 3)]
    assert out.images.shape == base.images.shape
    fastgen.remove(pipe)
    assert torch.equal(_imgs(pipe).images, base.images)
    for r in ("fastvar:fast", "fastvar:0.3,last=3,metric=mean,fill=zero", "fastvar:ratios=0.4/0.5",
              "cfg-share:start=3,every=2,mode=drop", "code:draft=5", "var-attn:xformers"):
        assert fastgen.recipe_string(fastgen.parse_recipe(r)) == fastgen.recipe_string(
            fastgen.parse_recipe(fastgen.recipe_string(fastgen.parse_recipe(r))))
    for bad in ("fastvar:1.5", "fastvar:0.5,fill=nope", "cfg-share:mode=x", "code:draft=0", "var-attn:flash"):
        with pytest.raises(RecipeError):
            fastgen.parse_recipe(bad)


def test_diffusion_pipelines_are_refused():
    from fastgen.testing import tiny_pipeline

    p = tiny_pipeline("dit")
    for r in ("fastvar:0.5", "cfg-share:2", "var-attn:math"):
        with pytest.raises(UnsupportedPipelineError, match="next-scale AR"):
            fastgen.accelerate(p, r)


def test_scale_hooks_interface():
    from fastgen.ar.accel import scale_hooks
    from fastgen.ar.scale_hooks import HookChain, ScaleHooks

    vae, var = tiny_vae(), tiny_var()
    run = lambda **kw: var.sample(3, [1, 2, 3], cfg=2.0, vae=vae, generator=torch.Generator().manual_seed(0), **kw)  # noqa: E731
    plain = run()
    for hooks in (ScaleHooks(), [ScaleHooks(), ScaleHooks()]):  # the base hook is the plain step, bit-exactly
        assert torch.equal(run(hooks=hooks).f_hat, plain.f_hat)
    both = scale_hooks(prune=FastVARConfig(0.5), cfg_share=CFGShareConfig(start=-2))
    assert isinstance(HookChain(both), ScaleHooks)
    stats: dict = {}
    run(hooks=both, stats=stats)
    assert [(r["tokens"], r["rows"]) for r in stats["scales"]] == [(1, 6), (4, 6), (4, 3), (8, 3)]

    class NoUncond(ScaleHooks):  # drops the unconditional rows but does not guide: refused
        def plan(self, step):
            step.uncond = step.si < 2

    with pytest.raises(ValueError, match="no scale hook guided it"):
        run(hooks=NoUncond())
    with pytest.raises(ValueError, match="two scale hooks prune"):
        run(hooks=scale_hooks(prune=FastVARConfig(0.5)) + scale_hooks(prune=FastVARConfig(0.5)))
