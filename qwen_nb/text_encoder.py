"""The text encoder: the language model of Qwen2.5-VL-7B (transformers' `Qwen2_5_VLTextModel`, text path only),
and the prompt encoding of diffusers' `QwenImagePipeline.encode_prompt`.

28 pre-norm decoder layers: GQA attention (28 query heads, 4 key/value heads, q/k/v with bias) with half-split
("rotate_half") RoPE, theta 1e6, and a SwiGLU MLP; causal plus padding mask; the output is the final RMSNorm's
(what diffusers reads as `hidden_states[-1]`). Without images M-RoPE's three position rows are equal, which is
plain 1-D RoPE. No vision tower (qwen_nb.vision), no lm_head.
`QwenTextEncoder(config)(ids (B, S), mask (B, S)) -> (B, S, hidden)`; `embeds=` and `rope=` take ready-made input
embeddings and a rotation table instead (the pictures of `qwen_nb.vision.encode_with_images`).
"""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .activations import ACTIVATIONS, check_activation
from .attention import attention
from .loading import Config, load_strict, read_weights
from .rmsnorm import RMSNorm
from .switches import Switches


@dataclass
class TextEncoderConfig(Config):
    """`text_encoder/config.json` of Qwen/Qwen-Image (Qwen2.5-VL-7B-Instruct's language model); defaults = it."""

    hidden_size: int = 3584
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 18944
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    vocab_size: int = 152064
    hidden_act: str = "silu"  # the MLP's act(gate) * up, by transformers' name

    def __post_init__(self):
        check_activation(self.hidden_act, "text encoder", "silu")
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"head_dim {self.head_dim} x num_attention_heads {self.num_attention_heads} must equal hidden_size "
                f"{self.hidden_size} (Qwen2.5-VL's attention has no separate head size)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of num_key_value_heads "
                f"{self.num_key_value_heads} (each key/value head serves a whole group of query heads)"
            )

    @classmethod
    def from_dict(cls, d: dict) -> "TextEncoderConfig":
        """From either shape of config.json: flat (transformers 4.x: text fields, `rope_theta` and `rope_scaling` at
        top level, as the hub checkpoint has them) or nested (transformers 5: `text_config` with
        `rope_parameters`). Where both are present the nested values win, as in transformers 5. Unknown keys
        (vision_config, token ids...) are ignored."""
        text = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
        text.update(d.get("text_config") or {})
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "mrope"):
            raise ValueError(f"rope type {kind!r} is not supported: the Qwen2.5-VL text encoder uses plain RoPE")
        if text.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported: Qwen2.5-VL's text encoder attends globally")
        text["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", 1e6))
        if text.get("num_key_value_heads") is None:
            text["num_key_value_heads"] = text.get("num_attention_heads", cls.num_attention_heads)
        # transformers derives the head size from hidden_size / heads and ignores any head_dim entry
        hidden = text.get("hidden_size", cls.hidden_size)
        text["head_dim"] = hidden // text.get("num_attention_heads", cls.num_attention_heads)
        return super().from_dict(text)

    @classmethod
    def tiny(cls, **overrides) -> "TextEncoderConfig":
        """A 2-layer, 64-wide model with the real structure (GQA 4:2), for tests and CPU notebooks."""
        base = dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            vocab_size=640,
        )
        return cls(**{**base, **overrides})


def causal_padding_mask(mask: mx.array) -> mx.array:
    """(B, S) padding mask (1 = token) -> (B, 1, S, S) bool: query i sees key j when j <= i and j is a token."""
    S = mask.shape[1]
    causal = mx.tril(mx.ones((S, S), dtype=mx.bool_))
    return causal[None, None] & mask.astype(mx.bool_)[:, None, None, :]


