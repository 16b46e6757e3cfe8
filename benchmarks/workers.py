"""The side-by-side benchmarks' plumbing: each framework runs in its own subprocess of the benchmark script (its
own interpreter: MLX here, torch + diffusers for the peer), prints one `RESULT {json}` line, and the driver
collects them. Also what the diffusers workers share: the real flow-matching scheduler, Qwen2.5-VL built from
sizes, and the clock that splits a diffusers call into its stages. Imports neither MLX nor torch at load time.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def serve(workers: dict, name: str, cfg_json: str, out_dir: str) -> None:
    """In the worker subprocess: run `workers[name](cfg, out_dir)` and print its result for the driver."""
    print("RESULT " + json.dumps(workers[name](json.loads(cfg_json), Path(out_dir))))


def run_worker(script, python: str, name: str, cfg: dict, out_dir: Path, timeout: int) -> dict:
    """`script --worker name` under `python`: the dict it printed, or {"error": ...} (with the output's tail)."""
    cmd = [python, str(Path(script).resolve()), "--worker", name, "--config", json.dumps(cfg), "--out", str(out_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"[{name}] {' '.join(cmd[:4])} ...", flush=True)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"[{name}] timed out after {timeout} s", flush=True)
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout)[-3000:]
        print(f"[{name}] failed (exit {r.returncode}):\n{tail}", flush=True)
        return {"error": f"exit {r.returncode}: {tail[-500:]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def peer_available(python: str, tiny: bool, pipeline: str = "QwenImagePipeline") -> tuple[bool, str]:
    """(True, "") when `python` imports torch, transformers and diffusers' `pipeline` and (unless `tiny`) has CUDA;
    else (False, why)."""
    code = f"import torch, transformers; from diffusers import {pipeline}; print(torch.cuda.is_available())"
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{python}: {e}"
    if r.returncode != 0:
        return False, f"{python} cannot import torch + transformers + diffusers' {pipeline}"
    if r.stdout.strip().splitlines()[-1] != "True" and not tiny:
        return False, f"{python} has torch but no CUDA device: diffusers at full size on a CPU is not compared"
    return True, ""


def side_by_side(script, cfg: dict, out_dir: Path, args, pipeline: str, notes: list) -> dict:
    """qwen_nb's worker, then diffusers' (unless `args.no_peer`, or its interpreter `args.peer_python` cannot run
    `pipeline`: said in `notes`), each a dict of named results; returns those that hold a time, failures printed
    and added to `notes`. SystemExit when none finished."""

    def run(python, name):
        r = run_worker(script, python, name, cfg, out_dir, args.timeout)
        return {name: r} if "error" in r else r

    results = run(sys.executable, "qwen_nb")
    if not args.no_peer:
        ok, why = peer_available(args.peer_python, args.tiny, pipeline)
        if ok:
            results.update(run(args.peer_python, "diffusers"))
        else:
            notes.append(f"diffusers not run: {why}.")
    done = {k: v for k, v in results.items() if "median_s" in v}
    for k, v in results.items():
        if k not in done:
            print(f"{k}: {v['error'][:300]}")
            notes.append(f"{k} failed: {v['error']}")
    if not done:
        raise SystemExit("no framework finished: nothing written")
    return done


# ------------------------------------------------------------------------------------------------ diffusers side
def flow_scheduler(**overrides):
    """diffusers' FlowMatchEulerDiscreteScheduler with Qwen-Image's scheduler_config.json (spec section 5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    return FlowMatchEulerDiscreteScheduler(**{**config, **overrides})


def random_qwen_image(sizes: dict, **token_ids):
    """diffusers' Qwen-Image transformer and VAE and transformers' Qwen2.5-VL (see `qwen25_vl`) with random weights
    made straight in bfloat16 on the CUDA device when there is one (no float32 copy): (transformer, vae,
    text_encoder, device)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            transformer = QwenImageTransformer2DModel(**sizes["transformer"])
            vae = AutoencoderKLQwenImage(**sizes["vae"])
            text_encoder = qwen25_vl(sizes, **token_ids)
    finally:
        torch.set_default_dtype(torch.float32)
    return transformer, vae, text_encoder, device


def qwen25_vl(sizes: dict, **token_ids):
    """transformers' Qwen2_5_VLForConditionalGeneration from a benchmark's sizes ("text" with its "mrope_section",
    "vision"), built in the current default dtype and device; `token_ids` (image_token_id=...) as the config takes."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(sizes["text"])
    mrope = text.pop("mrope_section")
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}
    config = Qwen2_5_VLConfig(
        text_config=dict(**text, rms_norm_eps=1e-6, rope_parameters=rope), vision_config=sizes["vision"], **token_ids
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def stamp(results: dict, cuda: bool) -> dict:
    """diffusers' results with the torch and diffusers versions and the device's name added."""
    import diffusers
    import torch

    for r in results.values():
        r["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__}
        r["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    return results


def clock_result(t: dict, cuda: bool, **fields) -> dict:
    """A diffusers result from `StageClock.run`'s times: the whole call as median_s, `fields` (what each benchmark
    names its stages), the steps' sum, the decode and the peak memory."""
    steps = t["step_s"]
    return {
        "median_s": t["total_s"],
        **fields,
        "step_median_s": sorted(steps)[len(steps) // 2],
        "denoise_s": sum(steps),
        "decode_s": t["decode_s"],
        "peak_gb": peak_gb(cuda),
    }


def peak_gb(cuda: bool) -> float:
    """torch's peak allocated memory on the CUDA device since the last reset, GB (0 on a CPU: not measured)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else 0.0


class StageClock:
    """Splits one diffusers pipeline call into stages by hooks: the prompt encoding (`pipe.encode_prompt` timed),
    the transformer's first call (everything between is picture encoding and set-up), each step's end (the
    pipeline's step callback) and the decode (after the last step). CUDA is synchronised at every mark."""

    def __init__(self, pipe, cuda: bool):
        import torch

        self.cuda, self.marks, self.steps_at = cuda, {}, []
        self._sync = torch.cuda.synchronize if cuda else (lambda: None)
        encode = pipe.encode_prompt

        def timed_encode(*args, **kwargs):
            self._sync()
            t = time.perf_counter()
            out = encode(*args, **kwargs)
            self._sync()
            self.marks["text_s"] = self.marks.get("text_s", 0.0) + time.perf_counter() - t
            return out

        def first_call(module, args, kwargs):
            if "first" not in self.marks:
                self._sync()
                self.marks["first"] = time.perf_counter()

        pipe.encode_prompt = timed_encode
        pipe.transformer.register_forward_pre_hook(first_call, with_kwargs=True)

    def on_step(self, pipe, i, t, kwargs) -> dict:
        self._sync()
        self.steps_at.append(time.perf_counter())
        return {}

    def run(self, call):
        """`call(on_step)` timed; returns (its output, stage times: total_s, text_s, before_steps_s (after the text,
        before the first step), step_s (list), decode_s)."""
        self.marks.clear()
        self.steps_at = []
        self._sync()
        t0 = time.perf_counter()
        out = call(self.on_step)
        self._sync()
        end = time.perf_counter()
        at = self.steps_at
        return out, {
            "total_s": end - t0,
            "text_s": self.marks.get("text_s", 0.0),
            "before_steps_s": self.marks["first"] - t0 - self.marks.get("text_s", 0.0),
            "step_s": [b - a for a, b in zip([self.marks["first"]] + at[:-1], at)],
            "decode_s": end - at[-1],
        }
