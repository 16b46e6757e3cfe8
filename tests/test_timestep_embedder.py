"""The timestep embedding against diffusers' `QwenTimestepProjEmbeddings` (`time_text_embed` of the tiny golden
models, goldens/make_transformer_goldens.py), and its sinusoids against the closed form."""

import math

import mlx.core as mx
import numpy as np
import pytest
from transformer_goldens import TAGS, assert_close, tiny_model

from qwen_nb.switches import Switches
from qwen_nb.timestep_embedder import QwenTimestepProjEmbeddings, sinusoids, timestep_frequencies

SETTINGS = {"cached": Switches(), "rebuilt": Switches(timestep_cache=False)}


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_matches_diffusers(tag, setting):
    model, g, _ = tiny_model(tag, SETTINGS[setting])
    temb = model.time_text_embed(g["sigma"], mx.float32)
    assert temb.shape == (g["sigma"].shape[0], model.config.dim)
    assert_close(temb, g["temb"], f"{tag} {setting} temb")
    # sigma from 1 down to 0: the largest angles, 1000 * sigma * f, are where frequency rounding shows
    assert_close(model.time_text_embed(g["temb_sweep_sigma"], mx.float32), g["temb_sweep"], f"{tag} {setting} sweep")


def test_frequencies_closed_form():
    exact = np.exp(-math.log(10000) * np.arange(128) / 128)
    f = np.array(timestep_frequencies(256))
    assert f.dtype == np.float32 and f.shape == (128,)
    # the float32 exponent (|x| <= 9.2) is off by up to half an ulp, 5e-7, which is the relative error of exp(x)
    np.testing.assert_allclose(f, exact, rtol=1e-6)


def test_sinusoids_cos_first():
    """flip_sin_to_cos: [cos(1000 t f), sin(1000 t f)]."""
    f = timestep_frequencies(256)
    t = mx.array([0.0, 0.25])
    emb = np.array(sinusoids(t, f))
    assert emb.shape == (2, 256)
    np.testing.assert_array_equal(emb[0], np.r_[np.ones(128), np.zeros(128)])
    a = 250.0 * np.array(f, dtype=np.float64)
    assert_close(emb[1], np.r_[np.cos(a), np.sin(a)], "sinusoids at t = 0.25", atol=2e-5)  # float32 angles ~250


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
def test_shapes_and_dtypes(dtype, batch):
    emb = QwenTimestepProjEmbeddings(64)
    emb.set_dtype(dtype)
    out = emb(mx.full((batch,), 0.5).astype(dtype), dtype)
    assert out.shape == (batch, 64) and out.dtype == dtype
