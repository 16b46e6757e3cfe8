"""Shared by the transformer and scheduler tests: load the diffusers goldens of goldens/make_transformer_goldens.py
and compare against them, printing the measured max|diff| (run pytest with -s or -rP to see it)."""

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_nb.switches import Switches
from qwen_nb.transformer import QwenImageTransformer, TransformerConfig

GOLDENS = Path(__file__).resolve().parent / "goldens"
TAGS = ("a", "b")  # a: 2 heads, 4x4 grid, batch 1, no mask; b: 3 heads, 3x5 grid, batch 2, padded text + mask


def load(name: str) -> tuple[dict, dict]:
    """(arrays, info) of tests/goldens/<name>.safetensors."""
    arrays, metadata = mx.load(str(GOLDENS / f"{name}.safetensors"), return_metadata=True)
    return arrays, json.loads(metadata.get("info", "{}"))


def tiny_model(tag: str, switches: Switches | None = None, dtype=mx.float32):
    """The tiny golden transformer with diffusers' weights loaded strictly by name, and its goldens and grid."""
    weights, info = load(f"transformer_{tag}_weights")
    model = QwenImageTransformer(TransformerConfig(**info["config"]), switches)
    model.load_weights([(k, v.astype(dtype)) for k, v in weights.items()], strict=True)
    model.set_switches(model.switches)  # structure follows the switches after loading: q/k/v fused by default
    golden, golden_info = load(f"transformer_{tag}")
    return model, golden, tuple(golden_info["grid"])


def every_switch_setting() -> dict[str, Switches]:
    """baseline, the default, and the default with each single switch off."""
    settings = {"baseline": Switches.baseline(), "default": Switches()}
    for f in dataclasses.fields(Switches):
        settings[f"no_{f.name}"] = Switches().only(**{f.name: False})
    return settings


def to_np(x) -> np.ndarray:
    if isinstance(x, mx.array):
        x = x.astype(mx.float32) if x.dtype == mx.bfloat16 else x
    return np.asarray(x, dtype=np.float32)


def max_diff(actual, expected) -> float:
    return float(np.max(np.abs(to_np(actual) - to_np(expected))))


def assert_close(actual, expected, what: str, rtol: float = 1e-5, atol: float = 1e-5) -> float:
    """assert_allclose with the measured max|diff| in the output and the message."""
    a, e = to_np(actual), to_np(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape}, expected {e.shape}"
    d = max_diff(a, e)
    if atol > 0:
        used = float(np.max(np.abs(a - e) / (atol + rtol * np.abs(e))))
        print(f"max|diff| {what}: {d:.3g} ({used:.0%} of the tolerance)")
    else:
        print(f"max|diff| {what}: {d:.3g} (bit-exact required)")
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{what} (max|diff| {d:.3g})")
    return d
