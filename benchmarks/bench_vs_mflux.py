"""qwen_nb's transformer against mflux's `QwenTransformer` (mflux 0.24.0) on the same MLX build: one forward of a
full-width (3072 wide, 24 heads, joint dim 3584) transformer with 2 blocks at 256x256 px (256 image tokens) and 64
text tokens, batch 1. Both models hold the very same weight arrays (mflux's, renamed to diffusers' names), so the
two forwards also check each other numerically. Runs alternate (benchmarks/common.time_variants).

    pip install --no-deps mflux==0.24.0     # its Linux requirement pulls MLX's CUDA build; the transformer needs
                                             # only what qwen_nb needs plus pyyaml, requests, filelock, platformdirs
    python benchmarks/bench_vs_mflux.py [--tiny] [--dtype bfloat16|float32] [--layers 2] [--side 256] [--txt 64]
                                       [--before FOLDER] [--name NAME]

`--before FOLDER` adds an earlier qwen_nb (FOLDER/qwen_nb_before: a copy of an older tree's qwen_nb/ package, its
imports are relative) on the same weight arrays, timed in the same alternating runs: a before/after of a change.
Both qwen_nb versions run with their default switches (q/k/v fused, as their pipelines run them).

Default dtype: bfloat16 on a GPU, float32 on the CPU (bfloat16 matmuls are slow there). Writes
assets/bench/vs_mflux_<cpu|cuda|metal>.json and .png; --tiny (2 heads, 128 px, 16 text tokens: seconds on a CPU)
writes vs_mflux_<kind>_tiny.* into a temporary folder instead.
"""

import argparse
import os
import statistics
import tempfile

import mlx.core as mx
from common import print_table, time_variants, write_report
from mflux.models.qwen.model.qwen_transformer.qwen_transformer import QwenTransformer
from mlx.utils import tree_flatten

from qwen_nb.transformer import QwenImageTransformer, TransformerConfig

# mflux's module names -> diffusers' (= qwen_nb's)
RENAMES = [
    ("img_mod_linear", "img_mod.1"),
    ("txt_mod_linear", "txt_mod.1"),
    ("attn.attn_to_out.0", "attn.to_out.0"),
    ("img_ff.mlp_in", "img_mlp.net.0.proj"),
    ("img_ff.mlp_out", "img_mlp.net.2"),
    ("txt_ff.mlp_in", "txt_mlp.net.0.proj"),
    ("txt_ff.mlp_out", "txt_mlp.net.2"),
]


def diffusers_name(mflux_name: str) -> str:
    for old, new in RENAMES:
        mflux_name = mflux_name.replace(old, new)
    return mflux_name


def device_kind() -> str:
    return "cuda" if mx.cuda.is_available() else ("metal" if mx.metal.is_available() else "cpu")


