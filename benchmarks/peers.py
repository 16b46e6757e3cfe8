"""The peers of the transformer benchmarks, timed the way `/work/shared/perf/peer_probe.py` times them: random
weights built on the device, one warm-up pass set, then the median of repeats, synchronised after each call.

- diffusers' `QwenImageTransformer2DModel` (PyTorch) runs in a subprocess of another Python (the reference
  environment, which has torch and diffusers; qwen_nb's never imports them): this file is also that subprocess's
  script, so it imports nothing but the standard library at the top.
- mflux's `QwenTransformer` (MLX) runs in-process when mflux imports.

A case is one timed call: an image side in pixels and a list of passes (batch, text tokens) run back to back,
e.g. [[1, 128]] for one forward, [[1, 128], [1, 16]] for a CFG step as two passes.
"""

import json
import os
import statistics
import subprocess
import sys
import time

MARK = "PEER_RESULT "
# Small shapes for --tiny smoke runs. mflux's RoPE is fixed to the real axes (16, 56, 56): the head stays 128 wide.
TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=128, joint_attention_dim=64)


def forward_flops(side: int, batch: int, txt: int, layers: int, width: int) -> float:
    """peer_probe.py's count: the block linears (12 D^2 per token) and attention (4 S^2 D), 2 FLOPs a multiply-add."""
    n = (side // 16) ** 2 + txt
    return batch * (2 * 12 * width * width * layers * n + 4 * n * n * width * layers)


def case_flops(case: dict, layers: int, width: int) -> float:
    return sum(forward_flops(case["side"], b, t, layers, width) for b, t in case["passes"])


def summary(name: str, case: dict, times: list, peak_gb, flops: float) -> dict:
    med = statistics.median(times)
    return {
        "peer": name,
        "label": case["label"],
        "side": case["side"],
        "passes": case["passes"],
        "median_s": med,
        "min_s": min(times),
        "times_s": times,
        "peak_gb": peak_gb,
        "tflops": round(flops / med / 1e12, 2),
    }


def run_diffusers(python: str, cases: list, model_kwargs: dict, repeats: int, warmup: int, timeout: float) -> dict:
    """Time diffusers in a subprocess of `python`; returns {"results": [...], "error": str | None, "log": [...]}."""
    spec = json.dumps(dict(cases=cases, model=model_kwargs, repeats=repeats, warmup=warmup))
    out = {"results": [], "error": None, "log": []}
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(
            [python, os.path.abspath(__file__), spec],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
    except OSError as e:
        out["error"] = f"could not start {python}: {e}"
        return out
    try:
        for line in proc.stdout:  # streamed, so a log shows where the time goes
            line = line.rstrip()
            if line.startswith(MARK):
                out["results"].append(json.loads(line[len(MARK) :]))
            else:
                out["log"].append(line)
            print(f"  [diffusers {time.perf_counter() - t0:6.1f} s] {line[:200]}", flush=True)
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                out["error"] = f"timed out after {timeout:.0f} s"
                break
        proc.wait(timeout=30)
    except Exception as e:  # noqa: BLE001 - a failing peer is recorded, never fatal
        proc.kill()
        out["error"] = f"{type(e).__name__}: {e}"
    if out["error"] is None and proc.returncode:
        out["error"] = f"exit code {proc.returncode}: " + " | ".join(out["log"][-5:])
    out["log"] = out["log"][-40:]
    return out


def run_mflux(cases: list, model_kwargs: dict, dtype: str, repeats: int, warmup: int) -> dict:
    """Time mflux's QwenTransformer in this process (MLX); returns {"results": [...], "error": str | None}."""
    import gc

    import mlx.core as mx

    out = {"results": [], "error": None, "version": None}
    try:
        import mflux
        from mflux.models.qwen.model.qwen_transformer.qwen_transformer import QwenTransformer
        from mlx.utils import tree_flatten
    except ImportError as e:
        out["error"] = f"mflux does not import: {e}"
        return out
    out["version"] = getattr(mflux, "__version__", None)
    try:
        dt = getattr(mx, dtype)
        t0 = time.perf_counter()
        model = QwenTransformer(**model_kwargs)
        model.set_dtype(dt)  # before any evaluation: no float32 copy of the weights ever exists
        for blk in model.transformer_blocks:
            mx.eval(blk.parameters())
        mx.eval(model.parameters())
        width = model_kwargs.get("num_attention_heads", 24) * model_kwargs.get("attention_head_dim", 128)
        joint = model_kwargs.get("joint_attention_dim", 3584)
        layers = model_kwargs.get("num_layers", 60)
        params = sum(v.size for _, v in tree_flatten(model.parameters()))
        print(f"  [mflux] built {params / 1e9:.2f} B parameters in {time.perf_counter() - t0:.1f} s", flush=True)

        class Size:  # the part of mflux's generation Config its transformer reads
            def __init__(self, side):
                self.height = self.width = side

        for case in cases:
            side = case["side"]
            inputs = []
            for b, t in case["passes"]:
                x = mx.random.normal((b, (side // 16) ** 2, 64)).astype(dt)
                e = mx.random.normal((b, t, joint)).astype(dt)
                m = mx.ones((b, t), dtype=mx.int32)
                inputs.append((x, e, m))
            mx.eval(inputs)
            size = Size(side)

            def call(inputs=inputs, size=size):
                return [
                    model(t=0.5, config=size, hidden_states=x, encoder_hidden_states=e, encoder_hidden_states_mask=m)
                    for x, e, m in inputs
                ]

            for _ in range(warmup):
                mx.eval(call())
            mx.synchronize()
            times, peak = [], 0.0
            for _ in range(repeats):
                gc.collect()
                mx.reset_peak_memory()
                t = time.perf_counter()
                mx.eval(call())
                mx.synchronize()
                times.append(time.perf_counter() - t)
                peak = max(peak, mx.get_peak_memory() / 1e9)
            r = summary("mflux", case, times, round(peak, 3), case_flops(case, layers, width))
            print(f"  [mflux] {case['label']}: {r['median_s'] * 1e3:.2f} ms, {r['tflops']} TFLOP/s", flush=True)
            out["results"].append(r)
    except Exception as e:  # noqa: BLE001 - a failing peer is recorded, never fatal
        out["error"] = f"{type(e).__name__}: {e}"
        print(f"  [mflux] failed: {out['error']}", flush=True)
    model = None
    gc.collect()
    mx.clear_cache()
    return out


def diffusers_worker(spec: dict) -> None:
    """The subprocess: build diffusers' transformer on cuda (bf16) or the CPU (float32), time each case."""
    import gc

    import diffusers
    import torch
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16 if cuda else torch.float32
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {dev}, {dt}", flush=True)
    kw = spec["model"]
    t0 = time.perf_counter()
    torch.set_default_dtype(dt)
    with dev:
        model = QwenImageTransformer2DModel(**kw).eval()
    torch.set_default_dtype(torch.float32)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    width = kw.get("num_attention_heads", 24) * kw.get("attention_head_dim", 128)
    joint = kw.get("joint_attention_dim", 3584)
    layers = kw.get("num_layers", 60)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for case in spec["cases"]:
        side = case["side"]
        h = w = side // 16
        inputs = []
        for b, t in case["passes"]:
            x = torch.randn(b, h * w, 64, device=dev, dtype=dt)
            e = torch.randn(b, t, joint, device=dev, dtype=dt)
            m = torch.ones(b, t, device=dev, dtype=torch.bool)
            ts = torch.full((b,), 0.5, device=dev)
            inputs.append((x, e, m, ts, [[(1, h, w)]] * b))

        def call(inputs=inputs):
            return [
                model(
                    hidden_states=x,
                    encoder_hidden_states=e,
                    encoder_hidden_states_mask=m,
                    timestep=ts,
                    img_shapes=shapes,
                    return_dict=False,
                )[0]
                for x, e, m, ts, shapes in inputs
            ]

        with torch.inference_mode():
            for _ in range(spec["warmup"]):
                call()
            sync()
            times, peak = [], 0
            for _ in range(spec["repeats"]):
                gc.collect()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                call()
                sync()
                times.append(time.perf_counter() - t)
                peak = max(peak, torch.cuda.max_memory_allocated() if cuda else 0)
        r = summary(f"diffusers {diffusers.__version__}", case, times, round(peak / 1e9, 3) if cuda else None,
                    case_flops(case, layers, width))  # fmt: skip
        r["torch"] = torch.__version__
        print(MARK + json.dumps(r), flush=True)


if __name__ == "__main__":
    diffusers_worker(json.loads(sys.argv[1]))
