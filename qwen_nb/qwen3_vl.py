"""Qwen3-VL, the text encoder of Qwen-Image 2.1: transformers' `Qwen3VLForConditionalGeneration` without its
lm_head, and `Qwen3VLProcessor`.

- `Qwen3VLProcessor`: the chat template (rendered with jinja2 as transformers renders it), the tokenizer and the
  Pillow image processor (`Qwen2VLImageProcessorPil`, qwen_nb.vision's, with Qwen3-VL's 16-pixel patches and
  mean/std 0.5): texts and pictures -> ids, mask, `mm_token_type_ids`, pixel values and grids, left-padded.
- `Qwen3VLVisionModel`: 16x16 patches, a learned position grid resampled bilinearly to each picture, 2-D RoPE, full
  attention within each picture, a 2x2 merger, and DeepStack: the merged features of some blocks, handed to the
  language model's first layers. `tower(pixel_values, grid) -> (embeds (N / 4, out), [deepstack features])`.
- `Qwen3VLTextModel`: Qwen3 decoder layers (q/k RMSNorm, GQA, SwiGLU) with interleaved M-RoPE (the frequencies
  cycle through the time, row and column positions) and the DeepStack additions after the first layers.
- `get_rope_index`: transformers' 3-D positions from `mm_token_type_ids`.
`Qwen3VLTextEncoder(config)(ids, mask, pixel_values, grid, mm_token_type_ids) -> (B, L, hidden)`: the last layer's
output before the final norm (what Qwen-Image 2.1 reads), or after it with `normed=True`.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from .activations import ACTIVATIONS, check_activation
from .loading import Config, load_strict, read_config, read_weights
from .rmsnorm import RMSNorm
from .tokenizer import QwenTokenizer
from .vision import (
    IMAGE_PAD,
    ImageProcessorConfig,
    Segments,
    apply_rope,
    expand_image_pads,
    process_images,
    rotate_half,
    vision_rope,
)

IMAGE_TOKEN_ID = 151655
HALF = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------- configs
# transformers' `Qwen3VLTextConfig` / `Qwen3VLVisionConfig` class defaults, for the keys a config.json leaves out
# (the dataclasses' own defaults are Qwen3-VL-8B-Instruct's, whose config.json names every key)
TRANSFORMERS_TEXT_DEFAULTS = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=22016,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=500000.0,
)
TRANSFORMERS_VISION_DEFAULTS = dict(out_hidden_size=3584)


@dataclass
class Qwen3VLTextConfig(Config):
    """The language model of `text_encoder/config.json` (`text_config`); defaults: Qwen3-VL-8B-Instruct's."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple = (24, 20, 20)
    attention_bias: bool = False  # biases on q, k, v and o (transformers' `attention_bias`)
    hidden_act: str = "silu"  # the MLP's activation (act(gate) * up)

    def __post_init__(self):
        # transformers interleaves: frequency j turns with the row position when j % 3 == 1 and j < 3 * section[1],
        # with the column when j % 3 == 2 and j < 3 * section[2], else with the time; the sections need not add up
        # to head_dim / 2 (section[0] is never read)
        self.mrope_section = tuple(self.mrope_section)
        if len(self.mrope_section) != 3 or any(not isinstance(v, int) or v < 0 for v in self.mrope_section):
            raise ValueError(
                f"mrope_section {list(self.mrope_section)} must be three counts of frequencies (time, row, column)"
            )
        check_activation(self.hidden_act, "text", "silu (Qwen3-VL)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3VLTextConfig":
        """From a whole Qwen3-VL config.json (its `text_config`) or the text config alone; `rope_parameters` (or
        transformers 4's `rope_scaling` + `rope_theta`) give the theta and the M-RoPE sections."""
        text = {**TRANSFORMERS_TEXT_DEFAULTS, **(d.get("text_config") or d)}
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "mrope"):
            raise ValueError(f"rope type {kind!r} is not supported: Qwen3-VL's language model uses plain M-RoPE")
        text["rope_theta"] = rope.get("rope_theta", text["rope_theta"])
        text["mrope_section"] = rope.get("mrope_section", cls.mrope_section)
        if text.get("num_key_value_heads") is None:
            text["num_key_value_heads"] = text["num_attention_heads"]
        if text.get("head_dim") is None:
            text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
        return super().from_dict(text)

    @classmethod
    def tiny(cls, **overrides) -> "Qwen3VLTextConfig":
        base = dict(
            vocab_size=640,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            mrope_section=(6, 3, 3),
        )
        return cls(**{**base, **overrides})


