"""Shared timing and reporting for the benchmark scripts: warm-up, alternating repeats, medians, JSON + chart.

Every script runs its variants side by side in one process, on whatever device MLX has (CPU here, CUDA on a
lent NVIDIA card, Metal on a Mac), and writes `assets/bench/<name>.json` (device, MLX version, date, config,
per-variant median seconds and peak memory) plus a bar chart next to it.
"""

import datetime
import json
import os
import platform
from pathlib import Path

import mlx.core as mx

from qwen_nb.timing import sync, time_variants  # noqa: F401 (the benchmarks import them from here)

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets" / "bench"


def device_name() -> str:
    """A readable name of the device MLX computes on, e.g. 'NVIDIA H100 80GB HBM3 (cuda)' or 'Apple M3 Max (gpu)'."""
    info = mx.device_info()
    name = info.get("device_name") or info.get("architecture") or platform.processor() or "unknown"
    kind = "cuda" if mx.cuda.is_available() else ("metal" if mx.metal.is_available() else "cpu")
    if kind == "cpu":
        name = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    return f"{name} ({kind})"


def write_report(name: str, config: dict, results: dict, notes: str = "", out_dir: Path | None = None) -> Path:
    """Write `<name>.json` (and `<name>.png` when matplotlib is there) and return the JSON path."""
    out_dir = Path(out_dir or os.environ.get("QWEN_NB_BENCH_OUT") or ASSETS)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "name": name,
        "device": device_name(),
        "mlx_version": mx.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": config,
        "results": results,
        "notes": notes,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(report, indent=2))
    try:
        chart(report, out_dir / f"{name}.png")
    except ImportError:
        pass
    return path


def chart(report: dict, path: Path) -> None:
    """Horizontal bars of median seconds per variant, labelled with time and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    names = list(res)
    med = [res[k]["median_s"] for k in names]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.4))
    bars = ax.barh(names, med, color="#4C72B0")
    for bar, k in zip(bars, names):
        peak = res[k].get("peak_gb")
        label = f" {res[k]['median_s']:.4g} s" + (f", {peak:.3g} GB" if peak else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median seconds (lower is better)")
    ax.set_title(f"{report['name']} on {report['device']}, MLX {report['mlx_version']}", fontsize=9)
    ax.set_xlim(0, max(med, default=1.0) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: dict) -> None:
    base = None
    for name, r in results.items():
        base = base or r["median_s"]
        print(
            f"{name:40s} {r['median_s'] * 1e3:10.2f} ms  x{base / r['median_s']:5.2f}  peak {r.get('peak_gb', 0):.2f} GB"
        )


def finish(name: str, config: dict, results: dict, notes: list, out_dir: Path, line) -> Path:
    """The side-by-side table, one `line(name, result)` per result, and the report written (returns its path)."""
    print_table(results)
    for k, v in results.items():
        print(line(k, v))
    path = write_report(name, config, results, " ".join(notes), out_dir=out_dir)
    print(f"wrote {path} on {device_name()}")
    return path
