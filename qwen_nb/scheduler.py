"""Sampling between transformer calls: diffusers' `FlowMatchEulerDiscreteScheduler` with Qwen-Image's config,
the 2x2 latent packing of `QwenImagePipeline._pack_latents`, and its norm-rescaled CFG combine.

Sigma schedule: linspace(1, 1/N, N), an exponential time shift by mu (linear in the image sequence length),
then a stretch so the last sigma is `shift_terminal`; Euler steps x += (sigma_{i+1} - sigma_i) * v.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .loading import Config

# FlowMatchEulerDiscreteScheduler's class defaults: what diffusers takes for a key a scheduler_config.json leaves out
FLOW_MATCH_DEFAULTS = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=False,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    shift_terminal=None,
    time_shift_type="exponential",
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    invert_sigmas=False,
)


@dataclass
class SchedulerConfig(Config):
    """`scheduler/scheduler_config.json` of Qwen/Qwen-Image (not the class defaults, which differ); `from_dict` fills
    the keys a file leaves out with the class defaults, as diffusers does."""

    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    base_shift: float = 0.5
    max_shift: float = 0.9
    shift_terminal: float | None = 0.02
    num_train_timesteps: int = 1000
    use_dynamic_shifting: bool = True
    time_shift_type: str = "exponential"
    shift: float = 1.0
    use_karras_sigmas: bool = False  # the shifted sigmas respaced as diffusers' _convert_to_karras (rho 7)
    use_exponential_sigmas: bool = False  # ... log-uniformly, as _convert_to_exponential
    use_beta_sigmas: bool = False  # refused: diffusers needs scipy's beta.ppf for it
    invert_sigmas: bool = False  # 1 - sigma, ending at 1 (Mochi's), as diffusers does it

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        cfg = super().from_dict({**FLOW_MATCH_DEFAULTS, **d})
        unsupported = [k for k in ("use_beta_sigmas", "stochastic_sampling") if d.get(k)]
        if unsupported:
            raise ValueError(
                f"scheduler options {unsupported} are not supported by qwen_nb's flow-match Euler (beta sigmas need "
                "scipy's beta.ppf; stochastic sampling draws fresh noise from torch's global generator every step)"
            )
        spacings = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if d.get(k)]
        if len(spacings) > 1:
            raise ValueError(f"only one of {spacings} can be used (diffusers' rule)")
        if cfg.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"unknown time_shift_type {cfg.time_shift_type!r}; expected 'exponential' or 'linear'")
        return cfg

    @classmethod
    def from_file(cls, path) -> "SchedulerConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def merged(self, overrides: dict | None) -> "SchedulerConfig":
        """This config with some keys replaced (e.g. the Lightning schedule's shifts); unknown keys are an error."""
        if not overrides:
            return self
        if not isinstance(overrides, dict):
            raise ValueError(f"scheduler_config takes a dict of overrides, got {type(overrides).__name__}")
        known = asdict(self)
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(
                f"scheduler_config: unknown key(s) {unknown}; the flow-match Euler scheduler's keys are {sorted(known)}"
            )
        return type(self).from_dict({**known, **overrides})


def calculate_shift(image_seq_len: int, cfg: SchedulerConfig) -> float:
    """mu, linear in the number of image tokens: base_shift at base_image_seq_len, max_shift at max_image_seq_len."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return image_seq_len * m + (cfg.base_shift - m * cfg.base_image_seq_len)


def flow_match_sigmas(steps: int, image_seq_len: int, cfg: SchedulerConfig | None = None, sigmas=None) -> np.ndarray:
    """The steps + 1 sigmas, float32, ending in 0, exactly as diffusers computes them (one step aside: below):
    linspace(1, 1/steps, steps), or the given `sigmas` (a pipeline's `sigmas=`, then steps = len(sigmas)), shifted
    for `image_seq_len` image tokens and stretched to end at shift_terminal."""
    cfg = cfg or SchedulerConfig()
    if sigmas is not None:
        s = np.asarray(sigmas, dtype=np.float64).astype(np.float32)
        steps = len(s)
    elif steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    else:
        s = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    if cfg.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, cfg)
        if cfg.time_shift_type == "exponential":
            s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        else:
            s = mu / (mu + (1 / s - 1))
    else:
        s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
    if cfg.shift_terminal and steps > 1:
        # At one step the stretch is 0/0 (the only sigma is both the first, 1, and the last): diffusers returns
        # NaN there and the pipeline makes a NaN image. Without the stretch the step is the exact one-step Euler
        # from pure noise, x0 = x - v.
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    s = s.astype(np.float32)
    if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
        # diffusers respaces between the last and the first shifted sigma, in float64, then casts to float32
        lo, hi = float(s[-1]), float(s[0])
        if cfg.use_karras_sigmas:
            rho = 7.0
            ramp = np.linspace(0, 1, steps)
            s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        else:
            s = np.exp(np.linspace(math.log(hi), math.log(lo), steps))
        s = s.astype(np.float32)
    if cfg.invert_sigmas:  # diffusers' Mochi option: 1 - sigma, the terminal value 1
        return np.concatenate([np.float32(1) - s, np.ones(1, np.float32)])
    return np.concatenate([s, np.zeros(1, np.float32)])


class FlowMatchEulerScheduler:
    """`set_timesteps(steps, image_seq_len)` then `step(v, i, x)` for i = 0..steps-1."""

    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self.sigmas = None
        self.timesteps = None

    @classmethod
    def from_pretrained(cls, folder) -> "FlowMatchEulerScheduler":
        """From a checkpoint's `scheduler/` folder (or the pipeline folder holding it); the real config if absent."""
        folder = Path(folder)
        for path in (folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json"):
            if path.exists():
                return cls(SchedulerConfig.from_file(path))
        return cls()

    def set_timesteps(self, steps: int, image_seq_len: int) -> np.ndarray:
        self.sigmas = flow_match_sigmas(steps, image_seq_len, self.config)
        self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps
        return self.timesteps

    def step(self, v: mx.array, i: int, x: mx.array) -> mx.array:
        """One Euler step from sigma_i to sigma_{i+1} (`euler_step`)."""
        if self.sigmas is None:
            raise RuntimeError("call set_timesteps(steps, image_seq_len) before step()")
        return euler_step(x, v, self.sigmas[i], self.sigmas[i + 1])


def euler_step(x: mx.array, v: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """x + (sigma_next - sigma) v, accumulated in float32 and returned in v's dtype (as diffusers' scheduler)."""
    dt = float(np.float32(sigma_next) - np.float32(sigma))
    return (x.astype(mx.float32) + dt * v).astype(v.dtype)


def pack_latents(z: mx.array, patch: int = 2) -> mx.array:
    """(B, C, H, W) latents -> (B, (H/p)(W/p), C p^2) tokens of p x p patches (p = the transformer's patch_size,
    2 for Qwen-Image); channel index c*p^2 + dy*p + dx, tokens row-major."""
    B, C, H, W = z.shape
    if H % patch or W % patch:
        raise ValueError(f"latent height and width must be multiples of {patch} to pack patches, got {H}x{W}")
    z = z.reshape(B, C, H // patch, patch, W // patch, patch).transpose(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return z.reshape(B, (H // patch) * (W // patch), C * patch * patch)


def unpack_latents(x: mx.array, grid: tuple[int, int], patch: int = 2) -> mx.array:
    """(B, h*w, C p^2) tokens of a (h, w) patch grid -> (B, C, p h, p w) latents; the inverse of `pack_latents`."""
    B, N, Cp = x.shape
    h, w = grid
    if h * w != N:
        raise ValueError(f"grid {h}x{w} has {h * w} patches, but there are {N} tokens")
    C = Cp // (patch * patch)
    x = x.reshape(B, h, w, C, patch, patch).transpose(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return x.reshape(B, C, patch * h, patch * w)


def cfg_combine(cond: mx.array, uncond: mx.array, scale: float) -> mx.array:
    """Classifier-free guidance with Qwen-Image's rescale: the combined velocity keeps each token's norm of `cond`."""
    comb = uncond + scale * (cond - uncond)
    cond_norm = mx.linalg.norm(cond.astype(mx.float32), axis=-1, keepdims=True)
    comb_norm = mx.linalg.norm(comb.astype(mx.float32), axis=-1, keepdims=True)
    return (comb * (cond_norm / comb_norm)).astype(cond.dtype)
