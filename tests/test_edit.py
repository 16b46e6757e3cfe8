"""The edit pipelines against diffusers 0.42.1's QwenImageEditPipeline and QwenImageEditPlusPipeline on the tiny
random checkpoint tests/fixtures/tiny_edit (written by tests/fixtures/make_edit_fixtures.py): one picture, two
and three pictures of different sizes and aspect ratios, zero_cond_t (Edit-2511), CJK prompts; pipeline options;
bad input; the CLI's edit command."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from qwen_nb import hub
from qwen_nb.__main__ import main
from qwen_nb.edit import QwenImageEditPipeline, calculate_dimensions
from qwen_nb.memory import component_bytes, plan_memory, tensor_shapes
from qwen_nb.pipeline import QwenImagePipeline
from qwen_nb.switches import Switches
from qwen_nb.vision import is_vision_tower

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_edit"
CHECKPOINT = FIXTURE / "checkpoint"  # Edit-2509's layout (QwenImageEditPlusPipeline)
PICTURES = FIXTURE / "pictures"
# goldens.* from make_edit_fixtures.py; three_pictures.* (three pictures, the most -2509/2511 take; and
# Qwen-Image-Edit at a given size of another aspect) from make_edit_three_fixtures.py
GOLDENS = {k: v for f in ("goldens", "three_pictures") for k, v in mx.load(str(FIXTURE / f"{f}.safetensors")).items()}
CASES = {
    c["name"]: c
    for f in ("goldens", "three_pictures")
    for c in json.loads((FIXTURE / f"{f}.json").read_text())["cases"]
}
CLASS_NAMES = {"edit": "QwenImageEditPipeline", "plus": "QwenImageEditPlusPipeline"}


def variant(folder: Path, kind: str, zero_cond_t: bool) -> Path:
    """The checkpoint as Qwen-Image-Edit (kind "edit"), -2509 ("plus") or -2511 ("plus" with zero_cond_t): one
    file changed, as the fixture script runs diffusers."""
    shutil.copytree(CHECKPOINT, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": CLASS_NAMES[kind]}))
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "zero_cond_t": zero_cond_t}))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    return {(k, z): variant(root / f"{k}_{z}", k, z) for k, z in (("edit", False), ("plus", False), ("plus", True))}


@pytest.fixture(scope="module")
def pipes(folders):
    return {
        key: QwenImageEditPipeline.from_pretrained(f, dtype=mx.float32, verbose=False) for key, f in folders.items()
    }


def pictures(case):
    images = [Image.open(PICTURES / f"{p}.png") for p in case["pictures"]]
    return images[0] if case["pipeline"] == "edit" else images


def run_case(pipe, name, **kw):
    """(the image, every step's latents (steps, N, 64)) of a golden case."""
    c = CASES[name]
    steps = []
    image = pipe.generate(
        c["prompt"],
        pictures(c),
        c["negative_prompt"],
        c["height"],
        c["width"],
        c["steps"],
        c["cfg_scale"],
        latents=GOLDENS[f"{name}.noise"],
        progress=False,
        callback=lambda i, x: steps.append(np.array(x[0].astype(mx.float32))),
        **kw,
    )
    return image, np.stack(steps)


def pixel_diff(image, name) -> int:
    return int(np.abs(np.asarray(image).astype(int) - np.array(GOLDENS[f"{name}.image"]).astype(int)).max())


def pipe_for(pipes, name):
    c = CASES[name]
    return pipes[c["pipeline"], c["zero_cond_t"]]


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(pipes, name):
    """Same noise, same weights: diffusers' uint8 image within 2/255, every step's latents within 1e-5 (float32)."""
    c = CASES[name]
    pipe = pipe_for(pipes, name)
    image, latents = run_case(pipe, name)
    assert image.size == (c["output"][1], c["output"][0]) and image.mode == "RGB"
    err = np.abs(latents - np.array(GOLDENS[f"{name}.latents"])).max()
    diff = pixel_diff(image, name)
    print(f"{name}: latents max|diff| {err:.2e}, max pixel difference {diff}/255")
    np.testing.assert_allclose(latents, np.array(GOLDENS[f"{name}.latents"]), rtol=1e-5, atol=1e-5)
    assert diff <= 2
    assert pipe.last_stats.cfg == (c["negative_prompt"] is not None)


@pytest.mark.parametrize("name", [n for n in CASES if f"{n}.prompt_embeds" in GOLDENS])
def test_prompt_embeddings_and_picture_latents_match_diffusers(pipes, name):
    """The prompt encoded with the pictures (processor, vision tower, language model, 64 tokens dropped) and the
    pictures' packed VAE latents, as diffusers' encode_prompt and prepare_latents give them."""
    c = CASES[name]
    pipe = pipe_for(pipes, name)
    checked = pipe.pictures(pictures(c))
    texts = [c["prompt"]] + ([c["negative_prompt"]] if f"{name}.negative_embeds" in GOLDENS else [])
    encoded = pipe.encode_edit(texts, checked)
    for (embeds, mask), key in zip(encoded, ("prompt_embeds", "negative_embeds")):
        assert mask is None
        np.testing.assert_allclose(np.array(embeds), np.array(GOLDENS[f"{name}.{key}"]), rtol=1e-5, atol=1e-5)
    latents, grids = pipe.condition_latents(checked)
    np.testing.assert_allclose(np.array(latents), np.array(GOLDENS[f"{name}.image_latents"]), rtol=1e-5, atol=1e-5)
    assert sum(h * w for h, w in grids) == c["condition_tokens"]


def test_zero_cond_t_and_the_picture_frames_matter(pipes):
    """The parity above is not loose: without zero_cond_t, or with the second picture's RoPE frame taken as the
    first's, the latents move far outside 1e-5."""
    name = "plus_two_zero_cond"
    _, plain = run_case(pipes["plus", False], name)
    assert np.abs(plain - np.array(GOLDENS[f"{name}.latents"])).max() > 1e-3

    import qwen_nb.transformer as transformer_module

    pipe = pipes["plus", True]
    real = transformer_module.rope_table

    def one_frame(h, w, text_len, axes_dims, theta=10000.0, conditions=()):
        return real(h, w, text_len, axes_dims, theta, tuple(conditions[:1]) * len(conditions))

    try:
        transformer_module.rope_table = one_frame
        _, wrong = run_case(pipe, name)
    finally:
        transformer_module.rope_table = real
    assert np.abs(wrong - np.array(GOLDENS[f"{name}.latents"])).max() > 1e-4


def test_lora_on_the_modulation_under_zero_cond_t_matches_diffusers(folders):
    """Edit-2511 with a kohya LoRA on img_mod/txt_mod (so the condition tokens' timestep-0 row changes too), attention,
    MLP and norm_out (make_edit_lora_fixtures.py): diffusers' latents within 1e-5 at every step, pixels within 2/255;
    with the modulation up front (the default) and in the model."""
    meta = json.loads((FIXTURE / "lora.json").read_text())
    (c,) = meta["cases"]
    golden = mx.load(str(FIXTURE / "lora.safetensors"))
    for schedule_modulation in (True, False):
        pipe = QwenImageEditPipeline.from_pretrained(
            folders["plus", True], dtype=mx.float32, verbose=False, schedule_modulation=schedule_modulation
        )
        pipe.load_lora(FIXTURE / meta["lora"])
        steps = []
        image = pipe.generate(
            c["prompt"], [Image.open(PICTURES / f"{p}.png") for p in c["pictures"]], c["negative_prompt"],
            c["height"], c["width"], c["steps"], c["cfg_scale"], latents=golden[f"{c['name']}.noise"], progress=False,
            callback=lambda i, x, steps=steps: steps.append(np.array(x[0])),
        )  # fmt: skip
        ref = np.array(golden[f"{c['name']}.latents"])
        np.testing.assert_allclose(np.stack(steps), ref, rtol=1e-5, atol=1e-5)
        diff = int(np.abs(np.asarray(image).astype(int) - np.array(golden[f"{c['name']}.image"]).astype(int)).max())
        assert diff <= 2, f"max pixel difference {diff}/255"


SETTINGS = {
    "baseline": dict(switches=Switches.baseline(), batched_cfg=False, schedule_modulation=False),
    "no_schedule_modulation": dict(schedule_modulation=False),
    "no_compiled_blocks": dict(switches=Switches().only(compiled_blocks=False, fused_qkv=False)),
    "sequenced": dict(keep_text_encoder=False),
    "eval_every_block": dict(eval_every=1),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_pipeline_options_keep_diffusers_parity(folders, setting):
    """Every switch off, the modulation per step (with sigma 0's row computed each call), blocks uncompiled, the
    text encoder and vision tower freed after encoding: the zero_cond_t case with two pictures still within 1e-5."""
    pipe = QwenImageEditPipeline.from_pretrained(
        folders["plus", True], dtype=mx.float32, verbose=False, **SETTINGS[setting]
    )
    name = "plus_two_zero_cond"
    image, latents = run_case(pipe, name)
    np.testing.assert_allclose(latents, np.array(GOLDENS[f"{name}.latents"]), rtol=1e-5, atol=1e-5)
    assert pixel_diff(image, name) <= 2
    if setting == "sequenced":
        assert not pipe.components.loaded("text_encoder") and not pipe.vision.loaded("vision_tower")
        run_case(pipe, name)  # the same prompts and pictures again: cached, no text encoder
        assert pipe.components.builds["text_encoder"] == 1 and pipe.vision.builds["vision_tower"] == 1


class Spy:
    """A transformer that records the batch of every call."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def __getattr__(self, attr):
        return getattr(self.model, attr)

    def __call__(self, x, *args, **kw):
        self.batches.append(x.shape[0])
        return self.model(x, *args, **kw)


def test_batched_cfg_with_pictures_equals_two_passes(folders):
    """Prompt and negative prompt of one length: CFG runs as one batch of two, the pictures' latents beside each
    (and, under zero_cond_t, both rows' condition tokens at sigma 0); the same latents as two passes within 1e-5."""
    runs = {}
    for batched in (True, False):
        pipe = QwenImageEditPipeline.from_pretrained(
            folders["plus", True], dtype=mx.float32, verbose=False, batched_cfg=batched, keep_text_encoder=True
        )  # resident: the spy must not be freed for the text encoder
        spy = Spy(pipe.transformer)
        pipe.components.replace("transformer", spy)
        steps = []
        pics = pictures(CASES["plus_two"])
        pipe.generate("a red fox in the snow", pics, "a red fox on the snow", 64, 64, 2, 4.0, seed=0, progress=False,
                      callback=lambda i, x, steps=steps: steps.append(np.array(x)))  # fmt: skip
        runs[batched] = (np.stack(steps), spy.batches)
    assert runs[True][1] == [2, 2] and runs[False][1] == [1] * 4
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-5)


def test_modulation_table_holds_sigma_zero_for_zero_cond_t(pipes):
    """Edit-2511's table has one more row per block, the image modulation at sigma 0, read with the schedule's."""
    pipe = pipes["plus", True]
    table = pipe.modulation_table(pipe.schedule(3, (6, 10)))
    assert table.cond is not None and len(table.cond) == 2 and table.cond[0].shape == (1, 6 * 32)
    assert table.blocks[0][0].shape == (3, 6 * 32) and table.step(1).cond is table.cond
    assert pipes["plus", False].modulation_table(pipe.schedule(3, (6, 10))).cond is None


def test_bfloat16_and_quantized_edits_run(folders):
    """bfloat16 and an 8-bit transformer: the edit's size, and pixels near the float32 golden."""
    for options in (dict(dtype=mx.bfloat16), dict(dtype=mx.float32, quantize=8)):
        pipe = QwenImageEditPipeline.from_pretrained(folders["plus", True], verbose=False, **options)
        image, _ = run_case(pipe, "plus_two_zero_cond")
        assert image.size == (96, 64)
        mean = np.abs(np.asarray(image).astype(float) - np.array(GOLDENS["plus_two_zero_cond.image"])).mean()
        assert mean < 6, (options, mean)  # measured mean |diff|: bfloat16 3.1, 8-bit 0.5 (of 255)


def test_output_size_follows_the_last_picture(pipes):
    pipe = pipes["plus", False]
    tall, wide = Image.open(PICTURES / "tall.png"), Image.open(PICTURES / "wide2.png")
    image = pipe.generate("x", [wide, tall], None, steps=1, seed=0, progress=False)
    assert image.size == calculate_dimensions(128 * 128, 60 / 90) == (96, 160)
    assert calculate_dimensions(1024 * 1024, 1.0) == (1024, 1024)
    assert calculate_dimensions(1024 * 1024, 16 / 9) == (1376, 768)  # diffusers' round: 1365.3 -> 1376, 768


def test_text_positions_option(pipes):
    """`text_positions = "mrope"`: Qwen2.5-VL's 3-D positions (as trained), not diffusers' plain ones: different
    embeddings, cached apart."""
    pipe = pipes["plus", False]
    checked = pipe.pictures(pictures(CASES["plus_two"]))
    ((plain, _),) = pipe.encode_edit(["swap them"], checked)
    pipe.text_positions = "mrope"
    try:
        ((mrope, _),) = pipe.encode_edit(["swap them"], checked)
    finally:
        pipe.text_positions = "plain"
    assert plain.shape == mrope.shape and np.abs(np.array(plain) - np.array(mrope)).max() > 1e-4
    pipe.text_positions = "3d"
    try:
        with pytest.raises(ValueError, match="text_positions must be 'plain'"):
            pipe.encode_edit(["swap them"], checked)
    finally:
        pipe.text_positions = "plain"


# ---------------------------------------------------------------------------------------------- loading
def test_variant_read_from_the_checkpoint(pipes):
    assert (pipes["edit", False].kind, pipes["edit", False].max_pictures) == ("edit", 1)
    assert (pipes["plus", True].kind, pipes["plus", True].zero_cond_t) == ("plus", True)
    import qwen_nb

    assert qwen_nb.QwenImageEditPipeline is QwenImageEditPipeline


def test_memory_plan_counts_the_vision_tower():
    text_only = plan_memory(CHECKPOINT, mx.float32)
    plan = plan_memory(CHECKPOINT, mx.float32, vision=True)
    tower = component_bytes(tensor_shapes(CHECKPOINT / "text_encoder", is_vision_tower), mx.float32)
    assert tower > 0 and plan.components["text_encoder"] == text_only.components["text_encoder"] + tower
    assert plan.activations["denoise"] > text_only.activations["denoise"]  # a condition picture in the sequence


def test_edit_pipelines_sequence_by_default_even_where_everything_fits(monkeypatch):
    """Issue 17's peak target is for the default: on a machine where both models fit (a 1 TB budget) the edit
    pipeline still frees its text encoder (and vision tower) before the transformer is read, while the
    text-to-image pipeline keeps them resident; keep_text_encoder=True asks an edit pipeline for resident."""
    from qwen_nb import memory

    monkeypatch.setattr(memory, "device_memory", lambda: (10**12, "test budget"))
    edit = QwenImageEditPipeline.from_pretrained(CHECKPOINT, dtype=mx.float32, verbose=False)
    plan = edit.memory_plan
    assert not edit.keep_text_encoder and plan.peak == plan.sequenced_peak < plan.resident_peak
    assert "sequenced by default" in str(plan)
    asked = QwenImageEditPipeline.from_pretrained(CHECKPOINT, dtype=mx.float32, verbose=False, keep_text_encoder=True)
    assert asked.keep_text_encoder and asked.memory_plan.peak == asked.memory_plan.resident_peak
    t2i = QwenImagePipeline.from_pretrained(CHECKPOINT, dtype=mx.float32, verbose=False)
    assert t2i.keep_text_encoder


def test_hub_download_keeps_vision_shards_for_edit():
    """The text-to-image download skips the text encoder's vision-only shards; the edit pipelines' fetches them
    (and still skips lm_head-only ones)."""
    source = Path(__file__).parent / "fixtures" / "tiny_pipeline" / "layout_a"
    sizes = {str(p.relative_to(source)): p.stat().st_size for p in source.rglob("*") if p.is_file()}
    t2i, skipped_t2i = hub.plan_download("x/y", source, sizes)
    edit, skipped_edit = hub.plan_download("x/y", source, sizes, vision=True)
    vision_only = set(skipped_t2i) - set(skipped_edit)
    assert vision_only and vision_only <= set(edit) and not vision_only & set(t2i)
    assert len(skipped_edit) == 1  # the lm_head-only shard
    assert "processor/*" in hub.SMALL_FILES


def test_save_quantized_edit_pipeline(folders, tmp_path):
    """An 8-bit edit pipeline saved with its vision tower and processor/ loads back as the same edit pipeline and
    edits to the same picture."""
    pipe = QwenImageEditPipeline.from_pretrained(folders["plus", True], dtype=mx.float32, quantize=8, verbose=False)
    first, _ = run_case(pipe, "plus_two_zero_cond")
    out = pipe.save_pretrained(tmp_path / "q8")
    assert (out / "processor" / "preprocessor_config.json").exists()
    assert tensor_shapes(out / "text_encoder", is_vision_tower)
    again = QwenImageEditPipeline.from_pretrained(out, dtype=mx.float32, verbose=False)
    assert (again.kind, again.zero_cond_t, again.quantize) == ("plus", True, 8)
    second, _ = run_case(again, "plus_two_zero_cond")
    assert np.array_equal(np.asarray(first), np.asarray(second))


# ---------------------------------------------------------------------------------------------- bad input
def test_more_pictures_than_the_model_takes(pipes):
    wide = Image.open(PICTURES / "wide.png")
    with pytest.raises(ValueError, match=r"2 pictures given; Qwen-Image-Edit takes at most 1 \(.*-2509 and -2511"):
        pipes["edit", False].generate("x", [wide, wide], steps=1, progress=False)
    with pytest.raises(ValueError, match="4 pictures given; Qwen-Image-Edit-2509/2511 takes at most 3"):
        pipes["plus", False].generate("x", [wide] * 4, steps=1, progress=False)
    with pytest.raises(ValueError, match="image is required"):
        pipes["plus", False].generate("x", steps=1, progress=False)


def test_pictures_too_small_or_too_thin(pipes):
    pipe = pipes["plus", False]
    with pytest.raises(ValueError, match=r"picture 2 is 0x10 pixels: nothing to edit"):
        pipe.generate("x", [Image.open(PICTURES / "wide.png"), Image.new("RGB", (0, 10))], steps=1, progress=False)
    with pytest.raises(ValueError, match=r"picture 1 is 2000x3 pixels: .* too thin to patch"):
        pipe.generate("x", Image.new("RGB", (2000, 3)), steps=1, progress=False)
    tiny = pipe.generate("x", Image.new("RGB", (1, 1), (200, 30, 30)), None, steps=1, seed=0, progress=False)
    assert tiny.size == (128, 128)  # one pixel is scaled up, as diffusers does


def test_pictures_in_other_modes_edit_as_their_rgb(pipes):
    """A picture with transparency is edited as Pillow's composite of it on white (transformers' convert_to_rgb;
    diffusers' VAE path takes RGB only, so the RGB picture is what the goldens cover), a grey one as Pillow's RGB
    conversion of it, a uint8 array as the PIL picture of it."""
    pipe = pipes["plus", False]
    wide = Image.open(PICTURES / "wide.png").convert("RGB")
    rgba = wide.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(wide.size))
    on_white = Image.alpha_composite(Image.new("RGBA", wide.size, (255, 255, 255, 255)), rgba).convert("RGB")
    grey = wide.convert("L")

    def edit(picture):
        return np.asarray(pipe.generate("x", picture, None, steps=1, seed=0, progress=False))

    assert np.array_equal(edit(rgba), edit(on_white))
    assert not np.array_equal(edit(on_white), edit(wide))  # the transparency changed the picture edited
    assert np.array_equal(edit(grey), edit(grey.convert("RGB")))
    assert np.array_equal(edit(np.asarray(wide)), edit(wide))


def test_pictures_that_are_not_pictures(pipes, tmp_path):
    pipe = pipes["plus", False]
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ValueError, match="notes.png is not a picture Pillow can read"):
        pipe.generate("x", text, steps=1, progress=False)
    with pytest.raises(FileNotFoundError, match="no picture at"):
        pipe.generate("x", tmp_path / "missing.png", steps=1, progress=False)
    with pytest.raises(ValueError, match="cannot make an RGB picture of a Pillow picture of mode 'La'"):
        pipe.generate("x", Image.new("La", (8, 8)), steps=1, progress=False)
    with pytest.raises(ValueError, match="picture 1 must be a PIL image, a path .* got int"):
        pipe.generate("x", 3, steps=1, progress=False)
    with pytest.raises(ValueError, match="numpy array must be uint8"):
        pipe.generate("x", np.zeros((8, 8, 3), np.float32), steps=1, progress=False)
    with pytest.warns(UserWarning, match="96x100 .* generated at 96x96, rounded down as diffusers does"):
        edited = pipe.generate("x", Image.open(PICTURES / "wide.png"), height=100, width=96, steps=1, progress=False)
    assert edited.size == (96, 96)


