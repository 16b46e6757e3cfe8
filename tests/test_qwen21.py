"""Qwen-Image 2.1 against diffusers 0.42.1 / transformers 5.24 on the tiny random checkpoint written by diffusers'
save_pretrained (tests/fixtures/tiny_qwen21, made by tests/fixtures/make_qwen21_fixtures.py): the Qwen3-VL processor
(bit-exact), vision tower, get_rope_index and language model, the 2.1 VAE, the block-causal transformer with and
without its KV cache, whole generations (CFG, KV cache on and off, condition pictures, a peft LoRA), the memory plan
at full size, and bad input."""

import hashlib
import json
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

import qwen_nb
import qwen_nb.memory as memory
from qwen_nb.pipeline21 import (
    QwenImage21Pipeline,
    calculate_dimensions,
    check_pipeline21_folder,
    drop_count,
    is_qwen21_folder,
)
from qwen_nb.qwen3_vl import (
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLTextConfig,
    Qwen3VLTextEncoder,
    Qwen3VLVisionConfig,
    composite_on_white,
    get_rope_index,
    load_qwen3_vl,
)
from qwen_nb.transformer21 import KVCache, QwenImage21Transformer, Transformer21Config, load_transformer21
from qwen_nb.vae21 import AutoencoderKLQwenImage21, VAE21Config, load_vae21
from qwen_nb.vision import process_images

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_qwen21"
FOLDER = FIXTURE / "pipeline"
PICTURES = FIXTURE / "pictures"
META = json.loads((FIXTURE / "goldens.json").read_text())
# extra.*: a tall condition picture, two and three of different aspects, with CFG against a real negative prompt
# (tests/fixtures/make_qwen21_extra_fixtures.py)
CASES = {c["name"]: c for c in META["cases"] + json.loads((FIXTURE / "extra.json").read_text())["cases"]}
G = {**mx.load(str(FIXTURE / "goldens.safetensors")), **mx.load(str(FIXTURE / "extra.safetensors"))}
TOL = dict(rtol=1e-5, atol=1e-5)


def close(a, b, tol=1e-5):
    a, b = np.array(mx.array(a).astype(mx.float32)), np.array(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f"max|diff| {np.abs(a - b).max():.3g}")


def sha256(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def pipe():  # resident (the default sequences): spies replace its transformer for a whole generation
    return QwenImage21Pipeline.from_pretrained(FOLDER, dtype=mx.float32, verbose=False, keep_text_encoder=True)


@pytest.fixture(scope="module")
def processor():
    return Qwen3VLProcessor.from_pretrained(FOLDER / "processor")


@pytest.fixture(scope="module")
def encoder():
    return load_qwen3_vl(FOLDER / "text_encoder", mx.float32)


def resized_pictures(names=("square", "rgba"), resolution=96):
    out = []
    for n in names:
        img = Image.open(PICTURES / f"{n}.png").convert("RGBA")
        w, h = calculate_dimensions(resolution * resolution, img.size[0] / img.size[1])
        out.append(img.resize((w, h), Image.Resampling.LANCZOS))
    return out


def run_case(pipe, name, golden=None, **kw):
    """(image, every step's packed latents) of a golden case, with its saved noise."""
    return generate_case(pipe, CASES[name], G[f"{golden or name}.noise"], **kw)


def generate_case(pipe, c: dict, noise, **kw):
    """(image, every step's packed latents) of a case as the fixture scripts record them (its prompt, sizes, CFG,
    cache, pictures, sigmas and resolution) from `noise`."""
    steps = []
    pictures = [PICTURES / f"{n}.png" for n in c["pictures"]] or None
    image = pipe.generate(
        c["prompt"],
        c["negative_prompt"],
        c["height"],
        c["width"],
        None,
        c["cfg_scale"],
        latents=noise,
        image=pictures,
        use_kv_cache=c["use_kv_cache"],
        sigmas=c.get("sigmas"),
        output_resolution=c["output_resolution"],
        progress=False,
        callback=lambda i, x: steps.append(np.array(x[0].astype(mx.float32))),
        **kw,
    )
    return image, np.stack(steps)


def pixel_diff(image, name) -> int:
    return int(np.abs(np.asarray(image).astype(int) - np.array(G[f"{name}.image"]).astype(int)).max())


# ---------------------------------------------------------------------------------------------- the processor
def test_processor_is_bit_exact(processor):
    """The two condition pictures as the pipeline resizes them (Lanczos of RGBA) and composites them on white:
    transformers' pixel values (float32 bytes), grids, left-padded ids, mask and mm_token_type_ids."""
    ref = META["processor"]
    resized = resized_pictures()
    assert [sha256(np.asarray(p)) for p in resized] == ref["resized"]
    out = processor([ref["text"]], [composite_on_white(p) for p in resized])
    assert list(out["pixel_values"].shape) == ref["pixel_values_shape"] and out["pixel_values"].dtype == np.float32
    assert sha256(out["pixel_values"]) == ref["pixel_values"]
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        np.testing.assert_array_equal(out[k], np.array(G[f"processor.{k}"]), err_msg=k)


def test_processor_resizes_a_raw_picture(processor):
    pixels, grid = process_images(Image.open(PICTURES / "square.png").convert("RGB"), processor.image_config)
    assert sha256(pixels) == META["processor"]["raw_pixel_values"]
    np.testing.assert_array_equal(grid, np.array(G["processor.raw.image_grid_thw"]))


def test_drop_count_comes_from_the_chat_template(processor):
    assert drop_count(processor) == META["drop_idx"] == 35
    bare = Qwen3VLProcessor(processor.tokenizer, processor.image_config, None)
    with pytest.raises(ValueError, match="chat template"):
        drop_count(bare)


def test_left_padding(processor):
    out = processor(["a fox", "a much longer prompt about a fox"])
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][0, -1] == 1
    assert (out["input_ids"][0][out["attention_mask"][0] == 0] == processor.tokenizer.pad_token_id).all()


