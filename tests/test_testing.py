import numpy as np
import pytest
import torch

from fastgen.adapters import get_adapter
from fastgen.testing import KINDS, bench_resolution, default_call_kwargs, tiny_pipeline


def _hw(kind):
    return {} if kind == "dit" else {"height": 64 if kind == "lumina2" else 32, "width": 64 if kind == "lumina2" else 32}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_generates_and_is_deterministic(kind):
    pipe = tiny_pipeline(kind)
    a = pipe(**default_call_kwargs(pipe, steps=2, **_hw(kind)), output_type="np").images
    assert a.ndim == 4 and a.shape[-1] == 3 and np.isfinite(a).all()
    # same seed -> same weights and same image; another weight seed -> another image
    b_pipe = tiny_pipeline(kind)
    b = b_pipe(**default_call_kwargs(b_pipe, steps=2, **_hw(kind)), output_type="np").images
    np.testing.assert_array_equal(a, b)
    c_pipe = tiny_pipeline(kind, seed=1)
    c = c_pipe(**default_call_kwargs(c_pipe, steps=2, **_hw(kind)), output_type="np").images
    assert not np.array_equal(a, c)
    assert get_adapter(pipe).family == kind


def test_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_pipeline("dit")
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())


@pytest.mark.parametrize("kind", ["sd", "sd3", "flux", "pixart", "sana"])
def test_bench_resolution_gives_token_counts(kind):
    pipe = tiny_pipeline(kind)
    h, w = bench_resolution(kind, 1024, size="tiny")
    assert get_adapter(pipe).latent_grid(pipe, h, w) == (32, 32)


def test_bench_size_sd3_is_bigger_and_has_4096_tokens():
    small = sum(p.numel() for p in tiny_pipeline("sd3").transformer.parameters())
    big_pipe = tiny_pipeline("sd3", size="bench")
    big = sum(p.numel() for p in big_pipe.transformer.parameters())
    assert big > 20 * small
    h, w = bench_resolution("sd3", 4096)
    assert get_adapter(big_pipe).latent_grid(big_pipe, h, w) == (64, 64)


def test_bad_kind_size_and_overrides():
    with pytest.raises(ValueError, match="unknown tiny pipeline kind 'sd4'.*sd3"):
        tiny_pipeline("sd4")
    with pytest.raises(ValueError, match="size must be"):
        tiny_pipeline("sd3", size="huge")
    with pytest.raises(TypeError, match="unexpected overrides"):
        tiny_pipeline("sd3", vae={"x": 1})
    with pytest.raises(ValueError, match="sample_size"):
        bench_resolution("dit", 1024)
    with pytest.raises(ValueError, match="square number"):
        bench_resolution("sd3", 1000)


def test_overrides_reach_the_denoiser():
    pipe = tiny_pipeline("sd3", transformer={"num_layers": 3})
    assert len(pipe.transformer.transformer_blocks) == 3


def test_tokenizer_is_offline_and_word_level():
    from fastgen.text import build_word_tokenizer

    tok = build_word_tokenizer(("circle", "square"))
    ids = tok("a red circle left of a square").input_ids
    toks = tok.convert_ids_to_tokens(ids)
    assert "circle</w>" in toks and "square</w>" in toks
    assert tok.batch_decode([ids], skip_special_tokens=True)[0] == "a red circle left of a square"
    with pytest.raises(ValueError, match="ASCII letters"):
        build_word_tokenizer(("two words",))