@dataclass
class Qwen3VLVisionConfig(Config):
    """`vision_config` of `text_encoder/config.json`; defaults: Qwen3-VL-8B-Instruct's."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple = (8, 16, 24)
    rope_theta: float = 10000.0
    hidden_act: str = "gelu_pytorch_tanh"  # the blocks' MLP activation

    def __post_init__(self):
        self.deepstack_visual_indexes = tuple(self.deepstack_visual_indexes)
        check_activation(self.hidden_act, "vision", "gelu_pytorch_tanh (Qwen3-VL)")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a head size divisible by 4 "
                "(the 2-D RoPE turns a quarter of the pairs with the row, a quarter with the column)"
            )
        side = int(self.num_position_embeddings**0.5)
        if side * side != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings {self.num_position_embeddings} must be a square grid")
        # an index that is no block of the tower gives no feature (its merger is built and read, never run), as in
        # transformers

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3VLVisionConfig":
        """From a whole Qwen3-VL config.json (its `vision_config`) or the vision config alone."""
        vision = {**TRANSFORMERS_VISION_DEFAULTS, **(d.get("vision_config") or d)}
        rope = vision.get("rope_parameters") or {}
        vision["rope_theta"] = rope.get("rope_theta", cls.rope_theta)
        return super().from_dict(vision)

    @classmethod
    def tiny(cls, **overrides) -> "Qwen3VLVisionConfig":
        base = dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            out_hidden_size=48,
            num_position_embeddings=36,
            deepstack_visual_indexes=(0, 2),
        )
        return cls(**{**base, **overrides})


@dataclass
class Qwen3VLConfig:
    """The whole `text_encoder/config.json`: the two parts and the id marking picture slots."""

    text: Qwen3VLTextConfig
    vision: Qwen3VLVisionConfig
    image_token_id: int = IMAGE_TOKEN_ID

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3VLConfig":
        if "vision_config" not in d or "text_config" not in d:
            raise ValueError(
                "this config.json has no text_config / vision_config: it is not a Qwen3-VL text encoder (Qwen-Image "
                "2.1's text_encoder/ folder holds Qwen3VLForConditionalGeneration)"
            )
        return cls(
            Qwen3VLTextConfig.from_dict(d), Qwen3VLVisionConfig.from_dict(d), d.get("image_token_id", IMAGE_TOKEN_ID)
        )

    @classmethod
    def from_folder(cls, folder) -> "Qwen3VLConfig":
        return cls.from_dict(read_config(folder))

    @classmethod
    def tiny(cls) -> "Qwen3VLConfig":
        return cls(Qwen3VLTextConfig.tiny(), Qwen3VLVisionConfig.tiny(), 612)


# ---------------------------------------------------------------------------------------------- the processor
def render_chat_template(template: str, messages: list, add_generation_prompt: bool = False, **variables) -> str:
    """A chat template rendered as transformers renders it: jinja2's immutable sandbox with trim_blocks and
    lstrip_blocks, loop controls, `tojson` and `raise_exception`."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a dependency
        raise ImportError("rendering a chat template needs jinja2: pip install jinja2") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


