"""qwen_nb.vision against transformers 5.24 (the Pillow image processor, Qwen2.5-VL's vision tower, get_rope_index,
the language model with pictures) and diffusers 0.42.1 (Qwen-Image-Edit-Plus's prompt encoding), on the tiny
random checkpoint tests/fixtures/tiny_vl and the goldens of tests/goldens/make_vision_goldens.py."""

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from qwen_nb.text_encoder import load_text_encoder
from qwen_nb.vision import (
    ImageProcessorConfig,
    Qwen25VisionTransformer,
    QwenVLProcessor,
    VisionConfig,
    encode_with_images,
    expand_image_pads,
    get_rope_index,
    load_vision_tower,
    process_images,
    smart_resize,
)

TESTS = Path(__file__).resolve().parent
GOLDENS = TESTS / "goldens"
PICTURES = GOLDENS / "vision_pictures"
FIXTURE = TESTS / "fixtures" / "tiny_vl"
ENCODER = FIXTURE / "text_encoder"
META = json.loads((GOLDENS / "vision_goldens.json").read_text())
IMAGE_TOKEN = META["tokens"]["image_token_id"]
EDIT_PLUS_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_DROP_IDX = 64  # diffusers' prompt_template_encode_start_idx for the edit pipelines


@pytest.fixture(scope="module")
def golden():
    return mx.load(str(GOLDENS / "vision_goldens.safetensors"))


@pytest.fixture(scope="module")
def processor():
    return QwenVLProcessor.from_pretrained(FIXTURE / "processor")


@pytest.fixture(scope="module")
def tower():
    return load_vision_tower(ENCODER, mx.float32)


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder(ENCODER, mx.float32)


def picture(name: str) -> Image.Image:
    return Image.open(PICTURES / f"{name}.png")


def batch_pixels(golden):
    return mx.concatenate([golden[f"pixel_values_{n}"] for n in META["batch_pictures"]])


def close(a, b, tol=1e-5):
    a, b = np.array(a.astype(mx.float32)), np.array(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f"max|diff| {np.abs(a - b).max():.3g}")


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def mode_pictures(odd: Image.Image) -> dict:
    """As make_vision_goldens.mode_pictures: the odd picture in other Pillow modes."""
    rgba = odd.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(odd.size))
    palette = odd.quantize(16)
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    grey = np.asarray(odd.convert("L"), np.uint16)
    return {
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "L": odd.convert("L"),
        "1": odd.convert("1"),
        "P": palette,
        "P+transparency": transparent,
        "CMYK": odd.convert("CMYK"),
        "I;16": Image.fromarray(grey * 257),
        "F": odd.convert("F"),
    }


# ---- the image processor: bit-exact in float32 ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small", "odd", "large"])
def test_pixel_values_equal_transformers(processor, golden, name):
    """small 30x20 is upscaled to min_pixels, odd 70x45 rounds 2.5 to even, large 200x300 is cut to max_pixels."""
    pixel_values, grid = process_images(picture(name), processor.image_config)
    ref = np.array(golden[f"pixel_values_{name}"])
    assert pixel_values.dtype == np.float32 and pixel_values.shape == ref.shape
    assert np.array_equal(pixel_values, ref), f"max|diff| {np.abs(pixel_values - ref).max():.3g}"
    np.testing.assert_array_equal(grid, np.array(golden[f"grid_{name}"]))


def _case_input(name: str):
    if name.startswith("mode "):
        return mode_pictures(picture("odd"))[name[len("mode ") :]]
    if name.startswith("path "):
        return PICTURES / name[len("path ") :]
    if name == "batch":
        return [picture(n) for n in ("large", "small", "odd")]
    return picture("large")  # "real range large"


@pytest.mark.parametrize("name", sorted(META["cases"]))
def test_processor_cases_equal_transformers(processor, name):
    """Pillow modes (transparency onto white, 16-bit clipped), paths (alpha dropped, EXIF applied), a batch, and
    the hub checkpoint's pixel range: the float32 bytes hash to transformers'."""
    case = META["cases"][name]
    config = ImageProcessorConfig() if name == "real range large" else processor.image_config
    pixel_values, grid = process_images(_case_input(name), config)
    assert list(pixel_values.shape) == case["shape"] and grid.tolist() == case["grid"]
    assert sha256(pixel_values) == case["sha256"], f"sum {pixel_values.astype(np.float64).sum()} vs {case['sum']}"


