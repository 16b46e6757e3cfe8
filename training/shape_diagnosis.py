"""Where the demo model's wrong shapes come from: which shape it draws in place of which, on captions it trained on
as much as on held-out ones, and whether its VAE already loses the shape.

    python training/shape_diagnosis.py [--model assets/demo] [--name NAME]   # adds NAME to assets/demo_shapes.json

For each caption set (36 training captions drawn at random, the 20 validation captions a fine-tune selects on, the
16 test captions of the README's picture) and CFG 4 / cfg_scale 1 (20 steps, seed i for caption i, float32), the
checker's shape verdicts as a confusion table (asked -> seen); and the VAE alone: 24 rendered pictures of each shape
encoded and decoded, then checked. If training captions fail as often as held-out ones, the model cannot draw the
shape (capacity, training), not that it fails to combine known words; if the VAE's round trip keeps the shape,
the VAE is not what loses it.
"""

import json
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_nb.demo_data import (
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    Scene,
    backgrounds_for,
    check,
    render,
    sample_scenes,
    test_scenes,
    training_scenes,
    validation_scenes,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from held_out_all import ROOT, draw, open_model  # noqa: E402

OUT = ROOT / "assets" / "demo_shapes.json"


def confusion(pipe, scenes, cfg: float) -> dict:
    """{"right": n, "n": len, "asked->seen": count of each wrong pair}."""
    wrong, right = Counter(), 0
    for s, image in zip(scenes, draw(pipe, scenes, cfg)):
        r = check(image, s.caption)
        if r.shape_ok:
            right += 1
        else:
            wrong[f"{s.shape}->{r.shape_seen}"] += 1
    asked = Counter(s.shape for s in scenes)
    return {"right": right, "n": len(scenes), "asked": dict(asked), "wrong": dict(wrong.most_common())}


def vae_round_trip(vae, per_shape: int = 24) -> dict:
    """Rendered pictures through the VAE (posterior mean, decoded): how many of each shape the checker still reads."""
    rng = np.random.default_rng(0)
    kept = {}
    for shape in SHAPES:
        ok = 0
        for i in range(per_shape):
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            backs = backgrounds_for(colour)
            s = Scene(colour, shape, list(POSITIONS)[rng.integers(len(POSITIONS))], backs[rng.integers(len(backs))])
            x = mx.array(render(s, IMAGE_SIZE, np.random.default_rng(i)).astype(np.float32)[None] / 127.5 - 1)
            y = vae.decode(vae.encode(x))
            pixels = np.array(((mx.clip(y, -1, 1) + 1) * 127.5).round().astype(mx.uint8))[0]
            ok += check(pixels, s.caption).shape_ok
        kept[shape] = {"kept": ok, "n": per_shape}
    return kept


def main(argv=None) -> None:
    args, pipe = open_model(__doc__.split("\n\n")[0], argv)
    sets = {
        "training_36": sample_scenes(np.random.default_rng(5), 36, training_scenes()),
        "validation_20": validation_scenes(),
        "test_16": test_scenes(16),
    }
    entry = {"vae_round_trip": vae_round_trip(pipe.vae)}
    for name, scenes in sets.items():
        for cfg in (4.0, 1.0):
            entry[f"{name}_cfg{cfg:g}"] = confusion(pipe, scenes, cfg)
            print(f"{args.name} {name} cfg {cfg:g}: {entry[f'{name}_cfg{cfg:g}']}", flush=True)
    print(f"VAE round trip: {entry['vae_round_trip']}")
    report = json.loads(OUT.read_text()) if OUT.exists() else {}
    report[args.name] = entry
    OUT.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
