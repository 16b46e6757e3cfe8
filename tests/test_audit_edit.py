"""Audit of the edit pipelines against transformers 5 and diffusers 0.42.1 (goldens of
tests/fixtures/make_audit_edit_fixtures.py in tests/fixtures/audit_edit/): Qwen2.5-VL vision towers with another
MLP activation (`hidden_act`, which transformers reads from the config and qwen_nb used to refuse), temporal patch
size 1, other patch and window sizes, weights named `visual.*` or `model.visual.*`; and the edit pipelines on
inputs the tiny_edit goldens do not cover (odd picture sizes, a very wide picture, CJK, a given odd size, the same
picture twice without CFG)."""

import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from qwen_nb.activations import ACTIVATIONS
from qwen_nb.vision import (
    ImageProcessorConfig,
    VisionConfig,
    load_vision_tower,
    process_images,
)

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_audit_edit_fixtures import pattern  # noqa: E402  (the pictures the goldens were made of)

FIXTURE = Path(__file__).parent / "fixtures" / "audit_edit"
META = json.loads((FIXTURE / "goldens.json").read_text())
GOLDENS = mx.load(str(FIXTURE / "goldens.safetensors"))
VARIANTS = list(META["variants"])


def pictures():
    return [Image.open(FIXTURE / "pictures" / f"{name}.png") for name in META["pictures"]]


def processor_config(name: str) -> ImageProcessorConfig:
    return ImageProcessorConfig.from_dict(
        json.loads((FIXTURE / name / "processor" / "preprocessor_config.json").read_text())
    )


@pytest.mark.parametrize("name", VARIANTS)
def test_config_reads_the_activation(name):
    config = VisionConfig.from_folder(FIXTURE / name / "text_encoder")
    expected = META["variants"][name]["vision"]
    assert config.hidden_act == expected.get("hidden_act", "silu")
    assert config.spatial_merge_size == expected["spatial_merge_size"]
    assert config.temporal_patch_size == expected["temporal_patch_size"]
    assert config.window_size == expected["window_size"]
    assert config.fullatt_block_indexes == tuple(expected["fullatt_block_indexes"])


@pytest.mark.parametrize("name", VARIANTS)
def test_pixel_values_equal_transformers(name):
    pixels, grid = process_images(pictures(), processor_config(name))
    digest = META["pixel_values"][name]
    assert list(pixels.shape) == digest["shape"]
    assert hashlib.sha256(np.ascontiguousarray(pixels, np.float32).tobytes()).hexdigest() == digest["sha256"]
    np.testing.assert_array_equal(grid, np.array(GOLDENS[f"{name}.image_grid_thw"]))


