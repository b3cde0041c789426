"""Tests of fastgen.ar (VAR): official key layout, parity with a from-the-equations reference, the
multi-scale VQ, checkpoint errors and the pipeline. Tiny configs, CPU, a few seconds in all."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastgen.ar import (
    PATCH_NUMS_256,
    PATCH_NUMS_512,
    VAR,
    CheckpointError,
    VARConfig,
    VQVAE,
    VQVAEConfig,
    load_official,
    phi_index,
)
from fastgen.ar.pipeline import VARPipeline, edit_mask_per_scale

torch.set_num_threads(1)

PNS = (1, 2, 3, 4)  # tiny schedule: L = 30
V, CVAE, NCLS = 64, 8, 10


def tiny_vae_config(**kw) -> VQVAEConfig:
    base = dict(vocab_size=V, z_channels=CVAE, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                patch_nums=PNS)
    base.update(kw)
    return VQVAEConfig(**base)


def tiny_vae(seed: int = 0, **kw) -> VQVAE:
    torch.manual_seed(seed)
    vae = VQVAE(tiny_vae_config(**kw)).eval()
    with torch.no_grad():  # a spread-out codebook so quantisation is not degenerate
        vae.quantize.embedding.weight.normal_(0, 1.0)
    return vae


# ------------------------------------------------------------------------------------------------------
# An official-layout VAR state dict, written here from the published key names and shapes (var.md §3),
# independently of fastgen.ar.var
# ------------------------------------------------------------------------------------------------------


def official_var_state_dict(depth=2, C=32, heads=2, pns=PNS, shared_aln=False, l2=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=None):
        std = std if std is not None else 1 / math.sqrt(shape[-1])
        return torch.randn(*shape, generator=g) * std

    L, K = sum(p * p for p in pns), len(pns)
    lvl = torch.cat([torch.full((p * p,), k) for k, p in enumerate(pns)])
    sd = {
        "pos_start": r(1, pns[0] ** 2, C, std=0.5), "pos_1LC": r(1, L, C, std=0.5),
        "word_embed.weight": r(C, CVAE), "word_embed.bias": r(C, std=0.1),
        "class_emb.weight": r(NCLS + 1, C, std=1.0), "lvl_embed.weight": r(K, C, std=0.5),
        "head_nm.ada_lin.1.weight": r(2 * C, C, std=0.3 / math.sqrt(C)), "head_nm.ada_lin.1.bias": r(2 * C, std=0.1),
        "head.weight": r(V, C, std=2 / math.sqrt(C)), "head.bias": r(V, std=0.1),
        "lvl_1L": lvl.view(1, L),
        "attn_bias_for_masking": torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf).view(1, 1, L, L),
    }
    if shared_aln:
        sd["shared_ada_lin.1.weight"] = r(6 * C, C, std=0.5 / math.sqrt(C))
        sd["shared_ada_lin.1.bias"] = r(6 * C, std=0.1)
    for i in range(depth):
        p = f"blocks.{i}."
        if l2:
            s = torch.full((1, heads, 1, 1), math.log(4.0)) + r(1, heads, 1, 1, std=0.3)
            s[0, 0] = 5.0  # above ln(100): exercises the clamp
            sd[p + "attn.scale_mul_1H11"] = s
        sd.update({
            p + "attn.q_bias": r(C, std=0.1), p + "attn.v_bias": r(C, std=0.1), p + "attn.zero_k_bias": torch.zeros(C),
            p + "attn.mat_qkv.weight": r(3 * C, C), p + "attn.proj.weight": r(C, C),
            p + "attn.proj.bias": r(C, std=0.1),
            p + "ffn.fc1.weight": r(4 * C, C), p + "ffn.fc1.bias": r(4 * C, std=0.1),
            p + "ffn.fc2.weight": r(C, 4 * C), p + "ffn.fc2.bias": r(C, std=0.1),
        })
        if shared_aln:
            sd[p + "ada_gss"] = r(1, 1, 6, C, std=0.3)
        else:
            sd[p + "ada_lin.1.weight"] = r(6 * C, C, std=0.5 / math.sqrt(C))
            sd[p + "ada_lin.1.bias"] = r(6 * C, std=0.1)
    return sd


# ------------------------------------------------------------------------------------------------------
# Reference forward from the paper's equations, plain tensor ops on the state dict
# ------------------------------------------------------------------------------------------------------


def _ln(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _silu(x):
    return x * torch.sigmoid(x)


def ref_forward(sd, heads, pns, label_B, x_BLCv, n_tokens=None):
    """Logits of the first ``n_tokens`` positions (default all) under the block-causal mask."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    L = sum(p * p for p in pns)
    n = n_tokens or L
    C = sd["head.weight"].shape[1]
    hd = C // heads
    B = label_B.shape[0]
    cond = sd["class_emb.weight"][label_B]  # B x C
    sos = cond[:, None, :] + sd["pos_start"]
    words = x_BLCv @ sd["word_embed.weight"].T + sd["word_embed.bias"]
    x = torch.cat([sos, words], 1)[:, :n]
    lvl = torch.cat([torch.full((p * p,), k) for k, p in enumerate(pns)])[:n]
    x = x + sd["lvl_embed.weight"][lvl] + sd["pos_1LC"][0, :n]
    visible = lvl[:, None] >= lvl[None, :]
    shared = "shared_ada_lin.1.weight" in sd
    if shared:
        gss = (_silu(cond) @ sd["shared_ada_lin.1.weight"].T + sd["shared_ada_lin.1.bias"]).view(B, 1, 6, C)
    for i in range(depth):
        p = f"blocks.{i}."
        if shared:
            mods = (sd[p + "ada_gss"] + gss)[:, 0]  # B x 6 x C
        else:
            mods = (_silu(cond) @ sd[p + "ada_lin.1.weight"].T + sd[p + "ada_lin.1.bias"]).view(B, 6, C)
        g1, g2, s1, s2, b1, b2 = [mods[:, j, None, :] for j in range(6)]
        h = _ln(x) * (1 + s1) + b1
        qkv_bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(C), sd[p + "attn.v_bias"]])  # k has no bias
        qkv = h @ sd[p + "attn.mat_qkv.weight"].T + qkv_bias
        q, k, v = [t.view(B, n, heads, hd).transpose(1, 2) for t in qkv.split(C, dim=-1)]
        if p + "attn.scale_mul_1H11" in sd:
            s = torch.exp(torch.minimum(sd[p + "attn.scale_mul_1H11"], torch.tensor(math.log(100.0))))
            q = q / q.norm(dim=-1, keepdim=True) * s
            k = k / k.norm(dim=-1, keepdim=True)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(hd)
        scores = (q @ k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        att = torch.softmax(scores, -1) @ v
        att = att.transpose(1, 2).reshape(B, n, C) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + att * g1
        h = _ln(x) * (1 + s2) + b2
        f = _gelu_tanh(h @ sd[p + "ffn.fc1.weight"].T + sd[p + "ffn.fc1.bias"])
        f = f @ sd[p + "ffn.fc2.weight"].T + sd[p + "ffn.fc2.bias"]
        x = x + f * g2
    sc, sh = (_silu(cond) @ sd["head_nm.ada_lin.1.weight"].T + sd["head_nm.ada_lin.1.bias"]).view(B, 2, C).unbind(1)
    h = _ln(x) * (1 + sc[:, None]) + sh[:, None]
    return h @ sd["head.weight"].T + sd["head.bias"]


def ref_filter(logits, top_k, top_p):
    """top-k: keep logits >= the k-th largest; top-p: drop the ascending-sorted tokens whose cumulative
    probability is <= 1 - p, never the most likely one."""
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = logits.sort(-1, descending=True).values[..., k - 1:k]
        logits = torch.where(logits < kth, float("-inf"), logits)
    if top_p > 0:
        srt, order = logits.sort(-1)
        drop = torch.softmax(srt, -1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        mask = torch.empty_like(drop)
        mask.scatter_(-1, order, drop)
        logits = logits.masked_fill(mask, float("-inf"))
    return logits


def ref_sample(sd, heads, pns, vae, labels, cfg, top_k, top_p, gen):
    """Non-cached sampler: recompute the whole prefix with the block-causal mask at every scale."""
    B, K, null = labels.shape[0], len(pns), sd["class_emb.weight"].shape[0] - 1
    cum = np.cumsum([p * p for p in pns]).tolist()
    tokens = []
    for si, pn in enumerate(pns):
        padded = tokens + [torch.zeros(B, p * p, dtype=torch.long) for p in pns[si:]]
        x_in = vae.quantize.idxBl_to_var_input(padded)[:, : cum[si] - pns[0] ** 2]
        lab2 = torch.cat([labels, torch.full_like(labels, null)])
        logits = ref_forward(sd, heads, pns, lab2, torch.cat([x_in, x_in]), n_tokens=cum[si])
        lg = logits[:, cum[si] - pn * pn: cum[si]]
        t = cfg * si / (K - 1)
        lg = (1 + t) * lg[:B] - t * lg[B:]
        probs = torch.softmax(ref_filter(lg, top_k, top_p), -1).view(-1, lg.shape[-1])
        tokens.append(torch.multinomial(probs, 1, replacement=True, generator=gen).view(B, pn * pn))
    return tokens


@pytest.fixture
def ckpts(tmp_path):
    vae = tiny_vae()
    sd = official_var_state_dict()
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    torch.save(sd, tmp_path / "var.pth")
    return tmp_path / "vae.pth", tmp_path / "var.pth", sd, vae


# ------------------------------------------------------------------------------------------------------
# Official architecture: key names, shapes and parameter counts (meta device, no memory)
# ------------------------------------------------------------------------------------------------------


def test_official_vae_layout():
    with torch.device("meta"):
        vae = VQVAE(VQVAEConfig())
    sd = vae.state_dict()
    assert len(sd) == 324
    assert tuple(sd["quantize.embedding.weight"].shape) == (4096, 32)
    for i in range(4):
        assert tuple(sd[f"quantize.quant_resi.qresi_ls.{i}.weight"].shape) == (32, 32, 3, 3)
    assert tuple(sd["quantize.ema_vocab_hit_SV"].shape) == (10, 4096)
    assert tuple(sd["quant_conv.weight"].shape) == tuple(sd["post_quant_conv.weight"].shape) == (32, 32, 3, 3)
    assert "encoder.down.4.attn.1.qkv.weight" in sd and "decoder.up.4.attn.2.proj_out.weight" in sd
    assert "encoder.mid.attn_1.qkv.weight" in sd and "decoder.up.1.upsample.conv.weight" in sd
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(n(vae.encoder) / 1e6, 1) == 44.1 and round(n(vae.decoder) / 1e6, 1) == 64.7
    assert vae.config.image_size == 256


@pytest.mark.parametrize("depth,shared,pns,millions", [
    (16, False, PATCH_NUMS_256, 310.3), (20, False, PATCH_NUMS_256, 600.9), (24, False, PATCH_NUMS_256, 1033.4),
    (30, False, PATCH_NUMS_256, 2010.0), (36, True, PATCH_NUMS_512, 2353.9)])
def test_official_var_layout(depth, shared, pns, millions):
    with torch.device("meta"):
        var = VAR(VARConfig(depth=depth, shared_aln=shared, patch_nums=pns), init=False)
    sd = var.state_dict()
    assert round(sum(p.numel() for p in var.parameters()) / 1e6, 1) == millions
    C, L = 64 * depth, sum(p * p for p in pns)
    assert tuple(sd["class_emb.weight"].shape) == (1001, C) and tuple(sd["pos_1LC"].shape) == (1, L, C)
    assert tuple(sd["lvl_1L"].shape) == (1, L) and tuple(sd["attn_bias_for_masking"].shape) == (1, 1, L, L)
    assert tuple(sd["blocks.0.attn.scale_mul_1H11"].shape) == (1, depth, 1, 1)
    assert tuple(sd["blocks.0.attn.mat_qkv.weight"].shape) == (3 * C, C) and "blocks.0.attn.mat_qkv.bias" not in sd
    assert tuple(sd["head.weight"].shape) == (4096, C) and tuple(sd["head_nm.ada_lin.1.weight"].shape) == (2 * C, C)
    if shared:
        assert "shared_ada_lin.1.weight" in sd and tuple(sd["blocks.0.ada_gss"].shape) == (1, 1, 6, C)
    else:
        assert tuple(sd["blocks.0.ada_lin.1.weight"].shape) == (6 * C, C)


def test_phi_index_partially_shared():
    assert [phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(k, 4, 4) for k in range(4)] == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------------
# Parity with the reference
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["adaln", "shared_aln", "no_l2"])
def test_teacher_forcing_parity(tmp_path, variant):
    sd = official_var_state_dict(shared_aln=variant == "shared_aln", l2=variant != "no_l2", seed=1)
    derived = ("lvl_1L", "attn_bias_for_masking")  # left out: the model's own block-causal mask is used
    torch.save({k: v for k, v in sd.items() if k not in derived}, tmp_path / "var.pth")
    torch.save(tiny_vae().state_dict(), tmp_path / "vae.pth")
    vae, var = load_official(tmp_path / "vae.pth", tmp_path / "var.pth", patch_nums=PNS)
    assert var.config.depth == 2 and var.config.shared_aln == (variant == "shared_aln")
    assert var.config.attn_l2_norm == (variant != "no_l2")
    torch.testing.assert_close(var.attn_bias_for_masking, sd["attn_bias_for_masking"], atol=0, rtol=0)
    assert torch.equal(var.lvl_1L, sd["lvl_1L"])
    g = torch.Generator().manual_seed(0)
    label = torch.tensor([0, 3, NCLS])  # including the null class
    x = torch.randn(3, var.L - 1, CVAE, generator=g)
    with torch.no_grad():
        ours = var(label, x)
    ref = ref_forward(sd, 2, PNS, label, x)
    assert ours.shape == (3, 30, V) and ours.dtype == torch.float32
    assert ref.abs().max() > 0.5  # the check is not vacuous
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_kv_cached_sampling_matches_uncached_reference(ckpts):
    vae_p, var_p, sd, _ = ckpts
    vae, var = load_official(vae_p, var_p, patch_nums=PNS)
    labels = torch.tensor([1, 7, NCLS])
    for cfg, top_k, top_p in [(2.0, 20, 0.9), (0.0, 0, 0.0)]:
        ours = var.sample(3, labels, cfg=cfg, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(5))
        ref = ref_sample(sd, 2, PNS, vae, labels, cfg, top_k, top_p, torch.Generator().manual_seed(5))
        for a, b in zip(ours.tokens, ref):
            assert torch.equal(a, b)
        torch.testing.assert_close(ours.f_hat, vae.quantize.idxBl_to_fhat(ref), atol=1e-5, rtol=1e-5)
    assert len({tuple(t.flatten().tolist()) for t in ours.tokens[-1]}) > 1  # samples differ across the batch
    img1 = var.autoregressive_infer_cfg(2, 4, g_seed=3, cfg=1.5, top_k=30, top_p=0.95)
    img2 = var.autoregressive_infer_cfg(2, 4, g_seed=3, cfg=1.5, top_k=30, top_p=0.95)
    img3 = var.autoregressive_infer_cfg(2, 4, g_seed=4, cfg=1.5, top_k=30, top_p=0.95)
    assert img1.shape == (2, 3, 8, 8) and 0 <= img1.min() and img1.max() <= 1
    assert torch.equal(img1, img2) and not torch.equal(img1, img3)


def test_more_smooth_and_random_labels(ckpts):
    vae_p, var_p, _, _ = ckpts
    _, var = load_official(vae_p, var_p, patch_nums=PNS)
    a = var.autoregressive_infer_cfg(2, None, g_seed=0, more_smooth=True)
    b = var.autoregressive_infer_cfg(2, None, g_seed=0, more_smooth=True)
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_cond_drop_only_in_training():
    torch.manual_seed(0)
    var = VAR(VARConfig(depth=1, embed_dim=32, num_heads=2, patch_nums=PNS, vocab_size=V, Cvae=CVAE,
                        num_classes=NCLS, cond_drop_rate=1.0, drop_path_rate=0.0))
    x, lab = torch.randn(2, 29, CVAE), torch.tensor([1, 2])
    with torch.no_grad():
        ev = var.eval()(lab, x)
        null = var(torch.full((2,), NCLS), x)
        tr = var.train()(lab, x)
    assert not torch.allclose(ev, null) and torch.allclose(tr, null)


# ------------------------------------------------------------------------------------------------------
# Multi-scale residual VQ
# ------------------------------------------------------------------------------------------------------


def ref_residual_quantize(vae, f):
    """Algorithm 1 of the paper with plain ops: nearest code of the area-downsampled residual, bicubic up,
    phi(h) = 0.5 h + 0.5 conv(h) with the partially shared conv of the scale."""
    q, K, H = vae.quantize, len(PNS), PNS[-1]
    E = q.embedding.weight
    rest, fhat, idx = f.clone(), torch.zeros_like(f), []
    for si, pn in enumerate(PNS):
        r = F.interpolate(rest, size=(pn, pn), mode="area") if si < K - 1 else rest
        z = r.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        i = torch.cdist(z, E).argmin(1)
        idx.append(i.view(f.shape[0], -1))
        h = E[i].view(f.shape[0], pn, pn, -1).permute(0, 3, 1, 2)
        if si < K - 1:
            h = F.interpolate(h, size=(H, H), mode="bicubic")
        conv = q.quant_resi.qresi_ls[[0, 1, 2, 3][si]]
        h = 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)
        fhat, rest = fhat + h, rest - h
    return idx, fhat