def read_chat_template(folder: Path) -> str | None:
    """The processor's chat template: chat_template.jinja, chat_template.json, or the `chat_template` entry of
    processor_config.json / tokenizer_config.json (the places transformers writes it), or None."""
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        if (folder / name).exists():
            template = json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def image_processor_config(folder: Path) -> ImageProcessorConfig:
    """The image processor's settings of a processor folder: `image_processor` of processor_config.json
    (transformers 5), or preprocessor_config.json (transformers 4)."""
    if (folder / "processor_config.json").exists():
        d = json.loads((folder / "processor_config.json").read_text()).get("image_processor")
        if d is not None:
            return ImageProcessorConfig.from_dict(d)
    if (folder / "preprocessor_config.json").exists():
        return ImageProcessorConfig.from_dict(read_config(folder, "preprocessor_config.json"))
    raise FileNotFoundError(
        f"{folder} has neither processor_config.json (with an image_processor entry) nor preprocessor_config.json: "
        "copy the processor/ folder from the checkpoint again"
    )


class Qwen3VLProcessor:
    """Texts and pictures -> the text encoder's inputs, as transformers' `Qwen3VLProcessor` (Pillow backend)."""

    def __init__(self, tokenizer: QwenTokenizer, image_config: ImageProcessorConfig, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.chat_template = chat_template
        self.image_token_id = tokenizer.tokenizer.token_to_id(IMAGE_PAD)
        if self.image_token_id is None:
            raise ValueError(f"the tokenizer has no {IMAGE_PAD} token: it is not a Qwen-VL tokenizer")

    @classmethod
    def from_pretrained(cls, folder) -> "Qwen3VLProcessor":
        """A checkpoint's `processor/` folder: the tokenizer, the image processor's settings, the chat template."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: a Qwen-Image 2.1 checkpoint has a processor/ folder")
        return cls(QwenTokenizer.from_pretrained(folder), image_processor_config(folder), read_chat_template(folder))

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = False) -> str:
        if self.chat_template is None:
            raise ValueError("this processor has no chat template (chat_template.jinja): copy it from the checkpoint")
        return render_chat_template(self.chat_template, messages, add_generation_prompt)

    def __call__(self, texts, images=None) -> dict:
        """{"input_ids", "attention_mask", "mm_token_type_ids"} (B, L) int32, left-padded, and with pictures
        {"pixel_values" (patches, C*T*P*P) float32, "image_grid_thw" (n, 3)}: each `<|image_pad|>` expanded to
        one token per merged 2x2 group of its picture's patches."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = {}
        if images is not None:
            out["pixel_values"], out["image_grid_thw"] = process_images(images, self.image_config)
            texts = expand_image_pads(texts, out["image_grid_thw"], self.image_config.merge_size)
        encoded = [self.tokenizer.encode(t) for t in texts]
        L = max(len(e) for e in encoded)
        ids = np.full((len(encoded), L), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(encoded), L), np.int32)
        for i, e in enumerate(encoded):
            ids[i, L - len(e) :], mask[i, L - len(e) :] = e, 1
        out["input_ids"], out["attention_mask"] = ids, mask
        out["mm_token_type_ids"] = (ids == self.image_token_id).astype(np.int32) * mask
        return out


# ---------------------------------------------------------------------------------------------- the vision tower
def patch_positions(image_grid_thw, merge: int) -> np.ndarray:
    """(row, column) of every patch, in the processor's order (2x2 merge groups row-major, then within a group):
    transformers' `get_vision_position_ids`; (N, 2)."""
    out = []
    for t, h, w in np.asarray(image_grid_thw, np.int64).reshape(-1, 3).tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = [
            a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1) for a in (rows, cols)
        ]
        out.append(np.tile(np.stack(block, axis=1), (t, 1)))
    return np.concatenate(out)


