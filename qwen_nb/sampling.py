"""The sampling loop of diffusers' `QwenImagePipeline.__call__`, as a generator.

`Schedule` is computed once per generation: the scheduler's sigmas, the first step that runs (img2img skips some),
and the sigmas the transformer sees (rounded as diffusers rounds them). `denoise(model, x, text, ...)` yields the
packed latents after every step, unevaluated: the caller decides where `mx.eval` goes (once per step in
`QwenImagePipeline.generate`; notebook 10 tries the other places with the same loop).
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .scheduler import SchedulerConfig, cfg_combine, euler_step, flow_match_sigmas


def first_step(steps: int, strength: float) -> int:
    """The index of the first step run at `strength`: diffusers' `get_timesteps` (SD3's), which skips
    int(steps - steps * strength) steps: ceil(steps * strength) run, up to float rounding."""
    return int(max(steps - min(steps * strength, steps), 0))


def check_strength(strength, steps: int) -> None:
    """ValueError unless strength is a number in (0, 1] that leaves at least one of `steps` to run."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.number)) or not 0 < strength <= 1:
        raise ValueError(
            f"strength must be a number in (0, 1], got {strength!r}: how much of the picture is redrawn (1 starts "
            "from pure noise; 0.6, diffusers' default, keeps its layout)"
        )
    if first_step(steps, strength) >= steps:
        raise ValueError(
            f"strength {strength} leaves none of the {steps} steps to run (diffusers' get_timesteps skips "
            f"int(steps - steps * strength) of them): use a strength of at least 1/steps = {1 / steps:.4g} (any "
            "strength up to that runs the last step only)"
        )


@dataclass(frozen=True)
class Schedule:
    """The sigmas of one generation: steps + 1 values ending in 0 (float32), and the index of the first step run."""

    sigmas: np.ndarray
    start: int = 0
    num_train_timesteps: int = 1000

    @classmethod
    def make(
        cls, config: SchedulerConfig, steps: int, image_seq_len: int, strength: float = 1.0, sigmas=None
    ) -> "Schedule":
        """The flow-match schedule for `steps` at `image_seq_len` image tokens (or for the given `sigmas`, as
        diffusers' `sigmas=`: then steps = len(sigmas)). With `strength` < 1 (img2img) the first steps are skipped
        as diffusers' `get_timesteps` skips them (`first_step`); the sigmas stay those of all `steps`, so img2img
        starts at sigmas[start]."""
        steps = steps if sigmas is None else len(sigmas)
        sigmas = flow_match_sigmas(steps, image_seq_len, config, sigmas)
        check_strength(strength, steps)
        return cls(sigmas, first_step(steps, strength), config.num_train_timesteps)

    @property
    def steps(self) -> int:
        """All steps of the schedule, run or skipped."""
        return len(self.sigmas) - 1

    @property
    def steps_run(self) -> int:
        """The steps from `start` to the end."""
        return self.steps - self.start

    @property
    def timesteps(self) -> np.ndarray:
        """diffusers' timesteps: sigma * num_train_timesteps, one per step."""
        return self.sigmas[:-1] * np.float32(self.num_train_timesteps)

    def model_sigmas(self, dtype: mx.Dtype) -> mx.array:
        """The sigmas the transformer sees, one per step: diffusers passes `timestep = t.to(latents.dtype) / 1000`,
        so each is rounded through 1000 sigma in the dtype (bfloat16: 989.70 -> 988). The 1000 is the pipeline's
        literal, not the scheduler's num_train_timesteps (t is sigma x num_train_timesteps)."""
        t = mx.array(self.timesteps, dtype=mx.float32).astype(dtype)
        return t / 1000

    def key(self, dtype: mx.Dtype) -> tuple:
        """What a modulation table for this schedule depends on."""
        return tuple(float(s) for s in self.sigmas), str(dtype)


def _velocity(model, x, text, sigma, grid, mods, block_hook):
    return model(x, text[0], sigma, grid, text[1], mods=mods, block_hook=block_hook)


