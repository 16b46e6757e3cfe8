"""Qwen-Image over two processes (qwen_nb.distributed): two local ranks started by `mlx.launch --backend ring -n 2`
on the CPU run every case of tests/distributed_ranks.py once; each must equal the same case in this one process
(pictures within 1/255, latents within 1e-5), and each rank must hold its closed-form share of the transformer."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import distributed_ranks as ranks  # noqa: E402

from qwen_nb.distributed import Parallel, check_tensor_split, shard_axis  # noqa: E402
from qwen_nb.loading import read_header, weight_files  # noqa: E402
from qwen_nb.quantize import is_timestep_weight  # noqa: E402
from qwen_nb.transformer import TransformerConfig  # noqa: E402

SCRIPT = Path(ranks.__file__)


def launcher() -> str:
    """mlx.launch beside this Python (the venv's), else on PATH; skip only when there is none at all."""
    here = Path(sys.executable).parent / "mlx.launch"
    found = str(here) if here.exists() else shutil.which("mlx.launch")
    if found is None or not mx.distributed.is_available():
        pytest.skip("mlx.launch is not installed with this MLX (or MLX has no distributed backend): cannot start ranks")
    return found


def launch(*args, timeout=600, module: str | None = None) -> subprocess.CompletedProcess:
    program = ["-m", module] if module else [str(SCRIPT)]
    command = [launcher(), "--backend", "ring", "-n", "2", "--", sys.executable, *program, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=SCRIPT.parents[1])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    run = launch(str(out))
    if run.returncode or not (out / "results.json").exists():  # mlx.launch may exit 0 when a rank failed
        pytest.fail(f"the two ranks failed (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return np.load(out / "results.npz"), json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("case", list(ranks.CASES))
def test_two_ranks_equal_one_process(results, case):
    arrays, _ = results
    latents, images = ranks.single(case)
    np.testing.assert_allclose(arrays[f"{case}/latents"], latents, rtol=0, atol=1e-5)
    got = arrays[f"{case}/images"].astype(int)
    assert got.shape == images.shape
    assert np.abs(got - images.astype(int)).max() <= 1


@pytest.mark.parametrize("case", ["cfg_demo", "cfg_demo_images"])
def test_cfg_ranks_each_encode_and_run_their_own_text(results, case):
    _, info = results
    assert info["bytes"][case]["texts"] == [1, 1]  # one process alone encodes both texts
    held = info["bytes"][case]["held"]
    assert held[0] == held[1]  # each rank holds the whole transformer


def closed_form(folder: Path, ranks_: int, itemsize: int | None) -> tuple[int, int]:
    """(bytes one rank holds or reads, bytes of the whole transformer) from the safetensors headers: the split
    weights' share is 1/ranks, the rest is replicated; `itemsize` None: as stored on disk."""
    stored = {"F32": 4, "F16": 2, "BF16": 2}
    part = whole = 0
    for f in weight_files(folder):
        for name, spec in read_header(f).items():
            if name == "__metadata__" or is_timestep_weight(name):
                continue  # schedule_modulation: never in the denoising transformer
            size = int(np.prod(spec["shape"])) * (itemsize or stored[spec["dtype"]])
            whole += size
            part += size // ranks_ if shard_axis(name) is not None else size
    return part, whole


@pytest.mark.parametrize("case", ["tensor_tiny", "tensor_demo"])
def test_tensor_ranks_hold_and_read_their_share(results, case):
    _, info = results
    folder = ranks.CASES[case][0] / "transformer"
    held, whole = closed_form(folder, 2, 4)  # float32 in memory
    read, _ = closed_form(folder, 2, None)
    assert info["bytes"][case]["held"] == [held, held]
    assert info["bytes"][case]["read"] == [read, read]
    share = held / whole
    print(f"{case}: each rank holds {held:,} of {whole:,} bytes ({share:.3f} of the transformer)")
    assert share < 0.6 if case == "tensor_demo" else share < 0.75  # 1/2 + the replicated embedders and norms


def test_tensor_ranks_hold_quantized_shares(results):
    _, info = results
    held_8bit = info["bytes"]["tensor_demo_8bit"]["held"][0]
    assert held_8bit < info["bytes"]["tensor_demo"]["held"][0] / 3  # float32 -> 8 bits + scales, per rank


def test_ranks_started_differently_refuse_with_the_cause():
    run = launch("--mismatch", timeout=300)
    # mlx.launch itself exits 0 here; it reports the exit codes (the first rank to fail ends the other)
    assert "exited with code 1" in run.stdout + run.stderr
    assert "the ranks were started with different models or options" in run.stdout + run.stderr


def test_num_images_equals_one_generation_per_seed():
    pipe = ranks.pipeline("cfg_demo", parallel=False)
    images = pipe.generate(ranks.PROMPT, seed=11, steps=2, num_images=2, progress=False)
    batch = np.array(pipe.last_latents)
    for i, image in enumerate(images):
        alone = pipe.generate(ranks.PROMPT, seed=11 + i, steps=2, progress=False)
        np.testing.assert_allclose(batch[i], np.array(pipe.last_latents[0]), rtol=0, atol=1e-5)
        assert np.abs(np.array(image).astype(int) - np.array(alone).astype(int)).max() <= 1
    one = pipe.generate(ranks.PROMPT, seed=11, steps=2, num_images=1, progress=False)
    assert isinstance(one, list) and len(one) == 1


def test_bad_requests_name_the_fix():
    with pytest.raises(ValueError, match="even number of ranks"):
        Parallel("cfg")  # this process alone: a group of one
    with pytest.raises(ValueError, match="None, 'cfg' or 'tensor'"):
        Parallel("pipeline")
    with pytest.raises(ValueError, match="does not divide them"):
        check_tensor_split(TransformerConfig.tiny(num_attention_heads=3, axes_dims_rope=(8, 12, 12)), 2)
    pipe = ranks.pipeline("cfg_demo", parallel=False)
    with pytest.raises(ValueError, match="num_images must be an integer >= 1"):
        pipe.generate(ranks.PROMPT, num_images=0)
    with pytest.raises(ValueError, match="does not go with latents= or image="):
        pipe.generate(ranks.PROMPT, num_images=2, latents=mx.zeros((1, 16, 12, 12)))


def test_cli_runs_under_mlx_launch_and_rank_0_writes(tmp_path):
    out = tmp_path / "pair.png"
    args = ["generate", "--model", str(ranks.DEMO), "--prompt", ranks.PROMPT, "--out", str(out)]
    args += ["--steps", "2", "--seed", "3", "--dtype", "float32", "--parallel", "cfg"]
    run = launch(*args, timeout=300, module="qwen_nb")
    assert out.exists(), run.stdout[-2000:] + run.stderr[-2000:]
    assert (run.stdout + run.stderr).count("wrote ") == 1  # rank 0 alone reports
    pipe = ranks.pipeline("cfg_demo", parallel=False)
    alone = np.array(pipe.generate(ranks.PROMPT, seed=3, steps=2, progress=False)).astype(int)
    from PIL import Image

    assert np.abs(np.array(Image.open(out).convert("RGB")).astype(int) - alone).max() <= 1