def test_residual_quantisation_round_trip():
    vae = tiny_vae()
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    with torch.no_grad():
        f = vae.img_to_f(img)
        f = f / f.std() * 1.5  # residuals of the size of the codes
        idx = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=False)
        fhats = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)
        ref_idx, ref_fhat = ref_residual_quantize(vae, f)
        assert [t.shape for t in idx] == [(2, p * p) for p in PNS]
        for a, b in zip(idx, ref_idx):
            assert torch.equal(a, b)
        torch.testing.assert_close(fhats[-1], ref_fhat, atol=1e-5, rtol=1e-5)
        # idx -> f_hat reconstructs the quantised features, scale by scale
        for a, b in zip(vae.quantize.idxBl_to_fhat(idx, cumulative=True), fhats):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        # each residual step moves f_hat towards f on this input
        errs = [float((f - fh).pow(2).mean()) for fh in fhats]
        assert errs[-1] < float(f.pow(2).mean())
        # decoding: tokens -> image equals the reconstruction round trip
        rec = vae.img_to_reconstructed_img(img)
        torch.testing.assert_close(vae.idxBl_to_img(vae.img_to_idxBl(img)), rec, atol=1e-5, rtol=1e-5)
        assert rec.shape == img.shape and rec.abs().max() <= 1


