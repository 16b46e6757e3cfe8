"""The README's picture: the embedded demo model drawing the 16 held-out captions (never seen in training), with
CFG 4 and with cfg_scale 1, each marked by the independent checker (qwen_nb.demo_data.check): a green frame when
colour, position, background and shape are all right, orange when only the shape is wrong, red otherwise; the
title says the shape the checker read.

    python training/held_out_grid.py            # writes assets/demo_held_out.png and prints the scores

Same protocol as tests/test_demo_model.py: 20 steps at the native size (demo_data.IMAGE_SIZE), negative prompt " ",
seed i for caption i.
"""

import argparse
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_nb import QwenImagePipeline
from qwen_nb.demo_data import IMAGE_SIZE, check, scores, test_scenes

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "assets" / "demo")
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "demo_held_out.png")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipe = QwenImagePipeline.from_pretrained(args.model, dtype=mx.float32, verbose=False)
    scenes = test_scenes(16)
    size = dict(height=IMAGE_SIZE, width=IMAGE_SIZE)
    rows = {}
    for cfg in (4.0, 1.0):
        images = [
            np.array(pipe.generate(s.caption, **size, steps=20, cfg_scale=cfg, seed=i, progress=False))
            for i, s in enumerate(scenes)
        ]
        rows[cfg] = (images, [check(im, s.caption) for im, s in zip(images, scenes)])
        n = scores(images, [s.caption for s in scenes])
        print(
            f"cfg_scale {cfg:g}: the checker accepts shape {n['shape']}/16, colour+position+background "
            f"{n['layout']}/16, everything {n['all']}/16"
        )

    fig, axes = plt.subplots(4, 8, figsize=(13, 9.0))
    for k, (cfg, (images, results)) in enumerate(rows.items()):
        for i, (im, r, s) in enumerate(zip(images, results, scenes)):
            ax = axes[2 * k + i // 8, i % 8]
            ax.imshow(im, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("#2a9d3a" if r.ok else "#f08c00" if r.layout_ok else "#d62828")
                spine.set_linewidth(3)
            caption = s.caption.replace(" background", "")
            seen = f"read: {r.shape_seen}" if r.shape_seen else "read: no shape"
            ax.set_title(("" if r.ok else "✗ ") + "\n".join(textwrap.wrap(caption, 24) + [seen]), fontsize=6.5)
        shape, layout = sum(r.shape_ok for r in results), sum(r.layout_ok for r in results)
        axes[2 * k, 0].set_ylabel(f"cfg {cfg:g}: shape {shape}/16\nrest {layout}/16", fontsize=9)
        axes[2 * k + 1, 0].set_ylabel(f"cfg {cfg:g}", fontsize=9)
    fig.suptitle(
        "The embedded demo model on 16 held-out captions (20 steps, seed i for caption i; green: all right, "
        "orange: only the shape wrong)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
