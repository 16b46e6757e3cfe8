"""img2img and inpainting against diffusers' QwenImageImg2ImgPipeline and QwenImageInpaintPipeline on the tiny
pipeline (goldens: tests/fixtures/make_img2img_fixtures.py, the VAE posterior's mode in place of its sample), the
pieces on their own (preprocessing, the mask, the skipped steps), the errors, and the CLI."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from qwen_nb import image_input
from qwen_nb.__main__ import main
from qwen_nb.pipeline import GenerationInterrupted, QwenImagePipeline
from qwen_nb.sampling import Schedule, check_strength, first_step
from qwen_nb.scheduler import SchedulerConfig, pack_latents

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = FIXTURES / "tiny_pipeline" / "layout_a"
PICTURES = FIXTURES / "img2img"
GOLDENS = mx.load(str(PICTURES / "goldens.safetensors"))
META = json.loads((PICTURES / "goldens.json").read_text())
# extra.*: strengths that leave one step, grey masks as L and as RGB, a coloured RGB mask
# (tests/fixtures/make_img2img_extra_fixtures.py)
GOLDENS.update(mx.load(str(PICTURES / "extra.safetensors")))
CASES = {c["name"]: c for c in META["cases"] + json.loads((PICTURES / "extra.json").read_text())["cases"]}


def golden(name, key) -> np.ndarray:
    return np.array(GOLDENS[f"{name}.{key}"])


def load(**kw) -> QwenImagePipeline:
    return QwenImagePipeline.from_pretrained(MODEL, dtype=mx.float32, verbose=False, **kw)


@pytest.fixture(scope="module")
def pipe():
    return load()


def run_case(pipe, name, **kw):
    c = CASES[name]
    mask = None if c["mask"] is None else Image.open(PICTURES / c["mask"])
    args = dict(latents=GOLDENS[f"{name}.noise"], image=Image.open(PICTURES / c["picture"]), mask_image=mask)
    args.update(strength=c["strength"], progress=False)
    return pipe.generate(
        c["prompt"], c["negative_prompt"], c["height"], c["width"], c["steps"], c["cfg_scale"], **{**args, **kw}
    )


def pixel_diff(image, name) -> int:
    return int(np.abs(np.asarray(image).astype(int) - golden(name, "image").astype(int)).max())


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(pipe, name):
    """Same picture, mask and noise: every step's latents within 1e-5, the uint8 image within 2/255 (float32)."""
    c = CASES[name]
    steps, seen = [], []
    image = run_case(pipe, name, callback=lambda i, x: (seen.append(i), steps.append(np.array(x[0]))))
    assert image.size == (c["width"], c["height"])
    assert seen == list(range(c["steps_run"]))  # the steps run, counted from 0 as diffusers' callback counts them
    ref = golden(name, "latents")
    err = float(np.abs(np.stack(steps) - ref).max())
    diff = pixel_diff(image, name)
    print(f"{name}: {len(steps)} of {c['steps']} steps, max |latents - diffusers| {err:.2e}, pixels {diff}/255")
    np.testing.assert_allclose(np.stack(steps), ref, rtol=1e-5, atol=1e-5)
    assert diff <= 2
    assert pipe.last_stats.steps == c["steps_run"] == len(pipe.last_stats.step_times_s)


def test_parity_with_modulation_per_step_and_two_cfg_passes():
    """The schedule's modulation table is indexed by the schedule's step: computing it per step instead, and CFG
    as two passes, gives the same latents."""
    pipe = load(schedule_modulation=False, batched_cfg=False)
    for name in ("img2img_06_cfg", "inpaint_08_cfg"):
        steps = []
        image = run_case(pipe, name, callback=lambda i, x, steps=steps: steps.append(np.array(x[0])))
        np.testing.assert_allclose(np.stack(steps), golden(name, "latents"), rtol=1e-5, atol=1e-5)
        assert pixel_diff(image, name) <= 2


@pytest.mark.parametrize("name", list(CASES))
def test_schedule_skips_the_steps_diffusers_skips(pipe, name):
    c = CASES[name]
    schedule = pipe.schedule(c["steps"], pipe.sizes.grid(c["height"], c["width"]), c["strength"])
    assert schedule.start == c["first_step"] and schedule.steps_run == c["steps_run"]
    np.testing.assert_array_equal(schedule.sigmas, golden(name, "sigmas"))
    assert schedule.sigmas[schedule.start] == np.float32(c["sigma_start"])  # the noise level img2img starts at


def test_first_step_is_get_timesteps():
    """diffusers' get_timesteps, run by the fixture script for 11 step counts x 30 strengths (those just under
    k/steps included): the first step run and the number run; where none runs, check_strength refuses."""
    for steps, strength, start, run in META["get_timesteps"]:
        assert first_step(steps, strength) == start, (steps, strength)
        assert steps - start == run
        if run < 1:
            with pytest.raises(ValueError, match="leaves none of the"):
                check_strength(strength, steps)
        else:
            assert Schedule.make(SchedulerConfig(), steps, 16, strength).start == start