def test_processor_texts_and_pictures(processor, golden):
    """Qwen2VLProcessor's ids and mask for two texts with three pictures, right-padded."""
    pictures = [picture(n) for n in META["batch_pictures"]]
    out = processor(META["texts"], pictures)
    np.testing.assert_array_equal(out["input_ids"], np.array(golden["batch_input_ids"]))
    np.testing.assert_array_equal(out["attention_mask"], np.array(golden["batch_attention_mask"]))
    np.testing.assert_array_equal(out["image_grid_thw"], np.array(golden["batch_grid"]))
    assert np.array_equal(out["pixel_values"], np.array(batch_pixels(golden)))


def test_preprocessor_config_shapes(processor):
    """The fixture's `size` {shortest_edge, longest_edge} (transformers 5's save) and the hub's top-level
    min_pixels / max_pixels read alike; top-level values win; with neither, transformers' class defaults."""
    saved = json.loads((FIXTURE / "processor" / "preprocessor_config.json").read_text())
    assert "size" in saved and "min_pixels" not in saved
    hub = {k: v for k, v in saved.items() if k != "size"} | META["processor"]
    assert ImageProcessorConfig.from_dict(hub) == processor.image_config
    assert processor.image_config.min_pixels == 56 * 56 and processor.image_config.max_pixels == 28 * 28 * 10
    both = {**saved, "min_pixels": 1000}
    assert ImageProcessorConfig.from_dict(both).min_pixels == 1000
    assert ImageProcessorConfig.from_dict({}).max_pixels == 28 * 28 * 1280
    assert asdict(ImageProcessorConfig()) == dict(
        min_pixels=3136,
        max_pixels=12845056,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
        resample=3,
        rescale_factor=1 / 255,
    )


def test_smart_resize_rounding():
    assert smart_resize(45, 70) == (56, 56)  # 1.6 -> 2, 2.5 -> 2: Python's round, halves to even
    assert smart_resize(20, 30) == (56, 84)  # under min_pixels: scaled up, rounded up
    assert smart_resize(300, 200, max_pixels=7840) == (84, 56)  # over max_pixels: scaled down, rounded down
    assert smart_resize(1024, 1024) == (1036, 1036)


# ---- the vision tower ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["padded", "masked"])
def test_tower_equals_transformers(golden, attention):
    """Three pictures at once (full-attention blocks see each picture alone); windows of 16 and 8 patches."""
    tower = load_vision_tower(ENCODER, mx.float32, attention)
    out = tower(batch_pixels(golden), golden["batch_grid"])
    assert out.shape == (16, 64) and out.dtype == mx.float32
    close(out, golden["tower"])


def test_tower_one_picture_at_a_time(tower, golden):
    rows = 0
    for name, grid in zip(META["batch_pictures"], np.array(golden["batch_grid"]).tolist()):
        n = grid[0] * grid[1] * grid[2] // 4
        close(tower(golden[f"pixel_values_{name}"], [grid]), golden["tower"][rows : rows + n])
        rows += n


@pytest.mark.parametrize("pictures", [1, 2])
def test_tower_bfloat16(golden, pictures):
    tower = load_vision_tower(ENCODER, mx.bfloat16)
    assert tower.dtype == mx.bfloat16
    names = META["batch_pictures"][:pictures]
    pixels = mx.concatenate([golden[f"pixel_values_{n}"] for n in names])
    grid = np.array(golden["batch_grid"])[:pictures]
    out = tower(pixels, grid)
    rows = int(grid.prod(axis=1).sum()) // 4
    assert out.shape == (rows, 64) and out.dtype == mx.bfloat16
    ref = np.array(golden["tower"][:rows])
    # bf16 weights are the fixture's own; the activations' rounding through four blocks and the merger puts the
    # worst element ~0.7% of the output's scale (max |ref| ~ 8) off float32 (measured 0.052); bound at 3%.
    err = np.abs(np.array(out.astype(mx.float32)) - ref).max()
    assert err < 0.03 * np.abs(ref).max(), err


