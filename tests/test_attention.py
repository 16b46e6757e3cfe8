"""Joint attention against the `attn` module of a diffusers `QwenImageTransformerBlock`
(goldens/make_transformer_goldens.py): block 0 of each tiny golden model, its own weights."""

import mlx.core as mx
import numpy as np
import pytest
from transformer_goldens import TAGS, assert_close, every_switch_setting, tiny_model

from qwen_nb.attention import attention, joint_key_mask
from qwen_nb.switches import Switches
from qwen_nb.transformer import TransformerConfig

SETTINGS = every_switch_setting()


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_matches_diffusers(tag, setting):
    model, g, (h, w) = tiny_model(tag, SETTINGS[setting])
    attn = model.transformer_blocks[0].attn
    rope = model.rope(h, w, g["attn_txt"].shape[1])
    img, txt = attn(g["attn_img"], g["attn_txt"], rope, None)
    assert_close(img, g["attn_out_img"], f"{tag} {setting} image")
    assert_close(txt, g["attn_out_txt"], f"{tag} {setting} text")
    if "text_mask" in g:  # config b: the second prompt is padded, its padded keys hidden
        mask = joint_key_mask(g["text_mask"], h * w)
        img, txt = attn(g["attn_img"], g["attn_txt"], rope, mask)
        assert_close(img, g["attn_masked_out_img"], f"{tag} {setting} masked image")
        assert_close(txt, g["attn_masked_out_txt"], f"{tag} {setting} masked text")


def test_mask_changes_only_the_padded_sample():
    model, g, (h, w) = tiny_model("b")
    # the golden itself: sample 0 has no padding, so its outputs are equal with and without the mask
    np.testing.assert_array_equal(np.array(g["attn_out_img"][0]), np.array(g["attn_masked_out_img"][0]))
    assert np.abs(np.array(g["attn_out_img"][1] - g["attn_masked_out_img"][1])).max() > 1e-3


def test_joint_key_mask():
    mask = joint_key_mask(mx.array([[1, 1, 1], [1, 0, 0]]), 2)
    assert mask.shape == (2, 1, 1, 5) and mask.dtype == mx.bool_
    assert mask[:, 0, 0].tolist() == [[True] * 5, [True, False, False, True, True]]


def test_written_out_attention_equals_fast():
    q, k, v = (mx.random.normal((2, 3, 9, 16), key=mx.random.key(i)) for i in range(3))
    mask = joint_key_mask(mx.array([[1, 1, 1, 1], [1, 1, 0, 0]]), 5)
    for m in (None, mask):
        fast = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m)
        assert_close(attention(q, k, v, 0.25, m), fast, "written-out vs mx.fast attention")


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("switches", [Switches(), Switches.baseline()], ids=["default", "baseline"])
def test_shapes_and_dtypes(dtype, batch, switches):
    from qwen_nb.transformer import QwenImageTransformer

    model = QwenImageTransformer(TransformerConfig.tiny(), switches)
    model.set_dtype(dtype)
    attn = model.transformer_blocks[0].attn
    D = model.config.dim
    img = mx.random.normal((batch, 6, D), key=mx.random.key(0)).astype(dtype)
    txt = mx.random.normal((batch, 5, D), key=mx.random.key(1)).astype(dtype)
    mask = joint_key_mask(mx.ones((batch, 5), dtype=mx.int32), 6)
    for m in (None, mask):
        o_img, o_txt = attn(img, txt, model.rope(2, 3, 5), m)
        assert o_img.shape == img.shape and o_txt.shape == txt.shape
        assert o_img.dtype == dtype and o_txt.dtype == dtype
