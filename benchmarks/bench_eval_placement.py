"""Where `mx.eval` goes in the denoising loop, at full size: time per step and peak memory of each placement (issue 7;
notebook 10 runs the same experiment on the small model and draws this script's report).

A short loop (default 4 steps at 512x512, CFG as two passes: the conditional text of 128 tokens, the
unconditional of 12, `cfg_combine`, an Euler step) of the full-size transformer with random weights in bfloat16,
under five policies: `mx.eval` after each step (the seed's), after each block (through the transformer's
`block_hook`), every 10 blocks, once at the end (all steps one graph), and `mx.async_eval` after each step (Python
builds step i+1's graph while step i runs). Every policy must give the same latents: the max |difference| to
"per step" is printed and recorded. Timings: warm-up, then alternating repeats of the whole loop, median; the
report's `median_s` is seconds per step; peak memory includes the weights.

    python benchmarks/bench_eval_placement.py [--tiny] [--steps 4] [--layers 60] [--only per_step,async]
        [--peers --peer-python PY]

`--peers` adds diffusers' CFG step (two eager passes, same shapes) from a subprocess of `--peer-python`, for
scale. Writes assets/bench/eval_placement_<kind>.json + .png ($QWEN_NB_BENCH_OUT or --out); `--tiny`
(TransformerConfig.tiny(num_layers=4), float32, 128 px, 16 + 6 text tokens, every 2 blocks) is a CPU smoke test
in seconds and writes to a temporary folder unless --out is given.
"""

import argparse
import gc
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import peers as peer_lib
from bench_transformer import build, device_kind, gb
from common import time_variants, write_report

from qwen_nb.sampling import Schedule, denoise, eval_every_blocks
from qwen_nb.scheduler import SchedulerConfig
from qwen_nb.transformer import TransformerConfig

CFG_SCALE = 4.0
KEYS = ("per_step", "per_block", "every_k", "at_end", "async")


def policy_names(every: int) -> dict:
    return {
        "per_step": "per step",
        "per_block": "per block",
        "every_k": f"every {every} blocks",
        "at_end": "once at the end",
        "async": "async per step",
    }


