"""Qwen-Image's 3-D rotary position embedding, as diffusers' `QwenEmbedRope(theta=10000, scale_rope=True)`.

The head dimension (128) is split into three axes, (frame, height, width) = (16, 56, 56) channels, i.e.
8 + 28 + 28 = 64 rotation frequencies. Channels are rotated in interleaved pairs (x[2i], x[2i+1]), not the
half-split layout of the text encoder. Image positions are centred on the patch grid; text token j sits at
max(h//2, w//2) + j on all three axes, just past the largest image position.

`rope_table` returns cos and sin of shape (L + N, 64) in float32, text rows first, then image rows in row-major
grid order: the order of the joint attention sequence. Qwen-Image-Edit appends its condition pictures' tokens after
the image's as further frames (`conditions`): picture k is frame k, centred on its own grid, and the text starts
past the largest grid's half.
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np


def axis_frequencies(dim: int, theta: float = 10000.0) -> np.ndarray:
    """The dim/2 rotation frequencies of one axis, theta^(-2k/dim), float32 as diffusers rounds them.

    diffusers rounds the exponent 2k/dim to float32 before the power and the power before the reciprocal; each
    rounding moves a frequency by a few ulps, and a position of ~1000 turns one ulp into ~1e-4 of angle, so the
    same three roundings are made here (the power itself in float64)."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    power = np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


def image_positions(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column position of each of the h*w image tokens (row-major), centred: rows -(h - h//2)..h//2-1."""
    rows = np.arange(h) - (h - h // 2)
    cols = np.arange(w) - (w - w // 2)
    return np.repeat(rows, w), np.tile(cols, h)


def rope_angles(
    h: int, w: int, text_len: int, axes_dims=(16, 56, 56), theta: float = 10000.0, conditions=()
) -> np.ndarray:
    """Rotation angles (text_len + N, sum(axes_dims)//2) in float32: text rows first, then the image grid (frame 0),
    then each condition picture's (h, w) grid of `conditions` as frame 1, 2, ... (N counts them all)."""
    f_frame, f_row, f_col = (axis_frequencies(d, theta) for d in axes_dims)
    grids = [(h, w), *conditions]
    frames = []
    for k, (gh, gw) in enumerate(grids):
        rows, cols = (p[:, None].astype(np.float32) for p in image_positions(gh, gw))
        frame = np.full((gh * gw, 1), k, np.float32)
        frames.append(np.concatenate([frame * f_frame[None], rows * f_row[None], cols * f_col[None]], axis=1))
    start = max(max(gh // 2, gw // 2) for gh, gw in grids)
    text_pos = np.arange(start, start + text_len, dtype=np.float32)[:, None]
    text = text_pos * np.concatenate([f_frame, f_row, f_col])[None]
    return np.concatenate([text, *frames], axis=0)


def build_rope_table(h: int, w: int, text_len: int, axes_dims=(16, 56, 56), theta: float = 10000.0, conditions=()):
    """(cos, sin), each (text_len + N, 64) float32 mx.arrays, in joint [text, image, conditions] order."""
    a = rope_angles(h, w, text_len, tuple(axes_dims), theta, tuple(conditions)).astype(np.float64)
    return mx.array(np.cos(a).astype(np.float32)), mx.array(np.sin(a).astype(np.float32))


@lru_cache(maxsize=16)
def rope_table(h: int, w: int, text_len: int, axes_dims=(16, 56, 56), theta: float = 10000.0, conditions=()):
    """`build_rope_table`, computed once per (grids, text length) and reused across blocks and steps."""
    return build_rope_table(h, w, text_len, tuple(axes_dims), theta, tuple(conditions))


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved channel pairs of x (B, S, H, D) by the angles of cos/sin (S, D/2), in float32."""
    B, S, H, D = x.shape
    pairs = x.reshape(B, S, H, D // 2, 2)
    x0, x1 = pairs[..., 0].astype(mx.float32), pairs[..., 1].astype(mx.float32)
    c, s = cos[:, None, :], sin[:, None, :]
    # round each half before interleaving them: the stack then moves half-width data
    out = mx.stack([(x0 * c - x1 * s).astype(x.dtype), (x0 * s + x1 * c).astype(x.dtype)], axis=-1)
    return out.reshape(B, S, H, D)


apply_rope_fused = mx.compile(apply_rope)