def test_vision_config_defaults_are_the_real_checkpoint():
    """Qwen/Qwen-Image's text_encoder/config.json (transformers 4.53: flat, with a nested text_config)."""
    hub = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "hidden_size": 3584,
        "image_token_id": 151655,
        "model_type": "qwen2_5_vl",
        "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0,
        "text_config": {"hidden_size": 3584, "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default"}},
        "video_token_id": 151656,
        "vision_config": {
            "depth": 32,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "hidden_act": "silu",
            "hidden_size": 1280,
            "in_channels": 3,
            "in_chans": 3,
            "initializer_range": 0.02,
            "intermediate_size": 3420,
            "model_type": "qwen2_5_vl",
            "num_heads": 16,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "torch_dtype": "float32",
            "window_size": 112,
        },
        "vision_start_token_id": 151652,
        "vocab_size": 152064,
    }
    assert VisionConfig.from_dict(hub) == VisionConfig()
    assert VisionConfig().head_dim == 80 and VisionConfig().patch_dim == 1176


def test_fixture_config_is_tiny():
    config = json.loads((ENCODER / "config.json").read_text())
    assert "rope_parameters" in config["vision_config"] and "text_config" in config  # transformers 5's shape
    assert VisionConfig.from_dict(config) == VisionConfig.tiny(image_token_id=IMAGE_TOKEN)


def test_sanitize():
    conv = mx.zeros((32, 3, 2, 14, 14))
    weights = {
        "visual.patch_embed.proj.weight": conv,
        "model.visual.blocks.0.attn.qkv.bias": 1,
        "visual.merger.mlp.0.weight": 2,
        "model.layers.0.mlp.up_proj.weight": 3,
        "model.language_model.norm.weight": 4,
        "lm_head.weight": 5,
    }
    out = Qwen25VisionTransformer.sanitize(weights)
    assert sorted(out) == ["blocks.0.attn.qkv.bias", "merger.mlp.0.weight", "patch_embed.proj.weight"]
    assert out["patch_embed.proj.weight"].shape == (32, 1176)


def test_loads_transformers5_names(tmp_path, golden):
    """transformers 5 keeps the tower as `model.visual.*` in memory (and some converted checkpoints carry it)."""
    weights = {
        ("model." + k if k.startswith("visual.") else k): v
        for k, v in mx.load(str(ENCODER / "model.safetensors")).items()
    }
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    shutil.copy(ENCODER / "config.json", tmp_path / "config.json")
    tower = load_vision_tower(tmp_path, mx.float32)
    close(tower(batch_pixels(golden), golden["batch_grid"]), golden["tower"])


# ---- positions and the language model with pictures ---------------------------------------------------------------


def test_rope_index_equals_transformers(golden):
    ids, mask, grid = (np.array(golden[k]) for k in ("batch_input_ids", "batch_attention_mask", "batch_grid"))
    positions, deltas = get_rope_index(ids, grid, mask, image_token_id=IMAGE_TOKEN)
    assert positions.shape == (3, 2, ids.shape[1]) and deltas.shape == (2, 1)
    np.testing.assert_array_equal(positions, np.array(golden["rope_positions"]))
    np.testing.assert_array_equal(deltas, np.array(golden["rope_deltas"]))
    # without a mask, an unpadded text gets the same positions
    alone, _ = get_rope_index(ids[:1], grid[:2], image_token_id=IMAGE_TOKEN)
    np.testing.assert_array_equal(alone[:, 0], np.array(golden["rope_positions"])[:, 0])


def test_rope_index_text_only_counts_up():
    positions, deltas = get_rope_index(np.arange(7)[None], None, image_token_id=IMAGE_TOKEN)
    np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(7), (3, 1, 7)))
    assert deltas.tolist() == [[0]]


@pytest.mark.parametrize("kind", ["mrope", "plain"])
def test_language_model_with_pictures(encoder, golden, kind):
    """mrope: positions from get_rope_index (transformers given mm_token_type_ids); plain: 0..L-1, what
    transformers 5 does for diffusers 0.42.1's edit pipelines, which pass no mm_token_type_ids. Padding included."""
    ids, mask, grid = (np.array(golden[k]) for k in ("batch_input_ids", "batch_attention_mask", "batch_grid"))
    positions = get_rope_index(ids, grid, mask, image_token_id=IMAGE_TOKEN)[0] if kind == "mrope" else None
    out = encode_with_images(encoder, ids, mask, golden["tower"], positions, IMAGE_TOKEN, (2, 3, 3))
    assert out.shape == (2, ids.shape[1], 64) and out.dtype == mx.float32
    close(out, golden[f"hidden_{kind}"])


