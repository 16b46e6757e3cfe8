"""img2img / inpainting inputs as diffusers takes them (goldens: tests/fixtures/make_audit_inputs_fixtures.py, run
with diffusers 0.42.1): float numpy pictures (nearest resize, 2x - 1), numpy masks binarized on their raw values
(a uint8 0/1 mask repaints its 1s), a mask of another size than the picture, a picture file read as `load_image`
reads it; and the errors for paths that are not pictures."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from qwen_nb import image_input
from qwen_nb.pipeline import QwenImagePipeline

FIXTURES = Path(__file__).parent / "fixtures"
HERE = FIXTURES / "audit_inputs"
MODEL = FIXTURES / "tiny_pipeline" / "layout_b"
GOLDENS = load_file(str(HERE / "goldens.safetensors"))  # numpy: float64 inputs kept
META = json.loads((HERE / "goldens.json").read_text())


@pytest.mark.parametrize("c", META["picture_cases"], ids=lambda c: c["case"])
def test_float_array_pictures_as_diffusers(c):
    """diffusers' VaeImageProcessor.preprocess of a float array: torch's nearest resize, then 2x - 1 (an array with
    values below 0 taken as already in [-1, 1]); exactly, in float32."""
    x = image_input.preprocess_image(GOLDENS[f"input.{c['input']}"], c["height"], c["width"])
    np.testing.assert_array_equal(x[0], GOLDENS[f"pre.{c['case']}.output"])


@pytest.mark.parametrize("c", META["mask_cases"], ids=lambda c: c["case"])
def test_array_masks_as_diffusers(c):
    """diffusers' mask processor on an array: nearest resize, binarized at 0.5 on the raw values (uint8 0/1 and 0/255
    masks both repaint their non-zero pixels)."""
    m = image_input.preprocess_mask(GOLDENS[f"input.{c['input']}"], c["height"], c["width"])
    np.testing.assert_array_equal(m, GOLDENS[f"pre.{c['case']}.output"])


@pytest.fixture(scope="module")
def pipe():
    return QwenImagePipeline.from_pretrained(MODEL, dtype=mx.float32, verbose=False)


def source(name: str):
    if name.endswith((".jpg", ".png")):
        return HERE / name  # the path: read as diffusers' load_image reads it (EXIF orientation applied)
    return GOLDENS[f"input.{name}"]


@pytest.mark.parametrize("c", META["runs"], ids=lambda c: c["case"])
def test_pipelines_on_array_inputs_as_diffusers(pipe, c):
    """Same noise and weights as diffusers' img2img / inpainting with array pictures and masks (one of another size
    than the picture): every step's latents within 1e-5, the image within 2/255."""
    name = c["case"]
    mask = None if c["mask"] is None else GOLDENS[f"run.{name}.mask"]
    steps = []
    image = pipe.generate(
        c["prompt"], c["negative_prompt"], c["height"], c["width"], c["steps"], c["cfg"],
        latents=mx.array(GOLDENS[f"run.{name}.noise"]), image=source(c["picture"]), strength=c["strength"],
        mask_image=mask, progress=False, callback=lambda i, x: steps.append(np.array(x[0])),
    )  # fmt: skip
    np.testing.assert_allclose(np.stack(steps), GOLDENS[f"run.{name}.latents"], rtol=1e-5, atol=1e-5)
    diff = np.abs(np.asarray(image).astype(int) - GOLDENS[f"run.{name}.image"].astype(int)).max()
    assert diff <= 2


def test_files_read_as_load_image():
    """A path is diffusers' load_image of it: EXIF orientation applied, RGB (a palette PNG with a transparent index
    is Pillow's RGB of it, not composited)."""
    for name in ("exif6.jpg", "p_trns.png"):
        np.testing.assert_array_equal(np.asarray(image_input.load_picture(HERE / name)), GOLDENS[f"load.{name}"])
    assert image_input.load_picture(HERE / "exif6.jpg").size == (14, 20)  # turned upright