def position_taps(image_grid_thw, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """The learned (side x side) position grid resampled to each picture's patch grid, bilinearly with aligned
    corners (`F.interpolate(align_corners=True)` as transformers' `get_vision_interpolation_indices_and_weights`
    writes it, in float32): (indices (N, 4) into the flattened grid, weights (N, 4))."""
    sizes = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    positions = patch_positions(sizes, merge)
    heights = np.repeat(sizes[:, 1], sizes.prod(axis=1))
    widths = np.repeat(sizes[:, 2], sizes.prod(axis=1))
    taps, weights = [], []
    for index, size in ((positions[:, 0], heights), (positions[:, 1], widths)):
        src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
        floor = np.floor(src)
        tap = floor.astype(np.int64)[:, None] + np.arange(2)
        weights.append(np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2, dtype=np.float32)), 0, None))
        taps.append(np.clip(tap, 0, side - 1))
    idx = (taps[0][:, :, None] * side + taps[1][:, None, :]).reshape(-1, 4)
    wts = (weights[0][:, :, None] * weights[1][:, None, :]).reshape(-1, 4).astype(np.float32)
    return idx, wts


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d with kernel = stride = one (C, T, P, P) patch, with bias: a linear over patches."""

    def __init__(self, config: Qwen3VLVisionConfig):
        super().__init__()
        self.proj = nn.Linear(config.patch_dim, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)


class VisionAttention(nn.Module):
    def __init__(self, config: Qwen3VLVisionConfig):
        super().__init__()
        self.heads = config.num_heads
        self.scale = config.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def __call__(self, x: mx.array, rope, segments: Segments) -> mx.array:
        N, D = x.shape
        q, k, v = mx.split(self.qkv(x).reshape(N, 3 * self.heads, -1), 3, axis=1)  # each (N, H, Dh)
        cos, sin = (t[:, None] for t in rope)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.proj(segments.attend(q, k, v, self.scale).reshape(N, D))


class VisionMLP(nn.Module):
    def __init__(self, config: Qwen3VLVisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: Qwen3VLVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def __call__(self, x: mx.array, rope, segments: Segments) -> mx.array:
        x = x + self.attn(self.norm1(x), rope, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each 2x2 group of patches (adjacent in the sequence) as one vector, through an MLP with exact GELU to the
    language model's width; LayerNorm before the grouping, or after it (`postshuffle`, the DeepStack mergers)."""

    def __init__(self, config: Qwen3VLVisionConfig, postshuffle: bool = False):
        super().__init__()
        self.wide = wide = config.hidden_size * config.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(wide if postshuffle else config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(wide, wide)
        self.linear_fc2 = nn.Linear(wide, config.out_hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.norm(x.reshape(-1, self.wide)) if self.postshuffle else self.norm(x).reshape(-1, self.wide)
        return self.linear_fc2(nn.gelu(self.linear_fc1(x)))


class Qwen3VLVisionModel(nn.Module):
    """transformers' `Qwen3VLVisionModel`: pixel values (N, C*T*P*P) of pictures of grids (n, 3) ->
    (merged embeddings (N / 4, out_hidden_size), the DeepStack features, one (N / 4, out_hidden_size) per index)."""

    def __init__(self, config: Qwen3VLVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.merger = PatchMerger(config)
        self.deepstack_merger_list = [PatchMerger(config, True) for _ in config.deepstack_visual_indexes]

    @property
    def dtype(self) -> mx.Dtype:
        return self.patch_embed.proj.weight.dtype

    def __call__(self, pixel_values, image_grid_thw) -> tuple[mx.array, list]:
        config = self.config
        grid = self._check(pixel_values, image_grid_thw)
        m, side = config.spatial_merge_size, int(config.num_position_embeddings**0.5)
        x = self.patch_embed(mx.array(pixel_values).astype(self.dtype))
        taps, weights = position_taps(grid, side, m)
        pos = (self.pos_embed.weight[mx.array(taps)] * mx.array(weights)[..., None]).sum(axis=1)
        x = x + pos.astype(x.dtype)
        rope = vision_rope(patch_positions(grid, m), config.head_dim, config.rope_theta)
        pictures = Segments([h * w for t, h, w in grid.tolist() for _ in range(t)])
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x, rope, pictures)
            if i in config.deepstack_visual_indexes:
                features.append(self.deepstack_merger_list[config.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), features

    def _check(self, pixel_values, image_grid_thw) -> np.ndarray:
        config = self.config
        grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
        m = config.spatial_merge_size
        if (grid <= 0).any() or (grid[:, 1:] % m).any():
            raise ValueError(
                f"image_grid_thw {grid.tolist()}: every picture needs rows and columns of patches that are positive "
                f"multiples of {m}; make the pixel values with Qwen3VLProcessor"
            )
        expected = (int(grid.prod(axis=1).sum()), config.patch_dim)
        if tuple(pixel_values.shape) != expected:
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)} do not fit image_grid_thw {grid.tolist()}: expected "
                f"{expected}, one row of C*T*P*P values per patch"
            )
        return grid


