"""The embedded demo model (assets/demo/, made by training/train_demo.py) and the checker that scores it.

The checker is tested on its own first: it accepts every ground-truth render and rejects renders that show
another colour, position or background. Then the trained checkpoint, loaded like any other with
`QwenImagePipeline.from_pretrained`, draws 16 held-out captions (combinations never seen in training) in 20 steps;
the checker must accept at least 80% with CFG 4, and CFG must beat cfg_scale 1.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from qwen_nb import demo_data
from qwen_nb.demo_data import COLOURS, POSITIONS, Scene, check, render, render_batch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
STEPS = 20


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
    assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, render_batch(scenes, seed=2))


# ------------------------------------------------------------------------------------------------ the checker
def test_checker_accepts_every_ground_truth_render():
    scenes = demo_data.sample_scenes(np.random.default_rng(0), 400) + demo_data.held_out_scenes()
    images = render_batch(scenes, seed=7)
    results = [check(im, s.caption) for im, s in zip(images, scenes)]
    assert all(r.ok for r in results), [s.caption for s, r in zip(scenes, results) if not r.ok][:5]
    # with margin: the thresholds are 0.4 and 0.8
    assert min(r.shape_fraction for r in results) > 0.55
    assert min(r.background_fraction for r in results) > 0.95
    assert demo_data.score(images[:10], [s.caption for s in scenes[:10]]) == 1.0
    big = render(scenes[0], size=192)  # any square size
    assert check(big, scenes[0].caption).ok


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
    raise ValueError(what)


@pytest.mark.parametrize("what", ["colour", "background", "position", "swapped"])
def test_checker_rejects_wrong_renders(what):
    scenes = demo_data.sample_scenes(np.random.default_rng(1), 150)
    rng = np.random.default_rng(2)
    rejected = [not check(render(_wrong(s, what), rng=rng), s.caption).ok for s in scenes]
    assert all(rejected), f"{sum(not r for r in rejected)} wrong '{what}' renders accepted"


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
    scenes = demo_data.test_scenes(16)
    scores = {}
    for cfg in (4.0, 1.0):
        images = [
            np.array(pipe.generate(s.caption, height=64, width=64, steps=STEPS, cfg_scale=cfg, seed=i, progress=False))
            for i, s in enumerate(scenes)
        ]
        scores[cfg] = [check(im, s.caption) for im, s in zip(images, scenes)]
    return scores


def test_held_out_captions_are_drawn_correctly_with_cfg(held_out_scores):
    results = held_out_scores[4.0]
    score = sum(r.ok for r in results) / len(results)
    assert score >= 0.8, [(s.caption, r) for s, r in zip(demo_data.test_scenes(16), results) if not r.ok]


def test_cfg_beats_no_cfg(held_out_scores):
    with_cfg = sum(r.ok for r in held_out_scores[4.0])
    without = sum(r.ok for r in held_out_scores[1.0])
    assert with_cfg > without, (with_cfg, without)
