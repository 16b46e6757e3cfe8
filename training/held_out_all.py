"""The demo model on all 36 held-out (colour, shape, position) combinations (demo_data.test_scenes(36)), with CFG 4
and with cfg_scale 1, scored by the independent checker: a wider measure than the 16 captions of the README's
picture and tests/test_demo_model.py (20 steps at the native size, negative prompt " ", seed i for caption i).

    python training/held_out_all.py [--model assets/demo] [--name NAME]   # adds NAME to assets/demo_held_out_all.json
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_nb import QwenImagePipeline
from qwen_nb.demo_data import IMAGE_SIZE, scores, test_scenes

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "assets" / "demo_held_out_all.json"


def open_model(description: str, argv=None):
    """(args, pipeline) for a script that scores a demo model: --model (default assets/demo) and --name (its entry
    in the script's JSON), the pipeline in float32."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", type=Path, default=ROOT / "assets" / "demo")
    p.add_argument("--name", default="assets/demo", help="the entry's name in the JSON")
    args = p.parse_args(argv)
    return args, QwenImagePipeline.from_pretrained(args.model, dtype=mx.float32, verbose=False)


def draw(pipe, scenes, cfg: float) -> list:
    """Each scene's caption drawn at the native size: 20 steps, negative prompt " ", seed i for caption i."""
    return [
        np.array(pipe.generate(s.caption, height=IMAGE_SIZE, width=IMAGE_SIZE, steps=20, cfg_scale=cfg, seed=i, progress=False))
        for i, s in enumerate(scenes)
    ]  # fmt: skip


def main(argv=None) -> None:
    args, pipe = open_model(__doc__.split("\n\n")[0], argv)
    scenes = test_scenes(36)
    entry = {}
    for cfg in (4.0, 1.0):
        images = draw(pipe, scenes, cfg)
        entry[f"cfg{cfg:g}"] = {**scores(images, [s.caption for s in scenes]), "n": len(scenes)}
        print(f"{args.name}, cfg_scale {cfg:g}: {entry[f'cfg{cfg:g}']}")
    report = json.loads(OUT.read_text()) if OUT.exists() else {"what": __doc__.split("\n\n")[0], "models": {}}
    report["models"][args.name] = entry
    OUT.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
