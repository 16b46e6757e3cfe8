"""Qwen-Image 2.1 against diffusers 0.42.1 / transformers 5 where the tiny_qwen21 goldens did not look
(tests/fixtures/make_audit_qwen21_fixtures.py writes tests/fixtures/audit_qwen21/): output sizes that are not
multiples of 32 (diffusers rounds them down, with a warning), a Qwen3-VL config transformers accepts and qwen_nb used
to refuse (M-RoPE sections not adding up to head_dim / 2, attention biases, other MLP activations, a DeepStack index
past the tower), the VAE's ignored `attn_scales`, a VAE of another depth (the pipeline's factor stays 16), and the
values transformers gives keys a config.json leaves out."""

import json
import shutil
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_qwen21 import generate_case  # a fixture case generated from its noise

from qwen_nb.pipeline21 import QwenImage21Pipeline
from qwen_nb.qwen3_vl import Qwen3VLConfig, Qwen3VLTextConfig, load_qwen3_vl
from qwen_nb.vae21 import AutoencoderKLQwenImage21, VAE21Config, load_vae21

FIXTURES = Path(__file__).parent / "fixtures"
BASE = FIXTURES / "tiny_qwen21"
FOLDER = BASE / "pipeline"
PICTURES = BASE / "pictures"
AUDIT = FIXTURES / "audit_qwen21"
SIZES = {c["name"]: c for c in json.loads((AUDIT / "sizes.json").read_text())["cases"]}
G = {**mx.load(str(AUDIT / "sizes.safetensors")), **mx.load(str(AUDIT / "text_encoder.safetensors"))}
TEXT = json.loads((AUDIT / "text_encoder.json").read_text())
MISC = json.loads((AUDIT / "misc.json").read_text())


@pytest.fixture(scope="module")
def pipe():
    return QwenImage21Pipeline.from_pretrained(FOLDER, dtype=mx.float32, verbose=False)


@pytest.fixture(scope="module")
def changed_folder(tmp_path_factory):
    """The tiny pipeline with the text encoder's config changed (and its attention biases added as a second
    safetensors file), as make_audit_qwen21_fixtures.py loaded it into transformers."""
    folder = tmp_path_factory.mktemp("qwen21") / "pipeline"
    shutil.copytree(FOLDER, folder)
    shutil.copy(AUDIT / "text_encoder_config.json", folder / "text_encoder" / "config.json")
    shutil.copy(AUDIT / "text_encoder_biases.safetensors", folder / "text_encoder" / "biases.safetensors")
    return folder


def generate(pipe, c, **kw):
    return generate_case(pipe, c, G[f"{c['name']}.noise"], **kw)


def check_against_golden(image, steps, name):
    np.testing.assert_allclose(steps, np.array(G[f"{name}.latents"]), rtol=1e-5, atol=1e-5)
    golden = np.array(G[f"{name}.image"]).astype(int)
    assert np.asarray(image).shape == golden.shape
    assert np.abs(np.asarray(image).astype(int) - golden).max() <= 2


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("name", list(SIZES))
def test_sizes_not_multiples_of_32_are_rounded_down_as_diffusers(pipe, name):
    """80x100, 70x100 with a condition picture, output_resolution 68: generated at the size rounded down to
    multiples of 32, with a warning; latents within 1e-5 and the image within 2/255 of diffusers'."""
    c = SIZES[name]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        image, steps = generate(pipe, c)
    assert image.size == (c["generated_width"], c["generated_height"])
    assert any("multiples of 32" in str(w.message) for w in seen)
    check_against_golden(image, steps, name)


def test_sizes_below_32_are_refused(pipe):
    with pytest.raises(ValueError, match="multiple of 32"):
        pipe.generate("a fox", height=16, width=64, seed=0, progress=False)
    with pytest.raises(ValueError, match="multiple of 32"):
        pipe.generate("a fox", height=64, width=31, seed=0, progress=False)


# ---------------------------------------------------------------------------------------------- the text encoder
def test_text_encoder_config_transformers_accepts(changed_folder):
    config = Qwen3VLConfig.from_folder(changed_folder / "text_encoder")
    assert config.text.mrope_section == (2, 2, 2) and config.text.head_dim == 24  # sections add up to 6, not 12
    assert config.text.attention_bias and config.text.hidden_act == "gelu"
    assert config.vision.hidden_act == "quick_gelu" and config.vision.deepstack_visual_indexes == (0, 5)
    model = load_qwen3_vl(changed_folder / "text_encoder", mx.float32)
    assert model.model.language_model.layers[2].self_attn.o_proj.bias.shape == (48,)
    assert len(model.model.visual.deepstack_merger_list) == 2  # the index past the tower has a merger, never run