# ---------------------------------------------------------------------------------------------- Qwen3-VL
@pytest.fixture(scope="module")
def inputs(processor):
    return processor([META["processor"]["text"]], [composite_on_white(p) for p in resized_pictures()])


def test_vision_tower_and_deepstack(encoder, inputs):
    merged, features = encoder.model.visual(inputs["pixel_values"], inputs["image_grid_thw"])
    close(merged, G["vision.merged"])
    assert len(features) == len(encoder.config.vision.deepstack_visual_indexes) == 2
    for i, f in enumerate(features):
        close(f, G[f"vision.deepstack{i}"])


def test_get_rope_index_is_exact(inputs):
    positions, deltas = get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], inputs["attention_mask"]
    )
    np.testing.assert_array_equal(positions, np.array(G["lm.positions"]))
    np.testing.assert_array_equal(deltas, np.array(G["lm.deltas"]))


@pytest.mark.parametrize("normed", [False, True])
def test_language_model_with_pictures(encoder, inputs, normed):
    """Interleaved M-RoPE at get_rope_index's positions, DeepStack after layers 0 and 1; the pre-norm output is
    what diffusers reads (its forward hook on the final norm), the normed one transformers' last_hidden_state."""
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    hidden = encoder(*(inputs[k] for k in keys), normed=normed)
    close(hidden, G["lm.images.last_hidden_state" if normed else "lm.images.prenorm"])


@pytest.mark.parametrize("normed", [False, True])
def test_language_model_text_only(encoder, normed):
    hidden = encoder(np.array(G["lm.text.input_ids"]), normed=normed)
    close(hidden, G["lm.text.last_hidden_state" if normed else "lm.text.prenorm"])


