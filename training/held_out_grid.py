"""The README's picture: the embedded demo model drawing the 16 held-out captions (never seen in training), with
CFG 4 and with cfg_scale 1, each marked by the independent checker (qwen_nb.demo_data.check).

    python training/held_out_grid.py            # writes assets/demo_held_out.png and prints the scores

Same protocol as tests/test_demo_model.py: 20 steps, 64x64, negative prompt " ", seed i for caption i.
"""

import argparse
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_nb import QwenImagePipeline
from qwen_nb.demo_data import check, test_scenes

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
    rows = {}
    for cfg in (4.0, 1.0):
        images = [
            np.array(pipe.generate(s.caption, height=64, width=64, steps=20, cfg_scale=cfg, seed=i, progress=False))
            for i, s in enumerate(scenes)
        ]
        rows[cfg] = (images, [check(im, s.caption).ok for im, s in zip(images, scenes)])
        print(f"cfg_scale {cfg:g}: the checker accepts {sum(rows[cfg][1])}/16")

    fig, axes = plt.subplots(4, 8, figsize=(13, 8.6))
    for k, (cfg, (images, oks)) in enumerate(rows.items()):
        for i, (im, ok, s) in enumerate(zip(images, oks, scenes)):
            ax = axes[2 * k + i // 8, i % 8]
            ax.imshow(im, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("#2a9d3a" if ok else "#d62828")
                spine.set_linewidth(3)
            caption = s.caption.replace(" background", "")
            ax.set_title(("" if ok else "✗ ") + "\n".join(textwrap.wrap(caption, 24)), fontsize=6.5)
        axes[2 * k, 0].set_ylabel(f"cfg {cfg:g}: {sum(oks)}/16", fontsize=10)
        axes[2 * k + 1, 0].set_ylabel(f"cfg {cfg:g}", fontsize=10)
    fig.suptitle(
        "The embedded demo model on 16 held-out captions (20 steps, seed i for caption i; green: the checker accepts)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