# ---------------------------------------------------------------------------------------------- the language model
def get_rope_index(
    input_ids, mm_token_type_ids, image_grid_thw=None, attention_mask=None, spatial_merge_size: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """3-D M-RoPE positions (3, B, L) int64 and deltas (B, 1), as transformers' `Qwen3VLModel.get_rope_index`:
    runs of text (type 0) count up on all three rows; a run of picture tokens (type 1) takes the next grid and sits
    at (t, row, column) of its merged grid plus the position reached, which then advances by the grid's longer side.
    Padding (mask 0) gets position 0."""
    ids = np.asarray(input_ids)
    types = np.asarray(mm_token_type_ids)
    B, L = ids.shape
    keep = np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter(np.asarray(image_grid_thw, np.int64).reshape(-1, 3).tolist() if image_grid_thw is not None else [])
    positions, deltas = np.zeros((3, B, L), np.int64), np.zeros((B, 1), np.int64)
    m = spatial_merge_size
    for b in range(B):
        kinds = types[b][keep[b]]
        parts, current = [], 0
        edges = np.flatnonzero(np.diff(kinds)) + 1
        for run in np.split(np.arange(len(kinds)), edges):
            if not len(run):
                continue
            if kinds[run[0]] == 0:
                parts.append(np.broadcast_to(np.arange(len(run)) + current, (3, len(run))))
                current += len(run)
                continue
            t, h, w = next(grids, (0, 0, 0))
            if t * (h // m) * (w // m) != len(run):
                raise ValueError(
                    f"a run of {len(run)} picture tokens in text {b} does not fit its grid {[t, h, w]}: make the ids "
                    "with Qwen3VLProcessor (it expands each <|image_pad|> to one token per merged patch)"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
            parts.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + current)
            current += max(h, w) // m
        llm = np.concatenate(parts, axis=1)
        positions[:, b, keep[b]] = llm
        deltas[b, 0] = llm.max() + 1 - len(kinds)
    return positions, deltas


def mrope_table(positions, head_dim: int, theta: float, mrope_section) -> tuple[mx.array, mx.array]:
    """(3, B, L) positions -> (cos, sin) (B, 1, L, head_dim) float32, interleaved: frequency j turns with the row
    position when j % 3 == 1 and j < 3 * section[1], with the column when j % 3 == 2 and j < 3 * section[2], else with
    the time position; both halves of the head alike (rotate_half layout)."""
    inv_freq = 1.0 / (theta ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))
    angles = mx.array(positions).astype(mx.float32)[..., None] * inv_freq  # (3, B, L, Dh/2)
    j = np.arange(head_dim // 2)
    row = mx.array((j % 3 == 1) & (j < 3 * mrope_section[1]))
    col = mx.array((j % 3 == 2) & (j < 3 * mrope_section[2]))
    angles = mx.where(row, angles[1], mx.where(col, angles[2], angles[0]))  # (B, L, Dh/2)
    angles = mx.concatenate([angles, angles], axis=-1)[:, None]  # (B, 1, L, Dh)
    return mx.cos(angles), mx.sin(angles)


class TextAttention(nn.Module):
    def __init__(self, config: Qwen3VLTextConfig):
        super().__init__()
        H, KV, Dh, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.heads, self.kv_heads, self.scale = H, KV, Dh**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(D, H * Dh, bias=bias)
        self.k_proj = nn.Linear(D, KV * Dh, bias=bias)
        self.v_proj = nn.Linear(D, KV * Dh, bias=bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=bias)
        self.q_norm = RMSNorm(Dh, config.rms_norm_eps)
        self.k_norm = RMSNorm(Dh, config.rms_norm_eps)

    def __call__(self, x: mx.array, rope, mask) -> mx.array:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.heads, -1)).transpose(0, 2, 1, 3)  # (B, H, L, Dh)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.kv_heads, -1).transpose(0, 2, 1, 3)
        cos, sin = (t.astype(x.dtype) for t in rope)  # transformers rounds the table to the activations' dtype
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class TextMLP(nn.Module):
    def __init__(self, config: Qwen3VLTextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACTIVATIONS[config.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3VLTextConfig):
        super().__init__()
        self.self_attn = TextAttention(config)
        self.mlp = TextMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, x: mx.array, rope, mask) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3VLTextModel(nn.Module):
    """transformers' `Qwen3VLTextModel` on input embeddings: (B, L, hidden) -> (B, L, hidden), the final norm's input
    (or output with `normed`). `visual` (B, L) bool marks where the DeepStack features are added, after layers 0, 1,
    ... in turn."""

    def __init__(self, config: Qwen3VLTextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, x, positions, attention_mask=None, visual=None, deepstack=(), normed=False) -> mx.array:
        config = self.config
        B, L, D = x.shape
        rope = mrope_table(positions, config.head_dim, config.rope_theta, config.mrope_section)
        mask = "causal"
        if attention_mask is not None and not np.asarray(attention_mask).all():
            keep = mx.array(np.asarray(attention_mask).astype(bool))
            mask = mx.tril(mx.ones((L, L), dtype=mx.bool_))[None, None] & keep[:, None, None, :]
        slots = None if visual is None else mx.array(np.flatnonzero(np.asarray(visual).reshape(-1)))
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask)
            if slots is not None and i < len(deepstack):
                x = x.reshape(B * L, D).at[slots].add(deepstack[i].astype(x.dtype)).reshape(B, L, D)
        return self.norm(x) if normed else x