def test_text_encoder_without_vision_tower_reads_no_vision_weights(inputs):
    lm = load_qwen3_vl(FOLDER / "text_encoder", mx.float32, vision=False)
    assert not lm.has_vision and not any(k.startswith("model.visual") for k, _ in tree_flatten(lm.parameters()))
    close(lm(np.array(G["lm.text.input_ids"])), G["lm.text.prenorm"])
    with pytest.raises(ValueError, match="vision=True"):
        lm(*(inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")))


def test_qwen3_vl_configs():
    real = Qwen3VLConfig.from_dict(json.loads((FOLDER / "text_encoder" / "config.json").read_text()))
    assert real.text == Qwen3VLTextConfig.tiny() and real.vision == Qwen3VLVisionConfig.tiny()
    assert real.image_token_id == 612
    assert Qwen3VLTextConfig().hidden_size == Transformer21Config().context_in_dim == 4096
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen3VLTextConfig(head_dim=128, mrope_section=(16, 24))
    with pytest.raises(ValueError, match="not a Qwen3-VL"):
        Qwen3VLConfig.from_dict({"hidden_size": 8})


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
def test_random_text_encoder_shapes(dtype, batch):
    model = Qwen3VLTextEncoder(Qwen3VLConfig.tiny())
    model.set_dtype(dtype)
    out = model(np.tile(np.arange(3, 12)[None], (batch, 1)))
    assert out.shape == (batch, 9, 48) and out.dtype == dtype


# ---------------------------------------------------------------------------------------------- the VAE
@pytest.fixture(scope="module")
def vae():
    return load_vae21(FOLDER / "vae")


def test_vae_encoder_moments(vae):
    x = mx.array(np.array(G["vae.input"]).astype(np.float32) / 255.0)[None] * 2 - 1  # (1, 32, 64, 4) RGBA
    close(vae.moments(x), G["vae.moments"].transpose(0, 2, 3, 1))  # measured 2.3e-7
    mean = G["vae.moments"].transpose(0, 2, 3, 1)[..., :16]
    c = vae.config
    close(vae.encode(x), (mean - mx.array(c.latents_mean)) / mx.array(c.latents_std))


def test_vae_decode(vae):
    """16x: (2, 3) latents -> 32x48 RGBA in [-1, 1]; the decoder has its own width (3 vs the encoder's 2)."""
    c = vae.config
    z = (G["vae.z"].transpose(0, 2, 3, 1) - mx.array(c.latents_mean)) / mx.array(c.latents_std)
    out = vae.decode(z)
    assert out.shape == (1, 32, 48, 4)
    close(out, G["vae.decoded"].transpose(0, 2, 3, 1))  # measured 4.8e-6


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_random_vae_shapes(dtype):
    model = AutoencoderKLQwenImage21(VAE21Config.tiny())
    model.set_dtype(dtype)
    z = model.encode(mx.zeros((2, 32, 64, 4)))
    assert z.shape == (2, 2, 4, 16) and z.dtype == dtype
    assert model.decode(z).shape == (2, 32, 64, 4)


def test_vae_config_checks():
    assert VAE21Config().scale_factor == 16 and VAE21Config().decoder_dims[-1] == 144
    with pytest.raises(ValueError, match="load_vae"):
        VAE21Config(is_residual=False)
    with pytest.raises(ValueError, match="patch"):
        VAE21Config(patch_size=2)
    with pytest.raises(ValueError, match="z_dim"):
        VAE21Config(z_dim=8)
    with pytest.raises(ValueError, match="channels-last"):
        load_vae21(FOLDER / "vae").decode(mx.zeros((1, 16, 2, 2)))


# ---------------------------------------------------------------------------------------------- the transformer
@pytest.mark.parametrize("attention", ["segments", "mask"])
def test_transformer_without_cache(attention):
    """text | a 2x4 picture | text | a 4x4 target: block-causal attention (one SDPA per segment, or one masked),
    the prefix modulated at t = 0; the target's rows of diffusers' output."""
    model, _ = load_transformer21(FOLDER / "transformer", mx.float32, attention=attention)
    layout = model.layout(np.array(G["transformer.img_mask"])[0].astype(bool), [(1, 2, 4), (1, 4, 4)])
    assert layout.segments == [(0, 5, True), (5, 13, False), (13, 16, True)] and layout.target == 16
    for name, t in (("t0", 0.7), ("t1", 0.35)):
        out = model(G["transformer.latents"], G["transformer.text"], mx.array([t]), layout)
        close(out, G[f"transformer.{name}.plain"][:, -16:])  # measured 4e-7


@pytest.mark.parametrize("attention", ["segments", "mask"])
def test_transformer_kv_cache(attention):
    """Prefill at t0 (the same output, the prefix's keys and values stored), then decode at t1 from the target's
    16 tokens alone: diffusers' `kv_cache_mode` "extract" and "cached"."""
    model, _ = load_transformer21(FOLDER / "transformer", mx.float32, attention=attention)
    layout = model.layout(np.array(G["transformer.img_mask"])[0].astype(bool), [(1, 2, 4), (1, 4, 4)])
    cache = KVCache(2)
    close(model(G["transformer.latents"], G["transformer.text"], mx.array([0.7]), layout, cache),
          G["transformer.t0.extract"][:, -16:])  # fmt: skip
    assert cache.filled
    close(cache.layers[0][0].transpose(0, 2, 1, 3), G["transformer.cache.k0"])
    close(cache.layers[1][1].transpose(0, 2, 1, 3), G["transformer.cache.v1"])
    out = model(G["transformer.latents"][:, -16:], None, mx.array([0.35]), layout, cache)
    close(out, G["transformer.t1.cached"][:, -16:])
    with pytest.raises(ValueError, match="16"):
        model(G["transformer.latents"], None, mx.array([0.35]), layout, cache)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
def test_random_transformer_shapes(dtype, batch):
    model = QwenImage21Transformer(Transformer21Config.tiny())
    model.set_dtype(dtype)
    layout = model.layout(np.array([0, 0, 1, 0, 1, 1], bool), [(1, 2, 2), (1, 2, 4)])
    out = model(mx.zeros((batch, 12, 16), dtype), mx.ones((batch, 4, 48), dtype), mx.array([0.5]), layout)
    assert out.shape == (batch, 8, 16) and out.dtype == dtype


def test_transformer_config_checks():
    real = Transformer21Config()
    assert (real.num_layers, real.dim, real.context_in_dim, real.in_channels) == (32, 4096, 4096, 64)
    with pytest.raises(ValueError, match="patch_size"):
        Transformer21Config(patch_size=2)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        Transformer21Config(axes_dims_rope=(16, 56, 58))
    model = QwenImage21Transformer(Transformer21Config.tiny(causal_condition=False))
    layout = model.layout(np.array([0, 1], bool), [(1, 2, 2)])
    with pytest.raises(ValueError, match="causal_condition"):
        model(mx.zeros((1, 4, 16)), mx.zeros((1, 1, 48)), mx.array([0.5]), layout, KVCache(2))
    with pytest.raises(ValueError, match="slots"):
        model.layout(np.array([0, 1], bool), [(1, 4, 4)])


# ---------------------------------------------------------------------------------------------- whole generations
@pytest.mark.parametrize("name", [n for n in CASES if not n.endswith(".lora")])
def test_generation_matches_diffusers(pipe, name):
    """Same noise and weights: every step's latents within 1e-5 and the RGBA image within 2/255 (float32)."""
    c = CASES[name]
    image, steps = run_case(pipe, name)
    assert image.mode == c["mode"] == "RGBA" and image.size == (c["width"], c["height"])
    np.testing.assert_allclose(steps, np.array(G[f"{name}.latents"]), **TOL)
    assert pixel_diff(image, name) <= 2


@pytest.mark.parametrize("name", [n for n in CASES if not n.endswith(".lora")])
def test_prompt_embeddings_match_diffusers(pipe, name):
    """The prompt and (with CFG) the negative prompt, each encoded with the condition pictures, within 1e-5."""
    c = CASES[name]
    pictures = pipe.condition_pictures([PICTURES / f"{n}.png" for n in c["pictures"]] or None, c["output_resolution"])
    for text, key in ((c["prompt"], "prompt_embeds"), (c["negative_prompt"], "negative_embeds")):
        if f"{name}.{key}" not in G:  # no negative, or no CFG
            continue
        embeds, slots = pipe.encode(text, pictures[1])
        close(embeds, G[f"{name}.{key}"])
        pad = "image_pad_mask" if key == "prompt_embeds" else "negative_image_pad_mask"
        np.testing.assert_array_equal(slots, np.array(G[f"{name}.{pad}"])[0].astype(bool))


def test_kv_cache_computes_only_the_target_after_the_first_step(pipe):
    model = pipe.transformer
    tokens = []

    class Spy:
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, latents, *args, **kw):
            tokens.append(latents.shape[1])
            return model(latents, *args, **kw)

    pipe.components.replace("transformer", Spy())
    try:
        run_case(pipe, "cond_one")  # a 4x8 condition picture (32 tokens) and a 4x8 target, CFG: two caches
        assert tokens == [64, 64] + [32, 32] * 3
        tokens.clear()
        run_case(pipe, "t2i_cfg")  # no cache: every step whole
        assert tokens == [24, 24] * 4
    finally:
        pipe.components.replace("transformer", model)


def test_cfg_with_texts_of_one_length_runs_as_a_batch_of_two(pipe):
    model = pipe.transformer
    batches = []

    class Spy:
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, latents, *args, **kw):
            batches.append(latents.shape[0])
            return model(latents, *args, **kw)

    pipe.components.replace("transformer", Spy())
    try:
        image, steps = run_case(pipe, "t2i_cfg_same_length")
    finally:
        pipe.components.replace("transformer", model)
    assert batches == [2] * 4
    np.testing.assert_allclose(steps, np.array(G["t2i_cfg_same_length.latents"]), **TOL)
    two_passes = QwenImage21Pipeline.from_pretrained(FOLDER, dtype=mx.float32, verbose=False, batched_cfg=False)
    image, steps = run_case(two_passes, "t2i_cfg_same_length")
    np.testing.assert_allclose(steps, np.array(G["t2i_cfg_same_length.latents"]), **TOL)