def test_edit_of_a_png_with_a_transparent_colour_as_diffusers():
    """diffusers' QwenImageEditPlusPipeline with load_image of an RGB PNG with a tRNS colour: the VAE encodes its RGB
    as it is, the processor composites the colour on white after the resize. The same pixels without the tRNS colour
    are edited first, so a prompt cache keyed on the pixels alone would answer with their embeddings."""
    from qwen_nb.edit import QwenImageEditPipeline

    c = META["edit"]
    folder = FIXTURES / "tiny_edit" / "checkpoint"
    pipe = QwenImageEditPipeline.from_pretrained(folder, dtype=mx.float32, verbose=False)
    with Image.open(HERE / c["picture"]) as im:
        plain = im.convert("RGB")
    plain.info.pop("transparency", None)
    noise = mx.array(GOLDENS["edit.noise"])
    pipe.generate(c["prompt"], plain, c["negative_prompt"], steps=c["steps"], cfg_scale=c["cfg"], latents=noise,
                  progress=False)  # fmt: skip
    steps = []
    pipe.generate(
        c["prompt"], HERE / c["picture"], c["negative_prompt"], steps=c["steps"], cfg_scale=c["cfg"], latents=noise,
        progress=False, callback=lambda i, x: steps.append(np.array(x[0])),
    )  # fmt: skip
    np.testing.assert_allclose(np.stack(steps), GOLDENS["edit.latents"], rtol=1e-5, atol=1e-5)


def test_a_mask_of_another_size_is_refused():
    """diffusers would stretch the picture and the mask to the output size each on its own, so a mask of another
    size would not mark the pixels it was drawn on: refused, naming both sizes (issue 15)."""
    picture = np.zeros((16, 32, 3), np.float32)
    image_input.load_pair(picture, np.zeros((16, 32), np.uint8))  # the same size: fine
    with pytest.raises(ValueError, match=r"mask_image is 16x8 but image is 32x16 \(width x height\).*picture's size"):
        image_input.load_pair(picture, np.zeros((8, 16), np.uint8))


def test_bool_and_grey_arrays():
    """A bool mask is 0/1 (diffusers' interpolate refuses bools); a grey float picture is its RGB (diffusers would
    hand the VAE one channel)."""
    m = np.zeros((16, 32), bool)
    m[4:, 10:] = True
    np.testing.assert_array_equal(image_input.preprocess_mask(m, 32, 64), image_input.preprocess_mask(m * 1.0, 32, 64))
    grey = np.linspace(0, 1, 16 * 32, dtype=np.float32).reshape(16, 32)
    np.testing.assert_array_equal(
        image_input.preprocess_image(grey, 16, 32), image_input.preprocess_image(np.dstack([grey] * 3), 16, 32)
    )


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="image: no such file"):
        image_input.prepare(tmp_path / "missing.png", None, 32, 32)
    with pytest.raises(IsADirectoryError, match="is a folder, not a picture file"):
        image_input.prepare(tmp_path, None, 32, 32)
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match="cannot read .*notes.png as a picture"):
        image_input.prepare(tmp_path / "notes.png", None, 32, 32)
    data = (HERE / "exif6.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read .*cut.jpg as a picture"):
        image_input.prepare(tmp_path / "cut.jpg", None, 32, 32)
    with pytest.raises(ValueError, match="0x0 pixels"):
        image_input.prepare(Image.new("RGB", (0, 0)), None, 32, 32)
    with pytest.raises(ValueError, match="mask_image is 0x4 pixels"):
        image_input.prepare(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 0)), 32, 32)
    with pytest.raises(ValueError, match="NaN or infinite"):
        image_input.prepare(np.full((4, 4, 3), np.nan, np.float32), None, 32, 32)
    with pytest.raises(ValueError, match="one picture per call"):
        image_input.prepare(np.zeros((2, 4, 4, 3), np.float32), None, 32, 32)
    with pytest.raises(ValueError, match="uint8 .* or float"):
        image_input.prepare(np.zeros((4, 4, 3), np.uint16), None, 32, 32)
    with pytest.raises(ValueError, match="a float array must have shape"):
        image_input.prepare(np.zeros((3, 4, 5), np.float32), None, 32, 32)


def test_a_zero_size_condition_picture_is_refused_by_21():
    from qwen_nb.pipeline21 import QwenImage21Pipeline

    pipe = QwenImage21Pipeline.from_pretrained(FIXTURES / "tiny_qwen21" / "pipeline", dtype=mx.float32, verbose=False)
    with pytest.raises(
        ValueError, match=r"a condition picture is 0x5 pixels \(width x height\): it needs at least one"
    ):
        pipe.generate("a fox", image=Image.new("RGB", (0, 5)), progress=False)
