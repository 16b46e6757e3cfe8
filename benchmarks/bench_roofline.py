"""Where an edit step's time goes: the transformer block's matmuls and its attention timed alone at the edit
pipelines' sequence lengths, against one whole block, so the step's floor on this card is measured, not guessed.

    python benchmarks/bench_roofline.py [--tiny] [--text 256] [--repeats 7]

For each sequence (text-to-image: 4096 noise tokens; an edit with one and two 1024x1024 pictures: 8192 and 12288
image tokens; plus --text text tokens) it times, in bfloat16:
  - every linear of a block as the image stream runs it (fused q/k/v 3072->9216, out 3072->3072, MLP 3072->12288 and
    12288->3072), the text stream's on the text tokens, and reports TFLOP/s;
  - mx.fast.scaled_dot_product_attention over the joint sequence (24 heads of 128): TFLOP/s;
  - one whole compiled transformer block (QwenImageTransformer with 4 layers: the forward / 4 less the embedding);
and the sum of the parts x 60 (the forward's floor with these kernels) against 60 blocks measured.
Writes assets/bench/roofline_<kind>.json (QWEN_NB_BENCH_OUT redirects). `--tiny`: a CPU smoke test.
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import device_name, print_table, sync, time_variants, write_report  # noqa: E402

from qwen_nb.pipeline import materialize  # noqa: E402
from qwen_nb.transformer import QwenImageTransformer, TransformerConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    cfg = TransformerConfig.tiny(num_layers=4) if a.tiny else TransformerConfig(num_layers=4)
    heads, hd = cfg.num_attention_heads, cfg.attention_head_dim
    D, mlp = cfg.dim, 4 * cfg.dim  # FeedForward's hidden width: 4 x the model's
    side = 64 if not a.tiny else 8  # latent tokens per side of a 1024x1024 picture (16 px each)
    dtype = mx.bfloat16 if not a.tiny else mx.float32
    layers = TransformerConfig().num_layers  # the real checkpoint's depth, for the per-forward figures
    cases = {"text-to-image": 1, "edit, 1 picture": 2, "edit, 2 pictures": 3}
    L = a.text
    results, summary = {}, {}
    model = QwenImageTransformer(cfg)
    model.set_dtype(dtype)
    materialize(model)
    mx.random.seed(0)
    txt = mx.random.normal((1, L, cfg.joint_attention_dim)).astype(dtype)
    table = model.modulations(mx.array([0.7]), dtype)  # the pipeline's precomputed modulation row
    sync(table.arrays())

    def measure(name, frames):
        N = frames * side * side
        S = N + L
        x = mx.random.normal((N, D)).astype(dtype)
        t = mx.random.normal((L, D)).astype(dtype)
        ws = {
            "qkv": (mx.random.normal((3 * D, D)) * 0.02).astype(dtype),
            "out": (mx.random.normal((D, D)) * 0.02).astype(dtype),
            "mlp_in": (mx.random.normal((mlp, D)) * 0.02).astype(dtype),
            "mlp_out": (mx.random.normal((D, mlp)) * 0.02).astype(dtype),
        }
        h = mx.random.normal((N, mlp)).astype(dtype)
        ht = mx.random.normal((L, mlp)).astype(dtype)
        q = mx.random.normal((1, heads, S, hd)).astype(dtype)
        k, v = mx.random.normal(q.shape).astype(dtype), mx.random.normal(q.shape).astype(dtype)
        mx.eval(x, t, h, ht, q, k, v, *ws.values())

        def linears(xi, hi):
            return [xi @ ws["qkv"].T, xi @ ws["out"].T, xi @ ws["mlp_in"].T, hi @ ws["mlp_out"].T]

        variants = {
            "image linears": lambda: linears(x, h),
            "text linears": lambda: linears(t, ht),
            "attention": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=hd**-0.5),
        }
        img = mx.random.normal((1, N, cfg.in_channels)).astype(dtype)
        sync(img)
        grids = [(side, side)] * frames
        variants["4 blocks (whole forward)"] = lambda: model(img, txt, None, grids, mods=table)
        img2, txt2 = mx.concatenate([img, img]), mx.concatenate([txt, txt])
        variants["4 blocks, a batch of 2 (batched CFG)"] = lambda: model(img2, txt2, None, grids, mods=table)
        timed = time_variants({k: (lambda f=f: sync(f())) for k, f in variants.items()}, repeats=a.repeats, warmup=2)
        per_block_linear_flops = 2 * (N + L) * (3 * D * D + D * D + 2 * D * mlp)
        attn_flops = 4 * heads * S * S * hd
        lin_s = timed["image linears"]["median_s"] + timed["text linears"]["median_s"]
        att_s = timed["attention"]["median_s"]
        block_s = timed["4 blocks (whole forward)"]["median_s"] / 4
        for k, r in timed.items():
            results[f"{name}: {k}"] = r
        summary[name] = {
            "tokens": S,
            "linear_tflops": round(per_block_linear_flops / lin_s / 1e12, 1),
            "attention_tflops": round(attn_flops / att_s / 1e12, 1),
            "linear_ms_per_block": round(lin_s * 1e3, 3),
            "attention_ms_per_block": round(att_s * 1e3, 3),
            "block_ms": round(block_s * 1e3, 3),
            "parts_share_of_block": round((lin_s + att_s) / block_s, 3),
            "forward_floor_s": round(layers * (lin_s + att_s), 4),
            "forward_measured_s (60 x block)": round(layers * block_s, 4),
            "cfg_step_floor_s": round(2 * layers * (lin_s + att_s), 4),
            "batch_of_2_vs_two_forwards": round(
                timed["4 blocks, a batch of 2 (batched CFG)"]["median_s"] / (2 * block_s * 4), 3
            ),
        }
        print(name, summary[name])

    for name, frames in cases.items():
        measure(name, frames)
    print_table(results)
    config = dict(tiny=a.tiny, width=D, heads=heads, head_dim=hd, mlp=mlp, text_tokens=L, layers=layers,
                  dtype=str(dtype), device=device_name())  # fmt: skip
    name = "roofline_tiny" if a.tiny else ("roofline_" + ("h200" if "H200" in device_name() else "gpu"))
    notes = (
        "linears: the block's four matmul shapes (q/k/v fused) on the image and the text tokens; attention: "
        "mx.fast.scaled_dot_product_attention over the joint sequence; block: a 4-layer QwenImageTransformer's "
        "forward / 4 (its embedding and output projection included, so a slight overestimate). forward_floor_s = 60 x "
        "(linears + attention): what one forward cannot go under with these kernels; cfg_step_floor_s: two of them."
    )
    config["summary"] = summary
    print(write_report(name, config, results, notes))


if __name__ == "__main__":
    main()