def test_edit_plus_prompt_embeds_equal_diffusers(processor, tower, encoder, golden):
    """diffusers' QwenImageEditPlusPipeline._get_qwen_prompt_embeds (two pictures, transformers 5): processor,
    tower, the language model at plain positions, the template's first 64 tokens dropped."""
    spec = META["edit_plus"]
    prefix = "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(2))
    inputs = processor(EDIT_PLUS_TEMPLATE.format(prefix + spec["prompt"]), [picture(n) for n in spec["pictures"]])
    embeds = tower(inputs["pixel_values"], inputs["image_grid_thw"])
    hidden = encode_with_images(encoder, inputs["input_ids"], None, embeds, None, IMAGE_TOKEN, (2, 3, 3))
    close(hidden[:, EDIT_DROP_IDX:], golden["edit_plus_embeds"])
    assert np.array(golden["edit_plus_mask"]).all()


# ---- bad input ------------------------------------------------------------------------------------------------------


def test_picture_too_small_to_patch():
    with pytest.raises(ValueError, match=r"0x10 pixels: nothing to patch \(the smallest it takes is 1x1\)"):
        process_images(Image.new("RGB", (0, 10)))
    with pytest.raises(ValueError, match="aspect ratio of 250: the processor takes at most 200"):
        process_images(Image.new("RGB", (250, 1)))
    assert process_images(Image.new("RGB", (1, 1)))[1].tolist() == [
        [1, 4, 4]
    ]  # upscaled to min_pixels, as transformers


def test_not_a_picture(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ValueError, match="is not a picture Pillow can read"):
        process_images(text)
    with pytest.raises(FileNotFoundError, match="no picture at"):
        process_images(tmp_path / "missing.png")
    with pytest.raises(TypeError, match=r"PIL.Image.Image or a file path, not ndarray .*fromarray"):
        process_images(np.zeros((28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="mode 'La'.*convert it first"):
        process_images(Image.new("La", (28, 28)))


def test_bad_processor_config():
    with pytest.raises(ValueError, match="0 < min_pixels <= max_pixels"):
        ImageProcessorConfig(min_pixels=0)
    with pytest.raises(ValueError, match="gives no pixel range"):
        ImageProcessorConfig.from_dict({"size": {"height": 100, "width": 100}})
    with pytest.raises(ValueError, match="do_resize=false is not supported"):
        ImageProcessorConfig.from_dict({"do_resize": False})


def test_checkpoint_without_vision_tower(tmp_path):
    language_model = {
        k: v for k, v in mx.load(str(ENCODER / "model.safetensors")).items() if not k.startswith("visual.")
    }
    mx.save_safetensors(str(tmp_path / "model.safetensors"), language_model)
    shutil.copy(ENCODER / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"no vision-tower weights \(visual\.\*\).*Download the text_encoder/ folder"):
        load_vision_tower(tmp_path)
    # a sharded folder whose index lists no vision tensors: no shard is opened
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00001.safetensors")
    index = {"weight_map": {k: "model-00001-of-00001.safetensors" for k in language_model}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no vision-tower weights"):
        load_vision_tower(tmp_path)


def test_incomplete_vision_tower(tmp_path):
    weights = mx.load(str(ENCODER / "model.safetensors"))
    del weights["visual.blocks.2.mlp.up_proj.bias"]
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    shutil.copy(ENCODER / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="vision tower: 1 missing: visual.blocks.2.mlp.up_proj.bias"):
        load_vision_tower(tmp_path)


def test_config_without_vision():
    with pytest.raises(ValueError, match="no vision_config"):
        VisionConfig.from_dict({"hidden_size": 64})


def test_bad_tower_input(tower, golden):
    pixels = golden["pixel_values_small"]
    with pytest.raises(ValueError, match="positive multiples of 2 .* at least 28 px a side"):
        tower(pixels[:12], [[1, 3, 4]])
    with pytest.raises(ValueError, match=r"pixel_values \(24, 1176\) do not fit image_grid_thw \[\[1, 4, 4\]\]"):
        tower(pixels, [[1, 4, 4]])


def test_placeholders_must_fit_the_pictures(encoder, golden):
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholder\\(s\\) for 1 picture"):
        expand_image_pads(["<|image_pad|> and <|image_pad|>"], [[1, 4, 4]])
    ids = np.array(golden["batch_input_ids"])
    with pytest.raises(ValueError, match="16 picture tokens but 10 picture embeddings"):
        encode_with_images(encoder, ids, None, golden["tower"][:10], None, IMAGE_TOKEN, (2, 3, 3))
    with pytest.raises(ValueError, match="does not fit its picture's grid"):
        get_rope_index(ids, np.array(golden["batch_grid"])[[2, 0, 1]], image_token_id=IMAGE_TOKEN)
