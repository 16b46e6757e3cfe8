"""Configs and inputs diffusers 0.42.1's QwenImagePipeline / Img2Img / Inpaint pipelines take that qwen_nb once
refused or got wrong, against diffusers' goldens (tests/fixtures/make_audit_t2i_fixtures.py): a transformer with
patch_size 1 (diffusers packs 2x2 whatever it says), a scheduler with num_train_timesteps 500 (the transformer sees
timestep / 1000), Karras and exponential sigma spacings, invert_sigmas (inpainting's last blend), and diffusers'
packed `latents=`."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from qwen_nb.pipeline import QwenImagePipeline
from qwen_nb.scheduler import SchedulerConfig, flow_match_sigmas, pack_latents

FIXTURES = Path(__file__).parent / "fixtures"
BASE = FIXTURES / "tiny_pipeline" / "layout_b"
PICTURES = FIXTURES / "img2img"
META = json.loads((FIXTURES / "audit_t2i" / "goldens.json").read_text())
GOLDENS = mx.load(str(FIXTURES / "audit_t2i" / "goldens.safetensors"))
CASES = {c["name"]: c for c in META["cases"]}


def assemble(folder: Path, changes: dict) -> Path:
    """layout_b with config entries changed, as the fixture script makes it."""
    shutil.copytree(BASE, folder)
    for component, entries in changes.items():
        path = folder / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
        path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))
    return folder


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit_t2i")
    folders = {name: assemble(root / name, changes) for name, changes in META["folders"].items()}
    return {name: QwenImagePipeline.from_pretrained(f, dtype=mx.float32, verbose=False) for name, f in folders.items()}


def run(pipe, c, noise, **kw):
    call, steps = dict(c["call"]), []
    args = dict(
        prompt=call.pop("prompt"), negative_prompt=call.pop("negative_prompt"), cfg_scale=call.pop("true_cfg_scale"),
        height=call.pop("height"), width=call.pop("width"), steps=call.pop("num_inference_steps", None),
        sigmas=call.pop("sigmas", None), latents=noise, progress=False,
    )  # fmt: skip
    if "image" in call:
        args["image"] = Image.open(PICTURES / call.pop("image"))
        args["strength"] = call.pop("strength")
    if "mask_image" in call:
        args["mask_image"] = Image.open(PICTURES / call.pop("mask_image"))
    assert not call, call
    image = pipe.generate(**args, callback=lambda i, x: steps.append(np.array(x[0])), **kw)
    return image, np.stack(steps)


def check(name, image, steps):
    ref = np.array(GOLDENS[f"{name}.latents"])
    assert steps.shape == ref.shape
    print(f"{name}: max |latents - diffusers| {np.abs(steps - ref).max():.2e}")
    np.testing.assert_allclose(steps, ref, rtol=1e-5, atol=1e-5)
    diff = int(np.abs(np.asarray(image).astype(int) - np.array(GOLDENS[f"{name}.image"]).astype(int)).max())
    assert diff <= 2, f"{name}: max pixel difference {diff}/255"


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(pipes, name):
    """Every step's latents within 1e-5 and the image within 2/255 (float32), and the scheduler's sigmas."""
    c = CASES[name]
    pipe = pipes[c["folder"]]
    image, steps = run(pipe, c, GOLDENS[f"{name}.noise"])
    assert len(steps) == c["steps_run"]
    call = c["call"]
    schedule = pipe.schedule(
        call.get("num_inference_steps", 0), pipe.sizes.grid(call["height"], call["width"]), 1.0, call.get("sigmas")
    )
    np.testing.assert_allclose(schedule.sigmas, c["sigmas"], rtol=0, atol=1e-6)
    check(name, image, steps)


def test_diffusers_packed_latents_are_the_noise(pipes):
    """latents= as diffusers takes them, packed (1, N, 4 C), give the same picture as the unpacked noise."""
    name = "karras"
    noise = GOLDENS[f"{name}.noise"]
    packed = pack_latents(noise.reshape(noise.shape[0], *noise.shape[2:]))
    image, steps = run(pipes["karras"], CASES[name], np.array(packed))  # a numpy array, as a test would pass it
    check(name, image, steps)


def test_patch_size_only_sizes_the_output_layer(pipes):
    pipe = pipes["patch1"]
    assert (pipe.sizes.patch, pipe.sizes.latent_channels, pipe.sizes.multiple) == (2, 16, 16)
    assert pipe.initial_noise(48, 32, seed=0).shape == (1, 16, 6, 4)


@pytest.mark.parametrize("name", list(META["sigma_tables"]))
def test_sigma_tables_match_diffusers(name):
    """flow_match_sigmas with the folder's scheduler config: diffusers' sigmas for 1..20 steps at 12..4096 tokens."""
    config = SchedulerConfig.from_file(BASE / "scheduler" / "scheduler_config.json")
    config = config.merged(META["folders"][name]["scheduler"])
    for row in META["sigma_tables"][name]:
        sigmas = flow_match_sigmas(row["steps"], row["tokens"], config)
        np.testing.assert_allclose(sigmas, np.array(row["sigmas"], np.float32), rtol=2e-7, atol=1e-7, err_msg=str(row))


def test_sigma_spacings_that_cannot_go_together_are_refused():
    with pytest.raises(ValueError, match="only one of"):
        SchedulerConfig.from_dict({"use_karras_sigmas": True, "use_exponential_sigmas": True})
    with pytest.raises(ValueError, match="use_beta_sigmas.*scipy"):
        SchedulerConfig.from_dict({"use_beta_sigmas": True})


def test_memory_plan_reads_the_vae_factor(tmp_path):
    """The VAE decoder's attention runs at the latent size, H/f x W/f with diffusers' vae_scale_factor
    f = 2 ** len(temperal_downsample): 16 for a five-level VAE, whose scores on a CPU at 1024x1024 are then
    2 * (64 * 64)**2 float32 values (closed form), not the factor-8 VAE's 2 * (128 * 128)**2."""
    from qwen_nb.memory import activation_bytes

    for part, config in {
        "transformer": {"num_attention_heads": 2, "attention_head_dim": 8},
        "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2},
        "vae": {"base_dim": 4, "temperal_downsample": [False, True, True, True]},
    }.items():
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text(json.dumps(config))
    decode = activation_bytes(tmp_path, mx.float32, 1024, 1024)["decode"]
    scores = 0 if mx.default_device() == mx.gpu else 2 * (64 * 64) ** 2 * 4  # fused attention keeps none
    assert decode == 8 * 1024 * 1024 * 4 * 4 + scores


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "quick_gelu", "relu"])
def test_text_encoder_runs_the_configs_activation(tmp_path, act):
    """A text encoder whose config names another hidden_act than silu runs that activation, as transformers does
    (tests/fixtures/make_audit_text_fixtures.py: the tiny encoder's weights, its config's hidden_act changed)."""
    from qwen_nb.text_encoder import load_text_encoder

    golden = mx.load(str(FIXTURES / "audit_t2i" / "text_act.safetensors"))
    folder = tmp_path / "text_encoder"
    shutil.copytree(FIXTURES.parent / "goldens" / "text_encoder_tiny", folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_act"] = act
    (folder / "config.json").write_text(json.dumps(config))
    encoder = load_text_encoder(folder, mx.float32)
    out = np.array(encoder(golden["ids"]))
    np.testing.assert_allclose(out, np.array(golden[act]), rtol=1e-5, atol=1e-5)
    silu = np.array(load_text_encoder(FIXTURES.parent / "goldens" / "text_encoder_tiny", mx.float32)(golden["ids"]))
    assert np.abs(silu - np.array(golden[act])).max() > 1e-2  # the activation matters at this size


def test_text_encoder_refuses_an_unknown_activation():
    from qwen_nb.text_encoder import TextEncoderConfig

    with pytest.raises(ValueError, match="text encoder hidden_act 'swiglu_x' is not supported.*qwen_nb takes .*silu"):
        TextEncoderConfig.from_dict({"hidden_act": "swiglu_x"})