def denoise(
    model,
    latents: mx.array,
    text: tuple,
    *,
    schedule: Schedule,
    grid: tuple[int, int],
    negative: tuple | None = None,
    cfg_scale: float = 4.0,
    mods=None,
    batched_cfg: bool = True,
    block_hook=None,
    blend=None,
    cfg_pair=None,
):
    """Flow-match Euler from `latents` (packed, (B, N, C): B pictures of one prompt): yields the latents after each
    step from `schedule.start`, unevaluated.

    `text` and `negative` are (embeds (1, L, D), mask (1, L) or None); with `negative` every step runs CFG with
    Qwen-Image's norm rescale. `mods` is the schedule's `ModulationTable` (a row per step) when the modulation was
    computed up front, else None (the model computes it each call). With `batched_cfg` the two CFG passes run as
    one batch of two when the texts have one length and no padding (padding would need a key mask, which takes
    attention off its fused kernel: 0.73 s instead of 0.32 s per 1024x1024 step on an H200). `blend(i, x)`, if
    given, replaces the latents after step i (inpainting keeps the unmasked region). `cfg_pair` (a
    `qwen_nb.distributed.Parallel` in "cfg" mode): CFG in parallel, this process runs `text` (its own half of the
    pair: the prompt or the negative prompt) and `cfg_pair.exchange` meets the other half once per step."""
    sigmas = schedule.model_sigmas(latents.dtype)
    B = latents.shape[0]
    text, negative = _repeat(text, B), _repeat(negative, B)
    batched = negative is not None and batched_cfg
    batched = batched and text[0].shape == negative[0].shape and text[1] is None and negative[1] is None
    if batched:
        both = (mx.concatenate([text[0], negative[0]]), None)
    x = latents
    for i in range(schedule.start, schedule.steps):
        sigma = sigmas[i : i + 1]
        row = None if mods is None else mods.step(i)
        if cfg_pair is not None:
            v = cfg_combine(*cfg_pair.exchange(_velocity(model, x, text, sigma, grid, row, block_hook)), cfg_scale)
        elif batched:
            v = _velocity(model, mx.concatenate([x, x]), both, sigma, grid, row, block_hook)
            v = cfg_combine(v[:B], v[B:], cfg_scale)
        else:
            v = _velocity(model, x, text, sigma, grid, row, block_hook)
            if negative is not None:
                v = cfg_combine(v, _velocity(model, x, negative, sigma, grid, row, block_hook), cfg_scale)
        x = euler_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1])
        if blend is not None:
            x = blend(i, x)
        yield x


def evaluated(loop, overlap: bool = True):
    """The loop's latents, each evaluated before it is yielded. With `overlap`, step k+1's graph is built (Python)
    and queued while step k runs on the device (`mx.async_eval`), so the device does not wait between steps for
    Python to trace the next one (11-16 ms per forward of the 60-block model on a 2-core x86 host, two forwards a
    CFG step); the values are the same, only the order of the host's work changes. Without, each step is evaluated
    before the next is built."""
    it = iter(loop)
    if not overlap:
        for x in it:
            mx.eval(x)
            yield x
        return
    x = next(it, None)
    if x is None:
        return
    mx.async_eval(x)
    for following in it:  # built while x runs
        mx.async_eval(following)
        mx.eval(x)
        yield x
        x = following
    mx.eval(x)
    yield x


def _repeat(text: tuple | None, batch: int) -> tuple | None:
    """(embeds, mask) of one prompt repeated for a batch of pictures."""
    if text is None or text[0].shape[0] == batch:
        return text
    return tuple(None if t is None else mx.repeat(t, batch, axis=0) for t in text)


def eval_every_blocks(k: int):
    """A `block_hook` that evaluates the activations after every k-th block (bounds the work queued on a GPU)."""

    def hook(i, img, txt):
        if (i + 1) % k == 0:
            mx.eval(img, txt)

    return hook
