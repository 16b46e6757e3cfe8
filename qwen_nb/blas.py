"""OpenBLAS for MLX's Linux CPU wheel, which ships a reference BLAS: a float32 matmul some 30x slower than with
Debian's OpenBLAS (`apt-get install libopenblas0-pthread`) preloaded (assets/bench/blas_cpu.json, a 2-core machine).
A library can only be preloaded when a process starts, so the command line, the notebook runner, `python -m qwen_nb
lab` and the test run restart themselves (or start their kernels) with LD_PRELOAD set, once, when OpenBLAS is
installed and LD_PRELOAD is not already set. QWEN_NB_NO_OPENBLAS=1 turns this off (to measure without it)."""

import os
import sys

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def wanted() -> bool:
    """True where preloading would help: Linux, OpenBLAS installed, nothing preloaded, not turned off."""
    return (
        sys.platform.startswith("linux")
        and not os.environ.get("LD_PRELOAD")
        and not os.environ.get("QWEN_NB_NO_OPENBLAS")
        and os.path.exists(OPENBLAS)
    )


def preloaded() -> str | None:
    """The OpenBLAS a child started with `environment()` will have (already preloaded here, or about to be)."""
    if wanted():
        return OPENBLAS
    return next((lib for lib in os.environ.get("LD_PRELOAD", "").split(":") if "openblas" in lib), None)


def missing_note() -> str | None:
    """A one-line note for Linux users without OpenBLAS (None elsewhere)."""
    if sys.platform.startswith("linux") and not os.environ.get("LD_PRELOAD") and not os.path.exists(OPENBLAS):
        return (
            "note: MLX's Linux CPU wheel ships a slow reference BLAS and OpenBLAS is not installed; "
            "`sudo apt-get install libopenblas0-pthread` makes float32 matmuls ~30x faster (qwen_nb preloads it)"
        )
    return None


def environment() -> dict:
    """os.environ with OpenBLAS preloaded where `wanted()`, for a child process (a kernel, a server)."""
    return dict(os.environ, LD_PRELOAD=OPENBLAS) if wanted() else dict(os.environ)


def restart_with_openblas(note: str | None = None) -> None:
    """Replace this process by the same command with OpenBLAS preloaded, where `wanted()`; else return."""
    if not wanted():
        return
    if note:
        print(note, file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment())
