"""Tests of the shapes world (fastgen.zoo.shapes) and its rule-based evaluator (fastgen.zoo.evaluate)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fastgen.zoo import evaluate as ev
from fastgen.zoo import shapes


def _degrade(images: list[np.ndarray], sigma: float, noise: float, seed: int = 0) -> list[np.ndarray]:
    """Gaussian blur (sigma in px) plus Gaussian pixel noise (std on the 0-255 scale)."""
    rng = np.random.default_rng(seed)
    out = []
    for im in images:
        f = ndimage.gaussian_filter(im.astype(np.float32), sigma=(sigma, sigma, 0))
        out.append(np.clip(f + rng.normal(0.0, noise, f.shape), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def real32() -> tuple[list[np.ndarray], list[str]]:
    return shapes.sample(300, shapes.EVAL_SEED, size=32)


# --- the world -----------------------------------------------------------------------------------


def test_deterministic_from_seed() -> None:
    a_imgs, a_ps = shapes.sample(20, 5)
    b_imgs, b_ps = shapes.sample(20, 5)
    assert a_ps == b_ps and all(np.array_equal(x, y) for x, y in zip(a_imgs, b_imgs))
    assert shapes.sample_prompts(20, 5) == a_ps
    assert shapes.sample_prompts(7, 5) == a_ps[:7]  # n only truncates: unlimited samples
    assert np.array_equal(shapes.render(a_ps[3], (5, 3, 1)), a_imgs[3])
    c_imgs, c_ps = shapes.sample(20, 6)
    assert c_ps != a_ps or not all(np.array_equal(x, y) for x, y in zip(a_imgs, c_imgs))
    p = "a red triangle left of a blue circle"
    assert np.array_equal(shapes.render(p, 11), shapes.render(p, 11))
    assert not np.array_equal(shapes.render(p, 11), shapes.render(p, 12))


def test_image_format_and_mix() -> None:
    imgs, prompts = shapes.sample(2000, 1000)
    assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in imgs[:50])
    kinds = [shapes.parse_prompt(p).kind for p in prompts]
    for kind, frac in shapes.PROMPT_MIX.items():
        assert abs(kinds.count(kind) / len(kinds) - frac) < 0.04, kind
    assert shapes.render("a red circle", 0, size=64).shape == (64, 64, 3)


def test_every_prompt_renders_parses_and_scores() -> None:
    prompts = shapes.all_prompts(max_objects=3)
    assert len(prompts) == len(set(prompts)) == 12 + 24 + 12 * 11 * 4
    vocab = set(shapes.VOCAB)
    for i, p in enumerate(prompts):
        assert shapes.parse_prompt(p).prompt == p
        assert set(p.split()) <= vocab, p
        assert ev.score_one(p, shapes.render(p, i))["overall"], p
    assert all(w.isascii() and w.isalpha() for w in shapes.VOCAB)
    assert set(shapes.sample_prompts(300, 0)) <= set(shapes.all_prompts())
    assert any(p.startswith("three") for p in shapes.sample_prompts(300, 0, max_objects=3))
    assert not any(p.startswith("three") for p in shapes.sample_prompts(300, 0))


def test_relations_hold_with_margin() -> None:
    for i, p in enumerate(shapes.all_prompts()):
        spec = shapes.parse_prompt(p)
        if spec.kind != "relation":
            continue
        a, b = shapes.layout(spec, i).objects
        dx, dy = b.cx - a.cx, b.cy - a.cy
        axes = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}
        along, cross = axes[spec.relation]
        assert along >= (a.size + b.size) / 2 + 3 and abs(cross) <= along / 2, p


def test_parse_prompt_errors() -> None:
    assert shapes.parse_prompt("  A Red  Circle. ") == shapes.parse_prompt("a red circle")
    for bad in ["", "a purple circle", "a red hexagon", "two red circle", "four red circles",
                "a red circle near a blue square", "a red circle left a blue square", "red circle"]:
        with pytest.raises(ValueError, match="grammar|unknown|plural"):
            shapes.parse_prompt(bad)
    with pytest.raises(ValueError):
        shapes.sample_prompts(3, 0, max_objects=4)
    with pytest.raises(ValueError):
        shapes.render("a red circle", 0, size=8)


def test_render_speed() -> None:
    import time

    t = time.perf_counter()
    shapes.sample(1000, 1000)
    assert time.perf_counter() - t < 2.0  # ~0.2 s here; 10k images take ~2 s


# --- the evaluator -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_real_images_score_high(size: int) -> None:
    imgs, prompts = shapes.sample(300, shapes.EVAL_SEED, size=size)
    r = ev.score(prompts, imgs)
    assert r["n"] == 300 and r["n_single"] + r["n_counting"] + r["n_relation"] == 300
    for key in ("overall", "color", "shape", "count", "position", "single", "counting", "relation"):
        assert r[key] >= 0.98, (key, r)


def test_shuffled_prompts_near_chance() -> None:
    # Expected chance ~0.017: a shuffled prompt matches iff it names the same scene: single 0.4 * 1/12,
    # counting 0.2 * 1/12, relation 0.4 * 2/528; measured 0.015 on 1000 items. 0.06 is ~6 std above it.
    r = ev.chance_baseline(300, shapes.EVAL_SEED)
    assert r["overall"] < 0.06, r
    assert r["relation"] < 0.02 and r["position"] < 0.1, r
    assert r == ev.chance_baseline(300, shapes.EVAL_SEED)  # deterministic


@pytest.mark.parametrize("size", [32, 64])
def test_robust_to_blur_and_noise(size: int) -> None:
    imgs, prompts = shapes.sample(300, shapes.EVAL_SEED, size=size)
    k = size / 32
    assert ev.score(prompts, _degrade(imgs, 0.7 * k, 8.0))["overall"] >= 0.95
    assert ev.score(prompts, _degrade(imgs, 1.0 * k, 15.0))["overall"] >= 0.9
    tex_imgs, tex_prompts = shapes.sample(100, 1, size=size, texture=True)
    assert ev.score(tex_prompts, tex_imgs)["overall"] >= 0.98


def test_rejects_wrong_images(real32) -> None:
    imgs, prompts = real32
    gray = [np.repeat(im.mean(-1, keepdims=True), 3, -1).astype(np.uint8) for im in imgs[:50]]
    assert ev.score(prompts[:50], gray)["overall"] == 0.0
    swapped = [im[:, :, ::-1].copy() for im in imgs[:100]]  # RGB -> BGR changes red/blue/yellow
    assert ev.score(prompts[:100], swapped)["color"] < 0.6
    flipped = [im[::-1].copy() for im in imgs[:100]]  # upside down: triangles and above/below break
    r = ev.score(prompts[:100], flipped)
    assert r["shape"] < 0.9 and r["relation"] < 0.7
    yy, xx = np.mgrid[0:32, 0:32] + 0.5
    ellipse = np.full((32, 32, 3), 45, np.uint8)
    ellipse[((xx - 16) / 9) ** 2 + ((yy - 16) / 4.5) ** 2 <= 1] = (220, 40, 40)
    assert [d["shape"] for d in ev.detect(ellipse)] == ["other"]


def test_input_formats(real32) -> None:
    import torch
    from PIL import Image

    imgs, prompts = real32
    imgs, prompts = imgs[:40], prompts[:40]
    ref = ev.score(prompts, imgs)
    arr = np.stack(imgs).astype(np.float32) / 255.0
    assert ev.score(prompts, arr) == ref  # (N, H, W, 3) float
    assert ev.score(prompts, torch.from_numpy(arr).permute(0, 3, 1, 2)) == ref  # (N, 3, H, W) tensor
    assert ev.score(prompts, [Image.fromarray(im) for im in imgs]) == ref
    assert ev.score(prompts, np.stack(imgs)) == ref  # uint8 batch
    assert ev.score(prompts, list(torch.from_numpy(arr).permute(0, 3, 1, 2))) == ref  # list of (3, H, W)
    one = ev.score_one(prompts[0], Image.fromarray(imgs[0]))
    assert one["overall"] and one["kind"] == shapes.parse_prompt(prompts[0]).kind


def test_input_errors(real32) -> None:
    imgs, prompts = real32
    arr = np.stack(imgs[:4]).astype(np.float32) / 255.0
    with pytest.raises(ValueError, match="prompts but"):
        ev.score(prompts[:3], imgs[:4])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ev.score(prompts[:4], arr * 2 - 1)
    with pytest.raises(ValueError, match="4-D"):
        ev.score(prompts[:4], arr[0])
    with pytest.raises(ValueError, match="N,3,H,W"):
        ev.score(prompts[:4], np.zeros((4, 4, 32, 32), np.float32))
    with pytest.raises(ValueError, match="empty"):
        ev.score([], [])
    with pytest.raises(ValueError, match="list of strings"):
        ev.score("a red circle", imgs[:1])
    with pytest.raises(ValueError, match="images must be"):
        ev.score(prompts[:1], "not an image")
    with pytest.raises(ValueError, match="grammar|unknown"):
        ev.score(["a purple circle"], imgs[:1])
    with pytest.raises(ValueError, match=">= 2 images"):
        ev.frechet_distance(imgs[:1], imgs[:5])


def test_frechet_distance(real32) -> None:
    imgs, _ = real32
    other, _ = shapes.sample(300, 1000)
    rng = np.random.default_rng(0)
    same = ev.frechet_distance(imgs, other)
    noise = ev.frechet_distance(imgs, rng.random((300, 32, 32, 3)))
    blurred = ev.frechet_distance(imgs, _degrade(other, 0.7, 0.0))
    assert same < 0.2 and noise > 3.0 and noise > 20 * same, (same, noise)
    assert blurred > 2 * same, (same, blurred)
    assert ev.frechet_distance(imgs, imgs) < 1e-3
    assert ev.features(imgs[:3]).shape == (3, 127)
