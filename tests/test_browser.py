"""09_generation in a real browser: JupyterLab on localhost (a token set here), headless Chromium driven by selenium;
run every cell, press the panel's Generate on the embedded model, wait for the image, take a screenshot (into the
test's temporary folder; QWEN_NB_SCREENSHOT=path keeps it, e.g. `QWEN_NB_SCREENSHOT=assets/panel_screenshot.png` to
renew the README's picture on purpose).

Without Chromium the test skips, saying so; where QWEN_NB_REQUIRE_BROWSER=1 is set (CI's .ci/run sets it, after
installing Chromium) a missing browser is a failure instead, so CI cannot stay green without this test.

The server gets its own Jupyter folders under a temporary directory, with a `python3` kernel spec that runs this
interpreter (so the kernel imports the qwen_nb under test), and a copy of the notebook: nothing in notebooks/ is
written. The server, its kernel and the browser are stopped in `finally`.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "09_generation.ipynb"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

START_S = 120  # the server answering (a 2-core CI machine builds nothing, but imports a lot)
RUN_ALL_S = 240  # every cell of the notebook (about 30 s of work on such a machine, plus a kernel start)
GENERATE_S = 120  # one panel generation of the demo model


def _missing() -> str | None:
    if CHROMIUM is None:
        return "chromium is not installed (Debian: apt-get install chromium chromium-driver)"
    if not Path(CHROMEDRIVER).exists():
        return "chromedriver is not installed (Debian: apt-get install chromium-driver)"
    for module in ("selenium", "jupyterlab", "ipykernel", "ipywidgets"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[test]')"
    return None


if _missing() is not None and os.environ.get("QWEN_NB_REQUIRE_BROWSER"):
    raise RuntimeError(f"QWEN_NB_REQUIRE_BROWSER is set but the browser test cannot run: {_missing()}")
pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jupyter_home(tmp: Path) -> dict:
    """Environment for a server that sees only our kernel spec and settings (none of the user's)."""
    kernel = tmp / "jupyter_path" / "kernels" / "python3"
    kernel.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (qwen_nb tests)",
        "language": "python",
    }
    (kernel / "kernel.json").write_text(json.dumps(spec))
    settings = tmp / "lab_settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no news or update toasts over the screenshot
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    env = dict(os.environ)
    env.update(
        JUPYTER_PATH=str(tmp / "jupyter_path"),
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTER_DATA_DIR=str(tmp / "data"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp / "lab_settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
        IPYTHONDIR=str(tmp / "ipython"),
        MPLBACKEND="module://matplotlib_inline.backend_inline",
    )
    env.pop("QWEN_NB_WEIGHTS", None)  # the embedded model
    if sys.platform.startswith("linux") and not env.get("LD_PRELOAD") and os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS  # MLX's CPU wheel is ~30x slower with its own BLAS (assets/bench/blas_cpu.json)
    return env


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def server_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def stop_server(proc: subprocess.Popen, base: str, token: str) -> None:
    """Ask the server to shut down (it stops its kernels), then make sure its process group is gone."""
    if proc.poll() is None:
        try:
            req = urllib.request.Request(
                f"{base}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"}
            )
            urllib.request.urlopen(req, timeout=10).close()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


# JavaScript run in the page (JupyterLab started with expose_app_in_browser)
NOTEBOOK_READY = """
const app = window.jupyterapp;
const nb = app && app.shell.currentWidget;
const kernel = nb && nb.sessionContext && nb.sessionContext.session && nb.sessionContext.session.kernel;
return Boolean(nb && nb.content && kernel && kernel.status === 'idle' && nb.context.isReady);
"""
RUN_STATE = """
const nb = window.jupyterapp.shell.currentWidget;
const cells = nb.content.widgets.filter(c => c.model.type === 'code');
const errors = [];
for (const c of cells) {
  for (let i = 0; i < c.model.outputs.length; i++) {
    const o = c.model.outputs.get(i).toJSON();
    if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue + '\\n' + c.model.sharedModel.getSource());
  }
}
const done = cells.filter(c => c.model.executionCount !== null).length;
return {done: done, total: cells.length, errors: errors, kernel: nb.sessionContext.session.kernel.status};
"""


