"""Goldens for qwen_nb.vision, made by transformers 5.24 (its Pillow image processor and Qwen2.5-VL) and diffusers
0.42.1 (the Qwen-Image-Edit-Plus prompt encoding).

Run with the reference environment:
    /work/refenv/bin/python tests/goldens/make_vision_goldens.py
It (re)writes, deterministically:
- tests/fixtures/tiny_vl/text_encoder/: a tiny random `Qwen2_5_VLForConditionalGeneration` (text 64 wide, 2 layers;
  vision 32 wide, 4 blocks, full attention in blocks 1 and 3, windows of 2x2 merged groups) as `save_pretrained`
  writes it, weights stored in bfloat16 (the goldens are computed in float32 from those same rounded weights).
- tests/fixtures/tiny_vl/processor/: `Qwen2VLImageProcessorPil.save_pretrained` (real settings but max_pixels
  28*28*10, so pictures stay small) and `Qwen2Tokenizer.save_pretrained` of tests/fixtures/tiny_tokenizer (which has
  Qwen2.5-VL's vision tokens): the `processor/` folder of a Qwen-Image-Edit checkpoint.
- tests/goldens/vision_pictures/: the input pictures (PNG, and a JPEG with an EXIF rotation).
- tests/goldens/vision_goldens.safetensors: pixel values and grids of three pictures (an upscale to min_pixels, an
  odd size with a half-way rounding, a downscale to max_pixels), the vision tower's output for the three at once,
  a two-text batch with pictures (ids, mask, get_rope_index positions and deltas, the last hidden states with
  M-RoPE positions and as diffusers calls the model), and diffusers' Edit-Plus prompt embeddings.
- tests/goldens/vision_goldens.json: the processor cases checked by SHA-256 of their float32 bytes (Pillow modes,
  a file path, EXIF, the real checkpoint's pixel range), and the texts.

transformers 5.24 cannot build `Qwen2VLProcessor` without torchvision (its video processor needs it, and the
processor checks every part's class); the image and text parts are what the edit pipelines use, so the check is
skipped for the missing video processor (`_allow_missing_video_processor`).
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent / "fixtures" / "tiny_vl"
TOKENIZER_DIR = HERE.parent / "fixtures" / "tiny_tokenizer" / "vocab_merges"
PICTURES = HERE / "vision_pictures"

TEXT = dict(
    vocab_size=640,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
)
ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
VISION = dict(
    depth=4,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    out_hidden_size=64,
    fullatt_block_indexes=[1, 3],
    window_size=56,  # 2x2 merged groups = 4x4 patches a window
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    tokens_per_second=2,
)
PROCESSOR = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 10)
# the vision token ids of tests/fixtures/tiny_tokenizer
TOKENS = dict(image_token_id=612, video_token_id=613, vision_start_token_id=609, vision_end_token_id=610)

EDIT_PLUS_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"
TEXTS = [
    f"Picture 1: {PICTURE}Picture 2: {PICTURE}put the red square on the blue one",
    f"Picture 1: {PICTURE}make it night",
]


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ---- pictures ----------------------------------------------------------------------------------------------------


def scene(height: int, width: int, seed: int) -> Image.Image:
    """A smooth colour field with hard-edged blocks (bicubic overshoot at the edges) and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = np.stack([128 + 90 * np.sin(7 * x + 3 * y + k) for k in range(3)], axis=-1)
    for _ in range(3):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        rgb[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.integers(0, 256, 3)
    rgb += rng.normal(0, 2, rgb.shape)
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))


