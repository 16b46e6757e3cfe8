"""The full-size transformer (random weights, bfloat16) as the edit pipelines run it: the noise tokens of a
1024x1024 output followed by one or two 1024x1024 condition pictures' tokens (RoPE frames 1, 2), with and without
Qwen-Image-Edit-2511's zero_cond_t (the condition tokens modulated at sigma 0: two modulations per block), each with
the default switches and with compiled blocks or fused q/k/v off; the text-to-image forward beside them.

    python benchmarks/bench_edit.py [--tiny] [--layers 60] [--text 256] [--repeats 5]

Every forward takes its modulation from a precomputed table row (the pipeline's schedule_modulation), batch 1.
Writes assets/bench/edit_transformer_<kind>.json + .png (QWEN_NB_BENCH_OUT redirects) and prints a table.
`--tiny` (TransformerConfig.tiny(), float32, 128 px pictures) is a smoke test on a CPU.
"""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, sync, time_variants, write_report  # noqa: E402

from qwen_nb.pipeline import materialize  # noqa: E402
from qwen_nb.switches import Switches  # noqa: E402
from qwen_nb.transformer import QwenImageTransformer, TransformerConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--text", type=int, default=256, help="text tokens (an edit prompt with its picture's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = TransformerConfig.tiny() if args.tiny else TransformerConfig(num_layers=args.layers)
    dtype = mx.float32 if args.tiny else mx.bfloat16
    side = 128 if args.tiny else 1024
    g = side // 16
    t = time.perf_counter()
    model = QwenImageTransformer(config)
    model.set_dtype(dtype)
    materialize(model)
    print(f"built {config.num_layers} blocks in {time.perf_counter() - t:.1f} s", flush=True)
    mx.random.seed(0)
    text = mx.random.normal((1, args.text, config.joint_attention_dim)).astype(dtype)
    sigma = mx.array([0.7])
    tables = {}
    for zero in (False, True):
        model.config.zero_cond_t = zero
        tables[zero] = model.modulations(sigma, dtype)
        sync(tables[zero].arrays())

    variants, prepare = {}, {}
    default = Switches()

    def add(name: str, pictures: int, zero: bool, switches: Switches = default):
        grids = [(g, g)] * (1 + pictures)
        x = mx.random.normal((1, g * g * (1 + pictures), config.in_channels)).astype(dtype)
        sync(x)

        def setup():  # outside the timing: q/k/v fused or split (lazily) and evaluated here
            model.config.zero_cond_t = zero
            model.set_switches(switches)
            sync(model.parameters())

        variants[name] = lambda: model(x, text, None, grids, mods=tables[zero])
        prepare[name] = setup

    add("text-to-image (1 frame)", 0, False)
    add("edit, 1 picture", 1, False)
    add("edit-2511, 1 picture (zero_cond_t)", 1, True)
    add("edit-2511, 1 picture, no compiled_blocks", 1, True, Switches().only(compiled_blocks=False))
    add("edit-2511, 1 picture, no fused_qkv", 1, True, Switches().only(fused_qkv=False))
    add("edit, 2 pictures", 2, False)
    add("edit-2511, 2 pictures (zero_cond_t)", 2, True)
    results = time_variants(variants, repeats=args.repeats, prepare=prepare)
    print_table(results)
    kind = (
        "tiny" if args.tiny else ("cuda" if mx.cuda.is_available() else "metal" if mx.metal.is_available() else "cpu")
    )
    config_out = dict(layers=config.num_layers, dtype=str(dtype), side=side, text_tokens=args.text, batch=1)
    path = write_report(
        f"edit_transformer_{kind}",
        config_out,
        results,
        notes="one forward with a precomputed modulation row; tokens: (1 + pictures) x (side/16)^2 + text",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
