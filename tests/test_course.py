"""`python -m qwen_nb course`, the command that runs the notebook series (the README's main command), and the checks
it makes before it saves a notebook."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from qwen_nb import course_runner

ROOT = Path(__file__).resolve().parents[1]


def test_course_runs_a_notebook_without_saving_it():
    notebook = ROOT / "notebooks" / "01_rmsnorm.ipynb"
    before = notebook.read_bytes()
    r = subprocess.run(
        [sys.executable, "-m", "qwen_nb", "course", "01_rmsnorm", "--no-save"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "running 1 notebook(s); embedded: assets/demo" in r.stdout
    assert "01_rmsnorm.ipynb" in r.stdout and "total" in r.stdout
    assert "without encryption" not in r.stderr  # the kernels log errors only
    assert notebook.read_bytes() == before


def test_course_refuses_an_unknown_notebook():
    r = subprocess.run(
        [sys.executable, "-m", "qwen_nb", "course", "99_nothing", "--no-save"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 1 and "error:" in r.stderr and "99_nothing" in r.stderr


def _notebook(counts, outputs):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1", execution_count=c, outputs=o) for c, o in zip(counts, outputs)]
    return nb


def test_check_notebook_finds_what_must_not_be_committed():
    clean = _notebook([1, 2], [[], [nbformat.v4.new_output("stream", name="stdout", text="ok\n")]])
    assert course_runner.check_notebook(clean) == []
    assert "execution counts" in course_runner.check_notebook(_notebook([1, 3], [[], []]))[0]
    error = nbformat.v4.new_output("error", ename="ValueError", evalue="bad", traceback=[])
    assert "error output: ValueError: bad" in course_runner.check_notebook(_notebook([1], [[error]]))[0]
    local = nbformat.v4.new_output("stream", name="stdout", text=f"saved to {ROOT}/x.png\n")
    assert "local path" in course_runner.check_notebook(_notebook([1], [[local]]))[0]


def test_course_report_names_what_the_times_were_measured_on(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("QWEN_NB_NO_OPENBLAS", "1")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    path = tmp_path / "times.json"
    course_runner.write_report(path, {"01_rmsnorm.ipynb": 2.0, "02_rope.ipynb": 3.25}, "embedded")
    report = json.loads(path.read_text())
    assert report["total_s"] == 5.25 and report["notebooks"]["02_rope.ipynb"] == 3.25
    assert "no OpenBLAS" in report["blas"] and report["mlx"] and "CPU cores" in report["machine"]


def test_compare_reads_a_difference_only_where_every_repeat_agrees():
    from qwen_nb import course

    runs = {
        "fast": {"median_s": 1.0, "times_s": [1.0, 1.1, 0.9]},
        "slow": {"median_s": 2.0, "times_s": [2.0, 2.2, 1.9]},
        "noisy": {"median_s": 1.2, "times_s": [0.9, 1.2, 1.3]},  # faster than 'fast' once, slower twice
    }
    assert course.ratios(runs, "fast", "slow") == pytest.approx((2.0, 2.0, 1.9 / 0.9))  # medians, min, max
    assert course.differs(runs, "fast", "slow") and course.differs(runs, "slow", "fast")
    assert not course.differs(runs, "fast", "noisy")
    assert course.compare(runs, "fast", "slow") == "fast is 2.00x faster than slow (in every repeat)"
    assert course.compare(runs, "slow", "fast", "B", "A") == "B is 2.00x slower than A (in every repeat)"
    assert "equal within noise (x1.20 by the medians" in course.compare(runs, "fast", "noisy")
