"""Joint text-image attention of the MMDiT block: diffusers' `Attention` with `QwenDoubleStreamAttnProcessor2_0`.

Each stream has its own q/k/v projections and per-head QK RMSNorm; the two are concatenated text-then-image,
rotated by the 3-D RoPE and attend jointly. Returns (img, txt) of the input shapes.
"""

import copy

import mlx.core as mx
import mlx.nn as nn

from .kernels import _backend, qk_norm_rope
from .rmsnorm import RMSNorm
from .rope import apply_rope, apply_rope_fused
from .switches import Switches


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """softmax(q k^T * scale) v written out, softmax in float32. q, k, v: (B, H, S, D); mask: bool, True = attend."""
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype)
    return weights @ v


def joint_key_mask(text_mask: mx.array, num_image: int) -> mx.array:
    """(B, L) text mask -> (B, 1, 1, L + N) bool key mask; image keys are always visible."""
    B = text_mask.shape[0]
    keep = mx.concatenate([text_mask.astype(mx.bool_), mx.ones((B, num_image), dtype=mx.bool_)], axis=1)
    return keep[:, None, None, :]


class JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6, switches: Switches | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.scale = head_dim**-0.5
        self.switches = switches = switches or Switches()
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.add_q_proj = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.norm_q = RMSNorm(head_dim, eps, switches)
        self.norm_k = RMSNorm(head_dim, eps, switches)
        self.norm_added_q = RMSNorm(head_dim, eps, switches)
        self.norm_added_k = RMSNorm(head_dim, eps, switches)
        self.to_out = [nn.Linear(inner, dim)]  # diffusers' to_out.1 is a Dropout: nothing to load
        self.to_add_out = nn.Linear(inner, dim)

    # ---------------------------------------------------------------- fused projections
    @property
    def fused(self) -> bool:
        return "to_qkv" in self

    def fuse_projections(self) -> None:
        """Replace each stream's q, k and v projections by one linear of three times the width (one matmul
        instead of three: the weights are stacked row-wise, so the outputs are bit-for-bit the same columns).
        Works on quantized linears too (groups run along the input width, rows are independent). Lazy: nothing
        is copied until evaluated. Call after loading; `split_projections` undoes it."""
        if self.fused:
            return
        for fused, names in FUSED_PROJECTIONS.items():
            setattr(self, fused, _stack([self[name] for name in names]))
            for name in names:
                delattr(self, name)

    def split_projections(self) -> None:
        """The checkpoint's separate to_q/to_k/to_v and add_{q,k,v}_proj again (row slices of the fused ones)."""
        if not self.fused:
            return
        for fused, names in FUSED_PROJECTIONS.items():
            for name, part in zip(names, _unstack(self[fused], len(names))):
                setattr(self, name, part)
            delattr(self, fused)

    def _projections(self, img, txt):
        """((q, k, v) of the image, (q, k, v) of the text), each (B, S, inner)."""
        if self.fused:
            return mx.split(self.to_qkv(img), 3, axis=-1), mx.split(self.add_qkv_proj(txt), 3, axis=-1)
        return (
            (self.to_q(img), self.to_k(img), self.to_v(img)),
            (self.add_q_proj(txt), self.add_k_proj(txt), self.add_v_proj(txt)),
        )

    def __call__(self, img: mx.array, txt: mx.array, rope, mask: mx.array | None = None):
        """img (B, N, D), txt (B, L, D); rope = (cos, sin) of (L + N, head_dim/2); mask (B,1,1,L+N) or None."""
        B, N, _ = img.shape
        L = txt.shape[1]
        H = self.heads

        def heads(x, S):
            return x.reshape(B, S, H, -1)  # (B, S, H, Dh)

        sw = self.switches
        (qi, ki, vi), (qt, kt, vt) = self._projections(img, txt)
        if sw.qk_kernel and sw.fast_rms_norm and sw.fused_modulation and _backend() is not None:
            eps = self.norm_q.eps
            q = qk_norm_rope(heads(qt, L), heads(qi, N), self.norm_added_q.weight, self.norm_q.weight, *rope, eps)
            k = qk_norm_rope(heads(kt, L), heads(ki, N), self.norm_added_k.weight, self.norm_k.weight, *rope, eps)
        else:
            q = mx.concatenate([self.norm_added_q(heads(qt, L)), self.norm_q(heads(qi, N))], 1)
            k = mx.concatenate([self.norm_added_k(heads(kt, L)), self.norm_k(heads(ki, N))], 1)
            rotate = apply_rope_fused if sw.fused_modulation else apply_rope
            q, k = rotate(q, *rope), rotate(k, *rope)
        v = mx.concatenate([heads(vt, L), heads(vi, N)], 1)

        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, L+N, Dh)
        if self.switches.fast_attention:
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        else:
            o = attention(q, k, v, self.scale, mask)
        o = o.transpose(0, 2, 1, 3).reshape(B, L + N, -1)
        return self.to_out[0](o[:, L:]), self.to_add_out(o[:, :L])


# Each fused projection and, in row order, the checkpoint's separate linears it stands for.
FUSED_PROJECTIONS = {"to_qkv": ("to_q", "to_k", "to_v"), "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj")}


def split_rows(x: mx.array, parts: int) -> list[mx.array]:
    """`parts` equal row blocks of x (a fused weight, bias, or quantized scales)."""
    n = x.shape[0] // parts
    return [x[i * n : (i + 1) * n] for i in range(parts)]


def _stack(linears: list) -> nn.Module:
    """One linear (plain or quantized) whose output rows are those of `linears`, in order."""
    fused = copy.copy(linears[0])
    for name, value in linears[0].items():
        if isinstance(value, mx.array):
            fused[name] = mx.concatenate([lin[name] for lin in linears], axis=0)
    return fused


def _unstack(fused: nn.Module, parts: int) -> list:
    """The inverse of `_stack`: `parts` linears of equal width."""
    out = [copy.copy(fused) for _ in range(parts)]
    for name, value in fused.items():
        if isinstance(value, mx.array):
            for lin, rows in zip(out, split_rows(value, parts)):
                lin[name] = rows
    return out