def make_pictures() -> dict[str, Path]:
    """small: 30x20 (upscaled to min_pixels); odd: 70x45 (70/28 = 2.5 rounds to even); large: 200x300 (downscaled
    to max_pixels); rgba: odd with an alpha gradient; exif: a 64x40 JPEG whose EXIF orientation 6 turns it upright."""
    if PICTURES.exists():
        shutil.rmtree(PICTURES)
    PICTURES.mkdir()
    paths = {}
    for name, (h, w, seed) in {"small": (20, 30, 0), "odd": (45, 70, 1), "large": (300, 200, 2)}.items():
        paths[name] = PICTURES / f"{name}.png"
        scene(h, w, seed).save(paths[name])
    paths["rgba"] = PICTURES / "rgba.png"
    mode_pictures(Image.open(paths["odd"]))["RGBA"].save(paths["rgba"])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    paths["exif"] = PICTURES / "exif.jpg"
    scene(40, 64, 3).save(paths["exif"], quality=90, exif=exif)
    return paths


def mode_pictures(odd: Image.Image) -> dict[str, Image.Image]:
    """The odd picture in other Pillow modes; the same code builds them in tests/test_vision.py."""
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


# ---- the processor -----------------------------------------------------------------------------------------------


def make_processor():
    from transformers import Qwen2Tokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    _allow_missing_video_processor(ProcessorMixin)
    folder = FIXTURE / "processor"
    folder.mkdir(parents=True)
    Qwen2VLImageProcessorPil(**PROCESSOR).save_pretrained(str(folder))
    Qwen2Tokenizer.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(str(folder))
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder))
    tokenizer = Qwen2Tokenizer.from_pretrained(str(folder))
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == TOKENS["image_token_id"]
    assert tokenizer.padding_side == "right"
    # the hub checkpoint's shape of preprocessor_config.json (min_pixels / max_pixels at the top) reads the same
    hub = Qwen2VLImageProcessorPil(**PROCESSOR)
    assert dict(hub.size) == dict(image_processor.size)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


def _allow_missing_video_processor(mixin) -> None:
    check = mixin.check_argument_for_proper_class

    def allow_none(self, name, arg):
        return None if arg is None else check(self, name, arg)

    mixin.check_argument_for_proper_class = allow_none


def processor_goldens(processor, paths) -> tuple[dict, dict]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tensors, cases = {}, {}
    for name in ("small", "odd", "large"):
        out = processor.image_processor(Image.open(paths[name]))
        tensors[f"pixel_values_{name}"] = torch.from_numpy(out["pixel_values"])
        tensors[f"grid_{name}"] = torch.from_numpy(out["image_grid_thw"])
        assert out["pixel_values"].dtype == np.float32

    def case(name, images, image_processor=None, note=""):
        out = (image_processor or processor.image_processor)(images)
        cases[name] = {
            "sha256": sha256(out["pixel_values"]),
            "shape": list(out["pixel_values"].shape),
            "grid": out["image_grid_thw"].tolist(),
            "sum": float(out["pixel_values"].astype(np.float64).sum()),
            "note": note,
        }

    odd = Image.open(paths["odd"])
    for mode, picture in mode_pictures(odd).items():
        case(f"mode {mode}", picture, note=f"PIL mode {picture.mode}")
    case("path rgba.png", str(paths["rgba"]), note="a path: alpha dropped, not composited")
    case("path exif.jpg", str(paths["exif"]), note="EXIF orientation applied")
    case("batch", [Image.open(paths[n]) for n in ("large", "small", "odd")], note="three pictures in one call")
    real = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    case("real range large", Image.open(paths["large"]), real, note="the hub checkpoint's min/max pixels")
    return tensors, cases


# ---- the model ---------------------------------------------------------------------------------------------------


