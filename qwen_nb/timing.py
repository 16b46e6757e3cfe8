"""Timing MLX code fairly: warm-up, variants alternated repeat by repeat, medians. The notebooks and the
benchmarks time with this one function."""

import gc
import statistics
import time

import mlx.core as mx


def sync(*arrays) -> None:
    """Evaluate and wait: `mx.eval` of any tree of arrays (other leaves are skipped), then the device is drained."""
    mx.eval(*arrays)
    mx.synchronize()


def time_variants(variants: dict, repeats: int = 5, warmup: int = 1, prepare: dict | None = None) -> dict:
    """Time several zero-argument callables side by side (each returns arrays to evaluate): warm each up, then
    alternate them repeat by repeat so drift (thermal state, other load) hits all alike. `prepare` {name: fn} runs
    before each call of that variant, outside the timing (e.g. setting a model's switches).
    Returns {name: {"median_s", "min_s", "times_s", "peak_gb"}}."""
    prepare = prepare or {}
    nothing = lambda: None  # noqa: E731
    for name, fn in variants.items():
        for _ in range(warmup):
            prepare.get(name, nothing)()
            sync(fn())
    times = {k: [] for k in variants}
    peaks = {k: 0.0 for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            prepare.get(name, nothing)()
            gc.collect()
            mx.reset_peak_memory()
            t = time.perf_counter()
            sync(fn())
            times[name].append(time.perf_counter() - t)
            peaks[name] = max(peaks[name], mx.get_peak_memory() / 1e9)
    return {
        k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": v, "peak_gb": round(peaks[k], 3)}
        for k, v in times.items()
    }