class Qwen3VLModel(nn.Module):
    def __init__(self, config: Qwen3VLConfig, vision: bool = True):
        super().__init__()
        self.language_model = Qwen3VLTextModel(config.text)
        if vision:
            self.visual = Qwen3VLVisionModel(config.vision)


class Qwen3VLTextEncoder(nn.Module):
    """`Qwen3VLForConditionalGeneration` without lm_head, as Qwen-Image 2.1 reads it. Built with `vision=False` it
    has no vision tower (text-to-image needs none, and its weights are not read)."""

    def __init__(self, config: Qwen3VLConfig | None = None, vision: bool = True):
        super().__init__()
        self.config = config = config or Qwen3VLConfig(Qwen3VLTextConfig(), Qwen3VLVisionConfig())
        self.model = Qwen3VLModel(config, vision)

    @property
    def has_vision(self) -> bool:
        return "visual" in self.model

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.language_model.embed_tokens.weight.dtype

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
        normed: bool = False,
    ) -> mx.array:
        """ids (B, L) with each picture's slots expanded (Qwen3VLProcessor's output) -> hidden states (B, L, hidden):
        the last decoder layer's output, DeepStack included (`normed`: after the final RMSNorm, transformers'
        last_hidden_state). Without pictures the positions are 0..L-1 (transformers' fallback); with them, from
        `get_rope_index` and `mm_token_type_ids`."""
        config = self.config
        ids = np.asarray(input_ids)
        B, L = ids.shape
        x = self.model.language_model.embed_tokens(mx.array(ids))
        slots = ids == config.image_token_id
        visual, deepstack = None, ()
        if pixel_values is not None:
            if not self.has_vision:
                raise ValueError(
                    "this text encoder was built without its vision tower (vision=False): load it with vision=True "
                    "to encode pictures"
                )
            if mm_token_type_ids is None:
                raise ValueError("pictures need mm_token_type_ids (Qwen3VLProcessor returns them) for their positions")
            embeds, deepstack = self.model.visual(pixel_values, image_grid_thw)
            if int(slots.sum()) != embeds.shape[0]:
                raise ValueError(
                    f"the ids hold {int(slots.sum())} picture tokens but the pictures give {embeds.shape[0]} "
                    "embeddings: make the ids and pixel values with one Qwen3VLProcessor call"
                )
            flat = mx.array(np.flatnonzero(slots.reshape(-1)))
            x = x.reshape(B * L, -1)
            x[flat] = embeds.astype(x.dtype)
            x = x.reshape(B, L, -1)
            positions, _ = get_rope_index(
                ids, mm_token_type_ids, image_grid_thw, attention_mask, config.vision.spatial_merge_size
            )
            visual = slots
        elif slots.any():
            raise ValueError("the ids hold picture tokens but no pixel_values were given")
        else:
            positions = np.broadcast_to(np.arange(L), (3, B, L))
        return self.model.language_model(x, positions, attention_mask, visual, deepstack, normed)

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """Checkpoint names -> this module's: lm_head dropped; transformers 4's `model.layers.*` / `visual.*` as
        transformers 5's `model.language_model.*` / `model.visual.*`; the Conv3d patch weight flattened."""
        out = {}
        for k, v in weights.items():
            if k.startswith("lm_head."):
                continue
            if k.startswith("visual."):
                k = "model." + k
            elif k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.")):
                k = "model.language_model." + k[len("model.") :]
            if k == "model.visual.patch_embed.proj.weight" and v.ndim == 5:
                v = v.reshape(v.shape[0], -1)
            out[k] = v
        return out


