"""pytest set-up for the whole repository (tests/ and the notebooks under nbval).

On Linux, MLX's CPU wheel ships a reference BLAS (about 5 GFLOP/s in float32). When Debian's OpenBLAS is installed
(`apt-get install libopenblas0-pthread`) and LD_PRELOAD is unset, the test run restarts itself once with OpenBLAS
preloaded (about 50x faster matmuls), so the README's plain `python -m pytest` is as fast as CI. A library can
only be preloaded when a process starts, hence the restart; the restart happens before any test runs.
"""

import os
import sys

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def pytest_configure(config):
    if (
        sys.platform.startswith("linux")
        and not os.environ.get("LD_PRELOAD")
        and not os.environ.get("QWEN_NB_NO_OPENBLAS")
        and os.path.exists(OPENBLAS)
    ):
        capture = config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.stop_global_capturing()  # give the terminal back before the process is replaced
        print(f"conftest: restarting pytest with LD_PRELOAD={OPENBLAS} (MLX's bundled BLAS is ~50x slower)", flush=True)
        os.execve(sys.executable, list(sys.orig_argv), dict(os.environ, LD_PRELOAD=OPENBLAS))
