"""The vision tower's window attention: uneven windows as one padded batch, or one block-diagonal mask.

Qwen2.5-VL's tower attends within windows of 8x8 patches in 28 of its 32 blocks; a picture whose grid is not a
multiple of 8 patches has narrower windows along its right and bottom edges, so the windows cannot simply be
reshaped into a batch. `qwen_nb.vision.Segments` either gathers them into a batch padded to the longest window
(padding keys masked) or runs attention over the whole sequence with a block-diagonal mask. This times the two on
the real head layout (16 heads of 80) for the pictures the edit pipelines send: Edit-Plus's 384x384 condition
picture (392x392 px after the processor, 28x28 patches) and Edit's 1024x1024 one (1036x1036 px, 74x74 patches).
Only the attention differs between the variants; the projections, MLP and merger are the same work either way.

Usage: python benchmarks/bench_vision.py [--sizes 392x392 1036x1036] [--repeats 3]
Writes assets/bench/vision_window_attention.json + .png (QWEN_NB_BENCH_OUT redirects) and prints a table.
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, time_variants, write_report  # noqa: E402

from qwen_nb.vision import Segments, VisionConfig, vision_layout  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["392x392", "1036x1036"], help="processed pictures, WxH px")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = VisionConfig()  # the real tower: 16 heads of 80, windows of 112 px
    scale = config.head_dim**-0.5
    results, shapes = {}, {}
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        grid = [[1, height // config.patch_size, width // config.patch_size]]
        layout = vision_layout(grid, config)
        N = len(layout.order)
        q, k, v = (mx.random.normal((N, config.num_heads, config.head_dim), key=mx.random.key(i)) for i in range(3))
        mx.eval(q, k, v)
        variants = {}
        for mode in ("padded", "masked"):
            segments = Segments(layout.windows, mode)
            variants[f"{size} {mode}"] = lambda s=segments, qkv=(q, k, v): s.attend(*qkv, scale)
        shapes[size] = {"patches": N, "windows": len(layout.windows), "longest": max(layout.windows)}
        print(f"{size}: {N} patches in {len(layout.windows)} windows of up to {max(layout.windows)}")
        results.update(time_variants(variants, repeats=args.repeats, warmup=1))
    print_table(results)
    path = write_report(
        "vision_window_attention",
        {"heads": config.num_heads, "head_dim": config.head_dim, "pictures": shapes},
        results,
        notes="Segments.attend for one window-attention block of the real tower, float32",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