# ---------------------------------------------------------------------------------------------- the pieces
def test_picture_preprocessing_is_diffusers(pipe):
    """The resized pictures equal diffusers' image processor's output exactly (Lanczos in Pillow, then 2x - 1)."""
    resized = [name for name in CASES if f"{name}.pixels" in GOLDENS]
    assert {"img2img_09_resize", "inpaint_10_resize", "img2img_one_step_aspect"} == set(resized)
    for name in resized:
        c = CASES[name]
        x = image_input.preprocess_image(Image.open(PICTURES / c["picture"]), c["height"], c["width"])
        np.testing.assert_array_equal(x[0], golden(name, "pixels").transpose(1, 2, 0))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["mask"]])
def test_mask_is_diffusers(pipe, name):
    """The mask binarized at 0.5 after the resize (127 kept, 128 repainted), and in the packed latent layout."""
    c = CASES[name]
    mask = image_input.preprocess_mask(Image.open(PICTURES / c["mask"]), c["height"], c["width"])
    np.testing.assert_array_equal(mask, golden(name, "mask"))
    s = pipe.sizes
    packed = image_input.packed_mask(mask, s.vae_factor, s.latent_channels, s.patch)
    np.testing.assert_array_equal(np.array(packed[0]), golden(name, "packed_mask").astype(bool))
    assert 0 < np.array(packed).mean() < 1  # some kept, some repainted


@pytest.mark.parametrize("name", list(CASES))
def test_picture_latents_and_start(pipe, name):
    """The picture's packed latents (the posterior's mode, normalised) and the noised start, within 1e-5."""
    c = CASES[name]
    z = image_input.img2img_latents(pipe.vae, PICTURES / c["picture"], c["height"], c["width"])
    np.testing.assert_allclose(np.array(z[0]), golden(name, "image_latents"), rtol=1e-5, atol=1e-5)
    noise = pipe.initial_noise(c["height"], c["width"], latents=GOLDENS[f"{name}.noise"])
    start = image_input.noised(z, pack_latents(noise), golden(name, "sigmas")[c["first_step"]])
    np.testing.assert_allclose(np.array(start[0]), golden(name, "start"), rtol=1e-5, atol=1e-5)


def test_inpainting_keeps_the_unmasked_region(pipe):
    """After the last step the kept region is the picture's latents (the blend at sigma 0), the rest is not."""
    name = "inpaint_08_cfg"
    steps = []
    run_case(pipe, name, callback=lambda i, x: steps.append(np.array(x[0])))
    kept = ~golden(name, "packed_mask").astype(bool)
    np.testing.assert_allclose(steps[-1][kept], golden(name, "image_latents")[kept], rtol=1e-6, atol=1e-6)
    assert not np.allclose(steps[-1][~kept], golden(name, "image_latents")[~kept], atol=1e-2)  # repainted


def test_a_path_and_a_uint8_array_are_the_picture():
    picture = Image.open(PICTURES / "picture_80x60.png")
    ref = image_input.preprocess_image(picture, 48, 64)
    for source in (PICTURES / "picture_80x60.png", str(PICTURES / "picture_80x60.png"), np.asarray(picture)):
        np.testing.assert_array_equal(image_input.preprocess_image(source, 48, 64), ref)
    rgba = Image.fromarray(np.dstack([np.asarray(picture), np.full((60, 80), 255, np.uint8)]), "RGBA")
    np.testing.assert_array_equal(image_input.preprocess_image(rgba, 48, 64), ref)  # taken as RGB
    mask = Image.open(
        PICTURES / "mask_80x60.png"
    )  # a uint8 array is diffusers' array mask (tests/test_audit_inputs.py)
    np.testing.assert_array_equal(
        image_input.preprocess_mask(Image.fromarray(np.asarray(mask)), 48, 64),
        image_input.preprocess_mask(mask, 48, 64),
    )


def test_default_size_is_the_native_one_as_in_diffusers():
    """Without height/width diffusers' img2img makes default_sample_size x vae_scale_factor = 1024 x 1024 whatever
    the picture (recorded by the fixture script), which is this checkpoint's native size; the rule is checked here
    with the native size set to 32x32, to run fast."""
    pipe = load()
    assert pipe.native_size == tuple(META["default_size"])
    pipe.sizes = replace(pipe.sizes, native=(32, 32))
    image = pipe.generate("a fox", steps=2, image=PICTURES / "picture_80x60.png", seed=0, progress=False)
    assert image.size == (32, 32)


def test_steps_run_are_what_previews_stats_and_interrupts_count(pipe):
    """strength 0.6 of 5 steps runs 3: previews every 2 of them come after the 2nd and the last."""
    shots = []
    run_case(pipe, "img2img_06_cfg", preview=lambda k, im: shots.append((k, im.size)), preview_every=2)
    assert shots == [(1, (64, 48)), (2, (64, 48))]
    assert pipe.last_stats.steps == 3 and "3 steps" in str(pipe.last_stats) and "picture" in str(pipe.last_stats)

    def stop(k, x):
        if k == 1:
            raise KeyboardInterrupt

    with pytest.raises(GenerationInterrupted, match="after step 2 of 3"):
        run_case(pipe, "img2img_06_cfg", callback=stop)


