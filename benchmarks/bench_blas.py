"""MLX's CPU matmul speed with the wheel's own BLAS and with Debian's OpenBLAS preloaded, float32 and bfloat16: the
figures the README quotes for why qwen_nb preloads OpenBLAS and computes in float32 on a CPU.

    python benchmarks/bench_blas.py        # writes assets/bench/blas_cpu.json (each case in a fresh process)
"""

import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qwen_nb.blas import OPENBLAS  # noqa: E402

N, REPEATS = 1024, 5
CHILD = f"""
import time, mlx.core as mx
for dtype in ("float32", "bfloat16"):
    a = mx.random.normal(({N}, {N})).astype(getattr(mx, dtype)); mx.eval(a)
    mx.eval(a @ a)
    times = []
    for _ in range({REPEATS}):
        t = time.perf_counter(); mx.eval(a @ a); times.append(time.perf_counter() - t)
    times.sort()
    print(dtype, 2 * {N}**3 / times[len(times) // 2] / 1e9)
"""


def gflops(preload: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = OPENBLAS
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout
    return {line.split()[0]: round(float(line.split()[1]), 1) for line in out.splitlines()}


def main() -> None:
    import mlx.core as mx

    results = {"reference BLAS (the wheel's)": gflops(False)}
    if os.path.exists(OPENBLAS):
        results["OpenBLAS preloaded"] = gflops(True)
    report = {
        "what": f"median GFLOP/s of a {N}x{N} @ {N}x{N} matmul on MLX's CPU device, {REPEATS} repeats, fresh processes",
        "date": date.today().isoformat(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores",
        "mlx": mx.__version__,
        "gflops": results,
    }
    path = ROOT / "assets" / "bench" / "blas_cpu.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