def test_prompt_embeddings_with_the_changed_text_encoder(changed_folder):
    """transformers' pre-norm last hidden state (system turn dropped) of a text prompt and of one with two
    condition pictures: M-RoPE sections [2, 2, 2], q/k/v/o biases, GELU MLP, quick-GELU vision MLP, DeepStack [0, 5]."""
    pipe = QwenImage21Pipeline.from_pretrained(changed_folder, dtype=mx.float32, verbose=False)
    embeds, _ = pipe.encode(TEXT["text_prompt"])
    np.testing.assert_allclose(np.array(embeds), np.array(G["text.embeds"]), rtol=1e-5, atol=1e-5)
    _, pictures = pipe.condition_pictures([PICTURES / f"{n}.png" for n in TEXT["pictures"]], TEXT["picture_resolution"])
    embeds, slots = pipe.encode(TEXT["text_prompt"], pictures)
    np.testing.assert_allclose(np.array(embeds), np.array(G["pictures.embeds"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(slots, np.array(G["pictures.image_pad_mask"])[0].astype(bool))


def test_generation_with_the_changed_text_encoder(changed_folder):
    pipe = QwenImage21Pipeline.from_pretrained(changed_folder, dtype=mx.float32, verbose=False)
    c = TEXT["case"]
    image, steps = generate(pipe, c)
    assert image.size == (c["generated_width"], c["generated_height"])
    check_against_golden(image, steps, c["name"])


def test_missing_config_keys_take_transformers_defaults():
    expected = MISC["partial_config"]
    config = Qwen3VLConfig.from_dict(expected["config"])
    for k, v in expected["text"].items():
        got = getattr(config.text, k)
        assert (list(got) if isinstance(got, tuple) else got) == v, k
    for k, v in expected["vision"].items():
        got = getattr(config.vision, k)
        assert (list(got) if isinstance(got, tuple) else got) == v, k


def test_text_config_checks():
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen3VLTextConfig.tiny(mrope_section=(6, 3))
    with pytest.raises(ValueError, match="hidden_act 'swiglu_fancy'"):
        Qwen3VLTextConfig.tiny(hidden_act="swiglu_fancy")


# ---------------------------------------------------------------------------------------------- the VAE
def test_vae_ignores_attn_scales_as_diffusers(tmp_path):
    """diffusers' residual 2.1 VAE builds no attention from attn_scales (its decode with them equals the plain
    one, recorded by the fixture script): qwen_nb loads such a config and decodes the tiny_qwen21 golden."""
    assert MISC["vae_attn_scales"]["max_diff_vs_plain"] == 0.0
    folder = tmp_path / "vae"
    shutil.copytree(FOLDER / "vae", folder)
    config = json.loads((folder / "config.json").read_text())
    config["attn_scales"] = MISC["vae_attn_scales"]["attn_scales"]
    (folder / "config.json").write_text(json.dumps(config))
    vae = load_vae21(folder)
    golden = mx.load(str(BASE / "goldens.safetensors"))
    c = vae.config
    z = (golden["vae.z"].transpose(0, 2, 3, 1) - mx.array(c.latents_mean)) / mx.array(c.latents_std)
    np.testing.assert_allclose(
        np.array(vae.decode(z)), np.array(golden["vae.decoded"].transpose(0, 2, 3, 1)), rtol=1e-5, atol=1e-5
    )


def test_vae_of_another_depth_keeps_the_pipelines_factor_16(pipe):
    """diffusers hard-codes the 2.1 pipeline's factor 16: with an 8x (4-level) VAE the 16x latent grid of a 64x96
    request decodes to a 32x48 picture (the size diffusers returns)."""
    m = MISC["vae_8x"]
    config = VAE21Config.tiny(dim_mult=tuple(m["dim_mult"]), temperal_downsample=tuple(m["temperal_downsample"]))
    assert config.scale_factor == 8
    small = QwenImage21Pipeline.from_components(
        pipe.processor, pipe.transformer, pipe.text_encoder, AutoencoderKLQwenImage21(config), dtype=mx.float32,
        verbose=False,
    )  # fmt: skip
    noise = mx.zeros((1, 16, m["height"] // 16, m["width"] // 16))  # the 16x grid
    image = small.generate("a fox", height=m["height"], width=m["width"], sigmas=[1.0, 0.5], latents=noise,
                           progress=False)  # fmt: skip
    assert list(image.size) == m["image_size"]
