"""A newcomer's first hour (the issue of that name): the native-size default, seeds checked the same way in the API,
the CLI and the panel, `--preview-every` under the same overwrite rule as `--out`, and the console script's name."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import pytest

from qwen_nb import QwenImagePipeline
from qwen_nb.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_pipeline" / "layout_a"
DEMO = ROOT / "assets" / "demo"
MAX_SEED = 2**64 - 1  # mx.random.key takes an unsigned 64-bit integer


@pytest.fixture(scope="module")
def demo():
    return QwenImagePipeline.from_pretrained(DEMO, dtype=mx.float32, verbose=False)


@pytest.fixture(scope="module")
def tiny():
    return QwenImagePipeline.from_pretrained(TINY, dtype=mx.float32, verbose=False)


# ------------------------------------------------------------------------------------------------ native size
def test_a_checkpoint_that_says_its_size_generates_at_it_by_default(demo):
    declared = json.loads((DEMO / "model_index.json").read_text())["_native_size"]  # [height, width]
    assert demo.native_size == tuple(declared)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the native size warns about nothing
        image = demo.generate("a red circle in the centre on a white background", steps=1, seed=0, progress=False)
    assert image.size == (declared[1], declared[0])


def test_other_sizes_of_a_one_size_model_warn_once(demo):
    demo._warned_size = False
    with pytest.warns(UserWarning, match="trained at 96x96"):
        demo.generate("a red circle", height=64, width=64, steps=1, seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough
        demo.generate("a red circle", height=64, width=64, steps=1, seed=0, progress=False)


def test_a_checkpoint_that_says_nothing_defaults_to_1024_square(tiny):
    assert "_native_size" not in json.loads((TINY / "model_index.json").read_text())
    assert tiny.native_size == (1024, 1024)  # Qwen-Image's model card size


# ------------------------------------------------------------------------------------------------ seeds
@pytest.mark.parametrize("seed", [-1, -5, MAX_SEED + 1, 99999999999999999999])
def test_api_refuses_seeds_outside_0_to_2_64(tiny, seed):
    with pytest.raises(ValueError, match=r"seed must be an integer from 0 to 2\*\*64 - 1"):
        tiny.generate("a fox", height=32, width=32, steps=1, seed=seed, progress=False)


@pytest.mark.parametrize("seed", [0, MAX_SEED])
def test_api_takes_both_ends_of_the_seed_range(tiny, seed):
    assert tiny.generate("a fox", height=32, width=32, steps=1, seed=seed, progress=False).size == (32, 32)


@pytest.mark.parametrize("seed", ["-5", "99999999999999999999", "1.5"])
def test_cli_refuses_bad_seeds_before_loading(tmp_path, capsys, seed):
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(TINY), "--prompt", "p", "--out", str(out), "--seed", seed])
    assert e.value.code == 2
    assert "--seed" in capsys.readouterr().err and not out.exists()


def test_panel_shows_a_bad_seed_instead_of_crashing(tiny):
    from qwen_nb.panel import Panel

    panel = Panel(tiny, prompt="a fox", steps=1, seed=-1, sizes={"32x32": (32, 32)})
    assert panel.generate_now() is None
    assert isinstance(panel.error, ValueError)
    assert "seed must be an integer from 0 to 2**64 - 1" in panel.status.value
    panel.seed.value = 7
    assert panel.generate_now().size == (32, 32)  # the panel stays usable


# ------------------------------------------------------------------------------------------------ previews
def test_preview_every_follows_the_overwrite_rule_of_out(tmp_path):
    out = tmp_path / "fox.png"
    preview = tmp_path / "fox.preview.png"
    preview.write_bytes(b"keep me")
    args = ["generate", "--model", str(TINY), "--prompt", "a fox", "--out", str(out), "--dtype", "float32"]
    args += ["--size", "32x32", "--steps", "2", "--seed", "1", "--preview-every", "1", "--quiet"]
    r = subprocess.run([sys.executable, "-m", "qwen_nb", *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "exists; nothing was written" in r.stderr and "--force" in r.stderr
    assert preview.read_bytes() == b"keep me" and not out.exists()
    r = subprocess.run([sys.executable, "-m", "qwen_nb", *args, "--force"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert out.exists() and preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # replaced by a picture


# ------------------------------------------------------------------------------------------------ the command's name
def test_console_script_names_itself():
    script = Path(sys.executable).with_name("qwen-nb")
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e . makes it)")
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: qwen-nb")
    r = subprocess.run([sys.executable, "-m", "qwen_nb", "--help"], capture_output=True, text=True)
    assert r.stdout.startswith("usage: python -m qwen_nb")
