"""`python -m qwen_nb generate` on the tiny fixture pipeline: a subprocess for the real thing, `main([...])` in
process for the argument checks."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from qwen_nb.__main__ import build_parser, main
from qwen_nb.pipeline import ASPECTS, QwenImagePipeline

MODEL = Path(__file__).parent / "fixtures" / "tiny_pipeline" / "layout_a"
ARGS = ["--model", str(MODEL), "--dtype", "float32", "--size", "64x48", "--steps", "2", "--seed", "3"]


def cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "qwen_nb", *args], capture_output=True, text=True, timeout=timeout, cwd=MODEL.parent
    )


def test_generate_writes_the_image_and_reports_time_and_memory(tmp_path):
    out = tmp_path / "fox.png"
    r = cli("generate", "--prompt", "a red fox", "--out", str(out), *ARGS, "--quiet")
    assert r.returncode == 0, r.stderr
    assert f"wrote {out} (64x48, seed 3)" in r.stdout
    assert "time per step" in r.stdout and "s, peak memory" in r.stdout and " GB" in r.stdout
    image = Image.open(out)
    assert image.size == (64, 48)
    assert "a red fox" in image.text["parameters"] and "Seed: 3" in image.text["parameters"]
    pipe = QwenImagePipeline.from_pretrained(MODEL, dtype=mx.float32, verbose=False)
    same = pipe.generate("a red fox", height=48, width=64, steps=2, seed=3, progress=False)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(same))  # same seed, same image

    before = out.read_bytes()
    r = cli("generate", "--prompt", "another", "--out", str(out), *ARGS)
    assert r.returncode == 2
    assert "exists; nothing was written" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == before
    r = cli("generate", "--prompt", "another", "--out", str(out), *ARGS, "--force", "--quiet")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() != before


def run_main(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "64x50"], "height 50 is not a multiple of 16"),
        (["--size", "0x64"], "width must be a positive multiple of 16"),
        (["--quantize", "7"], "unknown quantization 7"),
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--cfg", "-1"], "cfg_scale must be >= 0"),
        (["--model", "/no/such/folder"], "does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, extra, message):
    out = tmp_path / "x.png"
    code, io = run_main(capsys, "generate", "--prompt", "p", "--out", str(out), *ARGS, "--quiet", *extra)
    assert code == 2
    assert message in io.err
    assert "Tip: python -m qwen_nb generate --help" in io.err
    assert not out.exists()


def test_memory_limit_option():
    parse = lambda *a: build_parser().parse_args(["generate", "--prompt", "p", "--out", "x.png", *a])
    assert parse().memory_limit_gb == "auto"
    assert parse("--memory-limit-gb", "29").memory_limit_gb == 29.0
    assert parse("--memory-limit-gb", "none").memory_limit_gb is None
    for bad in ("-3", "lots"):
        with pytest.raises(SystemExit):
            parse("--memory-limit-gb", bad)


def test_output_checks(tmp_path, capsys):
    code, io = run_main(capsys, "generate", "--prompt", "p", "--out", str(tmp_path / "x.gif"), *ARGS)
    assert code == 2 and "should end in one of .png" in io.err
    code, io = run_main(capsys, "generate", "--prompt", "p", "--out", str(tmp_path / "no" / "x.png"), *ARGS)
    assert code == 2 and "does not exist: create it first" in io.err


def test_size_and_aspect_parsing():
    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt", "p", "--out", "x.png", "--aspect", "16:9"])
    assert args.aspect == "16:9" and ASPECTS[args.aspect] == (1664, 928)
    args = parser.parse_args(["generate", "--prompt", "p", "--out", "x.png", "--size", "1328x1328"])
    assert args.size == (1328, 1328)
    for bad in (["--size", "big"], ["--aspect", "5:4"], ["--size", "64x64", "--aspect", "1:1"], []):
        with pytest.raises(SystemExit):
            parser.parse_args(["generate", "--prompt", "p", "--out", "x.png", *bad] if bad else ["generate"])


def test_no_command_prints_usage():
    r = cli()
    assert r.returncode == 2 and "COMMAND" in r.stderr
