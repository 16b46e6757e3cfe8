"""Text-encoder speed and memory: qwen_nb's Qwen2.5-VL-7B language model in MLX beside transformers' in torch.

Random weights with the real 7B config in bfloat16 (`--tiny`: the 2-layer test config, seconds on a CPU), one
prompt of `--tokens` tokens inside the Qwen-Image template (34 + tokens + 5 ids), batch 1. MLX variants: the
default (mx.fast kernels) and the naive attention/RMSNorm (`Switches.baseline()`), sharing one set of weights.
The torch peer is transformers' `Qwen2_5_VLTextModel` (the language model only, SDPA attention) built with
random init directly on `cuda` in bf16 (on the CPU when there is no CUDA); it runs in a child process so the two
frameworks never share the device's memory, with `--torch-python` (default: this interpreter) when torch lives
in another environment. Each side gets what its pipeline passes for one unpadded prompt: qwen_nb's
`encode_prompt` the plain causal mask, diffusers an all-ones attention_mask. Peak memory includes the resident
weights in both columns.

Usage: python benchmarks/bench_text_encoder.py [--tiny] [--tokens 100] [--torch-python PATH] [--no-torch]
Writes assets/bench/text_encoder.json + .png (`text_encoder_tiny` with --tiny; QWEN_NB_BENCH_OUT redirects).
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEMPLATE_TOKENS = 34 + 5  # the system turn + "<|im_start|>user\n" before the prompt, the assistant turn after

REAL = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
)
TINY = dict(
    vocab_size=640,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
)


def mlx_variants(cfg: dict, seq_len: int, repeats: int, warmup: int) -> tuple[dict, dict]:
    import mlx.core as mx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import time_variants

    from qwen_nb.switches import Switches
    from qwen_nb.text_encoder import QwenTextEncoder, TextEncoderConfig

    config = TextEncoderConfig(**cfg, head_dim=cfg["hidden_size"] // cfg["num_attention_heads"])
    model = QwenTextEncoder(config)  # parameters are lazy: nothing is computed yet
    model.set_dtype(mx.bfloat16)  # so each float32 init is cast before it exists as a whole model
    # evaluate piece by piece, so only one float32 initial tensor exists at a time
    mx.eval(model.model.embed_tokens.parameters(), model.model.norm.parameters())
    for layer in model.model.layers:
        mx.eval(layer.parameters())
    naive = QwenTextEncoder(config, Switches.baseline())
    naive.update(model.parameters())  # the same arrays: no second copy
    weights_gb = mx.get_active_memory() / 1e9

    mx.random.seed(0)
    ids = mx.random.randint(0, cfg["vocab_size"], (1, seq_len))
    results = time_variants(
        {
            "qwen_nb MLX bf16 (mx.fast attention, RMSNorm, RoPE)": lambda: model(ids),
            "qwen_nb MLX bf16, naive attention + RMSNorm": lambda: naive(ids),
        },
        repeats=repeats,
        warmup=warmup,
    )
    return results, {"mlx_weights_gb": round(weights_gb, 3)}


def torch_peer(cfg: dict, seq_len: int, repeats: int, warmup: int) -> dict:
    """Runs in the child process: transformers' text model in bf16, timed like common.time_variants."""
    import torch
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    half = cfg["hidden_size"] // cfg["num_attention_heads"] // 2
    t = half // 4
    section = [t, (half - t) // 2, half - t - (half - t) // 2]  # the real [16, 24, 24] at head_dim 128
    text_config = Qwen2_5_VLTextConfig(
        **{k: v for k, v in cfg.items() if k != "rope_theta"},
        rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"], "mrope_section": section},
        use_cache=False,
    )
    text_config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with device:
        model = Qwen2_5_VLTextModel(text_config).eval()
    torch.set_default_dtype(torch.float32)
    weights_gb = torch.cuda.memory_allocated() / 1e9 if cuda else None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (1, seq_len), generator=g).to(device)
    mask = torch.ones_like(ids)

    def call():
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        if cuda:
            torch.cuda.synchronize()
        return out

    for _ in range(warmup):
        call()
    times, peak = [], 0.0
    for _ in range(repeats):
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
        if cuda:
            peak = max(peak, torch.cuda.max_memory_allocated() / 1e9)
    name = f"transformers {__import__('transformers').__version__} torch {torch.__version__} bf16 sdpa ({device.type})"
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    return {
        "name": name,
        "device": device_name,
        "weights_gb": None if weights_gb is None else round(weights_gb, 3),
        "result": {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "times_s": times,
            "peak_gb": round(peak, 3),  # 0.0 on the CPU: not measured
        },
    }


def run_torch_child(python: str, cfg: dict, seq_len: int, repeats: int, warmup: int) -> dict | None:
    job = json.dumps({"cfg": cfg, "seq_len": seq_len, "repeats": repeats, "warmup": warmup})
    proc = subprocess.run([python, __file__, "--torch-child", job], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TORCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"torch peer skipped ({python}): {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        return None
    return json.loads(lines[-1][len("TORCH_RESULT ") :])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the 2-layer test config: a smoke test on a CPU")
    ap.add_argument("--tokens", type=int, default=100, help="prompt tokens (the template adds 39)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--torch-python", default=sys.executable, help="interpreter with torch + transformers")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.torch_child:
        job = json.loads(args.torch_child)
        print("TORCH_RESULT " + json.dumps(torch_peer(job["cfg"], job["seq_len"], job["repeats"], job["warmup"])))
        return

    cfg = TINY if args.tiny else REAL
    seq_len = args.tokens + TEMPLATE_TOKENS
    results, extra = mlx_variants(cfg, seq_len, args.repeats, args.warmup)
    notes = [
        f"Encoder forward of one prompt: {args.tokens} prompt tokens + {TEMPLATE_TOKENS} template tokens = "
        f"{seq_len} ids, batch 1, random bf16 weights. Peak memory includes the weights."
    ]
    if not args.no_torch:
        peer = run_torch_child(args.torch_python, cfg, seq_len, args.repeats, args.warmup)
        if peer:
            results[peer["name"]] = peer["result"]
            extra.update(torch_weights_gb=peer["weights_gb"], torch_device=peer["device"])
            if peer["weights_gb"] is None:
                notes.append("The torch peer ran on the CPU: no peak memory recorded for it.")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import print_table, write_report

    print_table(results)
    config = {"text_encoder": cfg, "tiny": args.tiny, "prompt_tokens": args.tokens, "seq_len": seq_len, **extra}
    path = write_report("text_encoder_tiny" if args.tiny else "text_encoder", config, results, " ".join(notes))
    print(path)


if __name__ == "__main__":
    main()
