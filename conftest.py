"""pytest set-up for the whole repository (tests/ and the notebooks under nbval).

On Linux, MLX's CPU wheel ships a reference BLAS (about 5 GFLOP/s in float32). When Debian's OpenBLAS is installed
(`apt-get install libopenblas0-pthread`) and LD_PRELOAD is unset, the test run restarts itself once with OpenBLAS
preloaded (qwen_nb.blas), so the README's plain `python -m pytest` is as fast as CI. A library can only be preloaded
when a process starts, hence the restart; the restart happens before any test runs.
"""

from qwen_nb import blas


def pytest_configure(config):
    if blas.wanted():
        capture = config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.stop_global_capturing()  # give the terminal back before the process is replaced
        blas.restart_with_openblas(f"conftest: restarting pytest with LD_PRELOAD={blas.OPENBLAS} (faster matmuls)")