class MfluxSize:
    """The part of mflux's generation `Config` its transformer reads: the image size in pixels."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-head model at 128 px: a smoke test in seconds")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--side", type=int, default=256, help="image side in pixels (tokens: (side/16)^2)")
    ap.add_argument("--txt", type=int, default=64, help="text tokens")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--before", default=None, help="a folder holding qwen_nb_before (an older qwen_nb) to time too")
    ap.add_argument("--name", default=None, help="report name (default vs_mflux_<device>)")
    a = ap.parse_args()
    kind = device_kind()
    dtype = getattr(mx, a.dtype or ("float32" if kind == "cpu" else "bfloat16"))
    # mflux's RoPE is fixed to the real axes (16, 56, 56), so the head dim stays 128 even when tiny
    heads, joint = (2, 64) if a.tiny else (24, 3584)
    if a.tiny:
        a.side, a.txt = 128, 16
    h = w = a.side // 16
    cfg = TransformerConfig(num_layers=a.layers, num_attention_heads=heads, joint_attention_dim=joint)

    # mflux's model, built lazily and cast before anything is evaluated (no float32 copy of bf16 weights)
    theirs = QwenTransformer(num_layers=a.layers, num_attention_heads=heads, joint_attention_dim=joint)
    theirs.set_dtype(dtype)
    mx.eval(theirs.parameters())
    # qwen_nb's model takes the same arrays; its own random initialisation is never evaluated
    ours = QwenImageTransformer(cfg)
    ours.load_weights([(diffusers_name(k), v) for k, v in tree_flatten(theirs.parameters())], strict=True)
    params = sum(v.size for _, v in tree_flatten(ours.parameters()))
    ours.set_switches(ours.switches)  # as the pipeline runs it: q/k/v fused
    before = None
    if a.before:
        import sys

        sys.path.insert(0, a.before)
        import qwen_nb_before.transformer as old

        before = old.QwenImageTransformer(old.TransformerConfig(**{k: getattr(cfg, k) for k in (
            "num_layers", "num_attention_heads", "joint_attention_dim")}))  # fmt: skip
        before.load_weights([(diffusers_name(k), v) for k, v in tree_flatten(theirs.parameters())], strict=True)
        before.set_switches(before.switches)

    keys = mx.random.split(mx.random.key(0), 2)
    latents = mx.random.normal((1, h * w, cfg.in_channels), key=keys[0]).astype(dtype)
    text = mx.random.normal((1, a.txt, joint), key=keys[1]).astype(dtype)
    mask = mx.ones((1, a.txt), dtype=mx.int32)  # mflux needs one; all ones, it drops it (so does the pipeline)
    sigma = mx.array([0.5])
    size = MfluxSize(a.side, a.side)
    mx.eval(latents, text, mask)

    variants = {
        "qwen_nb": lambda: ours(latents, text, sigma, (h, w)),
        **({"qwen_nb before": lambda: before(latents, text, sigma, (h, w))} if before is not None else {}),
        "mflux 0.24.0": lambda: theirs(
            t=0.5, config=size, hidden_states=latents, encoder_hidden_states=text, encoder_hidden_states_mask=mask
        ),
    }
    a_out, b_out = variants["qwen_nb"]().astype(mx.float32), variants["mflux 0.24.0"]().astype(mx.float32)
    if before is not None:
        print(f"max|qwen_nb - qwen_nb before| = {mx.abs(variants['qwen_nb before']() - a_out).max().item():.3g}")
    diff = mx.abs(a_out - b_out).max().item()
    scale = mx.abs(b_out).max().item()
    print(f"max|qwen_nb - mflux| = {diff:.3g} (max|out| {scale:.3g}), {params / 1e6:.0f} M parameters, {dtype}")

    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    results = time_variants(variants, repeats=a.repeats, warmup=a.warmup)
    print_table(results)
    ratio = results["mflux 0.24.0"]["median_s"] / results["qwen_nb"]["median_s"]
    ratio_min = results["mflux 0.24.0"]["min_s"] / results["qwen_nb"]["min_s"]
    # each mflux run against the qwen_nb run just before it: neighbours share the machine's load, so the median of
    # these ratios is the statistic least moved by other work on a shared CPU
    pairs = [m / q for q, m in zip(results["qwen_nb"]["times_s"], results["mflux 0.24.0"]["times_s"])]
    ratio_paired = statistics.median(pairs)
    print(
        f"qwen_nb is {ratio:.2f}x mflux's speed by median, {ratio_min:.2f}x by the fastest run, "
        f"{ratio_paired:.2f}x by the median of paired runs"
    )
    if before is not None:
        pairs_b = [b / q for q, b in zip(results["qwen_nb"]["times_s"], results["qwen_nb before"]["times_s"])]
        print(f"qwen_nb is {statistics.median(pairs_b):.3f}x the speed of qwen_nb before (median of paired runs)")
    config = dict(
        layers=a.layers,
        width=cfg.dim,
        heads=heads,
        joint_attention_dim=joint,
        image_px=a.side,
        image_tokens=h * w,
        text_tokens=a.txt,
        batch=1,
        dtype=str(dtype).split(".")[-1],
        parameters=params,
        repeats=a.repeats,
        warmup=a.warmup,
        max_abs_diff_outputs=diff,
        max_abs_output=scale,
        speedup_vs_mflux=round(ratio, 3),
        speedup_vs_mflux_fastest_runs=round(ratio_min, 3),
        speedup_vs_mflux_paired_median=round(ratio_paired, 3),
        speedup_vs_before_paired_median=round(statistics.median(pairs_b), 3) if before is not None else None,
        before=a.before,
        load_average_before=load_before,
        load_average_after=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    )
    notes = (
        "One transformer forward (modulations, RoPE and all), same weight arrays in both, alternating runs. "
        "qwen_nb runs with its default Switches and no text mask; mflux gets an all-ones mask, which it checks "
        "on the host and drops. On a shared machine, trust speedup_vs_mflux_paired_median most (see load_average_*)."
    )
    name = a.name or (f"vs_mflux_{kind}" + ("_tiny" if a.tiny else ""))
    path = write_report(name, config, results, notes, out_dir=tempfile.mkdtemp() if a.tiny else None)
    print("wrote", path)


if __name__ == "__main__":
    main()