# ---------------------------------------------------------------------------------------------- errors
def gen(pipe, **kw):
    args = dict(prompt="a fox", height=48, width=64, steps=4, seed=0, progress=False)
    args["image"] = PICTURES / "picture_64x48.png"
    return pipe.generate(**{**args, **kw})


@pytest.mark.parametrize("strength", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_strength_outside_0_1(strength):
    pipe = load()
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
        gen(pipe, strength=strength)
    assert not pipe.components.loaded("transformer")  # refused before any weights are read


def test_strength_that_leaves_no_step(pipe):
    with pytest.raises(ValueError, match="leaves none of the 20 steps to run") as e:
        gen(pipe, steps=20, strength=1e-17)
    assert "at least 1/steps = 0.05" in str(e.value)
    assert gen(pipe, steps=20, strength=0.01, height=16, width=16).size == (16, 16)  # diffusers runs 1 step here
    assert pipe.last_stats.steps == 1


def test_mask_of_another_size(pipe):
    with pytest.raises(ValueError, match=r"mask_image is 80x60 but image is 64x48 \(width x height\)"):
        gen(pipe, mask_image=PICTURES / "mask_80x60.png")


def test_mask_without_a_picture(pipe):
    with pytest.raises(ValueError, match="mask_image needs image"):
        gen(pipe, image=None, mask_image=PICTURES / "mask_64x48.png")


def test_missing_unreadable_and_unsupported_pictures(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="image: no such file"):
        gen(pipe, image=tmp_path / "nothing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    with pytest.raises(ValueError, match="cannot read .*bad.png as a picture"):
        gen(pipe, image=bad)
    with pytest.raises(ValueError, match="a numpy array must be uint8 .* or float"):
        gen(pipe, image=np.zeros((48, 64, 3), np.uint16))
    with pytest.raises(ValueError, match="image must be a PIL image, a path"):
        gen(pipe, image=[1, 2, 3])
    with pytest.raises(FileNotFoundError, match="mask_image: no such file"):
        gen(pipe, mask_image=tmp_path / "nothing.png")


# ---------------------------------------------------------------------------------------------- the CLI
ARGS = ["--model", str(MODEL), "--dtype", "float32", "--size", "64x48", "--steps", "5", "--seed", "3", "--quiet"]


def cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "qwen_nb", *args], capture_output=True, text=True, timeout=timeout, cwd=MODEL.parent
    )


@pytest.mark.parametrize("inpaint", [False, True])
def test_cli_img2img_and_inpainting(tmp_path, pipe, inpaint):
    """--image/--strength (and --mask) write the picture the library makes with the same seed."""
    picture, mask = PICTURES / "picture_64x48.png", PICTURES / "mask_64x48.png"
    out = tmp_path / "out.png"
    extra = ["--image", str(picture), "--strength", "0.7", *(["--mask", str(mask)] if inpaint else [])]
    r = cli("generate", "--prompt", "a red fox", "--out", str(out), *ARGS, *extra)
    assert r.returncode == 0, r.stderr
    assert "4 of 5 steps run at strength 0.7" in r.stdout  # int(5 - 5 * 0.7) = 1 skipped
    written = Image.open(out)
    assert "Strength: 0.7" in written.text["parameters"] and ("Mask: " in written.text["parameters"]) == inpaint
    same = pipe.generate(
        "a red fox", height=48, width=64, steps=5, seed=3, image=picture, strength=0.7,
        mask_image=mask if inpaint else None, progress=False,
    )  # fmt: skip
    assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(same))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--strength", "0.5"], "--strength goes with --image PATH"),
        (["--mask", "m.png"], "--mask goes with --image PATH"),
        (["--image", "{pic}", "--strength", "1.5"], "strength must be a number in (0, 1]"),
        (["--image", "{pic}", "--strength", "0"], "strength must be a number in (0, 1]"),
        (["--image", "{pic}", "--strength", "1e-17"], "leaves none of the 5 steps to run"),
        (["--image", "{pic}", "--mask", "{big_mask}"], "--mask is 80x60 but --image is 64x48"),
        (["--image", "/no/such/picture.png"], "--image: no such file /no/such/picture.png"),
        (["--image", "{pic}", "--mask", "/no/such/mask.png"], "--mask: no such file"),
    ],
)
def test_cli_picture_errors_exit_2(tmp_path, capsys, extra, message):
    names = {"pic": PICTURES / "picture_64x48.png", "big_mask": PICTURES / "mask_80x60.png"}
    extra = [a.format(**names) for a in extra]
    out = tmp_path / "x.png"
    code = main(["generate", "--prompt", "p", "--out", str(out), *ARGS, *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not out.exists()
