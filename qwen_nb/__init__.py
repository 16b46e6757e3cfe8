"""qwen_nb: Qwen-Image (the 20B MMDiT text-to-image model) rebuilt in MLX, one component per notebook."""

from .switches import Switches
from .transformer import QwenImageTransformer, TransformerConfig

__version__ = "0.1.0"
__all__ = ["QwenImagePipeline", "QwenImageTransformer", "Switches", "TransformerConfig"]


def __getattr__(name):
    # The pipeline pulls in the VAE, tokenizer and text encoder: import it only when asked for.
    if name == "QwenImagePipeline":
        from .pipeline import QwenImagePipeline

        return QwenImagePipeline
    raise AttributeError(f"module 'qwen_nb' has no attribute {name!r}")
