"""RMSNorm against diffusers' `RMSNorm` (goldens/make_transformer_goldens.py)."""

import mlx.core as mx
import pytest
from transformer_goldens import TAGS, assert_close, load

from qwen_nb.rmsnorm import RMSNorm, rms_norm
from qwen_nb.switches import Switches

SETTINGS = {"fast": Switches(), "naive": Switches(fast_rms_norm=False)}


def norm_with(weight: mx.array, switches: Switches) -> RMSNorm:
    norm = RMSNorm(weight.shape[0], 1e-6, switches)
    norm.weight = weight
    return norm


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_matches_diffusers_float32(tag, setting):
    weights, _ = load(f"transformer_{tag}_weights")
    g, _ = load(f"transformer_{tag}")
    txt_norm = norm_with(weights["txt_norm.weight"].astype(mx.float32), SETTINGS[setting])
    assert_close(txt_norm(g["rmsnorm_x"]), g["rmsnorm_y"], f"txt_norm {tag} {setting}")
    # the per-head QK norm: (B, N, H, Dh) normalised over the head dimension
    head_norm = norm_with(g["rmsnorm_head_weight"], SETTINGS[setting])
    assert_close(head_norm(g["rmsnorm_head_x"]), g["rmsnorm_head_y"], f"norm_q {tag} {setting}")


def test_bfloat16_rounds_before_the_weight_like_diffusers():
    weights, _ = load("transformer_a_weights")
    g, _ = load("transformer_a")
    x, w = g["rmsnorm_x"].astype(mx.bfloat16), weights["txt_norm.weight"]
    assert w.dtype == mx.bfloat16
    # the written-out norm makes diffusers' two roundings (normalised x to bf16, then x * w to bf16): equal bits
    naive = norm_with(w, SETTINGS["naive"])(x)
    assert naive.dtype == mx.bfloat16
    assert_close(naive, g["rmsnorm_bf16_y"], "bf16 naive", rtol=0, atol=0)
    # mx.fast.rms_norm multiplies by the weight before its one rounding, so it may differ by one bf16 ulp
    # (2^-7 relative near |y| = 1..2, the size of these outputs): rtol 2^-7
    fast = norm_with(w, SETTINGS["fast"])(x)
    assert fast.dtype == mx.bfloat16
    assert_close(fast, g["rmsnorm_bf16_y"], "bf16 fast", rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("setting", SETTINGS)
def test_shapes_and_dtypes(dtype, batch, setting):
    x = mx.random.normal((batch, 5, 3, 24), key=mx.random.key(0)).astype(dtype)
    norm = RMSNorm(24, 1e-6, SETTINGS[setting])
    norm.set_dtype(dtype)
    y = norm(x)
    assert y.shape == x.shape and y.dtype == dtype


def test_unit_weight_gives_unit_rms():
    x = 7 * mx.random.normal((4, 64), key=mx.random.key(1))
    y = rms_norm(x, None, 1e-6)
    assert_close(mx.sqrt(mx.mean(y * y, axis=-1)), mx.ones(4), "rms of the output")