def test_panel_generates_in_a_real_browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    started = time.monotonic()
    workdir = tmp_path / "notebooks"
    workdir.mkdir()
    shutil.copy(NOTEBOOK, workdir / NOTEBOOK.name)
    env = jupyter_home(tmp_path)
    port, token = free_port(), "qwen-nb-test-" + os.urandom(8).hex()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={workdir}",
            "--LabApp.expose_app_in_browser=True",
            *(["--allow-root"] if os.geteuid() == 0 else []),  # CI containers run as root
        ],
        env=env,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so nothing it starts is left behind
    )
    driver = None
    try:
        wait_for(
            lambda: server.poll() is not None or server_up(f"{base}/api/status?token={token}"), START_S, "the server"
        )
        assert server.poll() is None, f"jupyter lab exited:\n{(tmp_path / 'server.log').read_text()[-3000:]}"

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
        ):
            options.add_argument(arg)
        browser_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # OpenBLAS preloaded crashes Chromium
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER, env=browser_env), options=options)
        driver.set_script_timeout(60)
        driver.get(f"{base}/lab/tree/{NOTEBOOK.name}?reset&token={token}")
        wait_for(lambda: driver.execute_script(NOTEBOOK_READY), START_S, "the notebook and an idle kernel")

        driver.execute_script(
            "const app = window.jupyterapp;"
            "return app.commands.execute('notebook:clear-all-cell-outputs')"
            ".then(() => { app.commands.execute('notebook:run-all-cells'); return true; });"
        )

        def finished():
            state = driver.execute_script(RUN_STATE)
            assert not state["errors"], "a cell failed in the browser:\n" + "\n\n".join(state["errors"])
            return state["done"] == state["total"] and state["kernel"] == "idle" and state

        state = wait_for(finished, RUN_ALL_S, "every cell to run", interval=1.0)
        ran_s = time.monotonic() - started

        button = driver.find_element(By.CSS_SELECTOR, "button.qwen-nb-generate")
        status = driver.find_element(By.CSS_SELECTOR, ".qwen-nb-status")
        assert "Generation 1" in status.text and "peak memory" in status.text  # the cell's generate_now()
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
        driver.find_element(By.CSS_SELECTOR, "button.qwen-nb-dice").click()  # a new seed
        button.click()
        wait_for(
            lambda: "Generation 2" in status.text and "peak memory" in status.text,
            GENERATE_S,
            "the panel's generation to finish",
        )
        size = driver.execute_script("const im = document.querySelector('img.qwen-nb-final'); return im.naturalWidth;")
        native = json.loads((ROOT / "assets" / "demo" / "model_index.json").read_text())["_native_size"]
        assert size == native[1]  # the demo model's picture at its native width, shown at 256 px
        driver.execute_script(
            "window.jupyterapp.shell.collapseLeft();"
            "document.querySelector('.qwen-nb-panel').scrollIntoView({block: 'center'});"
            "document.querySelectorAll('.jp-toast-container, .Toastify').forEach(e => e.remove());"
        )
        time.sleep(1.0)  # let the layout settle before the picture
        screenshot = Path(os.environ.get("QWEN_NB_SCREENSHOT") or tmp_path / "panel.png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        print(
            f"browser test: {state['total']} cells ran in {ran_s:.0f} s; panel generation done "
            f"{time.monotonic() - started:.0f} s after the start; {status.text}"
        )
        assert (workdir / NOTEBOOK.name).exists() and screenshot.stat().st_size > 10_000
    finally:
        if driver is not None:
            driver.quit()
        stop_server(server, base, token)
        log.close()
