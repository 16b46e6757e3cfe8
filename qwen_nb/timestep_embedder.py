"""The timestep embedding of diffusers' `QwenTimestepProjEmbeddings`: sinusoids of 1000*sigma -> MLP.

`Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)` then `TimestepEmbedding(256, D)`.
Returns (B, D). The 128 frequencies exp(-ln(10000) k / 128) stay in float32, as in diffusers.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .switches import Switches


def timestep_frequencies(num_channels: int = 256, max_period: float = 10000.0) -> mx.array:
    """The num_channels/2 sinusoid frequencies exp(-ln(max_period) k / half), float32.

    The exponent is formed in float32 as diffusers forms it; the exp is taken in float64 and rounded once, because
    float32 exp kernels (MLX's, torch's) are off by up to a few ulps, and at an angle of 1000*t*f one ulp of f moves
    the sinusoid by ~3e-5."""
    half = num_channels // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return mx.array(np.exp(exponent.astype(np.float64)).astype(np.float32))


def sinusoids(t: mx.array, freqs: mx.array, scale: float = 1000.0) -> mx.array:
    """[cos, sin] of scale * t * freqs: (B,) -> (B, 2 * len(freqs)), float32."""
    a = scale * (t.astype(mx.float32)[:, None] * freqs[None])
    return mx.concatenate([mx.cos(a), mx.sin(a)], axis=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class QwenTimestepProjEmbeddings(nn.Module):
    def __init__(self, dim: int, num_channels: int = 256, switches: Switches | None = None):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(num_channels, dim)
        self.num_channels = num_channels
        self.switches = switches or Switches()
        self._freqs = timestep_frequencies(num_channels)  # leading underscore: not a parameter

    def __call__(self, t: mx.array, dtype: mx.Dtype) -> mx.array:
        if self.switches.timestep_cache:
            freqs = self._freqs
        else:
            freqs = timestep_frequencies(self.num_channels)
        return self.timestep_embedder(sinusoids(t, freqs).astype(dtype))
