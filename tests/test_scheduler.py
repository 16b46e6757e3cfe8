"""The flow-match Euler schedule, one step, latent packing and the CFG combine against diffusers
(`FlowMatchEulerDiscreteScheduler` with Qwen-Image's scheduler_config.json, driven as `QwenImagePipeline` drives it;
goldens/make_transformer_goldens.py), plus the spec's reference table and the closed form."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from transformer_goldens import assert_close, load

from qwen_nb.scheduler import (
    FlowMatchEulerScheduler,
    SchedulerConfig,
    calculate_shift,
    cfg_combine,
    pack_latents,
    unpack_latents,
)

G, INFO = load("scheduler")
CASES = {k: v for k, v in INFO["cases"].items() if isinstance(v, dict) and "steps" in v}

# spec section 3.3 (computed with diffusers 0.42.1, 6 decimals): (size, steps) -> mu, first four, last three sigmas
SPEC_TABLE = {
    (1024, 1024, 50): (0.693548, [1.0, 0.989701, 0.979191, 0.968465], [0.095499, 0.058476, 0.02]),
    (1328, 1328, 50): (0.834325, [1.0, 0.990988, 0.981768, 0.972332], [0.105449, 0.063783, 0.02]),
    (1024, 1024, 20): (0.693548, [1.0, 0.972237, 0.943011, 0.912205], [0.199458, 0.113811, 0.02]),
    (512, 512, 4): (0.538710, [1.0, 0.749268, 0.432588, 0.02], []),
}


def schedule(height, width, steps, config=None):
    scheduler = FlowMatchEulerScheduler(config)
    timesteps = scheduler.set_timesteps(steps, (height // 16) * (width // 16))
    return scheduler, timesteps


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c]["steps"] > 1])
def test_schedule_matches_diffusers(case):
    c = CASES[case]
    scheduler, timesteps = schedule(c["height"], c["width"], c["steps"])
    assert scheduler.sigmas.dtype == np.float32 and scheduler.sigmas.shape == (c["steps"] + 1,)
    assert_close(scheduler.sigmas, G[f"sigmas_{case}"], f"sigmas {case}")
    assert_close(timesteps, G[f"timesteps_{case}"], f"timesteps {case}", rtol=1e-5, atol=1e-4)  # 1000x the sigmas
    assert math.isclose(calculate_shift(c["image_seq_len"], SchedulerConfig()), c["mu"], rel_tol=1e-12)


def test_one_step():
    """diffusers divides 0 by 0 at one step (its stretch to the terminal sigma) and returns NaN; qwen_nb gives the
    exact one-step Euler from pure noise, sigma 1 -> 0."""
    assert np.isnan(np.array(G["sigmas_1024_1"][0])) and np.isnan(np.array(G["timesteps_1024_1"][0]))
    scheduler, timesteps = schedule(1024, 1024, 1)
    np.testing.assert_array_equal(scheduler.sigmas, [1.0, 0.0])
    np.testing.assert_array_equal(timesteps, [1000.0])
    x, v = mx.ones((1, 4, 64)), mx.full((1, 4, 64), 0.25)
    assert_close(scheduler.step(v, 0, x), x - v, "one step")


@pytest.mark.parametrize("size", SPEC_TABLE)
def test_spec_reference_table(size):
    height, width, steps = size
    mu, first, last = SPEC_TABLE[size]
    scheduler, _ = schedule(height, width, steps)
    assert abs(calculate_shift((height // 16) * (width // 16), SchedulerConfig()) - mu) < 5e-7
    np.testing.assert_allclose(scheduler.sigmas[:4], first, atol=1e-6)
    if last:
        np.testing.assert_allclose(scheduler.sigmas[-4:-1], last, atol=1e-6)
    assert scheduler.sigmas[-1] == 0


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c]["steps"] > 1])
def test_closed_form(case):
    """Spec 3.2 in float64: shift exp(mu) / (exp(mu) + 1/s - 1), then stretch so the last sigma is 0.02."""
    c = CASES[case]
    n, seq = c["steps"], c["image_seq_len"]
    mu = 0.5 + (seq - 256) * (0.9 - 0.5) / (8192 - 256)
    s = np.linspace(1.0, 1 / n, n)
    s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    s = 1 - (1 - s) / ((1 - s[-1]) / (1 - 0.02))
    scheduler, _ = schedule(c["height"], c["width"], n)
    assert_close(scheduler.sigmas[:-1], s, f"closed form {case}", rtol=0, atol=1e-6)  # float32 vs float64


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_step_matches_diffusers(dtype):
    c = INFO["cases"]["step"]
    height, width, steps = (CASES[c["schedule"]][k] for k in ("height", "width", "steps"))
    scheduler, _ = schedule(height, width, steps)
    out = scheduler.step(G["step_v"].astype(dtype), c["index"], G["step_x"].astype(dtype))
    assert out.dtype == dtype  # diffusers accumulates in float32 and returns the model output's dtype
    if dtype == mx.float32:
        assert_close(out, G["step_out"], "step float32")
    else:  # the same roundings as diffusers (dt and dt * v in bf16, the sum in float32, then bf16): equal bits
        assert_close(out, G["step_out_bf16"], "step bfloat16", rtol=0, atol=0)


def test_step_needs_a_schedule():
    with pytest.raises(RuntimeError, match="set_timesteps"):
        FlowMatchEulerScheduler().step(mx.zeros((1, 4)), 0, mx.zeros((1, 4)))


def test_pack_unpack_match_diffusers():
    packed = pack_latents(G["pack_z"])
    assert packed.shape == (2, 15, 64)
    assert_close(packed, G["pack_tokens"], "pack", rtol=0, atol=0)
    assert_close(unpack_latents(G["pack_tokens"], (3, 5)), G["unpack_z"], "unpack", rtol=0, atol=0)
    assert_close(unpack_latents(packed, (3, 5)), G["pack_z"], "round trip", rtol=0, atol=0)
    # channel index c*4 + dy*2 + dx: token 0 holds the top-left 2x2 patch of each channel
    z = np.array(G["pack_z"])
    np.testing.assert_array_equal(np.array(packed[0, 0, 4 * 3 + 2 * 1 + 0]), z[0, 3, 1, 0])


def test_pack_unpack_bad_shapes():
    with pytest.raises(ValueError, match="multiples of 2"):
        pack_latents(mx.zeros((1, 16, 5, 6)))
    with pytest.raises(ValueError, match="3x4.*12.*15"):
        unpack_latents(mx.zeros((1, 15, 64)), (3, 4))


def test_cfg_combine_matches_diffusers():
    out = cfg_combine(G["cfg_cond"], G["cfg_uncond"], INFO["cases"]["cfg_scale"])
    assert_close(out, G["cfg_out"], "cfg combine")
    # the rescale keeps each token's norm of the conditional prediction
    assert_close(mx.linalg.norm(out, axis=-1), mx.linalg.norm(G["cfg_cond"], axis=-1), "cfg norms")


def test_cfg_combine_keeps_bfloat16():
    cond, uncond = G["cfg_cond"].astype(mx.bfloat16), G["cfg_uncond"].astype(mx.bfloat16)
    assert cfg_combine(cond, uncond, 4.0).dtype == mx.bfloat16


REAL_JSON = INFO["scheduler_config"]


def test_default_config_is_the_real_json():
    assert SchedulerConfig() == SchedulerConfig.from_dict({**REAL_JSON, "_class_name": "X", "new_key": 1})


def test_from_pretrained_reads_scheduler_config_json(tmp_path):
    changed = {**REAL_JSON, "max_shift": 1.15, "max_image_seq_len": 4096, "_class_name": "FlowMatchEuler"}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(changed))
    for folder in (tmp_path, tmp_path / "scheduler"):  # the pipeline folder or its scheduler/ folder
        scheduler = FlowMatchEulerScheduler.from_pretrained(folder)
        assert (scheduler.config.max_shift, scheduler.config.max_image_seq_len) == (1.15, 4096)
        scheduler.set_timesteps(20, 4096)
        assert not np.allclose(scheduler.sigmas, G["sigmas_1024_20"])  # a different mu: a different schedule
    # no file: the real config
    assert FlowMatchEulerScheduler.from_pretrained(tmp_path / "empty").config == SchedulerConfig()


def test_unsupported_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="use_beta_sigmas"):
        SchedulerConfig.from_dict({**REAL_JSON, "use_beta_sigmas": True})
    with pytest.raises(ValueError, match="stochastic_sampling"):
        SchedulerConfig.from_dict({**REAL_JSON, "stochastic_sampling": True})
    with pytest.raises(ValueError, match="time_shift_type"):
        SchedulerConfig.from_dict({**REAL_JSON, "time_shift_type": "cosine"})
