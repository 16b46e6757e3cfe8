"""Hand-written GPU kernels for the work MLX would otherwise spread over many passes.

`qk_norm_rope` does, for q or k of the joint attention, in one pass over memory: the per-head RMSNorm of the text
and image streams (each with its own weight), their concatenation text-then-image, and the interleaved 3-D RoPE.
With MLX ops this is an RMSNorm per stream, a concatenation and a rotation that MLX's compiler cannot fuse
(the pair interleave needs a stack), about seven full passes over a (L+N, 3072) tensor per call; at 1024x1024
that was 40% of a block's non-matmul time on an H100.

The same kernel body serves CUDA (`mx.fast.cuda_kernel`) and Metal (`mx.fast.metal_kernel`); the CPU uses the
MLX-op reference. Rounding follows the reference step by step (normalised value rounded to the input dtype,
rotation in float32), so the two agree to the last bit in float32 and to one rounding in bfloat16. Before its
first use on a device the kernel is checked against the reference on a small input; if it fails to compile or
disagrees, a warning is printed and the MLX ops are used instead.
"""

import warnings

import mlx.core as mx

from .rope import apply_rope

_BODY = """
    const int D = HEAD_DIM;
    const int rows = BATCH * (TXT + IMG) * HEADS;
    if ((int)row >= rows) return;
    const int h = row % HEADS;
    const int s = (row / HEADS) % (TXT + IMG);
    const int b = row / (HEADS * (TXT + IMG));
    bool is_txt = s < TXT;
    int src_off = is_txt ? ((b * TXT + s) * HEADS + h) * D : ((b * IMG + (s - TXT)) * HEADS + h) * D;
    float ss = 0.0f;
    for (int i = 0; i < D; i++) {
        float v = is_txt ? (float)txt[src_off + i] : (float)img[src_off + i];
        ss += v * v;
    }
    float inv = RSQRT(ss / D + EPS);
    int cs_off = s * (D / 2);
    int dst = row * D;
    for (int i = 0; i < D / 2; i++) {
        float x0 = is_txt ? (float)txt[src_off + 2 * i] : (float)img[src_off + 2 * i];
        float x1 = is_txt ? (float)txt[src_off + 2 * i + 1] : (float)img[src_off + 2 * i + 1];
        float w0 = is_txt ? (float)w_txt[2 * i] : (float)w_img[2 * i];
        float w1 = is_txt ? (float)w_txt[2 * i + 1] : (float)w_img[2 * i + 1];
        float a = (float)(T)(x0 * inv * w0);
        float c = (float)(T)(x1 * inv * w1);
        float co = cosv[cs_off + i];
        float si = sinv[cs_off + i];
        out[dst + 2 * i] = (T)(a * co - c * si);
        out[dst + 2 * i + 1] = (T)(a * si + c * co);
    }
"""

_kernels = {}
_verified = {}


def _make_kernel(backend: str, eps: float):
    key = (backend, eps)
    if key not in _kernels:
        names = dict(input_names=["txt", "img", "w_txt", "w_img", "cosv", "sinv"], output_names=["out"])
        body = _BODY.replace("EPS", f"{eps!r}f")
        if backend == "cuda":
            src = "auto row = cooperative_groups::this_grid().thread_rank();\n" + body.replace("RSQRT", "rsqrtf")
            _kernels[key] = mx.fast.cuda_kernel(name="qwen_qk_norm_rope", source=src, **names)
        else:
            src = "uint row = thread_position_in_grid.x;\n" + body.replace("RSQRT", "metal::rsqrt")
            _kernels[key] = mx.fast.metal_kernel(name="qwen_qk_norm_rope", source=src, **names)
    return _kernels[key]


def _backend() -> str | None:
    if mx.default_device() != mx.gpu:
        return None
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


def qk_norm_rope_reference(txt, img, w_txt, w_img, cos, sin, eps: float):
    """The MLX-op path: RMSNorm each stream's heads, concatenate text-then-image, rotate. (B, L+N, H, Dh)."""
    joint = mx.concatenate([mx.fast.rms_norm(txt, w_txt, eps), mx.fast.rms_norm(img, w_img, eps)], axis=1)
    return apply_rope(joint, cos, sin)


def _launch(backend, txt, img, w_txt, w_img, cos, sin, eps):
    B, L, H, Dh = txt.shape
    N = img.shape[1]
    rows = B * (L + N) * H
    kernel = _make_kernel(backend, eps)
    (out,) = kernel(
        inputs=[txt, img, w_txt.astype(txt.dtype), w_img.astype(txt.dtype), cos, sin],
        template=[("T", txt.dtype), ("BATCH", B), ("TXT", L), ("IMG", N), ("HEADS", H), ("HEAD_DIM", Dh)],
        grid=(rows, 1, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[(B, L + N, H, Dh)],
        output_dtypes=[txt.dtype],
    )
    return out


def _verify(backend: str, dtype, eps: float) -> bool:
    """Compare the kernel with the reference once per (backend, dtype) on a small random input."""
    key = (backend, dtype, eps)
    if key not in _verified:
        try:
            k = mx.random.key(0)
            ks = mx.random.split(k, 6)
            txt = mx.random.normal((2, 3, 2, 16), key=ks[0]).astype(dtype)
            img = mx.random.normal((2, 5, 2, 16), key=ks[1]).astype(dtype)
            w_t = (1 + 0.1 * mx.random.normal((16,), key=ks[2])).astype(dtype)
            w_i = (1 + 0.1 * mx.random.normal((16,), key=ks[3])).astype(dtype)
            ang = mx.random.uniform(-20, 20, (8, 8), key=ks[4])
            cos, sin = mx.cos(ang), mx.sin(ang)
            got = _launch(backend, txt, img, w_t, w_i, cos, sin, eps).astype(mx.float32)
            ref = qk_norm_rope_reference(txt, img, w_t, w_i, cos, sin, eps).astype(mx.float32)
            tol = 1e-5 if dtype == mx.float32 else 2e-2
            ok = mx.allclose(got, ref, atol=tol, rtol=tol).item()
            if not ok:
                warnings.warn(
                    f"qwen_nb: the {backend} qk_norm_rope kernel disagrees with MLX ops; using MLX ops", stacklevel=3
                )
        except Exception as e:  # a kernel that does not compile on this machine must not stop the model
            warnings.warn(
                f"qwen_nb: the {backend} qk_norm_rope kernel is unavailable ({e}); using MLX ops", stacklevel=3
            )
            ok = False
        _verified[key] = ok
    return _verified[key]


def qk_norm_rope(txt, img, w_txt, w_img, cos, sin, eps: float = 1e-6):
    """txt (B, L, H, Dh), img (B, N, H, Dh) -> RMSNormed, concatenated, RoPE-rotated (B, L+N, H, Dh)."""
    backend = _backend()
    if backend is None or not _verify(backend, txt.dtype, eps):
        return qk_norm_rope_reference(txt, img, w_txt, w_img, cos, sin, eps)
    return _launch(backend, txt, img, w_txt, w_img, cos, sin, eps)
