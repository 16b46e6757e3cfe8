"""The least time a 20-step CFG edit can take on a card at exact parity, from the card's kernel ceilings: arithmetic,
not a timing.

    python benchmarks/edit_floor.py [--ceilings h200] [--pipeline assets/bench/edit_pipeline_h200.json]

For the edits `bench_edit_pipeline.py` times (a 1024x1024 output from one and from two 1024x1024 pictures), it counts
the tokens of each CFG pass (noise + the pictures' latents + the prompt's text with the pictures' vision tokens, as
the pipeline builds them with that benchmark's processor and prompts) and the FLOPs of one forward: the blocks'
linears, 2 x 12 D^2 per token (image stream on the image tokens, text stream on the text tokens: fused q/k/v, out,
MLP in and out), and the joint attention, 4 S^2 D (QK^T and PV). Norms, RoPE, modulation and gating are left out, so
the floor is a lower bound. Each part at the card's measured rate (bf16 matmul, `mx.fast.scaled_dot_product_attention`)
gives the forward's floor; 2 x steps of them plus the measured encoding, picture encoding and decode give the edit's.
Writes assets/bench/edit_floor_<card>.json (QWEN_NB_BENCH_OUT redirects) with the measured edit beside it.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_edit_pipeline as bench  # noqa: E402
from common import ASSETS  # noqa: E402

from qwen_nb.transformer import TransformerConfig  # noqa: E402

# measured on the lent H200 (../shared/perf/PEERS.md, "NVIDIA H200, 2026-12-02"; ../shared/gpu/README.md): MLX 0.32.4
# bf16 matmul 660 TFLOP/s at 8192^3 and up to 730 at other shapes, SDPA 468 TFLOP/s at Qwen-Image's 1024^2 shape
CEILINGS = {
    "h200": {
        "device": "NVIDIA H200 (cuda)",
        "matmul_tflops": 730.0,  # the best MLX bf16 matmul rate measured there (the floor takes the most favourable)
        "attention_tflops": 468.0,
        "source": "../shared/perf/PEERS.md (H200, 2026-12-02: matmul 660 at 8192^3, SDPA 468 at the 1024^2 shape) "
        "and ../shared/gpu/README.md (MLX bf16 matmul 690-730 TFLOP/s)",
    }
}


def text_tokens(count: int) -> dict:
    """{"prompt": L, "negative": L} of the benchmark's edit from `count` pictures, as the pipeline encodes them."""
    import mlx.core as mx

    sizes = bench.FULL
    pipe = bench.build_qwen_nb(sizes)  # lazy: nothing of the models is computed
    pictures = pipe.pictures(bench.pictures(count))
    out = {}
    for key, text in (("prompt", bench.prompt_for(count)), ("negative", bench.NEGATIVE)):
        inputs = pipe.processor(pipe.prompt_text(text, count), pictures.condition)
        out[key] = int(inputs["input_ids"].shape[-1]) - 64  # diffusers' edit drop index
    del pipe
    mx.clear_cache()
    return out


def forward_flops(config: TransformerConfig, image_tokens: int, text: int) -> dict:
    """FLOPs of one forward's blocks: the linears (2 x 12 D^2 a token, each stream on its tokens) and attention."""
    D, S = config.dim, image_tokens + text
    linears = 2 * 12 * D * D * S * config.num_layers
    attention = 4 * S * S * D * config.num_layers
    return {"tokens": S, "linears": linears, "attention": attention}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ceilings", default="h200", choices=list(CEILINGS))
    ap.add_argument("--pipeline", default=str(ASSETS / "edit_pipeline_h200.json"), help="the measured edits")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    card = CEILINGS[a.ceilings]
    measured = json.loads(Path(a.pipeline).read_text())["results"]
    config = TransformerConfig()
    side = 1024 // 16  # latent tokens a side of a 1024x1024 picture (8x VAE, 2x2 patches)
    targets = {1: 11.0, 2: 18.0}  # the issue's, seconds
    results = {}
    for label, count in bench.VARIANTS.items():
        lengths = text_tokens(count)
        image = (1 + count) * side * side
        passes = {k: forward_flops(config, image, L) for k, L in lengths.items()}
        mm, att = card["matmul_tflops"] * 1e12, card["attention_tflops"] * 1e12
        step_floor = sum(p["linears"] / mm + p["attention"] / att for p in passes.values())
        ran = measured[f"qwen_nb {label} (sequenced)"]
        fixed = ran["text_and_vision_s"] + ran["pictures_vae_s"] + ran["decode_s"]
        flops_step = sum(p["linears"] + p["attention"] for p in passes.values())
        whole = a.steps * step_floor + fixed
        results[label] = {
            "pictures": count,
            "image_tokens": image,
            "text_tokens": lengths,
            "step_tflop": round(flops_step / 1e12, 1),
            "attention_share": round(sum(p["attention"] for p in passes.values()) / flops_step, 3),
            "step_floor_s": round(step_floor, 4),
            "encode_and_decode_s": round(fixed, 3),
            "floor_s": round(whole, 2),
            "target_s": targets[count],
            "measured_step_s": round(ran["step_median_s"], 4),
            "measured_s": round(ran["median_s"], 2),
            "measured_tflops": round(flops_step / ran["step_median_s"] / 1e12),
            "floor_over_target": round(whole / targets[count], 3),
        }
    report = {
        "name": f"edit_floor_{a.ceilings}",
        "device": card["device"],
        "kind": "derived: FLOPs counted, divided by kernel rates measured on the card; no timing made by this script",
        "config": {
            "steps": a.steps,
            "cfg": "true CFG: two forwards a step (the prompt's and the negative's, of their own text lengths)",
            "transformer": {"dim": config.dim, "layers": config.num_layers},
            "ceilings": card,
            "measured_edits": Path(a.pipeline).name,
            "text_tokens": "the benchmark's, with its tiny test tokenizer: the prompt's own words make fewer tokens than "
            "with the real vocabulary (the pictures' vision tokens are the real count), so the real floor is a little "
            "higher",
        },
        "results": results,
    }
    out_dir = Path(os.environ.get("QWEN_NB_BENCH_OUT") or ASSETS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{report['name']}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    for label, r in results.items():
        print(
            f"{label}: {r['step_tflop']} TFLOP a step, floor {r['step_floor_s']} s a step, {r['floor_s']} s the edit "
            f"(target {r['target_s']} s; measured {r['measured_s']} s at {r['measured_tflops']} TFLOP/s)"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