def is_vision_weight(name: str) -> bool:
    return name.startswith(("model.visual.", "visual."))


def load_qwen3_vl(
    folder, dtype: mx.Dtype = mx.bfloat16, vision: bool = True, variant: str | None = None
) -> Qwen3VLTextEncoder:
    """The Qwen3-VL text encoder of a 2.1 checkpoint's `text_encoder/` folder, lazily and strictly; with
    `vision=False` the vision tower is neither built nor read (shards holding only it are not opened)."""
    folder = Path(folder)
    model = Qwen3VLTextEncoder(Qwen3VLConfig.from_folder(folder), vision)

    def keep(name: str) -> bool:
        return not name.startswith("lm_head.") and (vision or not is_vision_weight(name))

    weights = Qwen3VLTextEncoder.sanitize(read_weights(folder, dtype, keep=keep, variant=variant))
    load_strict(model, weights, "Qwen3-VL text encoder")
    return model


def composite_on_white(picture: Image.Image) -> Image.Image:
    """An RGBA picture pasted onto white through its alpha (as QwenImage21Pipeline flattens it for the text
    encoder; Pillow's paste rounds as diffusers' does); other modes unchanged."""
    if picture.mode != "RGBA":
        return picture
    white = Image.new("RGB", picture.size, (255, 255, 255))
    white.paste(picture, mask=picture.getchannel("A"))
    return white


__all__ = [
    "Qwen3VLConfig",
    "Qwen3VLProcessor",
    "Qwen3VLTextConfig",
    "Qwen3VLTextEncoder",
    "Qwen3VLVisionConfig",
    "Qwen3VLVisionModel",
    "composite_on_white",
    "get_rope_index",
    "load_qwen3_vl",
    "render_chat_template",
]
