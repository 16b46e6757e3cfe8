"""The hand-written QK-norm + RoPE GPU kernel (qwen_nb.kernels, `Switches.qk_kernel`) against the written-out maths.
It has no CPU version: on a CPU the kernel tests skip, saying so, and only the fallback is checked; they run where MLX
has a GPU backend (CUDA, as on the lent H200: `python -m pytest tests/test_kernels.py`; Metal on a Mac)."""

import mlx.core as mx
import numpy as np
import pytest

from qwen_nb import kernels
from qwen_nb.rmsnorm import rms_norm
from qwen_nb.rope import apply_rope, rope_table
from qwen_nb.switches import Switches
from qwen_nb.transformer import QwenImageTransformer, TransformerConfig

GPU = kernels._backend()
needs_gpu = pytest.mark.skipif(GPU is None, reason="no GPU backend (CUDA or Metal): the kernel has no CPU version")


def inputs(dtype, B=2, L=7, grid=(3, 11), H=4, Dh=128):
    k = mx.random.split(mx.random.key(3), 4)
    N = grid[0] * grid[1]
    txt = mx.random.normal((B, L, H, Dh), key=k[0]).astype(dtype)
    img = (3 * mx.random.normal((B, N, H, Dh), key=k[1])).astype(dtype)
    w_txt = (1 + 0.2 * mx.random.normal((Dh,), key=k[2])).astype(dtype)
    w_img = (1 + 0.2 * mx.random.normal((Dh,), key=k[3])).astype(dtype)
    cos, sin = rope_table(*grid, L, (16, 56, 56))
    return txt, img, w_txt, w_img, cos, sin


def written_out(txt, img, w_txt, w_img, cos, sin, eps=1e-6):
    """RMSNorm written out (float32 statistics), text-then-image, interleaved-pair rotation: float64 at the end."""
    joint = mx.concatenate([rms_norm(txt, w_txt, eps), rms_norm(img, w_img, eps)], axis=1)
    return np.array(apply_rope(joint, cos, sin).astype(mx.float32), np.float64)


@needs_gpu
@pytest.mark.parametrize("dtype, tol", [(mx.float32, 1e-5), (mx.bfloat16, 3e-2)])
def test_kernel_equals_the_written_out_maths(dtype, tol):
    args = inputs(dtype)
    got = np.array(kernels._launch(GPU, *args, 1e-6).astype(mx.float32), np.float64)  # the kernel itself, no fallback
    ref = written_out(*args)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"{GPU} kernel, {dtype}: max |diff| {err:.2e} of the largest value")
    assert got.shape == ref.shape and err < tol


@needs_gpu
def test_transformer_with_the_kernel_equals_it_without():
    config = TransformerConfig.tiny(attention_head_dim=128, axes_dims_rope=(16, 56, 56), num_attention_heads=2)
    model = QwenImageTransformer(config)
    k = mx.random.split(mx.random.key(5), 2)
    x = mx.random.normal((1, 4 * 6, config.in_channels), key=k[0])
    text = mx.random.normal((1, 5, config.joint_attention_dim), key=k[1])
    plain = model(x, text, mx.array([0.6]), (4, 6))
    model.set_switches(Switches().only(qk_kernel=True))
    fused = model(x, text, mx.array([0.6]), (4, 6))
    np.testing.assert_allclose(np.array(fused), np.array(plain), rtol=1e-4, atol=1e-4)


def test_without_a_gpu_the_reference_path_runs():
    if GPU is not None:
        pytest.skip("a GPU backend is present: the kernel tests above cover it")
    args = inputs(mx.float32)
    np.testing.assert_allclose(np.array(kernels.qk_norm_rope(*args)), written_out(*args), rtol=1e-5, atol=1e-5)


def test_a_switch_that_needs_others_says_so():
    with pytest.raises(ValueError, match="qk_kernel=True\\) needs fast_rms_norm on too"):
        Switches.baseline().only(qk_kernel=True, fused_modulation=True)
