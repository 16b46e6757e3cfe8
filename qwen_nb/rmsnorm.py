"""RMSNorm with a learned weight, as diffusers' `models.normalization.RMSNorm` (eps 1e-6); shape-preserving."""

import mlx.core as mx
import mlx.nn as nn

from .switches import Switches


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """RMSNorm written out. Statistics in float32; like diffusers, the result is rounded to a half-precision
    weight's dtype before the weight is applied."""
    xf = x.astype(mx.float32)
    y = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is None:
        return y.astype(x.dtype)
    if weight.dtype in (mx.float16, mx.bfloat16):
        y = y.astype(weight.dtype)
    return y * weight


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-6, switches: Switches | None = None):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps
        self.switches = switches or Switches()

    def __call__(self, x: mx.array) -> mx.array:
        if self.switches.fast_rms_norm:
            return mx.fast.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)
