"""The embedded demo model (assets/demo/, made by training/train_demo.py) and the checker that scores it.

The checker is tested on its own first: its shape features on masks drawn by hand, then on renders: it accepts
every ground-truth render and rejects renders that show another colour, position, background or shape. Then the
trained checkpoint, loaded like any other with `QwenImagePipeline.from_pretrained`, draws 16 held-out captions
(combinations never seen in training) at its native size in 20 steps, with CFG 4 and with cfg_scale 1, and the
checker scores colour, position and background apart from shape; and `python -m qwen_nb generate` draws a triangle.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qwen_nb import demo_data
from qwen_nb.demo_data import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, Scene, check, render, render_batch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
STEPS = 20
# held-out captions (of 16) whose shape the checker must read as the caption's, with CFG 4 and with cfg_scale 1
# (the fine-tuned checkpoint, training/finetune_demo.py run 11: measured 13 and 10 on this repository's CPU; 12 with
# CFG 4 is the target the model was asked to meet, 10 with cfg 1 has no margin)
SHAPES_CFG4, SHAPES_CFG1 = 12, 10


# ------------------------------------------------------------------------------------------------ the data set
def test_held_out_combinations_never_in_training():
    held = demo_data.held_out_pairs()
    train = demo_data.training_scenes()
    assert len(held) == 9 and {p for _, p in held} == set(POSITIONS)  # one colour held out at each position
    assert not held & {s.pair for s in train}
    assert len(train) + len(demo_data.held_out_scenes()) == len(demo_data.all_scenes())
    tests = demo_data.test_scenes()
    assert len({(s.colour, s.shape, s.position) for s in tests}) == 16
    for scene in tests:
        assert scene.pair in held
        # every part of a held-out caption is seen in training, in other combinations
        assert any(s.colour == scene.colour for s in train) and any(s.position == scene.position for s in train)
        assert any(s.colour == scene.colour and s.background == scene.background for s in train)


def test_captions_round_trip_and_renders_are_deterministic():
    for scene in demo_data.held_out_scenes()[::7] + demo_data.training_scenes()[::50]:
        assert Scene.from_caption(scene.caption) == scene
    assert Scene.from_caption("an orange circle in the centre on a white background").position == "centre"
    with pytest.raises(ValueError, match="not a demo caption"):
        Scene.from_caption("a photo of a cat")
    scenes = demo_data.sample_scenes(np.random.default_rng(3), 8)
    a, b = render_batch(scenes, seed=1), render_batch(scenes, seed=1)
    assert a.shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, render_batch(scenes, seed=2))


# ------------------------------------------------------------------------------------------------ the checker
def test_checker_accepts_every_ground_truth_render():
    scenes = demo_data.sample_scenes(np.random.default_rng(0), 400) + demo_data.held_out_scenes()
    images = render_batch(scenes, seed=7)
    results = [check(im, s.caption) for im, s in zip(images, scenes)]
    assert all(r.ok for r in results), [s.caption for s, r in zip(scenes, results) if not r.ok][:5]
    assert [r.shape_seen for r in results] == [s.shape for s in scenes]
    # with margin: the thresholds are 0.4 and 0.8
    assert min(r.colour_fraction for r in results) > 0.55
    assert min(r.background_fraction for r in results) > 0.95
    assert demo_data.score(images[:10], [s.caption for s in scenes[:10]]) == 1.0
    assert demo_data.scores(images[:10], [s.caption for s in scenes[:10]]) == dict(layout=10, shape=10, all=10, n=10)
    for size in (48, 64, 128, 192):  # any square size
        assert all(check(render(s, size=size), s.caption).ok for s in scenes[:: len(scenes) // 12])


def _hand_drawn(shape: str, n: int = 40) -> np.ndarray:
    """An n x n bool mask of the ideal shape, drawn row by row (independent of demo_data's renderer)."""
    mask = np.zeros((n, n), bool)
    for y in range(n):
        v = (y + 0.5) / n  # 0 at the top, 1 at the bottom
        if shape == "square":
            half = 0.5
        elif shape == "circle":
            half = np.sqrt(max(0.0, 0.25 - (v - 0.5) ** 2))
        elif shape == "diamond":
            half = 0.5 - abs(v - 0.5)
        else:  # triangle pointing up: the width grows linearly from the apex to the base
            half = v / 2
        cols = (np.arange(n) + 0.5) / n
        mask[y] = np.abs(cols - 0.5) <= half
    return mask


def test_shape_features_of_hand_drawn_shapes():
    """Fill of the bounding box: 1, pi/4, 1/2, 1/2; share of the area in the top half: 1/2, 1/2, 1/2, 1/4."""
    expected = {"square": (1.0, 0.5), "circle": (np.pi / 4, 0.5), "diamond": (0.5, 0.5), "triangle": (0.5, 0.25)}
    for shape, (fill, top) in expected.items():
        f, t = demo_data.shape_features(_hand_drawn(shape))
        assert abs(f - fill) < 0.03 and abs(t - top) < 0.03, (shape, f, t)
        assert demo_data.nearest_shape(f, t) == shape
        assert demo_data.solidity(_hand_drawn(shape)) > 0.9
    assert demo_data.convex_hull_area(np.array([[0, 0], [4, 0], [0, 3], [1, 1]])) == 6.0  # (1, 1) is inside
    plus = np.zeros((30, 30), bool)
    plus[12:18, :] = plus[:, 12:18] = True  # a cross: fill 0.36 and top 0.5 as a diamond, but ragged
    # 324 pixels; its hull is the 30x30 square less four corner triangles with legs of 12
    assert demo_data.solidity(plus) == pytest.approx(324 / (900 - 4 * 72))
    image = np.zeros((96, 96, 3), np.uint8) + np.array(COLOURS["blue"], np.uint8)
    image[33:63, 33:63][plus] = COLOURS["red"]
    r = check(image, "a red diamond in the centre on a blue background")
    assert r.layout_ok and r.shape_seen == "ragged" and not r.ok
    mask = np.zeros((30, 30), bool)
    mask[5:25, 5:25] = _hand_drawn("circle", 20)
    mask[0:3, 0:3] = True  # a speck elsewhere is another component
    blob = demo_data.largest_component(mask, np.ones_like(mask))
    assert blob.sum() == _hand_drawn("circle", 20).sum()


def test_checker_reads_the_shape_of_the_named_colour_only():
    scene = Scene("red", "triangle", "centre", "blue")
    image = render(scene)
    assert check(image, scene.caption).shape_seen == "triangle"
    # a square of a third colour beside it changes nothing; the same square in red at the named place does
    other = render(Scene("green", "square", "middle left", "blue"))
    both = np.where(np.all(image == COLOURS["blue"], axis=-1, keepdims=True), other, image)
    assert check(both, scene.caption).ok
    red_square = render(Scene("red", "square", "centre", "blue"))
    r = check(red_square, scene.caption)
    assert r.layout_ok and not r.shape_ok and r.shape_seen == "square" and not r.ok
    blank = np.full_like(image, COLOURS["blue"])
    assert check(blank, scene.caption).shape_seen is None


def _wrong(scene: Scene, what: str) -> Scene:
    names = list(COLOURS)
    if what == "colour":
        other = [c for c in names if c not in (scene.colour, scene.background)]
        return Scene(other[0], scene.shape, scene.position, scene.background)
    if what == "background":
        other = [c for c in names if c not in (scene.colour, scene.background)]
        return Scene(scene.colour, scene.shape, scene.position, other[0])
    if what == "position":
        r, c = POSITIONS[scene.position]
        far = [p for p, (r2, c2) in POSITIONS.items() if abs(r2 - r) + abs(c2 - c) >= 1]
        return Scene(scene.colour, scene.shape, far[len(far) // 2], scene.background)
    if what == "swapped":
        return Scene(scene.background, scene.shape, scene.position, scene.colour)
    if what == "shape":
        return Scene(
            scene.colour, SHAPES[(SHAPES.index(scene.shape) + 1) % len(SHAPES)], scene.position, scene.background
        )
    raise ValueError(what)


@pytest.mark.parametrize("what", ["colour", "background", "position", "swapped", "shape"])
def test_checker_rejects_wrong_renders(what):
    scenes = demo_data.sample_scenes(np.random.default_rng(1), 150)
    rng = np.random.default_rng(2)
    rejected = [not check(render(_wrong(s, what), rng=rng), s.caption).ok for s in scenes]
    assert all(rejected), f"{sum(not r for r in rejected)} wrong '{what}' renders accepted"


def test_checker_rejects_every_other_shape():
    scenes = demo_data.sample_scenes(np.random.default_rng(4), 100)
    rng = np.random.default_rng(5)
    for scene in scenes:
        for shape in SHAPES:
            r = check(render(Scene(scene.colour, shape, scene.position, scene.background), rng=rng), scene.caption)
            assert r.layout_ok and r.shape_ok == (shape == scene.shape), (scene.caption, shape, r)


def test_checker_rejects_blank_and_noise():
    scene = demo_data.test_scenes()[0]
    blank = np.full((64, 64, 3), COLOURS[scene.background], np.uint8)
    assert not check(blank, scene.caption).ok
    assert check(blank, scene.caption).background_ok  # the background alone is right
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not check(noise, scene.caption).ok


# ------------------------------------------------------------------------------------------------ the checkpoint
def test_demo_checkpoint_is_a_diffusers_folder_under_25_mb():
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"{size / 2**20:.2f} MiB"
    index = json.loads((DEMO / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["_native_size"] == [IMAGE_SIZE, IMAGE_SIZE]  # what it was trained at (diffusers skips "_" keys)
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (DEMO / name).is_dir(), name
    assert json.loads((DEMO / "scheduler" / "scheduler_config.json").read_text())["shift_terminal"] == 0.02
    vae = json.loads((DEMO / "vae" / "config.json").read_text())
    assert vae["z_dim"] == 16 and len(vae["latents_mean"]) == len(vae["latents_std"]) == 16
    transformer = json.loads((DEMO / "transformer" / "config.json").read_text())
    assert transformer["in_channels"] == 4 * vae["z_dim"]

    import mlx.core as mx

    weights = mx.load(str(DEMO / "vae" / "diffusion_pytorch_model.safetensors"))
    conv = weights["decoder.conv_in.weight"]  # a causal 3-D conv: the kernel on the last temporal tap
    assert conv.ndim == 5 and conv.shape[2] == 3
    assert mx.all(conv[:, :, :2] == 0).item() and mx.any(conv[:, :, 2] != 0).item()
    assert any(k.endswith("time_conv.weight") for k in weights)


def test_template_prefix_is_the_34_dropped_tokens():
    from qwen_nb.text_encoder import DROP_IDX, PROMPT_TEMPLATE
    from qwen_nb.tokenizer import QwenTokenizer

    tok = QwenTokenizer.from_pretrained(DEMO / "tokenizer")
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    ids = tok.encode(prefix)
    assert len(ids) == DROP_IDX
    assert [tok.decode([i]) for i in ids[:6]] == ["<|im_start|>", "system", "\n", "Describe", " the", " image"]
    assert [tok.decode([i]) for i in ids[-4:]] == ["\n", "<|im_start|>", "user", "\n"]
    caption = demo_data.test_scenes()[0].caption
    assert tok.encode(PROMPT_TEMPLATE.format(caption))[:DROP_IDX] == ids


@pytest.fixture(scope="module")
def pipe():
    import mlx.core as mx

    from qwen_nb.pipeline import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(DEMO, dtype=mx.float32, verbose=False)


@pytest.fixture(scope="module")
def held_out_scores(pipe):
    """The checker's results on the 16 held-out captions at the native size, 20 steps, seed i for caption i."""
    scenes = demo_data.test_scenes(16)
    size = dict(height=IMAGE_SIZE, width=IMAGE_SIZE)
    scores = {}
    for cfg in (4.0, 1.0):
        images = [
            np.array(pipe.generate(s.caption, **size, steps=STEPS, cfg_scale=cfg, seed=i, progress=False))
            for i, s in enumerate(scenes)
        ]
        scores[cfg] = [check(im, s.caption) for im, s in zip(images, scenes)]
    return scores


def _failures(results, what):
    return [(s.caption, r) for s, r in zip(demo_data.test_scenes(16), results) if not getattr(r, what)]


@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_held_out_colour_position_and_background(held_out_scores, cfg):
    results = held_out_scores[cfg]
    assert sum(r.layout_ok for r in results) >= 15, _failures(results, "layout_ok")


@pytest.mark.parametrize("cfg, least", [(4.0, SHAPES_CFG4), (1.0, SHAPES_CFG1)])
def test_held_out_shapes(held_out_scores, cfg, least):
    """The measured scores (training/train_demo.py's docstring); a blob-drawing model scored 3/16 (its circles)."""
    results = held_out_scores[cfg]
    assert sum(r.shape_ok for r in results) >= least, _failures(results, "shape_ok")
    assert set(SHAPES) <= {r.shape_seen for r in results}  # it draws all four, not one blob for all


def test_cli_draws_a_triangle_in_seconds(tmp_path):
    """What the README promises a fresh clone: the command finishes in seconds, at the native size, a triangle."""
    from PIL import Image

    out = tmp_path / "t.png"
    prompt = "a blue triangle at the top centre on an orange background"
    cmd = [sys.executable, "-m", "qwen_nb", "generate", "--model", str(DEMO), "--prompt", prompt, "--out", str(out)]
    t = time.perf_counter()
    r = subprocess.run([*cmd, "--seed", "0", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    assert seconds < 30, f"{seconds:.1f} s"
    image = np.array(Image.open(out).convert("RGB"))
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    result = check(image, prompt)
    assert result.ok and result.shape_seen == "triangle", result


def test_validation_captions_are_the_held_out_ones_the_test_does_not_use():
    """What a training run selects on (demo_data.validation_scenes) never overlaps the 16 test captions and is held
    out of training: together they cover all 9 x 4 held-out (colour, position, shape) combinations once."""
    validation, test = demo_data.validation_scenes(), demo_data.test_scenes(16)
    combo = lambda s: (s.colour, s.shape, s.position)  # noqa: E731
    held = {(c, s, p) for c, p in demo_data.held_out_pairs() for s in demo_data.SHAPES}
    assert len(held) == 36 and len(validation) == 20
    assert {combo(s) for s in validation} | {combo(s) for s in test} == held
    assert not {combo(s) for s in validation} & {combo(s) for s in test}
    assert all(s.background != s.colour for s in validation)
    training = {s.caption for s in demo_data.training_scenes()}
    assert not training & {s.caption for s in validation}
