"""The 3-D RoPE tables against diffusers' `QwenEmbedRope` (goldens/make_transformer_goldens.py), and the rotation
against the complex multiply it stands for."""

import mlx.core as mx
import numpy as np
import pytest
from transformer_goldens import TAGS, assert_close, load

from qwen_nb.rope import apply_rope, apply_rope_fused, axis_frequencies, build_rope_table, image_positions, rope_table


@pytest.mark.parametrize("tag", TAGS)
def test_tiny_tables_match_diffusers(tag):
    g, info = load(f"transformer_{tag}")
    (h, w), axes = info["grid"], tuple(info["config"]["axes_dims_rope"])
    L = g["text"].shape[1]
    for make in (build_rope_table, rope_table):
        cos, sin = make(h, w, L, axes)
        assert cos.shape == sin.shape == (L + h * w, sum(axes) // 2) and cos.dtype == mx.float32
        assert_close(cos[:L], g["rope_txt_cos"], f"{tag} text cos")
        assert_close(sin[:L], g["rope_txt_sin"], f"{tag} text sin")
        assert_close(cos[L:], g["rope_img_cos"], f"{tag} image cos")
        assert_close(sin[L:], g["rope_img_sin"], f"{tag} image sin")


@pytest.mark.parametrize("case", ["sq64", "sq83", "wide", "long"])
def test_real_axes_match_diffusers(case):
    """(16, 56, 56) at 64x64, 83x83 (odd), 58x104 with 12 text tokens and 64x64 with 1024: the angles reach ~1000
    rad, where one float32 ulp of a frequency is visible, so this checks that the roundings are diffusers'."""
    g, info = load("rope_tables")
    h, w, L = info["cases"][case]
    cos, sin = build_rope_table(h, w, L, tuple(info["axes_dims_rope"]))
    rows, text_rows = np.array(g[f"{case}_rows"]), np.array(g[f"{case}_text_rows"])
    cos, sin = np.array(cos), np.array(sin)
    assert_close(cos[text_rows], g[f"{case}_txt_cos"], f"{case} text cos")
    assert_close(sin[text_rows], g[f"{case}_txt_sin"], f"{case} text sin")
    assert_close(cos[L + rows], g[f"{case}_img_cos"], f"{case} image cos")
    assert_close(sin[L + rows], g[f"{case}_img_sin"], f"{case} image sin")


def test_positions_are_centred():
    # spec 1.6: h = 64 gives rows -32..31; the odd side 83 gives -42..40
    rows, cols = image_positions(64, 83)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (-32, 31, -42, 40)
    assert list(rows[:84]) == [-32] * 83 + [-31] and list(cols[:3]) == [-42, -41, -40]  # row-major


def test_frequencies_closed_form():
    # theta^(-2k/d) for the real axes, to float32 precision
    for d in (16, 56):
        exact = 10000.0 ** (-np.arange(0, d, 2) / d)
        np.testing.assert_allclose(axis_frequencies(d), exact, rtol=1e-6)


def test_text_starts_past_the_largest_image_position():
    # text token j sits at max(h//2, w//2) + j on all three axes: with all axes alike, its angle is (p + j) * f
    cos, sin = build_rope_table(6, 10, 3, (8, 12, 12))
    f = np.concatenate([axis_frequencies(d) for d in (8, 12, 12)])
    angles = (5 + np.arange(3, dtype=np.float32))[:, None] * f[None]
    assert_close(cos[:3], np.cos(angles), "text cos closed form")
    assert_close(sin[:3], np.sin(angles), "text sin closed form")


def test_table_is_cached():
    assert rope_table(4, 4, 7, (8, 12, 12)) is rope_table(4, 4, 7, (8, 12, 12))


@pytest.mark.parametrize("rotate", [apply_rope, apply_rope_fused])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_rotation_is_the_interleaved_complex_multiply(rotate, dtype):
    """(x[2i] + i x[2i+1]) * e^{i theta_i}, computed in float32 and cast back, as diffusers' use_real=False."""
    cos, sin = build_rope_table(3, 5, 6, (6, 6, 8))
    x = mx.random.normal((2, 21, 3, 20), key=mx.random.key(0)).astype(dtype)
    y = rotate(x, cos, sin)
    assert y.shape == x.shape and y.dtype == dtype
    xc = np.array(x.astype(mx.float32)).reshape(2, 21, 3, 10, 2)
    z = (xc[..., 0] + 1j * xc[..., 1]) * (np.array(cos) + 1j * np.array(sin))[None, :, None, :]
    expected = np.stack([z.real, z.imag], axis=-1).reshape(2, 21, 3, 20)
    if dtype == mx.float32:
        assert_close(y, expected, "rotation float32")
    else:  # one bf16 rounding of values |y| < 8: half an ulp is at most 2^-6 absolute, 2^-9 relative
        assert_close(y, expected, "rotation bfloat16", rtol=2**-8, atol=2**-8)