def test_peft_lora_matches_diffusers():
    """A rank-4 peft LoRA (alpha 6) on the attention, MLP, shared modulation and text projection, merged as the
    weights are read, against diffusers' load_lora_weights; unloading gives the base golden back."""
    pipe = QwenImage21Pipeline.from_pretrained(FOLDER, dtype=mx.float32, verbose=False)
    lora = pipe.load_lora(FIXTURE / "lora_peft.safetensors")
    assert len(lora.modules) == 17 and "modulation.1" in lora.modules
    image, steps = run_case(pipe, "t2i_empty_steps", "t2i_empty_steps.lora")
    np.testing.assert_allclose(steps, np.array(G["t2i_empty_steps.lora.latents"]), **TOL)
    assert pixel_diff(image, "t2i_empty_steps.lora") <= 2
    pipe.unload_lora()
    image, steps = run_case(pipe, "t2i_empty_steps")
    np.testing.assert_allclose(steps, np.array(G["t2i_empty_steps.latents"]), **TOL)


def test_lora_in_memory_fuses_and_unfuses(pipe):
    model, _ = load_transformer21(FOLDER / "transformer", mx.float32)
    before = {k: v for k, v in tree_flatten(model.parameters())}
    mem = QwenImage21Pipeline.from_components(pipe.processor, model, pipe.text_encoder, pipe.vae, pipe.scheduler_config,
                                              pipe.sample_sigmas, dtype=mx.float32, verbose=False)  # fmt: skip
    mem.load_lora(FIXTURE / "lora_peft.safetensors")
    image, steps = run_case(mem, "t2i_empty_steps", "t2i_empty_steps.lora")
    np.testing.assert_allclose(steps, np.array(G["t2i_empty_steps.lora.latents"]), **TOL)
    mem.unload_lora()
    assert all(v is before[k] for k, v in tree_flatten(model.parameters()))


def test_qwen_image_lora_is_refused_by_name(tmp_path, pipe):
    tensors = {
        "transformer.transformer_blocks.0.txt_mod.1.lora_A.weight": mx.zeros((2, 64)),
        "transformer.transformer_blocks.0.txt_mod.1.lora_B.weight": mx.zeros((384, 2)),
    }
    mx.save_safetensors(str(tmp_path / "old.safetensors"), tensors)
    with pytest.raises(ValueError, match=r"QwenImagePipeline(.|\n)*gate_layer"):
        pipe.load_lora(tmp_path / "old.safetensors")


