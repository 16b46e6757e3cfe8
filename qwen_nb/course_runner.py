"""Running the notebook series top to bottom in fresh kernels (`python -m qwen_nb course`) and the checks made
before a notebook is saved: numbered cells, no error outputs, no local paths."""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from . import blas
from .course import NOTEBOOKS, REPO, mode, show_path

LIMIT_S = 60.0  # the most one notebook may take in the embedded mode (CI: a 2-core CPU)


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


def run_notebooks(
    paths=None,
    timeout: float | None = LIMIT_S,
    cell_timeout: int = 1800,
    save: bool = True,
    strict: bool = False,
):
    """Execute notebooks top to bottom in place, each in a fresh `python3` kernel, and save them with their outputs.

    Prints each notebook's wall time. Raises NotebookError (after saving none of it) when a cell fails or the
    outputs hold an error or a local path. A notebook that took longer than `timeout` seconds (None: no limit, as
    with real weights) is reported; with `strict` (CI) that is an error too, raised after saving. The kernels get
    OpenBLAS preloaded where that helps (qwen_nb.blas). Returns {notebook name: seconds}."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    paths = notebook_paths(paths)
    if not paths:
        raise NotebookError(f"no notebooks found in {show_path(NOTEBOOKS)}")
    env = blas.environment()
    if blas.preloaded():
        print(f"kernels preload OpenBLAS ({blas.preloaded()})")
    elif blas.missing_note():
        print(blas.missing_note())
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
            client.execute(env=env)
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
        message = f"over the {timeout:.0f} s limit per notebook: " + ", ".join(slow)
        if strict:
            raise NotebookError(message)
        print(f"warning: {message} (a slow machine, or no OpenBLAS on Linux; --strict makes this an error)")
    return times


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of `run_notebooks` (for `python -m qwen_nb course`)."""
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (paths or names like 02_rope); default: all")
    parser.add_argument(
        "--limit",
        type=float,
        default=None,
        help=f"seconds one notebook should take (default {LIMIT_S:.0f} in the embedded mode, none with real weights; "
        "0 = none); over it is a warning, or an error with --strict",
    )
    parser.add_argument("--strict", action="store_true", help="fail when a notebook is over the time limit (CI)")
    parser.add_argument("--cell-timeout", type=int, default=1800, help="seconds before a single cell is stopped")
    parser.add_argument("--no-save", action="store_true", help="run without writing the outputs back")
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="JSON",
        help="also write the times to this JSON file, with the machine, the BLAS and the MLX version",
    )


def run_from_args(args) -> int:
    from . import course

    limit = args.limit if args.limit is not None else (None if course.REAL else LIMIT_S)
    try:
        times = run_notebooks(
            args.notebooks,
            timeout=limit or None,
            cell_timeout=args.cell_timeout,
            save=not args.no_save,
            strict=args.strict,
        )
    except (NotebookError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.report is not None:
        write_report(args.report, times, mode())
    return 0


def write_report(path: Path, times: dict, mode_line: str) -> None:
    """The course's times as JSON: what the README quotes, with what they were measured on."""
    import json
    import platform
    from datetime import date

    import mlx.core as mx

    report = {
        "what": "python -m qwen_nb course: wall seconds per notebook, each in a fresh kernel",
        "date": date.today().isoformat(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores",
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "blas": blas.preloaded() or "the MLX wheel's own (no OpenBLAS preloaded)",
        "mode": mode_line,
        "notebooks": {name: round(t, 2) for name, t in times.items()},
        "total_s": round(sum(times.values()), 2),
    }
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {show_path(path)}")


def main(argv=None) -> int:
    """`python -m qwen_nb.course_runner [notebooks...]`: run the series (or some notebooks) and save their outputs."""
    parser = argparse.ArgumentParser(
        prog="python -m qwen_nb course",
        description="Run the course notebooks top to bottom in fresh kernels and save their outputs.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
