"""What the notebooks share: the mode switch, the set-up cell, and small number, timing and plotting helpers.
(`qwen_nb.course_runner` runs the series; the notebooks do not need it.)

Two modes, one switch. By default every notebook runs on the embedded checkpoint (`EMBEDDED`, in the repository:
no download, tiny sizes, float32). With `QWEN_NB_WEIGHTS=<hub id or folder>` (e.g. `Qwen/Qwen-Image`) the same
cells run the real model at real sizes in bfloat16; the few cells that only make sense there are guarded by
`if course.REAL:`. The mode is read from the environment when a notebook asks (`course.REAL`, `course.DTYPE`,
`course.SIZE`, `course.PROMPT`, `course.WEIGHTS` are computed on access), not when this module is imported.
"""

import json
import os
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from .timing import time_variants as _time_variants

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"

# The embedded checkpoint: a tiny Qwen-Image trained in this repository on procedural captioned pictures
# (training/train_demo.py, qwen_nb/demo_data.py), in the diffusers folder layout like the real one.
EMBEDDED = REPO / "assets" / "demo"
EMBEDDED_NAME = "the demo model trained in this repository (pictures of coloured shapes)"
REAL_PROMPT = "A red fox sitting in the snow at dawn, soft morning light, Ultra HD, 4K, cinematic composition."
DEMO_PROMPT = "a red circle at the top left on a blue background"  # the embedded demo model's kind of caption


def _weights() -> str | None:
    return os.environ.get("QWEN_NB_WEIGHTS", "").strip() or None


def __getattr__(name: str):
    """The mode's values, read from the environment now: WEIGHTS (hub id or folder, or None), REAL, DTYPE, SIZE (the
    picture side notebook 09 generates at: the checkpoint's native size), PROMPT."""
    real = _weights() is not None
    if name == "WEIGHTS":
        return _weights()
    if name == "REAL":
        return real
    if name == "DTYPE":
        return mx.bfloat16 if real else mx.float32
    if name == "SIZE":
        return native_side(checkpoint())
    if name == "PROMPT":
        return REAL_PROMPT if real else DEMO_PROMPT
    raise AttributeError(f"module 'qwen_nb.course' has no attribute {name!r}")


def native_side(folder: Path) -> int:
    """The picture side a checkpoint declares it was trained at (`_native_size` in model_index.json), else 1024."""
    size = json.loads((Path(folder) / "model_index.json").read_text()).get("_native_size") or [1024, 1024]
    return int(size[0])


def mode() -> str:
    """One line saying which model the notebooks run."""
    weights = _weights()
    if weights is not None:
        where = show_path(weights) if Path(weights).expanduser().exists() else weights
        return f"real weights: QWEN_NB_WEIGHTS={where}, bfloat16, real sizes"
    return f"embedded: {show_path(EMBEDDED)}, {EMBEDDED_NAME}; float32, tiny sizes"


def show_path(path) -> str:
    """A path as the notebooks print it: relative to the repository when inside it, never a home folder."""
    path = Path(path)
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        home = str(Path.home())
        return str(path).replace(home, "~", 1) if str(path).startswith(home) else str(path)


def checkpoint() -> Path:
    """The pipeline folder of the current mode (a hub id is downloaded on first use)."""
    return _resolve(_weights())


@lru_cache(maxsize=4)
def _resolve(weights: str | None) -> Path:
    if weights is not None:
        from .hub import resolve

        return resolve(weights)
    if not (EMBEDDED / "model_index.json").exists():
        raise FileNotFoundError(f"the embedded checkpoint {show_path(EMBEDDED)} is missing: is the clone whole?")
    return EMBEDDED


def setup(seed: int = 0) -> str:
    """Seed MLX and NumPy, set print options and modest figure defaults; returns the mode line."""
    mx.random.seed(seed)
    np.random.seed(seed)
    np.set_printoptions(precision=4, suppress=True, linewidth=110)
    import matplotlib.pyplot as plt  # after the backend is chosen, so these settings stay

    plt.rcParams.update(
        {
            "figure.dpi": 80,
            "savefig.dpi": 80,
            "figure.figsize": (7.5, 3.0),
            "axes.titlesize": 10,
            "axes.labelsize": 9,
            "xtick.labelsize": 8,
            "ytick.labelsize": 8,
            "legend.fontsize": 8,
            "image.cmap": "viridis",
        }
    )
    return f"mlx {mx.__version__} on {mx.default_device()}; {mode()}"


