"""What the notebooks share: the mode switch, the set-up cell, small plotting and timing helpers, and the command
that runs the whole series (`run_notebooks`, `main`).

Two modes, one switch. By default every notebook runs on the embedded checkpoint (`EMBEDDED`, in the repository:
no download, tiny sizes, float32). With `QWEN_NB_WEIGHTS=<hub id or folder>` (e.g. `Qwen/Qwen-Image`) the same
cells run the real model at real sizes in bfloat16; the few cells that only make sense there are guarded by
`if course.REAL:`.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"

# The embedded checkpoint: a tiny Qwen-Image trained in this repository on procedural captioned pictures
# (training/train_demo.py, qwen_nb/demo_data.py), in the diffusers folder layout like the real one.
EMBEDDED = REPO / "assets" / "demo"
EMBEDDED_NAME = "the demo model trained in this repository (64x64 pictures of coloured shapes)"

WEIGHTS = os.environ.get("QWEN_NB_WEIGHTS", "").strip() or None
REAL = WEIGHTS is not None
DTYPE = mx.bfloat16 if REAL else mx.float32
SIZE = 1024 if REAL else 64  # the image side notebook 09 generates at (the embedded model's own size)
PROMPT = (
    "A red fox sitting in the snow at dawn, soft morning light, Ultra HD, 4K, cinematic composition."
    if REAL
    else "a red circle at the top left on a blue background"  # the embedded demo model's kind of caption
)

LIMIT_S = 60.0  # the most one notebook may take in the embedded mode (CI: a 2-core CPU)
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"

_checkpoint = None


def mode() -> str:
    """One line saying which model the notebooks run."""
    if REAL:
        where = show_path(WEIGHTS) if Path(WEIGHTS).expanduser().exists() else WEIGHTS
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
    """The pipeline folder of the current mode (resolved once; a hub id is downloaded on first use)."""
    global _checkpoint
    if _checkpoint is None:
        if REAL:
            from .hub import resolve

            _checkpoint = resolve(WEIGHTS)
        else:
            if not (EMBEDDED / "model_index.json").exists():
                raise FileNotFoundError(
                    f"the embedded checkpoint {show_path(EMBEDDED)} is missing: is the clone whole?"
                )
            _checkpoint = EMBEDDED
    return _checkpoint


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
    if DTYPE == mx.float32:
        return float32
    ref = np.asarray(reference.astype(mx.float32) if isinstance(reference, mx.array) else reference)
    return bfloat16 * float(np.abs(ref).max())


def _evaluate(out):
    mx.eval(out)  # any tree of arrays; other leaves are skipped
    return out


def time_variants(variants: dict, repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each `fn()` (its mx outputs evaluated), the variants run alternately after a warm-up."""
    for fn in variants.values():
        for _ in range(warmup):
            _evaluate(fn())
    samples = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            start = time.perf_counter()
            _evaluate(fn())
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


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


# ------------------------------------------------------------------------------------------------ running
class NotebookError(RuntimeError):
    """A notebook failed, took too long, or would have committed something it must not."""


def _local_markers() -> list[str]:
    marks = {str(REPO), str(Path.home()), tempfile.gettempdir().rstrip("/") + "/"}
    return sorted(m for m in marks if len(m) > 2)