class Attention(nn.Module):
    def __init__(self, config: TextEncoderConfig, switches: Switches):
        super().__init__()
        H, KV, Dh, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.heads, self.kv_heads, self.head_dim = H, KV, Dh
        self.scale = Dh**-0.5
        self.rope_theta = config.rope_theta
        self.switches = switches
        self.q_proj = nn.Linear(D, H * Dh, bias=True)
        self.k_proj = nn.Linear(D, KV * Dh, bias=True)
        self.v_proj = nn.Linear(D, KV * Dh, bias=True)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)

    def __call__(self, x: mx.array, mask, rope=None) -> mx.array:
        """x (B, S, D); mask: "causal" or a (B, 1, S, S) bool array; rope: None for positions 0..S-1, or a (cos, sin)
        table (B, 1, S, Dh) in float32 (M-RoPE positions of a text with pictures)."""
        B, S, _ = x.shape
        q = self.q_proj(x).reshape(B, S, self.heads, -1).transpose(0, 2, 1, 3)  # (B, H, S, Dh)
        k = self.k_proj(x).reshape(B, S, self.kv_heads, -1).transpose(0, 2, 1, 3)  # (B, KV, S, Dh)
        v = self.v_proj(x).reshape(B, S, self.kv_heads, -1).transpose(0, 2, 1, 3)
        if rope is None:
            # rotate_half RoPE (traditional=False) at 0..S-1: right padding leaves the tokens' positions alone
            q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
            k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        else:
            cos, sin = (t.astype(x.dtype) for t in rope)  # transformers rounds the table to the activations' dtype
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.switches.fast_attention:
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        else:
            groups = self.heads // self.kv_heads
            k, v = mx.repeat(k, groups, axis=1), mx.repeat(v, groups, axis=1)
            if isinstance(mask, str):
                mask = mx.tril(mx.ones((S, S), dtype=mx.bool_))
            o = attention(q, k, v, self.scale, mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, S, -1))


def rotate_half(x: mx.array) -> mx.array:
    """(x1, x2) -> (-x2, x1) over the last axis's halves: the pairing of half-split ("rotate_half") RoPE."""
    x1, x2 = mx.split(x, 2, axis=-1)
    return mx.concatenate([-x2, x1], axis=-1)


class MLP(nn.Module):
    """The gated MLP, down(act(gate(x)) * up(x)), `act` by transformers' name (silu: SwiGLU); without biases in the
    language model, with them in the Qwen2.5-VL vision tower's blocks."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig, switches: Switches):
        super().__init__()
        self.self_attn = Attention(config, switches)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, switches)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, switches)

    def __call__(self, x: mx.array, mask, rope=None) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), mask, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, config: TextEncoderConfig, switches: Switches):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, switches) for _ in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, switches)

    def __call__(self, ids: mx.array | None, mask: mx.array | None = None, *, embeds=None, rope=None) -> mx.array:
        x = self.embed_tokens(ids) if embeds is None else embeds  # (B, S, hidden)
        attn_mask = "causal" if mask is None else causal_padding_mask(mask)
        for layer in self.layers:
            x = layer(x, attn_mask, rope)
        return self.norm(x)


class QwenTextEncoder(nn.Module):
    """Qwen2.5-VL's language model; returns the final-norm hidden states (B, S, hidden) of ids (B, S)."""

    def __init__(self, config: TextEncoderConfig, switches: Switches | None = None):
        super().__init__()
        self.config = config
        self.model = TextModel(config, switches or Switches())

    def __call__(self, ids: mx.array | None, mask: mx.array | None = None, *, embeds=None, rope=None) -> mx.array:
        """ids (B, S) int; mask (B, S), 1 on tokens, 0 on right padding (None: no padding). `embeds` (B, S, hidden)
        replaces the token embeddings of ids (pass ids=None); `rope` = (cos, sin) (B, 1, S, head_dim) rotates by
        other positions than 0..S-1."""
        return self.model(ids, mask, embeds=embeds, rope=rope)

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """Checkpoint names -> this module's: transformers 5's `model.language_model.*` becomes `model.*`; the
        vision tower (`visual.*`, `model.visual.*`) and `lm_head.*` are dropped (never read: mx.load is lazy)."""
        return {language_model_name(k): v for k, v in weights.items() if is_language_model(k)}

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.embed_tokens.weight.dtype