@pytest.mark.parametrize("dtype", [mx.bfloat16])
def test_bfloat16_generation(dtype):
    """bfloat16 (the checkpoint's dtype): the same picture size and mode, and close to diffusers' float32 run."""
    pipe = QwenImage21Pipeline.from_pretrained(FOLDER, dtype=dtype, verbose=False)
    image, steps = run_case(pipe, "cond_one")
    assert image.mode == "RGBA" and image.size == (128, 64) and np.isfinite(steps).all()
    assert np.abs(steps - np.array(G["cond_one.latents"])).max() < 0.1


def test_seed_draws_unpacked_noise_and_defaults(pipe):
    a = pipe.generate("a fox", height=32, width=64, seed=3, progress=False)
    b = pipe.generate("a fox", height=32, width=64, latents=mx.random.normal((1, 16, 2, 4), key=mx.random.key(3)),
                      progress=False)  # fmt: skip
    assert np.array_equal(np.asarray(a), np.asarray(b)) and a.mode == "RGBA"
    assert pipe.last_stats.steps == len(META["sample_sigmas"])  # the author's sample_sigmas by default
    pipe._noted_steps = False
    with pytest.warns(UserWarning, match="steps=2 is ignored: .* 4-step schedule"):  # as diffusers ignores it
        pipe.generate("a fox", height=32, width=32, steps=2, seed=0, progress=False)
    assert pipe.last_stats.steps == len(META["sample_sigmas"])
    pipe.generate("a fox", height=32, width=32, sigmas=[1.0, 0.5], seed=0, progress=False)
    assert pipe.last_stats.steps == 2  # sigmas= sets a schedule of one's own
    stats = str(pipe.last_stats)
    assert "2 steps" in stats and "peak memory" in stats


def test_output_size_follows_the_last_condition_picture(pipe):
    square = Image.open(PICTURES / "square.png")
    wide = Image.open(PICTURES / "rgba.png")  # 3:2
    out = pipe.generate("x", image=[wide, square], output_resolution=64, steps=1, seed=0, progress=False)
    assert out.size == (64, 64)
    out = pipe.generate("x", image=np.asarray(wide), output_resolution=96, steps=1, seed=0, progress=False)
    assert out.size == (128, 64)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_requests(pipe):
    with pytest.raises(ValueError, match="multiple of 32"):
        pipe.generate("a fox", height=16, width=64, progress=False)
    with pytest.raises(ValueError, match="steps"):
        pipe.generate("a fox", height=32, width=32, steps=0, progress=False)
    with pytest.raises(ValueError, match="sigmas"):
        pipe.generate("a fox", height=32, width=32, sigmas=[1.0, 1.5], progress=False)
    with pytest.raises(ValueError, match="unpacked noise"):
        pipe.generate("a fox", height=32, width=32, latents=mx.zeros((1, 4, 16)), progress=False)
    with pytest.raises(ValueError, match="nested"):
        pipe.generate("a fox", image=[[Image.new("RGB", (8, 8))]], progress=False)
    with pytest.raises(ValueError, match="PIL image"):
        pipe.generate("a fox", image=3, progress=False)
    with pytest.raises(FileNotFoundError, match="no picture"):
        pipe.generate("a fox", image="/nonexistent.png", progress=False)
    with pytest.raises(ValueError, match="prompt"):
        pipe.generate(["a", "b"], progress=False)
    with pytest.raises(ValueError, match="seed"):
        pipe.generate("a fox", height=32, width=32, seed=-1, progress=False)


def test_picture_the_processor_resizes_again(pipe):
    """At a resolution whose resized picture the text encoder's processor resizes again (288x288 is more than the
    tiny processor's 256^2 pixels; the real one takes at least 256^2), the slots no longer fit the latents: refused
    with the reason (diffusers raises in build_token_metadata)."""
    with pytest.raises(ValueError, match="slot"):
        pipe.generate("x", image=Image.new("RGB", (40, 40)), output_resolution=300, steps=1, seed=0, progress=False)


def test_folders_are_told_apart(tmp_path):
    assert is_qwen21_folder(FOLDER) and not is_qwen21_folder(Path(__file__).parent / "fixtures" / "tiny_pipeline"
                                                                / "layout_a")  # fmt: skip
    with pytest.raises(ValueError, match="QwenImagePipeline"):
        QwenImage21Pipeline.from_pretrained(Path(__file__).parent / "fixtures" / "tiny_pipeline" / "layout_a")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        check_pipeline21_folder(tmp_path)
    with pytest.raises(ValueError, match="vae_tile"):
        QwenImage21Pipeline.from_pretrained(FOLDER, dtype=mx.float32, verbose=False, vae_tile=32)


def test_package_exports_the_pipeline_lazily():
    assert qwen_nb.QwenImage21Pipeline is QwenImage21Pipeline


def test_kv_cache_off_without_causal_condition(pipe):
    model = QwenImage21Transformer(Transformer21Config.tiny(causal_condition=False))
    mem = QwenImage21Pipeline.from_components(pipe.processor, model, pipe.text_encoder, pipe.vae, dtype=mx.float32,
                                              verbose=False)  # fmt: skip
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mem.generate("x", height=32, width=32, steps=1, seed=0, progress=False)
    assert any("causal_condition" in str(w.message) for w in seen)


# ---------------------------------------------------------------------------------------------- the memory plan
def sparse_component(folder: Path, params: dict, config: dict) -> None:
    """A component folder whose safetensors file has the real shapes in bf16 and no data (sparse)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    header, offset = {}, 0
    for k, shape in params.items():
        n = 2 * int(np.prod(shape))
        header[k] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)


def test_memory_plan_for_the_real_size(tmp_path):
    """Full-size 2.1 (the shapes qwen_nb builds from the configs' defaults: a 7.1B transformer, Qwen3-VL-8B's 7.6B
    language model) on Macs: a 32 GB Mac (Metal's working set 75% of RAM, 24 GB) runs bfloat16 with the text
    encoder freed before the transformer is read; a 16 GB one needs a smaller text encoder than exists."""
    shapes = lambda m: {k: v.shape for k, v in tree_flatten(m.parameters())}  # noqa: E731
    tr = shapes(QwenImage21Transformer(Transformer21Config()))
    te_config = Qwen3VLConfig(Qwen3VLTextConfig(), Qwen3VLVisionConfig())
    te = shapes(Qwen3VLTextEncoder(te_config))
    te["lm_head.weight"] = (151936, 4096)
    vae = shapes(AutoencoderKLQwenImage21(VAE21Config()))
    sparse_component(tmp_path / "transformer", tr, {"num_attention_heads": 32, "attention_head_dim": 128})
    sparse_component(tmp_path / "text_encoder", te, json.loads((FOLDER / "text_encoder" / "config.json").read_text())
                     | {"text_config": {"hidden_size": 4096, "intermediate_size": 12288}})  # fmt: skip
    sparse_component(tmp_path / "vae", vae, {"base_dim": 96})
    assert sum(np.prod(s) for s in tr.values()) / 1e9 == pytest.approx(7.12, abs=0.01)
    gb = 1e9
    plan = memory.plan_memory(tmp_path, mx.bfloat16, budget=int(24 * gb), schedule_modulation=False)
    print(plan)
    assert plan.components["transformer"] / gb == pytest.approx(14.2, abs=0.1)
    assert plan.components["text_encoder"] / gb == pytest.approx(15.1, abs=0.1)  # lm_head and vision tower not read
    assert plan.fits and not plan.keep_text_encoder  # bfloat16, sequenced
    assert not memory.plan_memory(tmp_path, mx.bfloat16, budget=int(12 * gb), schedule_modulation=False).fits


def test_the_pipeline_sequences_by_default_even_where_everything_fits(monkeypatch):
    """Issue 16's peak target (30 GB) is for the default: with a 1 TB budget from_pretrained still frees the text
    encoder before the transformer is read; keep_text_encoder=True keeps both."""
    monkeypatch.setattr(memory, "device_memory", lambda: (10**12, "test budget"))
    pipe = QwenImage21Pipeline.from_pretrained(FOLDER, dtype=mx.float32, verbose=False)
    plan = pipe.memory_plan
    assert not pipe.keep_text_encoder and plan.peak == plan.sequenced_peak < plan.resident_peak
    for case in ("cond_one", "t2i_cfg"):  # sequenced generations match diffusers: a picture, then a new prompt
        image, steps = run_case(pipe, case)
        np.testing.assert_allclose(steps, np.array(G[f"{case}.latents"]), **TOL)
        assert pixel_diff(image, case) <= 2
        assert not pipe.components.loaded("text_encoder")
    asked = QwenImage21Pipeline.from_pretrained(FOLDER, dtype=mx.float32, verbose=False, keep_text_encoder=True)
    assert asked.keep_text_encoder and asked.memory_plan.peak == asked.memory_plan.resident_peak


def real_21_folder(folder: Path) -> Path:
    """Qwen-Image 2.1 at full size as sparse files: every component's real shapes (qwen_nb's modules built from the
    configs' defaults, the text encoder with its vision tower and lm_head) under the real configs."""
    from dataclasses import asdict

    shapes = lambda m: {k: v.shape for k, v in tree_flatten(m.parameters())}  # noqa: E731
    te = shapes(Qwen3VLTextEncoder(Qwen3VLConfig(Qwen3VLTextConfig(), Qwen3VLVisionConfig())))
    te["lm_head.weight"] = (151936, 4096)
    sparse_component(folder / "transformer", shapes(QwenImage21Transformer(Transformer21Config())),
                     asdict(Transformer21Config()))  # fmt: skip
    sparse_component(folder / "text_encoder", te, {"text_config": asdict(Qwen3VLTextConfig()),
                                                   "vision_config": asdict(Qwen3VLVisionConfig())})  # fmt: skip
    sparse_component(folder / "vae", shapes(AutoencoderKLQwenImage21(VAE21Config())), asdict(VAE21Config()))
    return folder


@pytest.mark.parametrize(
    "ram_gb, picks",
    [
        (128, {None: "sequenced"}),  # 2.1's default; both models held (32.4 GB) fits too, keep_text_encoder=True
        (64, {None: "sequenced"}),
        (32, {None: "sequenced"}),  # bfloat16, the text encoder freed before the transformer is read
        (24, {None: None, 8: "sequenced", 4: "sequenced"}),  # bfloat16 does not fit; 8 bits does
        (16, {None: None, 8: None, 4: None}),  # the bfloat16 text encoder alone is too large
    ],
)
def test_memory_plan_per_mac(tmp_path, monkeypatch, ram_gb, picks):
    """What the plan picks for full-size 2.1 in bfloat16 on Macs (Metal's working set 75% of RAM, estimates as on a
    GPU), with the components' bytes against closed-form counts from the real configs: the transformer
    (32 single-stream blocks of 4096 and the shared modulation) and Qwen3-VL-8B's language model (vision tower and
    lm_head are not read for text-to-image); the decode estimate at the 2.1 decoder's width (144, not base_dim)."""
    monkeypatch.setattr(memory.mx, "default_device", lambda: mx.gpu)  # a Mac: fused attention, no score matrices
    folder = real_21_folder(tmp_path)
    D, Dh, C, T = 32 * 128, 128, 64, 4096  # width, head, latent channels, text width
    block = 4 * D * D + 2 * Dh + 3 * D * 3 * D  # q/k/v/out, the q/k RMSNorms, SwiGLU at mlp_ratio 3
    transformer = 32 * block + C * D + (T + T * D + D * D) + (256 * D + D * D) + 4 * D * D + D * D + D * C
    H, KV, I, V = 32, 8, 12288, 151936
    layer = D * H * Dh + 2 * D * KV * Dh + H * Dh * D + 2 * Dh + 3 * D * I + 2 * D
    language_model = V * D + 36 * layer + D
    budget = int(0.75 * ram_gb * 1e9)
    for bits, pick in picks.items():
        plan = memory.plan_memory(folder, mx.bfloat16, bits, budget=budget, schedule_modulation=False,
                                  prefer_sequenced=True)  # fmt: skip
        print(f"{ram_gb} GB Mac, quantize={bits}: {pick or 'refused'}\n{plan}")
        assert plan.components["text_encoder"] == 2 * language_model
        if bits is None:
            assert plan.components["transformer"] == 2 * transformer
        assert plan.activations["decode"] == 8 * 1024 * 1024 * 144 * 2
        assert plan.fits == (pick is not None)
        if pick is not None:
            assert plan.keep_text_encoder == (pick == "resident")
            assert plan.peak <= 30e9  # the target for the default, whatever the machine
        resident = memory.plan_memory(folder, mx.bfloat16, bits, True, budget=budget, schedule_modulation=False)
        assert resident.fits == (ram_gb >= 64 and bits is None)  # asked for: both models held
    with_pictures = memory.plan_memory(folder, mx.bfloat16, min(picks, key=lambda b: b or 99), budget=budget,
                                       schedule_modulation=False, vision=True)  # fmt: skip
    assert with_pictures.fits == (ram_gb >= 32)  # the vision tower read too, a condition picture beside the target


@pytest.mark.parametrize("ram_gb, bits, fits", [(32, None, True), (24, 8, False)])
def test_a_condition_picture_checks_the_plan_again_with_the_vision_tower(tmp_path, monkeypatch, ram_gb, bits, fits):
    """The plan made at from_pretrained leaves the vision tower out (text-to-image never reads it); the first call
    with a picture plans again with it and refuses, naming the fix, before anything is read (full-size shapes)."""
    from qwen_nb.components import ComponentStore
    from qwen_nb.pipeline21 import Qwen3VLProcessor, read_scheduler

    monkeypatch.setattr(memory.mx, "default_device", lambda: mx.gpu)  # a Mac's estimates
    folder = real_21_folder(tmp_path)
    budget = int(0.75 * ram_gb * 1e9)
    plan = memory.plan_memory(folder, mx.bfloat16, bits, budget=budget, schedule_modulation=False)
    assert plan.fits  # text-to-image loads
    opts = QwenImage21Pipeline._options(dtype=mx.bfloat16, quantize=bits, check_memory=True, verbose=False)
    opts.keep_text_encoder = plan.keep_text_encoder
    pipe = QwenImage21Pipeline(
        Qwen3VLProcessor.from_pretrained(FOLDER / "processor"), read_scheduler(FOLDER / "scheduler"),
        ComponentStore({}), opts, folder=folder, plan=plan,
    )  # fmt: skip
    if fits:
        pipe._want_vision()
        assert pipe._vision
    else:
        with pytest.raises(memory.MemoryPlanError, match="will not fit(.|\n)*quantize=4|Even quantize=4"):
            pipe._want_vision()
        assert not pipe._vision  # nothing changed: a text-to-image call still works


def test_qwen_image_pipeline_names_the_21_pipeline():
    """qwen_nb.hub takes a 2.1 folder (processor/ in place of tokenizer/); QwenImagePipeline refuses its transformer
    and says which pipeline loads it."""
    from qwen_nb.hub import check_pipeline_folder
    from qwen_nb.pipeline import QwenImagePipeline

    assert check_pipeline_folder(FOLDER) == FOLDER
    with pytest.raises(ValueError, match=r"causal_condition(.|\n)*QwenImage21Pipeline"):
        QwenImagePipeline.from_pretrained(FOLDER, dtype=mx.float32, verbose=False)


# ---------------------------------------------------------------------------------------------- the command line
def test_cli_generate_dispatches_to_21(tmp_path, pipe, capsys, monkeypatch):
    """`python -m qwen_nb generate --model <2.1>`: diffusers' 2.1 defaults (the author's schedule, no CFG), --image
    as a condition picture, an RGBA PNG with its parameters; Qwen-Image-only options refused by name."""
    from qwen_nb.__main__ import main

    base = ["generate", "--model", str(FOLDER), "--dtype", "float32", "--seed", "5", "--quiet"]
    out = tmp_path / "fox.png"
    assert main([*base, "--prompt", "a red fox", "--out", str(out), "--size", "64x32"]) == 0
    assert f"wrote {out} (64x32 RGBA, seed 5, 4 steps)" in capsys.readouterr().out
    same = pipe.generate("a red fox", height=32, width=64, seed=5, progress=False)
    saved = Image.open(out)
    assert saved.mode == "RGBA" and np.array_equal(np.asarray(saved), np.asarray(same))
    assert "Steps: 4, CFG: 1.0" in saved.text["parameters"]

    out = tmp_path / "hat.png"
    args = ["--prompt", "a hat", "--out", str(out), "--image", str(PICTURES / "rgba.png"), "--steps", "1", "--cfg", "3"]
    assert main([*base, *args]) == 2  # at 1024^2 pixels the tiny processor (at most 256^2) resizes the picture
    assert "slots" in capsys.readouterr().err
    generate = QwenImage21Pipeline.generate  # at the tiny model's resolution, 96^2 pixels
    monkeypatch.setattr(QwenImage21Pipeline, "generate", lambda *a, **k: generate(*a, **k, output_resolution=96))
    assert main([*base, *args]) == 0
    assert Image.open(out).size == (128, 64) and "CFG: 3.0" in Image.open(out).text["parameters"]  # the picture's 3:2
    assert main([*base, "--prompt", "x", "--out", str(tmp_path / "y.png"), "--strength", "0.5"]) == 2
    assert "--strength is for Qwen-Image" in capsys.readouterr().err


def test_previews_and_the_panel(pipe):
    """Previews (a linear latent -> RGB map fitted once per VAE) after every second step and the last; the notebook
    panel drives the pipeline (picture upload optional, size from the picture or 1024x1024)."""
    seen = []
    pipe.generate("a fox", height=32, width=64, seed=1, progress=False, preview=lambda i, im: seen.append((i, im)),
                  preview_every=2)  # fmt: skip
    assert [i for i, _ in seen] == [1, 3] and all(im.size == (64, 32) and im.mode == "RGB" for _, im in seen)
    pytest.importorskip("ipywidgets")
    from qwen_nb.panel import Panel

    p = Panel(pipe, steps=2, cfg_scale=1.0, negative_prompt="")
    p.set_pictures([Image.open(PICTURES / "rgba.png")])
    generate = pipe.generate
    pipe.generate = lambda *a, **k: generate(*a, **k, output_resolution=96)  # the tiny processor's range
    try:
        image = p.generate_now()
    finally:
        del pipe.generate
    assert p.error is None and image.size == (128, 64) and image.mode == "RGBA"


@pytest.mark.parametrize("bits, latents_tol, pixels_tol", [(8, 0.02, 8), (4, 0.3, 128)])
def test_quantized_transformer_stays_near_diffusers(bits, latents_tol, pixels_tol):
    """The transformer's linears at 8 / 4 bits (the shared modulation and norm_out at 8; widths that are not a
    multiple of 64 stay in full precision): bounded against diffusers' float32 goldens. Measured on this tiny random
    model: 8 bits 6.0e-3 (latents) and 3/255; 4 bits 0.13 and 67/255; a LoRA merged before quantizing."""
    pipe = QwenImage21Pipeline.from_pretrained(FOLDER, dtype=mx.float32, quantize=bits, verbose=False)
    for name in ("t2i_cfg_kv", "cond_one"):
        image, steps = run_case(pipe, name)
        assert np.abs(steps - np.array(G[f"{name}.latents"])).max() < latents_tol
        assert pixel_diff(image, name) <= pixels_tol
    assert pipe.quantization.bits == bits and pipe.quantization.skipped == ["txt_in.in_layer", "img_in"]
    assert isinstance(pipe.transformer.modulation[1], nn.QuantizedLinear)
    assert pipe.transformer.modulation[1].bits == 8
    pipe.load_lora(FIXTURE / "lora_peft.safetensors")
    image, steps = run_case(pipe, "t2i_empty_steps", "t2i_empty_steps.lora")
    assert np.abs(steps - np.array(G["t2i_empty_steps.lora.latents"])).max() < latents_tol