def make_model():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(text_config={**TEXT, "rope_parameters": dict(ROPE)}, vision_config=VISION, **TOKENS)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    # Larger than the 0.02 init, so attention is far from uniform and every term matters; the patch embedding
    # smaller, as it sums 1176 inputs. Rounded to bfloat16, the dtype the fixture is stored in.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "norm1" in name or "norm2" in name:
                value = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            elif "ln_q" in name:
                value = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name:
                value = torch.randn(p.shape, generator=g)
            elif "patch_embed" in name:
                value = torch.randn(p.shape, generator=g) * 0.03
            else:
                value = torch.randn(p.shape, generator=g) * 0.15
            p.copy_(value.to(torch.bfloat16).float())
    folder = FIXTURE / "text_encoder"
    model.to(torch.bfloat16).save_pretrained(str(folder))
    (folder / "generation_config.json").unlink(missing_ok=True)
    # The goldens come from the checkpoint as saved, read in float32: the in-memory model's RoPE frequency
    # buffers (not saved, rebuilt on loading) went through bfloat16 with it.
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    for (k, a), (_, b) in zip(model.float().state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), k
    return reloaded


def model_goldens(model, processor, paths) -> dict:
    from diffusers import QwenImageEditPlusPipeline

    names = ("small", "large", "odd")  # the order the texts' pictures come in
    pictures = [Image.open(paths[n]) for n in names]
    inputs = processor(text=TEXTS, images=pictures, padding=True, return_tensors="pt")
    single = [processor.image_processor(p, return_tensors="pt")["pixel_values"] for p in pictures]
    assert torch.equal(inputs["pixel_values"], torch.cat(single)), "a batch's pixel values are its pictures' in order"
    assert inputs["attention_mask"][1].sum() < inputs["attention_mask"].shape[1], "the second text must be padded"
    out = {
        "batch_input_ids": inputs["input_ids"].to(torch.int32),
        "batch_attention_mask": inputs["attention_mask"].to(torch.int32),
        "batch_grid": inputs["image_grid_thw"],
    }
    with torch.no_grad():
        tower = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        features = torch.cat(model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        assert torch.equal(tower, features)
        positions, deltas = model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        mrope = model(**inputs, output_hidden_states=True).hidden_states[-1]
        # diffusers 0.42.1's edit pipelines pass no mm_token_type_ids: transformers 5 then counts 0..L-1 on all rows
        plain = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            output_hidden_states=True,
        ).hidden_states[-1]
    real = inputs["attention_mask"].bool()
    assert (mrope - plain)[real].abs().max() > 1e-2, "M-RoPE and plain positions should differ"
    out.update(
        tower=tower.contiguous(),
        rope_positions=positions,
        rope_deltas=deltas,
        hidden_mrope=mrope.contiguous(),
        hidden_plain=plain.contiguous(),
    )

    pipe = QwenImageEditPlusPipeline(
        scheduler=None,
        vae=None,
        text_encoder=model,
        tokenizer=processor.tokenizer,
        processor=processor,
        transformer=None,
    )
    with torch.no_grad():
        embeds, mask = pipe._get_qwen_prompt_embeds("put the red square on the blue one", image=pictures[:2])
    out.update(edit_plus_embeds=embeds.contiguous(), edit_plus_mask=mask.to(torch.int32))
    return out


def main() -> None:
    if FIXTURE.exists():
        shutil.rmtree(FIXTURE)
    paths = make_pictures()
    processor = make_processor()
    tensors, cases = processor_goldens(processor, paths)
    model = make_model()
    tensors.update(model_goldens(model, processor, paths))
    save_file(tensors, str(HERE / "vision_goldens.safetensors"))
    meta = {
        "cases": cases,
        "texts": TEXTS,
        "edit_plus": {"prompt": "put the red square on the blue one", "pictures": ["small", "large"]},
        "batch_pictures": ["small", "large", "odd"],
        "processor": PROCESSOR,
        "tokens": TOKENS,
    }
    (HERE / "vision_goldens.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = 0
    for p in [FIXTURE, PICTURES, HERE / "vision_goldens.safetensors", HERE / "vision_goldens.json"]:
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        total += size
        print(f"{p.relative_to(HERE.parent.parent)!s:50s} {size / 1e3:8.1f} kB")
    print(f"{'total':50s} {total / 1e3:8.1f} kB")


if __name__ == "__main__":
    main()
