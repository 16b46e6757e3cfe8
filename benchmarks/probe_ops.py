"""Times the single operations of an MMDiT block at full size (1024x1024: 4096 image + 128 text tokens, width
3072, 24 heads of 128) on the current device, to find the elementwise and layout work that the matmuls and the
attention kernel do not explain. Exploration for issue 7. Usage: python benchmarks/probe_ops.py [--tiny]
"""

import argparse
import json
import time

import mlx.core as mx
import mlx.nn as nn

from qwen_nb.kernels import qk_norm_rope, qk_norm_rope_reference
from qwen_nb.rope import apply_rope_fused, rope_table
from qwen_nb.transformer import gate_residual_fused, gelu_tanh_fused, modulate_fused


def bench(fn, reps=20, warm=3):
    for _ in range(warm):
        mx.eval(fn())
    mx.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    S_img, L, D, H, Dh = (4096, 128, 3072, 24, 128) if not a.tiny else (64, 8, 64, 2, 32)
    S = S_img + L
    dt = mx.bfloat16
    r = lambda *s: mx.random.normal(s).astype(dt)
    x, xi, xt, hid = r(1, S, D), r(1, S_img, D), r(1, L, D), r(1, S_img, 4 * D)
    q4, qi4, qt4 = r(1, S, H, Dh), r(1, S_img, H, Dh), r(1, L, H, Dh)
    qh = r(1, H, S, Dh)
    w, b, wh = r(D), r(D), r(Dh)
    W, Wb, W3 = r(D, D), r(D), r(3 * D, D)
    shift, scale, gate = r(1, D), r(1, D), r(1, D)
    cos, sin = rope_table(
        64 if not a.tiny else 8, 64 if not a.tiny else 8, L, (16, 56, 56) if not a.tiny else (8, 12, 12)
    )
    mx.eval(x, xi, xt, hid, q4, qi4, qt4, qh, w, b, wh, W, Wb, W3, shift, scale, gate, cos, sin)
    lin = nn.Linear(D, D)
    lin.set_dtype(dt)
    mx.eval(lin.parameters())

    def rope_half(x, c, s):  # half-split layout: x*[c,c] + [-x2,x1]*[s,s] (weights permuted to match)
        xf = x.astype(mx.float32)
        x1, x2 = xf[..., : Dh // 2], xf[..., Dh // 2 :]
        c, s = c[:, None, :], s[:, None, :]
        return mx.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).astype(x.dtype)

    rope_half_c = mx.compile(rope_half)

    ops = {
        "matmul_img_DxD (1 linear)": lambda: xi @ W.T,
        "linear_img_DxD_bias": lambda: lin(xi),
        "matmul_img_3DxD (fused qkv)": lambda: xi @ W3.T,
        "matmul_img_Dx4D (mlp in)": lambda: hid[:, :, :D] @ W.T,
        "layer_norm_affine (fused modulate)": lambda: mx.fast.layer_norm(xi, w, b, 1e-6),
        "layer_norm_plain": lambda: mx.fast.layer_norm(xi, None, None, 1e-6),
        "layer_norm_plain+modulate_fused": lambda: modulate_fused(
            mx.fast.layer_norm(xi, None, None, 1e-6), shift, scale
        ),
        "rms_norm_heads (q)": lambda: mx.fast.rms_norm(qi4, wh, 1e-6),
        "concat_txt_img (q)": lambda: mx.concatenate([qt4, qi4], axis=1),
        "rope_interleaved_fused": lambda: apply_rope_fused(q4, cos, sin),
        "rope_halfsplit_fused": lambda: rope_half_c(q4, cos, sin),
        "qk_norm_rope_kernel": lambda: qk_norm_rope(qt4, qi4, wh, wh, cos, sin),
        "qk_norm_rope_mlx_ops": lambda: qk_norm_rope_reference(qt4, qi4, wh, wh, cos, sin, 1e-6),
        "transpose_to_BHSD_copy": lambda: mx.contiguous(q4.transpose(0, 2, 1, 3)),
        "sdpa_contiguous": lambda: mx.fast.scaled_dot_product_attention(qh, qh, qh, scale=0.0884),
        "sdpa_from_transposed_views": lambda: mx.fast.scaled_dot_product_attention(
            q4.transpose(0, 2, 1, 3), q4.transpose(0, 2, 1, 3), q4.transpose(0, 2, 1, 3), scale=0.0884
        ),
        "out_transpose_reshape": lambda: qh.transpose(0, 2, 1, 3).reshape(1, S, D),
        "slice_then_linear": lambda: lin(x[:, L:]),
        "gelu_fused (S x 4D)": lambda: gelu_tanh_fused(hid),
        "gelu_nn_approx_bf16": lambda: nn.gelu_approx(hid),
        "gate_residual_fused": lambda: gate_residual_fused(xi, gate, xi),
        "copy_DxS (bandwidth ref)": lambda: xi + 1,
    }
    got = qk_norm_rope(qt4, qi4, wh, wh, cos, sin).astype(mx.float32)
    ref = qk_norm_rope_reference(qt4, qi4, wh, wh, cos, sin, 1e-6).astype(mx.float32)
    print("qk_norm_rope kernel vs ops max|diff|", mx.abs(got - ref).max().item(), "max|ref|", mx.abs(ref).max().item())
    res = {}
    for name, fn in ops.items():
        res[name] = round(bench(fn), 4)
        print(f"{name:40s} {res[name]:8.3f} ms", flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