# ------------------------------------------------------------------------------------------------ numbers
def max_diff(a, b) -> float:
    """max |a - b| over all elements, in float64 (mx arrays, NumPy arrays or PIL images)."""
    a = np.asarray(a.astype(mx.float32) if isinstance(a, mx.array) else a, dtype=np.float64)
    b = np.asarray(b.astype(mx.float32) if isinstance(b, mx.array) else b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a - b).max())


def tolerance(reference, float32: float = 1e-5, bfloat16: float = 2e-2) -> float:
    """The bound for a notebook's agreement assert: `float32` (absolute) in the embedded mode; in the real mode's
    bfloat16, `bfloat16` times the largest |reference| (an 8-bit mantissa rounds by up to 0.4% each time, and a layer
    chains several roundings)."""
    if _weights() is None:
        return float32
    ref = np.asarray(reference.astype(mx.float32) if isinstance(reference, mx.array) else reference)
    return bfloat16 * float(np.abs(ref).max())


def time_variants(variants: dict, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each `fn()` (its mx outputs evaluated), the variants alternated after a warm-up
    (`qwen_nb.timing.time_variants`, which the benchmarks use too, keeping only the medians)."""
    return {name: r["median_s"] for name, r in _time_variants(variants, repeats, warmup).items()}


def ratios(runs: dict, a: str, b: str) -> tuple[float, float, float]:
    """How many times faster `a` ran than `b`: (by the medians, the smallest and the largest over the repeats).
    `runs` maps names to {"median_s", "times_s"} (`qwen_nb.timing.time_variants`, or an assets/bench report), the
    variants alternated, so repeat k of `a` and of `b` ran side by side."""
    pairs = [t_b / t_a for t_a, t_b in zip(runs[a]["times_s"], runs[b]["times_s"])]
    return runs[b]["median_s"] / runs[a]["median_s"], min(pairs), max(pairs)


def differs(runs: dict, a: str, b: str) -> bool:
    """True when every alternated repeat says the same: `a` faster than `b` in all of them, or slower in all."""
    _, low, high = ratios(runs, a, b)
    return low > 1 or high < 1


def compare(runs: dict, a: str, b: str, name_a: str | None = None, name_b: str | None = None) -> str:
    """One sentence reading two timed variants: `a` is r x faster (slower) than `b` where every alternated repeat
    agrees, else the two are equal within noise. `name_a`/`name_b` are how the sentence calls them."""
    r = ratios(runs, a, b)[0]
    verdict = differs(runs, a, b)
    a, b = name_a or a, name_b or b
    if verdict:
        return f"{a} is {max(r, 1 / r):.2f}x {'faster' if r > 1 else 'slower'} than {b} (in every repeat)"
    return f"{a} and {b} are equal within noise (x{r:.2f} by the medians; the repeats disagree)"


def print_times(times: dict[str, float], baseline: str | None = None) -> None:
    """One line per variant: milliseconds and the speed-up over `baseline` (the first one by default)."""
    baseline = baseline or next(iter(times))
    width = max(len(n) for n in times)
    for name, t in times.items():
        print(f"{name:<{width}}  {1e3 * t:9.2f} ms   x{times[baseline] / t:5.2f} vs {baseline}")


# ------------------------------------------------------------------------------------------------ pictures
def to_image(x) -> np.ndarray:
    """An image for imshow: PIL, uint8, or floats in [-1, 1] (the VAE's range), (H, W, 3) or (H, W)."""
    if hasattr(x, "convert"):  # PIL
        return np.asarray(x)
    x = np.asarray(x.astype(mx.float32) if isinstance(x, mx.array) else x)
    if x.dtype == np.uint8:
        return x
    return np.clip((x + 1) / 2, 0, 1)


def show_images(images, titles=None, cols: int | None = None, size: float = 1.8, suptitle: str | None = None):
    """A row (or grid) of images with optional titles; returns the figure."""
    import matplotlib.pyplot as plt

    images = list(images)
    cols = cols or len(images)
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + (0.3 if suptitle else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(to_image(images[i]), interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def heatmap(ax, data, title: str = "", xlabel: str = "", ylabel: str = "", cmap: str = "viridis", colorbar=True, **kw):
    """imshow of a 2-D array on `ax` with labels and a colour bar."""
    data = np.asarray(data.astype(mx.float32) if isinstance(data, mx.array) else data)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, **kw)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    return im


def bar_times(times: dict[str, float], title: str = "", ax=None, baseline: str | None = None):
    """Horizontal bars of milliseconds, labelled with the speed-up over `baseline` (the first by default)."""
    import matplotlib.pyplot as plt

    baseline = baseline or next(iter(times))
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 0.45 * len(times) + 0.9))
    names = list(times)[::-1]
    ms = [1e3 * times[n] for n in names]
    ax.barh(names, ms, color=["tab:orange" if n == baseline else "tab:blue" for n in names])
    for y, (n, v) in enumerate(zip(names, ms)):
        ax.text(v, y, f" {v:.1f} ms (x{times[baseline] / times[n]:.2f})", va="center", fontsize=8)
    ax.set_xlim(0, max(ms) * 1.45)
    ax.set_xlabel("milliseconds (median)")
    ax.set_title(title)
    ax.figure.tight_layout()
    return ax


def spread_bars(ax, runs: dict, title: str = "", scale: float = 1e3, unit: str = "ms", colour: str = "tab:blue"):
    """Horizontal bars of each variant's median time, with a whisker over its repeats (min to max): two variants
    differ beyond noise only where their whiskers do not overlap. `runs`: {name: {"median_s", "times_s"}}."""
    names = list(runs)[::-1]
    med = np.array([scale * runs[n]["median_s"] for n in names])
    low = np.array([scale * min(runs[n]["times_s"]) for n in names])
    high = np.array([scale * max(runs[n]["times_s"]) for n in names])
    ax.barh(names, med, color=colour, alpha=0.8)
    ax.errorbar(med, range(len(names)), xerr=[med - low, high - med], fmt="none", ecolor="k", capsize=3, lw=1)
    ax.set(title=title, xlabel=f"{unit} (median; whisker: fastest to slowest repeat)")
    return ax


def time_and_memory(runs: dict, title: str, memory_unit: str = "GB", time_unit: str = "ms"):
    """Two panels for variants of one computation: time per call with the repeats' spread (`spread_bars`; in ms or
    s), and peak memory (`peak_gb` of each run, in GB or MB). Returns the figure."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 0.4 * len(runs) + 1.3))
    spread_bars(a, runs, f"{title}: time", scale={"ms": 1e3, "s": 1.0}[time_unit], unit=time_unit)
    names = list(runs)[::-1]
    factor = 1e3 if memory_unit == "MB" else 1.0
    b.barh(names, [factor * runs[n]["peak_gb"] for n in names], color="tab:green", alpha=0.8)
    b.set(title=f"{title}: peak memory", xlabel=memory_unit, yticks=[])
    fig.tight_layout()
    return fig


def speedup_chart(speedups: dict, notes: dict | None = None, title: str = ""):
    """What each technique is worth on several machines: `speedups` {technique: {machine: (by the medians, smallest,
    largest)}} (`ratios` of the runs without it over with it), drawn on a log scale around x1 with the repeats'
    range as a whisker; `notes` {technique: text} are written at the right (e.g. a quoted claim)."""
    import matplotlib.pyplot as plt

    names = list(speedups)[::-1]
    machines = list(dict.fromkeys(m for row in speedups.values() for m in row))
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(names) + 1.2))
    height = 0.8 / len(machines)
    for k, (machine, colour) in enumerate(zip(machines, ["tab:blue", "tab:orange", "tab:purple"])):
        y = np.arange(len(names)) + 0.4 - height * (k + 0.5)
        rows = [speedups[n].get(machine) for n in names]
        mid = np.array([r[0] if r else np.nan for r in rows])
        low = np.array([r[1] if r else np.nan for r in rows])
        high = np.array([r[2] if r else np.nan for r in rows])
        ax.barh(y, mid - 1, height * 0.9, left=1, color=colour, label=machine, alpha=0.85)
        ax.errorbar(mid, y, xerr=[mid - low, high - mid], fmt="none", ecolor="k", capsize=2, lw=0.8)
    for y, n in enumerate(names):
        if notes and n in notes:
            ax.text(1.01, y, notes[n], va="center", fontsize=7, color="tab:green", transform=ax.get_yaxis_transform())
    ax.axvline(1, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlim(0.3, 8)
    ax.set_xticks([0.5, 1, 2, 4], ["x0.5", "x1", "x2", "x4"])
    ax.set_xticks([], minor=True)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("time without the technique / time with it (log scale; right of x1: it helps)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig
