"""Pipeline-level bad input: each is a ValueError, FileNotFoundError or CheckpointError (a RuntimeError) whose
message names the problem and the fix. Nothing heavy runs before the check that stops it."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen_nb.loading import CheckpointError
from qwen_nb.pipeline import QwenImagePipeline, check_size

FIXTURES = Path(__file__).parent / "fixtures" / "tiny_pipeline"


@pytest.fixture(scope="module")
def pipe():
    return QwenImagePipeline.from_pretrained(FIXTURES / "layout_a", dtype=mx.float32, verbose=False)


def gen(pipe, **kw):
    args = dict(prompt="a fox", height=32, width=32, steps=1, seed=0, progress=False)
    return pipe.generate(**{**args, **kw})


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("height, width, fitted", [(40, 64, (32, 64)), (64, 70, (64, 64)), (47, 79, (32, 64))])
def test_size_not_a_multiple_of_16_is_rounded_down_as_diffusers_does(pipe, height, width, fitted):
    """diffusers rounds each side down to a multiple of vae_scale_factor * 2 (with a warning) and generates there."""
    with pytest.warns(UserWarning, match=f"{width}x{height} .* generated at {fitted[1]}x{fitted[0]}, rounded down"):
        image = gen(pipe, height=height, width=width)
    assert image.size == (fitted[1], fitted[0])
    assert np.array_equal(np.asarray(image), np.asarray(gen(pipe, height=fitted[0], width=fitted[1])))


def test_size_below_16_suggests_the_nearest_and_presets(pipe):
    with pytest.raises(ValueError, match="not a multiple of 16") as e:
        gen(pipe, height=8, width=64)
    assert "use 16" in str(e.value)
    assert "1:1 1328x1328" in str(e.value) and "16:9 1664x928" in str(e.value)


@pytest.mark.parametrize("height, width", [(0, 64), (64, 0), (-16, 64), (64, -32)])
def test_zero_or_negative_size(pipe, height, width):
    with pytest.raises(ValueError, match="must be a positive multiple of 16"):
        gen(pipe, height=height, width=width)


@pytest.mark.parametrize("value", [64.0, "64", None, True])
def test_size_not_an_integer(value):
    with pytest.raises(ValueError, match="must be an integer"):
        check_size(value, 64)


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_steps_below_one(pipe, steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        gen(pipe, steps=steps)


@pytest.mark.parametrize("cfg", [-0.5, -4])
def test_negative_cfg_scale(pipe, cfg):
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        gen(pipe, cfg_scale=cfg)


@pytest.mark.parametrize("cfg", [float("nan"), float("inf"), "4"])
def test_cfg_scale_not_a_number(pipe, cfg):
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        gen(pipe, cfg_scale=cfg)


def test_cfg_scale_zero_and_one_are_allowed(pipe):
    assert gen(pipe, cfg_scale=0.0).size == (32, 32)
    assert gen(pipe, cfg_scale=1).size == (32, 32)


@pytest.mark.parametrize(
    "shape",
    [(1, 16, 4, 6), (1, 4, 4, 4), (2, 16, 4, 4), (16, 4, 4), (1, 1, 16, 4, 6), (1, 2, 16, 4, 4), (1, 64, 4)],
)
def test_latents_of_the_wrong_shape(pipe, shape):
    with pytest.raises(ValueError, match=r"latents have shape .* must be \(1, 16, 4, 4\)"):
        gen(pipe, latents=mx.zeros(shape))


def test_latents_as_numpy_are_accepted(pipe):
    noise = np.random.default_rng(0).standard_normal((1, 16, 4, 4)).astype(np.float32)
    a = np.asarray(gen(pipe, latents=noise))
    b = np.asarray(gen(pipe, latents=mx.array(noise)))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("seed", [1.5, "42"])
def test_seed_not_an_integer(pipe, seed):
    with pytest.raises(ValueError, match="seed must be an integer"):
        gen(pipe, seed=seed)


@pytest.mark.parametrize("prompt", [None, ["a", "b"], 3])
def test_prompt_not_a_string(pipe, prompt):
    with pytest.raises(ValueError, match="prompt must be a string"):
        gen(pipe, prompt=prompt)


def test_negative_prompt_not_a_string(pipe):
    with pytest.raises(ValueError, match="negative_prompt must be a string or None"):
        gen(pipe, negative_prompt=["x"])


def test_prompt_over_1024_tokens_is_cut_as_diffusers_cuts_it(pipe):
    """diffusers' tokenizer cuts the templated prompt at 1024 tokens after the drop, then max_sequence_length keeps
    the first 512: two prompts alike in their first 1200 words give the same picture (a note, no error)."""
    prompt = "fox " * 1200
    a = np.asarray(gen(pipe, prompt=prompt + "red", negative_prompt=prompt))
    b = np.asarray(gen(pipe, prompt=prompt + "blue", negative_prompt=prompt + "green"))
    assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------- loading
def load(folder, **kw):
    return QwenImagePipeline.from_pretrained(folder, dtype=mx.float32, verbose=False, **kw)


@pytest.fixture
def copy(tmp_path):
    dst = tmp_path / "pipe"
    shutil.copytree(FIXTURES / "layout_a", dst)
    return dst


@pytest.mark.parametrize("q", [2, 16, 7, "8", True, 8.5])
def test_unknown_quantization(q):
    with pytest.raises(ValueError, match="unknown quantization .*use quantize=8 .* or 4"):
        load(FIXTURES / "layout_a", quantize=q)


def test_float16_is_refused():
    with pytest.raises(ValueError, match="float16 overflows"):
        QwenImagePipeline.from_pretrained(FIXTURES / "layout_a", dtype=mx.float16, verbose=False)


def test_folder_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*diffusers layout.*Qwen/Qwen-Image"):
        load(tmp_path / "no_such_folder")


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=r"is not a pipeline: it has no model_index.json \(found: notes.txt\)"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        load(tmp_path / "notes.txt")


def test_folder_of_another_pipeline(copy):
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="holds a FluxPipeline, not a QwenImagePipeline"):
        load(copy)


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_folder(copy, component):
    shutil.rmtree(copy / component)
    with pytest.raises(FileNotFoundError, match=f"has no {component}/ folder"):
        load(copy)


def test_missing_config_and_tokenizer_files(copy):
    (copy / "vae" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"vae/config.json is missing"):
        load(copy)
    shutil.copy(FIXTURES / "layout_a" / "vae" / "config.json", copy / "vae" / "config.json")
    (copy / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.json"):
        load(copy)


def test_missing_shard(copy):
    for name in (
        "diffusion_pytorch_model-00002-of-00008.safetensors",
        "diffusion_pytorch_model-00007-of-00008.safetensors",
    ):
        (copy / "transformer" / name).unlink()
    with pytest.raises(FileNotFoundError, match="2 of the 8 weight files .* missing: .*00002-of-00008.*00007-of-00008"):
        load(copy)


def test_missing_single_weights_file(tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(FIXTURES / "layout_b", dst)
    (dst / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights in .*vae"):
        load(dst)


def test_truncated_shard(copy):
    shard = copy / "text_encoder" / "model-00003-of-00005.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model-00003-of-00005.safetensors is truncated") as e:
        load(copy)
    assert isinstance(e.value, RuntimeError)
    assert f"Delete {shard}" in str(e.value) and "download it again" in str(e.value)


@pytest.mark.parametrize("junk", [b"<!DOCTYPE html><html>rate limited</html>", b"", b"\x00" * 4])
def test_corrupt_shard(copy, junk):
    shard = copy / "vae" / "diffusion_pytorch_model-00005-of-00021.safetensors"
    shard.write_bytes(junk)
    with pytest.raises(CheckpointError, match="00005-of-00021.safetensors is not a valid safetensors file"):
        load(copy)


def test_corrupt_index(copy):
    (copy / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not a valid shard index"):
        load(copy)


def test_weights_that_do_not_fit_the_config(copy):
    """A config.json that does not match its weights: strict loading lists the mismatches when the transformer
    is first used."""
    cfg = json.loads((copy / "transformer" / "config.json").read_text())
    (copy / "transformer" / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    pipe = load(copy)
    with pytest.raises(ValueError, match=r"does not fit the transformer: \d+ missing: transformer_blocks.2"):
        gen(pipe)


def test_bad_input_leaves_the_pipeline_usable(pipe):
    with pytest.raises(ValueError):
        gen(pipe, height=8)
    assert gen(pipe).size == (32, 32)
