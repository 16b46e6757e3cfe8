"""The whole `QwenImageTransformer` and one block against diffusers' `QwenImageTransformer2DModel`
(goldens/make_transformer_goldens.py): two tiny configurations with diffusers' state dicts loaded strictly by name,
every `Switches` setting, a bfloat16 run, shapes and dtypes, bad input and the real config.json."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from transformer_goldens import TAGS, assert_close, every_switch_setting, load, tiny_model, to_np

from qwen_nb.attention import joint_key_mask
from qwen_nb.loading import load_strict
from qwen_nb.switches import Switches
from qwen_nb.transformer import QwenImageTransformer, TransformerConfig

SETTINGS = every_switch_setting()

# transformer/config.json of Qwen/Qwen-Image (spec section 1.1)
REAL_CONFIG = {
    "_class_name": "QwenImageTransformer2DModel",
    "_diffusers_version": "0.34.0.dev0",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 768,
}


def forward(model, g, grid, dtype=mx.float32):
    return model(
        g["latents"].astype(dtype), g["text"].astype(dtype), g["sigma"].astype(dtype), grid, g.get("text_mask")
    )


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_full_model_matches_diffusers(tag, setting):
    model, g, grid = tiny_model(tag, SETTINGS[setting])
    out = forward(model, g, grid)
    assert out.dtype == mx.float32
    assert_close(out, g["out"], f"transformer {tag} {setting}")


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("setting", ["default", "baseline"])
def test_block_matches_diffusers(tag, setting):
    model, g, (h, w) = tiny_model(tag, SETTINGS[setting])
    block = model.transformer_blocks[0]
    mask = None if "text_mask" not in g else joint_key_mask(g["text_mask"], h * w)
    rope = model.rope(h, w, g["block_txt"].shape[1])
    img, txt = block(g["block_img"], g["block_txt"], block.modulation(g["temb"]), rope, mask)
    assert_close(img, g["block_out_img"], f"block {tag} {setting} image")
    assert_close(txt, g["block_out_txt"], f"block {tag} {setting} text")


@pytest.mark.parametrize("setting", ["default", "baseline"])
def test_bfloat16_matches_diffusers_bfloat16(setting):
    """Config a with the same (bfloat16-exact) weights and inputs, run in bfloat16 by both."""
    model, g, grid = tiny_model("a", SETTINGS[setting], dtype=mx.bfloat16)
    out = forward(model, g, grid, mx.bfloat16)
    assert out.dtype == mx.bfloat16
    # Measured: max|diff| 0.047 (mean 0.008) on outputs up to |7.3|, 1.5 bf16 ulps of the largest outputs (the ulp
    # is 2^-5 in [4, 8)). The error is absolute, not relative: it comes from the two frameworks rounding matmul sums
    # and the bf16 residual stream differently, and shows as 0.035 on an output of 0.18 as on one of 3.6. Hence an
    # absolute 2^-4 (twice a top ulp, 0.9% of max|y|) plus one ulp relative. For scale, diffusers' own bfloat16
    # run is 0.54 (mean 0.11) away from its float32 run.
    assert_close(out, g["out_bf16"], f"transformer a {setting} bfloat16", rtol=2**-5, atol=2**-4)
    # and qwen_nb's bfloat16 is far closer to diffusers' bfloat16 than bfloat16 is to float32
    ours, theirs, exact = to_np(out), to_np(g["out_bf16"]), to_np(g["out"])
    assert np.abs(ours - theirs).mean() < 0.2 * np.abs(theirs - exact).mean()


def test_diffusers_state_dict_loads_strictly():
    for tag in TAGS:
        weights, info = load(f"transformer_{tag}_weights")
        model = QwenImageTransformer(TransformerConfig(**info["config"]))
        load_strict(model, weights, "transformer")  # raises on any missing, unexpected or mis-shaped name
        assert set(dict(tree_flatten(model.parameters()))) == set(weights)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("setting", ["default", "baseline"])
def test_shapes_and_dtypes(dtype, batch, setting):
    model = QwenImageTransformer(TransformerConfig.tiny(), SETTINGS[setting])
    model.set_dtype(dtype)
    keys = mx.random.split(mx.random.key(0), 2)
    latents = mx.random.normal((batch, 6, 64), key=keys[0]).astype(dtype)
    text = mx.random.normal((batch, 5, 48), key=keys[1]).astype(dtype)
    for mask in (None, mx.ones((batch, 5), dtype=mx.int32)):
        out = model(latents, text, mx.full((batch,), 0.5).astype(dtype), (2, 3), mask)
        assert out.shape == (batch, 6, 64) and out.dtype == dtype


def test_modules_never_evaluate(monkeypatch):
    model, g, grid = tiny_model("b")

    def refuse(*args):
        raise AssertionError("a module called mx.eval")

    monkeypatch.setattr(mx, "eval", refuse)
    out = forward(model, g, grid)  # builds the graph only
    monkeypatch.undo()
    mx.eval(out)


def test_axes_must_sum_to_head_dim():
    with pytest.raises(ValueError, match=r"sums to 30.*attention_head_dim = 32"):
        TransformerConfig.tiny(axes_dims_rope=(6, 12, 12))


def test_grid_must_match_tokens():
    model = QwenImageTransformer(TransformerConfig.tiny())
    with pytest.raises(ValueError, match=r"3x3.*9.*N = 6"):
        model(mx.zeros((1, 6, 64)), mx.zeros((1, 5, 48)), mx.array([0.5]), (3, 3))


def test_config_from_the_real_config_json():
    cfg = TransformerConfig.from_dict(REAL_CONFIG)  # _class_name, guidance_embeds, pooled_projection_dim ignored
    assert cfg == TransformerConfig()
    assert (cfg.dim, cfg.num_layers, cfg.axes_dims_rope, cfg.joint_attention_dim) == (3072, 60, (16, 56, 56), 3584)
    assert TransformerConfig.from_dict({**REAL_CONFIG, "zero_cond_t": False, "brand_new_key": 1}) == cfg


def test_switch_settings_cover_every_switch():
    assert Switches.baseline() != Switches() and len(SETTINGS) == 2 + len(Switches.__dataclass_fields__)