def check_notebook(nb) -> list[str]:
    """Problems that must not be committed: code cells not numbered 1..n, error outputs, local paths in outputs."""
    problems = []
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    if counts != list(range(1, len(code) + 1)):
        problems.append(f"execution counts are {counts}, not 1..{len(code)} (an empty code cell is never run)")
    marks = _local_markers()
    for i, cell in enumerate(code, 1):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(f"code cell {i} has an error output: {out.get('ename')}: {out.get('evalue')}")
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            text += "".join(str(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
            found = [m for m in marks if m in text]
            if found:
                problems.append(f"code cell {i} prints a local path ({found[0]}...): print it relative instead")
    return problems


def _preload_openblas() -> None:
    """Linux: MLX's CPU wheel ships a reference BLAS (~5 GFLOP/s); preloading OpenBLAS in the kernels makes it ~50x
    faster. Done only when LD_PRELOAD is unset and Debian's libopenblas0-pthread is installed."""
    if sys.platform.startswith("linux") and not os.environ.get("LD_PRELOAD") and os.path.exists(OPENBLAS):
        os.environ["LD_PRELOAD"] = OPENBLAS
        print(f"kernels preload OpenBLAS ({OPENBLAS})")


def notebook_paths(paths=None) -> list[Path]:
    """The given notebooks, or the whole series (notebooks/NN_*.ipynb) in order."""
    if not paths:
        return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    out = []
    for p in paths:
        p = Path(p)
        if not p.exists() and (NOTEBOOKS / p).exists():
            p = NOTEBOOKS / p
        if not p.exists():
            found = sorted(NOTEBOOKS.glob(f"{p.stem}*.ipynb"))
            if len(found) != 1:
                raise FileNotFoundError(f"no notebook {p}: give a path or a name such as 02_rope")
            p = found[0]
        out.append(p)
    return out


def run_notebooks(paths=None, timeout: float | None = LIMIT_S, cell_timeout: int = 1800, save: bool = True):
    """Execute notebooks top to bottom in place, each in a fresh `python3` kernel, and save them with their outputs.

    Prints each notebook's wall time. Raises NotebookError (after saving none of it) when a cell fails or the
    outputs hold an error or a local path, and (after saving) when a notebook took longer than `timeout` seconds
    (None: no limit, as with real weights). Returns {notebook name: seconds}."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    _preload_openblas()
    paths = notebook_paths(paths)
    if not paths:
        raise NotebookError(f"no notebooks found in {show_path(NOTEBOOKS)}")
    print(f"running {len(paths)} notebook(s); {mode()}")
    times, slow = {}, []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        client = NotebookClient(
            nb,
            extra_arguments=["--IPKernelApp.log_level=ERROR"],  # not the kernel's warning about local TCP sockets
            timeout=cell_timeout,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        start = time.perf_counter()
        try:
            client.execute()
        except CellExecutionError as e:
            raise NotebookError(f"{path.name}: a cell failed (the notebook was not saved)\n{e}") from None
        wall = time.perf_counter() - start
        problems = check_notebook(nb)
        if problems:
            raise NotebookError(f"{path.name} (not saved): " + "; ".join(problems))
        if save:
            nbformat.write(nb, path)
        times[path.name] = wall
        over = timeout is not None and wall > timeout
        size = path.stat().st_size / 1e3
        print(f"{path.name:32s} {wall:6.1f} s  {size:6.0f} kB{'  OVER THE LIMIT' if over else ''}", flush=True)
        if over:
            slow.append(f"{path.name} took {wall:.1f} s")
    print(f"{'total':32s} {sum(times.values()):6.1f} s")
    if slow:
        raise NotebookError(f"over the {timeout:.0f} s limit per notebook: " + ", ".join(slow))
    return times


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of `run_notebooks` (for `python -m qwen_nb course`)."""
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (paths or names like 02_rope); default: all")
    parser.add_argument(
        "--limit",
        type=float,
        default=None,
        help=f"seconds one notebook may take (default {LIMIT_S:.0f} in the embedded mode, none with real weights; "
        "0 = none)",
    )
    parser.add_argument("--cell-timeout", type=int, default=1800, help="seconds before a single cell is stopped")
    parser.add_argument("--no-save", action="store_true", help="run without writing the outputs back")


def run_from_args(args) -> int:
    limit = args.limit if args.limit is not None else (None if REAL else LIMIT_S)
    try:
        run_notebooks(args.notebooks, timeout=limit or None, cell_timeout=args.cell_timeout, save=not args.no_save)
    except (NotebookError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    """`python -m qwen_nb.course [notebooks...]`: run the series (or some notebooks) and save their outputs."""
    parser = argparse.ArgumentParser(
        prog="python -m qwen_nb course",
        description="Run the course notebooks top to bottom in fresh kernels and save their outputs.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