def test_checkpoints_that_cannot_edit(tmp_path):
    with pytest.raises(ValueError, match="holds a QwenImagePipeline, not an edit checkpoint"):
        folder = variant(tmp_path / "t2i", "plus", False)
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImagePipeline"}))
        QwenImageEditPipeline.from_pretrained(folder, verbose=False)

    stripped = variant(tmp_path / "no_tower", "plus", False)
    weights = mx.load(str(stripped / "text_encoder" / "model.safetensors"))
    mx.save_safetensors(
        str(stripped / "text_encoder" / "model.safetensors"),
        {k: v for k, v in weights.items() if not k.startswith(("visual.", "model.visual."))},
    )
    with pytest.raises(ValueError, match="holds no vision-tower weights"):
        QwenImageEditPipeline.from_pretrained(stripped, verbose=False)
    assert QwenImagePipeline.from_pretrained(stripped, verbose=False)  # text-to-image never needed it

    no_config = variant(tmp_path / "no_config", "plus", False)
    config = json.loads((no_config / "text_encoder" / "config.json").read_text())
    config.pop("vision_config")
    (no_config / "text_encoder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no vision_config.*the edit pipelines need the vision tower"):
        QwenImageEditPipeline.from_pretrained(no_config, verbose=False)

    no_processor = variant(tmp_path / "no_processor", "plus", False)
    shutil.rmtree(no_processor / "processor")
    with pytest.raises(FileNotFoundError, match="no processor/preprocessor_config.json"):
        QwenImageEditPipeline.from_pretrained(no_processor, verbose=False)


def test_lightning_refused_where_unsupported(pipes):
    with pytest.raises(ValueError, match="fast= is not taken"):
        QwenImageEditPipeline.from_pretrained(CHECKPOINT, fast=8, verbose=False)
    with pytest.raises(ValueError, match="Qwen-Image-Edit-2511 has its own Lightning LoRAs"):
        pipes["plus", True].use_lightning(8)
    with pytest.raises(ValueError, match="for 8 or 4 steps"):
        pipes["plus", False].use_lightning(6)


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_edit_two_pictures(folders, pipes, tmp_path):
    out = tmp_path / "edited.png"
    args = ["--model", str(folders["plus", True]), "--dtype", "float32", "--steps", "2", "--seed", "5", "--quiet"]
    images = [str(PICTURES / "tall.png"), str(PICTURES / "wide2.png")]
    r = subprocess.run(
        [sys.executable, "-m", "qwen_nb", "edit", "--image", *images, "--prompt", "把两张图合在一起", "--out", str(out)]
        + args,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    assert f"wrote {out} (160x96, seed 5, edited from 2 picture(s))" in r.stdout
    image = Image.open(out)
    assert "Pictures: tall.png, wide2.png" in image.text["parameters"]
    same = pipes["plus", True].generate(
        "把两张图合在一起", [Image.open(p) for p in images], steps=2, seed=5, progress=False
    )
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(same))


def test_cli_edit_bad_input(folders, tmp_path, capsys):
    model = ["--model", str(folders["edit", False]), "--dtype", "float32", "--quiet"]
    missing = ["edit", "--image", str(tmp_path / "nope.png"), "--prompt", "x", "--out", str(tmp_path / "o.png")]
    assert main(missing + model) == 2
    assert "no picture at" in capsys.readouterr().err
    two = ["edit", "--image", str(PICTURES / "wide.png"), str(PICTURES / "tall.png"), "--prompt", "x"]
    assert main(two + ["--out", str(tmp_path / "o.png"), "--steps", "1"] + model) == 2
    assert "takes at most 1" in capsys.readouterr().err
    assert main(["edit", "--image", str(PICTURES / "wide.png"), "--prompt", "x", "--out", str(tmp_path / "o.gif")]) == 2
    assert "should end in one of" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the panel
def test_panel_edit_mode(pipes):
    """For an edit pipeline the panel shows a picture upload; uploaded pictures are edited, at the last picture's
    size unless a preset is chosen; without a picture the panel says one is needed."""
    from qwen_nb.panel import FROM_PICTURE, Panel

    pipe = pipes["plus", True]
    p = Panel(pipe, steps=1, seed=3)
    assert p.editing and p.upload in p.widget.children[0].children and p.size.value == FROM_PICTURE
    assert p.generate_now() is None and "image is required" in p.status.value
    uploads = [
        {"name": f"{n}.png", "content": memoryview((PICTURES / f"{n}.png").read_bytes())} for n in ("wide", "tall")
    ]
    p._uploaded(tuple(uploads))  # what the FileUpload widget's value change delivers
    assert len(p.pictures) == 2 and len(p.thumbnails.children) == 2 and "2 picture(s)" in p.status.value
    image = p.generate_now()
    assert image is not None and image.size == (96, 160)  # the last picture's (tall) ratio at the checkpoint's area
    same = pipe.generate(p.prompt.value, [Image.open(PICTURES / n) for n in ("wide.png", "tall.png")], " ", steps=1,
                         seed=3, progress=False)  # fmt: skip
    assert np.array_equal(np.asarray(image), np.asarray(same))
    p._uploaded(({"name": "notes.txt", "content": memoryview(b"not a picture")},))
    assert "could not read the upload" in p.status.value


