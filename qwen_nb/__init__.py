"""qwen_nb: Qwen-Image (the 20B MMDiT text-to-image model) rebuilt in MLX, one component per notebook."""

from .switches import Switches
from .transformer import QwenImageTransformer, TransformerConfig

__version__ = "0.1.0"
__all__ = [
    "QwenImage21Pipeline",
    "QwenImageEditPipeline",
    "QwenImagePipeline",
    "QwenImageTransformer",
    "Switches",
    "TransformerConfig",
]


def __getattr__(name):
    # The pipelines pull in the VAE, tokenizer and text encoder (the edit one the vision tower): import them only
    # when asked for.
    if name == "QwenImagePipeline":
        from .pipeline import QwenImagePipeline

        return QwenImagePipeline
    if name == "QwenImageEditPipeline":
        from .edit import QwenImageEditPipeline

        return QwenImageEditPipeline
    if name == "QwenImage21Pipeline":
        from .pipeline21 import QwenImage21Pipeline

        return QwenImage21Pipeline
    raise AttributeError(f"module 'qwen_nb' has no attribute {name!r}")