def test_var_input_matches_incremental_inference_input():
    vae = tiny_vae()
    g = torch.Generator().manual_seed(1)
    idx = [torch.randint(0, V, (2, p * p), generator=g) for p in PNS]
    q, K = vae.quantize, len(PNS)
    with torch.no_grad():
        x_tf = q.idxBl_to_var_input(idx)
        f_hat, pieces = torch.zeros(2, CVAE, PNS[-1], PNS[-1]), []
        for si, pn in enumerate(PNS):
            h = q.embedding(idx[si]).transpose(1, 2).reshape(2, CVAE, pn, pn)
            f_hat, nxt = q.get_next_autoregressive_input(si, K, f_hat, h)
            if si < K - 1:
                assert nxt.shape == (2, CVAE, PNS[si + 1], PNS[si + 1])
                pieces.append(nxt.flatten(2).transpose(1, 2))
    assert x_tf.shape == (2, sum(p * p for p in PNS[1:]), CVAE)
    torch.testing.assert_close(torch.cat(pieces, 1), x_tf, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(f_hat, q.idxBl_to_fhat(idx), atol=1e-6, rtol=1e-6)


def test_vae_training_pass_has_gradients():
    vae = tiny_vae().train()
    img = torch.rand(2, 3, 8, 8) * 2 - 1
    rec, vq_loss = vae(img)
    (F.mse_loss(rec, img) + vq_loss).backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through estimator
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0  # codebook term
    assert vae.quantize.ema_vocab_hit_SV.sum() > 0


# ------------------------------------------------------------------------------------------------------
# Loader errors and checkpoint formats
# ------------------------------------------------------------------------------------------------------


def test_loader_wrong_depth(ckpts):
    vae_p, var_p, _, _ = ckpts
    with pytest.raises(ValueError, match="checkpoint has depth 2, config expects depth 3"):
        load_official(vae_p, var_p, depth=3, patch_nums=PNS)
    cfg = VARConfig(depth=3, embed_dim=32, num_heads=2, patch_nums=PNS, vocab_size=V, Cvae=CVAE, num_classes=NCLS)
    with pytest.raises(CheckpointError, match="checkpoint has depth 2, config expects 3"):
        load_official(vae_p, var_p, config=cfg)
    _, var = load_official(vae_p, var_p, config=VARConfig(**{**cfg.to_dict(), "depth": 2}))  # matching config
    assert var.config.depth == 2 and len(var.blocks) == 2
    with pytest.raises(ValueError, match="bogus"):
        VARConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_loader_wrong_patch_nums(ckpts):
    vae_p, var_p, _, _ = ckpts
    with pytest.raises(ValueError, match=r"wrong resolution.*config expects patch_nums \(1, 2, 3, 5\)"):
        load_official(vae_p, var_p, patch_nums=(1, 2, 3, 5))
    with pytest.raises(ValueError, match=r"wrong resolution.*512 px"):
        load_official(vae_p, var_p, patch_nums=PATCH_NUMS_512)
    with pytest.raises(ValueError, match="matches no official schedule; pass patch_nums"):
        load_official(vae_p, var_p)


def test_loader_names_missing_unexpected_and_misshaped_keys(ckpts, tmp_path):
    vae_p, _, sd, _ = ckpts
    bad = dict(sd)
    del bad["blocks.1.ffn.fc2.bias"]
    bad["foo.weight"] = torch.zeros(3)
    bad["head.bias"] = torch.zeros(V + 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_official(vae_p, tmp_path / "bad.pth", patch_nums=PNS)
    msg = str(e.value)
    assert "missing keys (1): ['blocks.1.ffn.fc2.bias']" in msg
    assert "unexpected keys (1): ['foo.weight']" in msg
    assert "head.bias: checkpoint (65,) vs model (64,)" in msg
    # non-strict loads the rest
    _, var = load_official(vae_p, tmp_path / "bad.pth", patch_nums=PNS, strict=False)
    assert torch.equal(var.blocks[0].ffn.fc1.weight, sd["blocks.0.ffn.fc1.weight"])
    # a VAE missing a tensor is named too
    vsd = torch.load(vae_p)
    del vsd["quantize.quant_resi.qresi_ls.2.bias"]
    with pytest.raises(CheckpointError, match=r"VQ-VAE checkpoint .*quantize\.quant_resi\.qresi_ls\.2\.bias"):
        load_official(vsd, sd, patch_nums=PNS)


def test_loader_accepts_trainer_and_wrapped_checkpoints(ckpts, tmp_path):
    vae_p, var_p, sd, vae = ckpts
    _, ref_var = load_official(vae_p, var_p, patch_nums=PNS)
    x, lab = torch.randn(2, 29, CVAE), torch.tensor([0, 1])
    want = ref_var(lab, x)
    trainer = {"epoch": 3, "iter": 0, "args": {"depth": 2, "tblr": 1e-4},
               "trainer": {"config": {"patch_nums": list(PNS)}, "var_wo_ddp": sd, "vae_local": vae.state_dict(),
                           "var_opt": {"step": 1}}}
    torch.save(trainer, tmp_path / "ar-ckpt-last.pth")
    v2, var2 = load_official(None, tmp_path / "ar-ckpt-last.pth", patch_nums=PNS)  # VAE from the trainer
    assert torch.equal(var2(lab, x), want)
    assert torch.equal(v2.quantize.embedding.weight, vae.quantize.embedding.weight)
    _, var_mem = load_official(vae.state_dict(), sd, patch_nums=PNS)  # in-memory dicts are copied, not shared
    var_mem.head.bias.data.add_(1.0)
    assert not torch.equal(var_mem.head.bias, sd["head.bias"])
    for wrapped in ({"model": sd}, {"state_dict": {"module." + k: v for k, v in sd.items()}},
                    {k: v for k, v in sd.items() if k not in ("lvl_1L", "attn_bias_for_masking")
                     and not k.endswith("zero_k_bias")}):
        torch.save(wrapped, tmp_path / "w.pth")
        _, var3 = load_official(vae_p, tmp_path / "w.pth", patch_nums=PNS)
        assert torch.equal(var3(lab, x), want)


def test_loader_rejects_mismatched_vae(ckpts, tmp_path):
    _, var_p, _, _ = ckpts
    other = VQVAE(tiny_vae_config(vocab_size=32))
    torch.save(other.state_dict(), tmp_path / "v32.pth")
    with pytest.raises(CheckpointError, match="VQ-VAE has vocab 32"):
        load_official(tmp_path / "v32.pth", var_p, patch_nums=PNS)


# ------------------------------------------------------------------------------------------------------
# Pipeline
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def pipe(ckpts):
    vae_p, var_p, _, _ = ckpts
    p = VARPipeline.from_official(vae_p, var_p, patch_nums=PNS)
    p.set_progress_bar_config(disable=True)
    return p


def test_pipeline_save_load_round_trip(pipe, tmp_path):
    out = pipe([1, 2], guidance_scale=2.0, top_k=20, top_p=0.9, seed=7, num_images_per_label=2, output_type="np")
    assert out.images.shape == (4, 8, 8, 3) and out.images.dtype == np.float32
    pipe.save_pretrained(tmp_path / "saved")
    again = VARPipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    out2 = again([1, 2], guidance_scale=2.0, top_k=20, top_p=0.9, seed=7, num_images_per_label=2, output_type="np")
    np.testing.assert_array_equal(out.images, out2.images)
    for a, b in zip(out.tokens, out2.tokens):
        assert torch.equal(a, b)
    pil = again(3, seed=0).images
    assert len(pil) == 1 and pil[0].size == (8, 8)
    pt = again([0, -1], seed=0, output_type="pt").images
    assert pt.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="output_type"):
        again(1, output_type="latent")
    with pytest.raises(ValueError, match="class labels must lie"):
        again([NCLS + 3])


def test_pipeline_inpainting_keeps_known_tokens(pipe):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 8, 8, generator=g)
    known = pipe.encode_tokens(image)
    mask = torch.zeros(4, 4)
    mask[:, :2] = 1  # keep the left half (token grid of the last scale)
    out = pipe(None, seed=1, image=image, mask=mask, num_images_per_label=3, output_type="pt", top_k=0, top_p=0)
    keeps = edit_mask_per_scale(mask[None, None], PNS)
    assert keeps[0].all()  # the 1x1 scale is always taken from the image
    n_kept = n_free_changed = 0
    for tok, kn, keep in zip(out.tokens, known, keeps):
        keep = keep.expand_as(tok)
        assert torch.equal(tok[keep], kn.expand_as(tok)[keep])
        n_kept += int(keep.sum())
        n_free_changed += int((tok[~keep] != kn.expand_as(tok)[~keep]).sum())
    assert n_kept > 0 and n_free_changed > 0  # the rest is generated
    # keep everything: the output is the VQ-VAE reconstruction of the image
    full = pipe(None, seed=1, image=image, mask=torch.ones(8, 8), output_type="pt")
    for tok, kn in zip(full.tokens, known):
        assert torch.equal(tok, kn)
    with torch.no_grad():
        rec = pipe.vae.img_to_reconstructed_img(image * 2 - 1).add(1).mul(0.5)
    torch.testing.assert_close(full.images, rec, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs both image and mask"):
        pipe(None, image=image)