@pytest.mark.parametrize("name", VARIANTS)
def test_tower_equals_transformers(name):
    tower = load_vision_tower(FIXTURE / name / "text_encoder", mx.float32)
    pixels, grid = process_images(pictures(), processor_config(name))
    out = np.array(tower(pixels, grid))
    golden = np.array(GOLDENS[f"{name}.embeds"])
    err = np.abs(out - golden).max()
    print(f"{name}: max|diff| {err:.2e} (outputs' std {golden.std():.2f})")
    np.testing.assert_allclose(out, golden, rtol=1e-5, atol=1e-4 * golden.std())

    if tower.config.hidden_act == "silu":
        return
    # the activation is what is tested: silu (what qwen_nb hard-coded before) is far off
    for block in tower.blocks:
        block.mlp.act = ACTIVATIONS["silu"]
    assert np.abs(np.array(tower(pixels, grid)) - golden).max() > 0.05 * golden.std()


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="vision hidden_act 'swiglu_fancy' is not supported .* qwen_nb takes .*gelu"):
        VisionConfig.tiny(hidden_act="swiglu_fancy")
    config = json.loads((FIXTURE / VARIANTS[0] / "text_encoder" / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "swiglu_fancy"
    with pytest.raises(ValueError, match="swiglu_fancy"):
        VisionConfig.from_dict(config)


@pytest.mark.parametrize(
    "name, formula",
    [
        ("gelu", lambda x: 0.5 * x * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2)))),
        ("gelu_pytorch_tanh", lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))),
        ("quick_gelu", lambda x: x / (1 + np.exp(-1.702 * x))),
        ("silu", lambda x: x / (1 + np.exp(-x))),
        ("relu2", lambda x: np.maximum(x, 0) ** 2),
    ],
)
def test_activations_closed_form(name, formula):
    """transformers' ACT2FN formulas (activations.py), in float64 here."""
    x = np.linspace(-6, 6, 97)
    np.testing.assert_allclose(np.array(ACTIVATIONS[name](mx.array(x, mx.float32))), formula(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- pipelines
# diffusers' edit pipelines on tests/fixtures/tiny_edit/checkpoint (pipeline.* of make_audit_edit_fixtures.py):
# pictures of odd sizes (30x40, 97x61, 300x40), a CJK prompt with a longer negative prompt, a given size that is
# not a multiple of 16, the same picture twice without CFG.
TINY_EDIT = Path(__file__).parent / "fixtures" / "tiny_edit" / "checkpoint"
PIPELINE = {c["name"]: c for c in json.loads((FIXTURE / "pipeline.json").read_text())["cases"]}
PIPELINE_GOLDENS = mx.load(str(FIXTURE / "pipeline.safetensors"))
CLASS_NAMES = {"edit": "QwenImageEditPipeline", "plus": "QwenImageEditPlusPipeline"}


@pytest.fixture(scope="module")
def edit_pipes(tmp_path_factory):
    from qwen_nb.edit import QwenImageEditPipeline

    root = tmp_path_factory.mktemp("audit_edit")
    pipes = {}
    for kind, zero_cond_t in {(c["pipeline"], c["zero_cond_t"]) for c in PIPELINE.values()}:
        folder = root / f"{kind}_{zero_cond_t}"
        shutil.copytree(TINY_EDIT, folder)
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": CLASS_NAMES[kind]}))
        config = json.loads((folder / "transformer" / "config.json").read_text())
        (folder / "transformer" / "config.json").write_text(json.dumps({**config, "zero_cond_t": zero_cond_t}))
        pipes[kind, zero_cond_t] = QwenImageEditPipeline.from_pretrained(folder, dtype=mx.float32, verbose=False)
    return pipes


@pytest.mark.parametrize("name", list(PIPELINE))
def test_edit_parity_on_odd_inputs(edit_pipes, name):
    c = PIPELINE[name]
    pictures = [pattern(w, h) for w, h in c["pictures"]]
    assert [hashlib.sha256(p.tobytes()).hexdigest() for p in pictures] == c["pictures_sha256"]
    pipe = edit_pipes[c["pipeline"], c["zero_cond_t"]]
    steps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the given size rounded down to multiples of 16, as diffusers does
        image = pipe.generate(
            c["prompt"],
            pictures if c["listed"] else pictures[0],
            c["negative_prompt"],
            c["height"],
            c["width"],
            c["steps"],
            c["cfg_scale"],
            latents=PIPELINE_GOLDENS[f"{name}.noise"],
            progress=False,
            callback=lambda i, x: steps.append(np.array(x[0].astype(mx.float32))),
        )
    assert image.size == (c["output"][1], c["output"][0])
    latents, golden = steps[-1], np.array(PIPELINE_GOLDENS[f"{name}.latents"])
    diff = np.abs(np.asarray(image).astype(int) - np.array(PIPELINE_GOLDENS[f"{name}.image"]).astype(int)).max()
    print(f"{name}: latents max|diff| {np.abs(latents - golden).max():.2e}, max pixel difference {diff}/255")
    np.testing.assert_allclose(latents, golden, rtol=1e-5, atol=1e-5)
    assert diff <= 2
    assert pipe.last_stats.cfg == (c["negative_prompt"] is not None)


# ---------------------------------------------------------------------------------------------- text positions
def test_mrope_text_positions_follow_the_towers_merge_size():
    """text_positions="mrope" (transformers' 3-D M-RoPE, what it does given mm_token_type_ids) with a tower that
    merges 3x3 groups: the positions are transformers' get_rope_index for that merge size (qwen_nb passed 2 and
    refused the prompt), and the prompt embeddings transformers' hidden states (goldens.* merge3: tiny_edit's
    language model with that tower)."""
    import qwen_nb.edit as edit_module
    from qwen_nb.edit import QwenImageEditPipeline
    from qwen_nb.scheduler import SchedulerConfig
    from qwen_nb.switches import Switches
    from qwen_nb.text_encoder import load_text_encoder
    from qwen_nb.tokenizer import QwenTokenizer
    from qwen_nb.transformer import load_transformer
    from qwen_nb.vae import load_vae
    from qwen_nb.vision import QwenVLProcessor

    folder = FIXTURE / "merge3" / "text_encoder"
    pipe = QwenImageEditPipeline.from_components(
        QwenVLProcessor(QwenTokenizer.from_pretrained(TINY_EDIT / "processor"), processor_config("merge3")),
        lambda modulation=True: load_transformer(
            TINY_EDIT / "transformer", mx.float32, switches=Switches().only(fused_qkv=False), modulation=modulation
        )[0],
        load_text_encoder(TINY_EDIT / "text_encoder", mx.float32),
        load_vae(TINY_EDIT / "vae", mx.float32),
        lambda: load_vision_tower(folder, mx.float32),
        SchedulerConfig.from_file(TINY_EDIT / "scheduler" / "scheduler_config.json"),
        kind="plus",
        vision_config=VisionConfig.from_folder(folder),
        dtype=mx.float32,
        verbose=False,
    )
    assert pipe.vision_config.spatial_merge_size == 3
    pipe.text_positions = "mrope"
    seen = []
    real = edit_module.get_rope_index

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    text = META["merge3_text"]
    edit_module.get_rope_index = spy
    try:
        ((embeds, mask),) = pipe.encode_edit([text["prompt"]], pipe.pictures(pattern(*text["picture"])))
    finally:
        edit_module.get_rope_index = real
    assert mask is None and len(seen) == 1
    np.testing.assert_array_equal(seen[0][0], np.array(GOLDENS["merge3.positions"]))
    golden = np.array(GOLDENS["merge3.mrope_embeds"])
    err = np.abs(np.array(embeds) - golden).max()
    print(f"mrope embeds max|diff| {err:.2e}; plain positions are {float(GOLDENS['merge3.plain_vs_mrope']):.2e} off")
    assert float(GOLDENS["merge3.plain_vs_mrope"]) > 20 * 1e-5  # the comparison below can tell them apart
    np.testing.assert_allclose(np.array(embeds), golden, rtol=1e-5, atol=1e-5)
