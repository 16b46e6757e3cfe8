"""transformers' activations (`ACT2FN`) by the name a config's `hidden_act` gives, for the MLPs of the text
encoders and vision towers (Qwen2.5-VL's and Qwen3-VL's language models use silu, Qwen2.5-VL's vision tower silu,
Qwen3-VL's the tanh GELU); a checkpoint that names another gets the same function transformers would run."""

import mlx.core as mx
import mlx.nn as nn

# MLX's own (each compiled to one kernel): the exact GELU, x Phi(x), and its tanh approximation (transformers'
# gelu_pytorch_tanh / gelu_new), the same formulas as transformers'
gelu, gelu_tanh = nn.gelu, nn.gelu_approx


ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": gelu,
    "gelu_python": gelu,
    "gelu_10": lambda x: mx.clip(gelu(x), -10.0, 10.0),
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_python_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "gelu_accurate": gelu_tanh,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + mx.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x),
    "relu": nn.relu,
    "relu2": lambda x: mx.square(nn.relu(x)),
    "relu6": lambda x: mx.clip(x, 0.0, 6.0),
    "leaky_relu": lambda x: nn.leaky_relu(x, 0.01),
    "sigmoid": mx.sigmoid,
    "tanh": mx.tanh,
    "linear": lambda x: x,
    "mish": lambda x: x * mx.tanh(nn.softplus(x)),
    "hardswish": lambda x: x * mx.clip(x + 3.0, 0.0, 6.0) / 6.0,
}


def check_activation(name: str, part: str, usual: str) -> None:
    """Refuse a hidden_act this table lacks, naming the ones it has."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"{part} hidden_act {name!r} is not supported (the released checkpoints use {usual}); qwen_nb takes "
            f"{', '.join(sorted(ACTIVATIONS))}"
        )