def make_denoise(model, noise, cond, uncond, grid, steps: int, every: int):
    """The package's CFG loop (qwen_nb.sampling.denoise) with mx.eval placed by a policy key at the caller: the
    loop is the same generator for every policy; returns the final latents (evaluated)."""
    schedule = Schedule.make(SchedulerConfig(), steps, grid[0] * grid[1])
    hooks = {"per_block": eval_every_blocks(1), "every_k": eval_every_blocks(every)}

    def run(policy):
        loop = denoise(
            model, noise, (cond, None), schedule=schedule, grid=grid, negative=(uncond, None), cfg_scale=CFG_SCALE,
            block_hook=hooks.get(policy),
        )  # fmt: skip
        for x in loop:
            if policy in ("per_step", "per_block", "every_k"):
                mx.eval(x)
            elif policy == "async":
                mx.async_eval(x)  # step i computes while Python builds step i + 1
        mx.eval(x)  # "at_end" evaluates only here
        return x

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 4-block tiny model in float32: a CPU smoke test")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default 60; tiny 4)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--side", type=int, default=None, help="image side in pixels (default 512; tiny 128)")
    ap.add_argument("--txt", type=int, default=None, help="conditional text tokens (default 128; tiny 16)")
    ap.add_argument("--uncond-txt", type=int, default=None, help="unconditional text tokens (default 12; tiny 6)")
    ap.add_argument("--every", type=int, default=None, help="'every k blocks' policy (default 10; tiny 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="warm-up loops per policy, the checking loop included")
    ap.add_argument("--only", default="", help=f"comma-separated policies of {','.join(KEYS)}")
    ap.add_argument("--peers", action="store_true", help="add diffusers' CFG step (needs --peer-python)")
    ap.add_argument("--peer-python", default=None, help="a Python with torch + diffusers")
    ap.add_argument("--peer-timeout", type=float, default=300)
    ap.add_argument("--out", default=None, help="report folder (default $QWEN_NB_BENCH_OUT or assets/bench)")
    a = ap.parse_args()
    keys = [k.strip() for k in a.only.split(",") if k.strip()] or list(KEYS)
    bad = [k for k in keys if k not in KEYS]
    if bad:
        ap.error(f"unknown policies {bad}; choose from {', '.join(KEYS)}")
    if "per_step" not in keys:
        keys.insert(0, "per_step")  # the reference every other policy is compared with
    a.warmup = max(a.warmup, 1)
    kind = device_kind()
    if a.tiny:
        config = TransformerConfig.tiny(num_layers=a.layers or 4)
        dtype, side, txt, utxt, every = mx.float32, a.side or 128, a.txt or 16, a.uncond_txt or 6, a.every or 2
    else:
        config = TransformerConfig(**({"num_layers": a.layers} if a.layers else {}))
        dtype, side, txt, utxt, every = mx.bfloat16, a.side or 512, a.txt or 128, a.uncond_txt or 12, a.every or 10
    names = policy_names(every)
    name = f"eval_placement_{kind}" + ("_tiny" if a.tiny else "")
    out_dir = Path(a.out) if a.out else (Path(tempfile.mkdtemp()) if a.tiny else None)
    grid = (side // 16, side // 16)
    print(f"{name}: {config.num_layers} blocks of width {config.dim}, {dtype}, {side}x{side} px, {a.steps} steps, "
          f"texts {txt}/{utxt} tokens; policies {[names[k] for k in keys]}; device {mx.default_device()}, "
          f"MLX {mx.__version__}", flush=True)  # fmt: skip

    t0 = time.perf_counter()
    model = build(config, dtype)
    weights_gb = mx.get_active_memory() / 1e9
    k = mx.random.split(mx.random.key(0), 3)
    noise = mx.random.normal((1, grid[0] * grid[1], config.in_channels), key=k[0]).astype(dtype)
    cond = mx.random.normal((1, txt, config.joint_attention_dim), key=k[1]).astype(dtype)
    uncond = mx.random.normal((1, utxt, config.joint_attention_dim), key=k[2]).astype(dtype)
    mx.eval(noise, cond, uncond)
    denoise = make_denoise(model, noise, cond, uncond, grid, a.steps, every)

    errors, outs, ok = {}, {}, {}
    for key in keys:
        t = time.perf_counter()
        try:
            outs[key] = denoise(key)
            ok[names[key]] = lambda key=key: denoise(key)
            print(f"  {names[key]}: first loop {time.perf_counter() - t:.2f} s; {gb()}", flush=True)
        except Exception as e:  # noqa: BLE001 - a failing policy is recorded, never fatal
            errors[names[key]] = f"{type(e).__name__}: {e}"
            print(f"  {names[key]}: FAILED {errors[names[key]]}", flush=True)
    ref = np.array(outs["per_step"].astype(mx.float32)) if "per_step" in outs else None
    diffs = {}
    for key, o in outs.items():
        o = np.array(o.astype(mx.float32))
        diffs[names[key]] = float(np.nanmax(np.abs(o - ref))) if ref is not None else None
        print(f"  {names[key]:18s} max|diff to per step| = {diffs[names[key]]:.3g}; "
              f"finite: {bool(np.isfinite(o).all())}", flush=True)  # fmt: skip
    outs = None
    gc.collect()
    t = time.perf_counter()
    try:
        timed = time_variants(ok, a.repeats, a.warmup - 1)
    except Exception as e:  # noqa: BLE001 - fall back to one policy at a time
        print(f"side-by-side timing failed ({type(e).__name__}: {e}); one at a time", flush=True)
        timed = {}
        for n, fn in ok.items():
            try:
                timed.update(time_variants({n: fn}, a.repeats, 0))
            except Exception as e2:  # noqa: BLE001
                errors[n] = f"{type(e2).__name__}: {e2}"
    print(f"timed {len(timed)} policies in {time.perf_counter() - t:.1f} s", flush=True)

    results = {}
    for n, r in timed.items():
        results[n] = {
            "median_s": r["median_s"] / a.steps,  # per step
            "min_s": r["min_s"] / a.steps,
            "loop_times_s": r["times_s"],
            "peak_gb": r["peak_gb"],
            "peak_above_weights_gb": round(r["peak_gb"] - weights_gb, 3),
            "max_abs_diff_vs_per_step": diffs.get(n),
        }
    model = None
    gc.collect()
    mx.clear_cache()

    peer = None
    if a.peers:
        if not a.peer_python:
            errors["peers/diffusers"] = "no --peer-python given"
        else:
            kwargs = dict(peer_lib.TINY, num_layers=config.num_layers) if a.tiny else {"num_layers": config.num_layers}
            case = {"label": f"CFG step {side} (two passes)", "side": side, "passes": [[1, txt], [1, utxt]]}
            d = peer_lib.run_diffusers(a.peer_python, [case], kwargs, max(a.repeats, 3), 2, a.peer_timeout)
            if d["error"]:
                errors["peers/diffusers"] = d["error"]
            for r in d["results"]:
                peer = r
                results[f"peer: {r['peer']} (eager torch), per step"] = {**r, "section": "peers"}

    print(f"\n{'policy':44s} {'ms/step':>9s} {'min':>9s} {'peak GB':>8s} {'max|diff|':>10s}")
    for n, r in results.items():
        d = r.get("max_abs_diff_vs_per_step")
        print(f"{n:44s} {r['median_s'] * 1e3:9.2f} {r['min_s'] * 1e3:9.2f} {r.get('peak_gb') or 0:8.2f} "
              f"{'' if d is None else f'{d:10.3g}'}")  # fmt: skip
    for n, e in errors.items():
        print(f"  ERROR {n}: {e}")
    config_out = dict(
        policies=[names[k] for k in keys],
        steps=a.steps,
        layers=config.num_layers,
        width=config.dim,
        dtype=str(dtype).split(".")[-1],
        image_px=side,
        grid=list(grid),
        text_tokens=txt,
        uncond_text_tokens=utxt,
        cfg_scale=CFG_SCALE,
        every_k_blocks=every,
        repeats=a.repeats,
        warmup=a.warmup,
        weights_gb=round(weights_gb, 3),
        time_unit="median_s and min_s: seconds per denoising step (two transformer passes + cfg_combine + Euler)",
        errors=errors,
        peer=peer,
    )
    notes = (
        "Random weights. The same loop under each mx.eval placement; median over alternating repeats of the "
        "whole loop, divided by the steps. peak_gb includes the weights (weights_gb). The peer entry (if any) is "
        "diffusers' two passes of one CFG step in eager PyTorch, for scale; it is not an eval placement."
    )
    path = write_report(name, config_out, results, notes, out_dir=out_dir)
    print(f"total {time.perf_counter() - t0:.1f} s; wrote {path}", flush=True)


if __name__ == "__main__":
    main()