def is_language_model(name: str) -> bool:
    """The text encoder's tensors the text-to-image pipeline reads: the language model, not the vision tower or
    lm_head (a shard holding only those need not even be downloaded)."""
    return not name.startswith(("visual.", "model.visual.", "lm_head."))


def language_model_name(name: str) -> str:
    """A language-model tensor's name in this module: transformers 5's `model.language_model.*` is `model.*`."""
    prefix = "model.language_model."
    return "model." + name[len(prefix) :] if name.startswith(prefix) else name


def load_text_encoder(
    folder, dtype: mx.Dtype = mx.bfloat16, switches: Switches | None = None, variant: str | None = None
) -> QwenTextEncoder:
    """The language model of a checkpoint's `text_encoder/` folder (config.json + safetensors shards), in `dtype`,
    loaded lazily and strictly; shards of vision-tower or lm_head tensors only are not opened."""
    folder = Path(folder)
    model = QwenTextEncoder(TextEncoderConfig.from_folder(folder), switches)
    weights = QwenTextEncoder.sanitize(read_weights(folder, dtype, keep=is_language_model, variant=variant))
    load_strict(model, weights, "Qwen2.5-VL text encoder")
    return model


# diffusers' `prompt_template_encode`: a system turn, then the prompt as the user turn.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
DROP_IDX = 34  # the system turn and "<|im_start|>user\n": dropped from the embeddings
MAX_TOKENS = 1024  # diffusers' tokenizer_max_length: the most tokens (after the drop) the encoder reads


def prompt_length(tokenizer, prompt: str) -> int:
    """The tokens of `prompt` the transformer sees: the templated prompt's tokens after the dropped 34 (so the
    template's 5-token tail counts)."""
    return len(tokenizer.encode(PROMPT_TEMPLATE.format(prompt))) - DROP_IDX


def encode_prompt(tokenizer, encoder: QwenTextEncoder, prompts, max_sequence_length: int = 512):
    """Prompt(s) -> (embeds (B, L, hidden) in the encoder's dtype, mask (B, L) int32), as diffusers'
    `QwenImagePipeline.encode_prompt`: template, encode, keep each prompt's tokens after the first 34, re-pad
    with zeros to the longest, cut to `max_sequence_length`. The mask is always returned."""
    if max_sequence_length > MAX_TOKENS:
        raise ValueError(f"max_sequence_length cannot be greater than {MAX_TOKENS} but is {max_sequence_length}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    # truncated as diffusers' tokenizer is, at tokenizer_max_length + the drop: with causal attention the rows kept
    # below do not depend on what is cut, so a longer prompt gives the embeddings of its first tokens
    templated = [PROMPT_TEMPLATE.format(p) for p in prompts]
    ids, mask = tokenizer(templated, max_length=MAX_TOKENS + DROP_IDX, truncation=True)
    lengths = mask.sum(axis=1) - DROP_IDX
    # without padding the plain causal mask does the same job, and lets the attention kernel skip the mask
    hidden = encoder(mx.array(ids), None if mask.all() else mx.array(mask))
    L = int(lengths.max())
    # right padding: each prompt's tokens are positions DROP_IDX .. DROP_IDX + n - 1
    hidden = hidden[:, DROP_IDX : DROP_IDX + L]
    keep = np.arange(L)[None, :] < lengths[:, None]
    embeds = mx.where(mx.array(keep)[..., None], hidden, mx.zeros((), hidden.dtype))
    out_mask = mx.array(keep.astype(np.int32))
    return embeds[:, :max_sequence_length], out_mask[:, :max_sequence_length]
