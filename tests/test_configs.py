"""Sizes and flags come from the checkpoint's configs, as in diffusers: a tiny Qwen-Image with a z_dim-8 VAE (the
transformer takes 32 channels), a transformer config with zero_cond_t, and CFG with texts of one length (run as one
batch of two), each against diffusers' goldens (tests/fixtures/make_config_fixtures.py); a VAE of three levels
(spatial factor 4; tests/fixtures/make_vae4_fixtures.py); flags qwen_nb does not
build are refused by name; components that do not fit each other are refused."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from qwen_nb.pipeline import QwenImagePipeline

FIXTURES = Path(__file__).parent / "fixtures"
BASE = FIXTURES / "tiny_pipeline" / "layout_b"
CONFIGS = FIXTURES / "tiny_configs"
GOLDENS = mx.load(str(CONFIGS / "goldens.safetensors"))
CASES = {c["name"]: c for c in json.loads((CONFIGS / "goldens.json").read_text())["cases"]}


def assemble(folder: Path, transformer=None, vae=None, **transformer_config) -> Path:
    """layout_b with some components replaced or some transformer config entries set (as the fixture script)."""
    shutil.copytree(BASE, folder)
    for name, src in (("transformer", transformer), ("vae", vae)):
        if src is not None:
            shutil.rmtree(folder / name)
            shutil.copytree(src, folder / name)
    if transformer_config:
        path = folder / "transformer" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **transformer_config}))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    zdim8 = CONFIGS / "zdim8"
    return {
        "zdim8": assemble(root / "zdim8", zdim8 / "transformer", zdim8 / "vae"),
        "base": BASE,
        "zero_cond_t": assemble(root / "zero_cond_t", zero_cond_t=True),
    }


def run(pipe, name):
    c = CASES[name]
    steps, batches = [], []
    model = pipe.transformer

    class Spy:  # counts the batch of every transformer call
        def __getattr__(self, attr):
            return getattr(model, attr)

        def __call__(self, x, *args, **kw):
            batches.append(x.shape[0])
            return model(x, *args, **kw)

    pipe.components.replace("transformer", Spy())
    image = pipe.generate(
        c["prompt"], c["negative_prompt"], c["height"], c["width"], c["steps"], c["cfg_scale"],
        latents=GOLDENS[f"{name}.noise"], progress=False, callback=lambda i, x: steps.append(np.array(x[0])),
    )  # fmt: skip
    pipe.components.replace("transformer", model)
    np.testing.assert_allclose(np.stack(steps), np.array(GOLDENS[f"{name}.latents"]), rtol=1e-5, atol=1e-5)
    diff = int(np.abs(np.asarray(image).astype(int) - np.array(GOLDENS[f"{name}.image"]).astype(int)).max())
    assert diff <= 2, f"{name}: max pixel difference {diff}/255"
    return batches


@pytest.mark.parametrize("batched_cfg", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(folders, name, batched_cfg):
    pipe = QwenImagePipeline.from_pretrained(
        folders[CASES[name]["folder"]], dtype=mx.float32, verbose=False, batched_cfg=batched_cfg
    )
    batches = run(pipe, name)
    one_length = name.endswith("same_length")
    assert batches == ([2] if one_length and batched_cfg else [1, 1]) * CASES[name]["steps"]


def test_sizes_read_from_the_configs(folders):
    pipe = QwenImagePipeline.from_pretrained(folders["zdim8"], dtype=mx.float32, verbose=False)
    assert (pipe.sizes.latent_channels, pipe.sizes.vae_factor, pipe.sizes.patch) == (8, 8, 2)
    assert pipe.initial_noise(64, 48, seed=0).shape == (1, 8, 8, 6)
    with pytest.raises(ValueError, match=r"must be \(1, 8, 8, 6\)"):
        pipe.generate("a fox", height=64, width=48, steps=1, latents=mx.zeros((1, 16, 8, 6)), progress=False)


@pytest.mark.parametrize(
    "flag", ["guidance_embeds", "use_additional_t_cond", "use_layer3d_rope"]
)  # diffusers 0.42.1's flags that change the computation and that qwen_nb does not build
def test_computation_flags_are_refused_by_name(tmp_path, flag):
    folder = assemble(tmp_path / "p", **{flag: True})
    with pytest.raises(ValueError, match=f"{flag}=true .*would make wrong pictures"):
        QwenImagePipeline.from_pretrained(folder, dtype=mx.float32, verbose=False)


def test_components_that_do_not_fit_each_other_are_refused(tmp_path):
    folder = assemble(tmp_path / "p", vae=CONFIGS / "zdim8" / "vae")  # a 64-channel transformer, a z_dim-8 VAE
    with pytest.raises(ValueError, match="64 channels = 2\\^2 patches x 16 latent channels, but the VAE.s z_dim is 8"):
        QwenImagePipeline.from_pretrained(folder, dtype=mx.float32, verbose=False)
    folder = assemble(tmp_path / "q")
    path = folder / "vae" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "temperal_downsample": [False, True]}))
    with pytest.raises(ValueError, match="temperal_downsample has 2 entries.*needs len\\(dim_mult\\) - 1 = 3"):
        QwenImagePipeline.from_pretrained(folder, dtype=mx.float32, verbose=False)


# a VAE of three levels (spatial factor 4): tests/fixtures/make_vae4_fixtures.py
VAE4 = json.loads((CONFIGS / "vae4.json").read_text())
VAE4_GOLDENS = mx.load(str(CONFIGS / "vae4.safetensors"))


@pytest.mark.parametrize("c", VAE4["cases"], ids=[c["name"] for c in VAE4["cases"]])
def test_vae_of_factor_4_matches_diffusers(tmp_path, c):
    """dim_mult [1, 2, 2] and temperal_downsample [False, True]: diffusers' factor 2 ** 2 = 4, sizes in multiples
    of 8 pixels; text-to-image with CFG at 40x24 and inpainting (the picture and mask resized to 56x40, the mask
    packed at a quarter of the size) within 1e-5 at every step and 2/255 in pixels; without height/width the size
    diffusers makes, 128 x the factor (512), not 1024."""
    pipe = QwenImagePipeline.from_pretrained(
        assemble(tmp_path / "vae4", vae=CONFIGS / "vae4" / "vae"), dtype=mx.float32, verbose=False
    )
    assert (pipe.sizes.vae_factor, pipe.sizes.multiple) == (4, 8)
    assert pipe.native_size == tuple(VAE4["default_size"]) == (512, 512)  # diffusers: 128 x the factor
    name, steps = c["name"], []
    pictures = Path(__file__).parent / "fixtures" / "img2img"
    extra = {}
    if c["picture"] is not None:
        extra = dict(image=Image.open(pictures / c["picture"]), mask_image=Image.open(pictures / c["mask"]))
        extra["strength"] = c["strength"]
    image = pipe.generate(
        c["prompt"], c["negative_prompt"], c["height"], c["width"], c["steps"], c["cfg_scale"],
        latents=VAE4_GOLDENS[f"{name}.noise"], progress=False, callback=lambda i, x: steps.append(np.array(x[0])),
        **extra,
    )  # fmt: skip
    assert image.size == (c["width"], c["height"]) and len(steps) == c["steps_run"]
    ref = np.array(VAE4_GOLDENS[f"{name}.latents"])
    print(f"{name}: latents max|diff| {np.abs(np.stack(steps) - ref).max():.2e}")
    np.testing.assert_allclose(np.stack(steps), ref, rtol=1e-5, atol=1e-5)
    diff = int(np.abs(np.asarray(image).astype(int) - np.array(VAE4_GOLDENS[f"{name}.image"]).astype(int)).max())
    assert diff <= 2, f"{name}: max pixel difference {diff}/255"
    with pytest.warns(UserWarning, match="multiples of 8 .* 24x36 .* generated at 24x32"):
        assert pipe.generate("a fox", height=36, width=24, steps=1, progress=False).size == (24, 32)


# scheduler configs other than the real one, some leaving keys out: tests/fixtures/make_scheduler_config_fixtures.py
SCHEDULERS = json.loads((CONFIGS / "schedulers.json").read_text())
SCHEDULER_GOLDENS = mx.load(str(CONFIGS / "schedulers.safetensors"))


@pytest.mark.parametrize("name", list(SCHEDULERS["configs"]))
def test_scheduler_configs_match_diffusers(tmp_path, name):
    """A scheduler_config.json with no keys (diffusers' class defaults: no shifting), with only dynamic shifting and a
    terminal sigma (base/max shift 0.5/1.15 over 256..4096 tokens by default), a static shift of 3, the linear
    time shift: diffusers' sigmas for 1..50 steps at 12..10000 image tokens (within 1 float32 ulp), and its
    latents (1e-5) and image (2/255) at 48x64."""
    from qwen_nb.scheduler import SchedulerConfig, flow_match_sigmas

    entry = SCHEDULERS["configs"][name]
    config = SchedulerConfig.from_dict(entry["scheduler_config"])
    for row in entry["table"]:
        sigmas = flow_match_sigmas(row["steps"], row["tokens"], config)
        np.testing.assert_allclose(sigmas, np.array(row["sigmas"], np.float32), rtol=2e-7, atol=1e-7, err_msg=str(row))
    folder = assemble(tmp_path / name)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(entry["scheduler_config"]))
    pipe = QwenImagePipeline.from_pretrained(folder, dtype=mx.float32, verbose=False)
    r, steps = SCHEDULERS["run"], []
    image = pipe.generate(
        r["prompt"], r["negative_prompt"], r["height"], r["width"], r["steps"], r["cfg_scale"],
        latents=SCHEDULER_GOLDENS[f"{name}.noise"], progress=False, callback=lambda i, x: steps.append(np.array(x[0])),
    )  # fmt: skip
    np.testing.assert_allclose(
        pipe.schedule(r["steps"], pipe.sizes.grid(r["height"], r["width"])).sigmas, entry["run_sigmas"], atol=1e-7
    )
    np.testing.assert_allclose(np.stack(steps), np.array(SCHEDULER_GOLDENS[f"{name}.latents"]), rtol=1e-5, atol=1e-5)
    diff = int(np.abs(np.asarray(image).astype(int) - np.array(SCHEDULER_GOLDENS[f"{name}.image"]).astype(int)).max())
    assert diff <= 2, f"{name}: max pixel difference {diff}/255"