@pytest.mark.parametrize("name", ["plus_two_zero_cond", "edit_one"])
def test_from_components_matches_diffusers(folders, name):
    """An edit pipeline assembled from models in memory (as the benchmarks build full-size random ones): the
    checkpoint's own models, processor and vision tower given one by one, diffusers' golden edit again."""
    from qwen_nb.scheduler import SchedulerConfig
    from qwen_nb.text_encoder import load_text_encoder
    from qwen_nb.transformer import load_transformer
    from qwen_nb.vae import load_vae
    from qwen_nb.vision import QwenVLProcessor, VisionConfig, load_vision_tower

    c = CASES[name]
    folder = folders[c["pipeline"], c["zero_cond_t"]]

    def transformer(modulation=True):  # as the benchmarks' builders: the pipeline asks for the parts it runs
        separate = Switches().only(fused_qkv=False)  # the pipeline fuses q/k/v itself
        return load_transformer(folder / "transformer", mx.float32, switches=separate, modulation=modulation)[0]

    index = json.loads((folder / "model_index.json").read_text())
    pipe = QwenImageEditPipeline.from_components(
        QwenVLProcessor.from_pretrained(folder / "processor"),
        transformer,
        load_text_encoder(folder / "text_encoder", mx.float32),
        load_vae(folder / "vae", mx.float32),
        lambda: load_vision_tower(folder / "text_encoder", mx.float32),
        SchedulerConfig.from_file(folder / "scheduler" / "scheduler_config.json"),
        kind=c["pipeline"],
        vision_config=VisionConfig.from_folder(folder / "text_encoder"),
        vae_area=index["_vae_image_area"],
        dtype=mx.float32,
        verbose=False,
    )
    assert pipe.zero_cond_t == c["zero_cond_t"]
    image, latents = run_case(pipe, name)
    np.testing.assert_allclose(latents, np.array(GOLDENS[f"{name}.latents"]), rtol=1e-5, atol=1e-5)
    assert pixel_diff(image, name) <= 2
    with pytest.raises(ValueError, match="kind must be one of"):
        QwenImageEditPipeline.from_components(pipe.processor, None, None, None, None, kind="2511")
