"""The vision side of Qwen2.5-VL, which Qwen-Image-Edit's text encoder uses to read its input pictures.

- The image processor: transformers' `Qwen2VLImageProcessorPil` (the Pillow backend transformers 5 uses without
  torchvision), bit-exact in float32. `process_images(pictures) -> (pixel_values (N, C*T*P*P), image_grid_thw (n, 3))`.
- The vision tower: transformers' `Qwen2_5_VisionTransformerPretrainedModel`.
  `Qwen25VisionTransformer(config)(pixel_values, image_grid_thw) -> (N / merge^2, out_hidden_size)`.
- `get_rope_index`: `Qwen2_5_VLModel.get_rope_index`, the 3-D M-RoPE positions of a text with pictures.
- `encode_with_images`: the language model of `qwen_nb.text_encoder` with the picture embeddings in place of the
  `<|image_pad|>` tokens, rotated by those 3-D positions (or plain ones, as diffusers 0.42.1 calls it); returns the
  final-norm hidden states (B, L, hidden).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .activations import check_activation
from .loading import Config, load_strict, read_config, read_weights
from .rmsnorm import RMSNorm
from .text_encoder import MLP, QwenTextEncoder, rotate_half
from .tokenizer import QwenTokenizer

IMAGE_PAD = "<|image_pad|>"
IMAGE_TOKEN_ID = 151655  # Qwen2.5-VL's <|image_pad|>
MROPE_SECTION = (16, 24, 24)  # the 64 frequencies of a 128-wide head, split between the (t, h, w) positions
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


# ---------------------------------------------------------------------------------------------- the image processor


@dataclass
class ImageProcessorConfig(Config):
    """`processor/preprocessor_config.json` of Qwen/Qwen-Image-Edit (Qwen2.5-VL-7B-Instruct's); defaults = it."""

    min_pixels: int = 3136
    max_pixels: int = 12845056
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        self.image_mean = _three(self.image_mean, "image_mean")
        self.image_std = _three(self.image_std, "image_std")
        if not (0 < self.min_pixels <= self.max_pixels):
            raise ValueError(
                f"min_pixels {self.min_pixels} and max_pixels {self.max_pixels} must satisfy 0 < min_pixels <= "
                "max_pixels (the pixel count every picture is resized into)"
            )
        if int(self.resample) not in {int(r) for r in Image.Resampling}:
            raise ValueError(f"resample {self.resample} is not a Pillow filter (0-5; Qwen2.5-VL uses 3, bicubic)")
        if 0 in self.image_std:
            raise ValueError(f"image_std {self.image_std} has a zero: pictures would be divided by it")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged 2x2 group of patches (28 px)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessorConfig":
        """As transformers 5 reads preprocessor_config.json: the pixel range from `size` {shortest_edge,
        longest_edge}, overridden by top-level `min_pixels` / `max_pixels` (the hub checkpoint's shape); with
        neither, transformers' class defaults (56*56, 28*28*1280), not the checkpoint's."""
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(flag) is False:
                raise ValueError(f"{flag}=false is not supported: Qwen2.5-VL's processor always does that step")
        size = d.get("size") or {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
        low = d["min_pixels"] if d.get("min_pixels") is not None else size.get("shortest_edge")
        high = d["max_pixels"] if d.get("max_pixels") is not None else size.get("longest_edge")
        if not low or not high:
            raise ValueError(
                f"preprocessor_config.json gives no pixel range (size {size}, min_pixels {d.get('min_pixels')}, "
                f"max_pixels {d.get('max_pixels')}): Qwen2.5-VL needs size {{'shortest_edge', 'longest_edge'}} or "
                "min_pixels and max_pixels, both positive"
            )
        rest = {k: v for k, v in d.items() if k not in ("min_pixels", "max_pixels")}
        return super().from_dict({**rest, "min_pixels": low, "max_pixels": high})


def _three(value, name: str) -> tuple:
    values = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3
    if len(values) != 3:
        raise ValueError(f"{name} needs one value per RGB channel, got {value}")
    return values


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 12845056):
    """(height, width) rounded to multiples of `factor` with min_pixels <= height*width <= max_pixels, keeping the
    aspect ratio as well as that allows: transformers' `smart_resize` (Python's round: halves go to even)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"the picture is {width}x{height} pixels: nothing to patch (the smallest it takes is 1x1)")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"the picture is {width}x{height} pixels, an aspect ratio of {max(height, width) / min(height, width):.0f}"
            f": the processor takes at most {MAX_ASPECT_RATIO} (as transformers). Crop or pad it."
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def open_picture(path) -> Image.Image:
    """A picture file as transformers' `load_image` reads a path: EXIF orientation applied, then plain RGB (an
    alpha channel is dropped, not composited)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no picture at {path}")
    try:
        with Image.open(path) as picture:
            return ImageOps.exif_transpose(picture).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a picture Pillow can read ({e}): give a PNG, JPEG, WebP ... file") from e


def to_rgb(picture: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb`: a picture with transparency is composited onto white, any other mode is
    converted by Pillow (16-bit 'I;16' values are clipped to 255 there, as in transformers)."""
    try:
        if "A" in picture.getbands() or picture.info.get("transparency") is not None:
            rgba = picture.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return picture.convert("RGB")
    except ValueError as e:
        raise ValueError(
            f"cannot make an RGB picture of a Pillow picture of mode {picture.mode!r} ({e}): convert it first, "
            "e.g. picture.convert('RGBA')"
        ) from e


def patchify(image: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int) -> np.ndarray:
    """(C, H, W) -> (H/P * W/P, C*T*P*P): each patch repeated over T frames, patches ordered by 2x2 merge group
    (group rows, group columns, then the 2x2 inside), as the vision tower reads them."""
    C, H, W = image.shape
    P, m = patch_size, merge_size
    gh, gw = H // P, W // P
    x = image.reshape(C, gh // m, m, P, gw // m, m, P).transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, P, P))
    return x.reshape(gh * gw, C * temporal_patch_size * P * P)


def process_images(pictures, config: ImageProcessorConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pictures (PIL images or file paths, one or a list) -> (pixel_values (sum of patches, C*T*P*P) float32,
    image_grid_thw (n, 3) int64 of (1, rows, columns) of patches), equal to transformers' Pillow backend."""
    config = config or ImageProcessorConfig()
    if isinstance(pictures, (Image.Image, str, Path)):
        pictures = [pictures]
    pictures = list(pictures)
    if not pictures:
        raise ValueError("no pictures given")
    mean = np.array(config.image_mean, np.float32)
    std = np.array(config.image_std, np.float32)
    patches, grids = [], []
    for picture in pictures:
        if isinstance(picture, (str, Path)):
            picture = open_picture(picture)
        elif not isinstance(picture, Image.Image):
            raise TypeError(
                f"a picture must be a PIL.Image.Image or a file path, not {type(picture).__name__} (for an array, "
                "PIL.Image.fromarray(array))"
            )
        rgb = to_rgb(picture)
        width, height = rgb.size
        h, w = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
        resized = np.asarray(rgb.resize((w, h), resample=config.resample), dtype=np.uint8)  # (h, w, 3)
        # transformers rescales in float64 and rounds once to float32, then normalises in float32
        x = (resized.astype(np.float64) * config.rescale_factor).astype(np.float32)
        x = (x - mean) / std
        patches.append(patchify(x.transpose(2, 0, 1), config.patch_size, config.temporal_patch_size, config.merge_size))
        grids.append((1, h // config.patch_size, w // config.patch_size))
    return np.ascontiguousarray(np.concatenate(patches)), np.array(grids, np.int64)


def expand_image_pads(texts: list[str], image_grid_thw, merge_size: int = 2) -> list[str]:
    """Each `<|image_pad|>` of the texts (in order) repeated once per merged patch of its picture, as
    `Qwen2VLProcessor` does before tokenizing."""
    counts = [int(t * h * w) // merge_size**2 for t, h, w in np.asarray(image_grid_thw).tolist()]
    found = sum(text.count(IMAGE_PAD) for text in texts)
    if found != len(counts):
        raise ValueError(
            f"the texts have {found} {IMAGE_PAD} placeholder(s) for {len(counts)} picture(s): write one "
            f"'<|vision_start|>{IMAGE_PAD}<|vision_end|>' per picture"
        )
    it = iter(counts)
    out = []
    for text in texts:
        first, *rest = text.split(IMAGE_PAD)
        out.append(first + "".join(IMAGE_PAD * next(it) + piece for piece in rest))
    return out


class QwenVLProcessor:
    """Texts and pictures -> the language model's inputs, as transformers' `Qwen2VLProcessor` (right padding)."""

    def __init__(self, tokenizer: QwenTokenizer, image_config: ImageProcessorConfig | None = None):
        self.tokenizer = tokenizer
        self.image_config = image_config or ImageProcessorConfig()

    @classmethod
    def from_pretrained(cls, folder) -> "QwenVLProcessor":
        """A checkpoint's `processor/` folder: preprocessor_config.json and the tokenizer with the vision tokens."""
        folder = Path(folder)
        config = ImageProcessorConfig.from_dict(read_config(folder, "preprocessor_config.json"))
        return cls(QwenTokenizer.from_pretrained(folder), config)

    def __call__(self, texts, images=None) -> dict:
        """{"input_ids", "attention_mask"} (B, L) int32, and with pictures {"pixel_values", "image_grid_thw"}."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = {}
        if images is not None:
            out["pixel_values"], out["image_grid_thw"] = process_images(images, self.image_config)
            texts = expand_image_pads(texts, out["image_grid_thw"], self.image_config.merge_size)
        out["input_ids"], out["attention_mask"] = self.tokenizer(texts)
        return out


# ---------------------------------------------------------------------------------------------- the vision tower


@dataclass
class VisionConfig(Config):
    """The vision side of `text_encoder/config.json` of Qwen/Qwen-Image (Qwen2.5-VL-7B-Instruct); defaults = it.
    `image_token_id` and `mrope_section` are the language model's: how it marks and positions picture tokens."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6  # transformers' vision norms hard-code it
    hidden_act: str = "silu"  # the blocks' gated MLP (transformers' ACT2FN name); the merger's GELU is fixed
    image_token_id: int = IMAGE_TOKEN_ID
    mrope_section: tuple = MROPE_SECTION

    def __post_init__(self):
        self.fullatt_block_indexes = tuple(self.fullatt_block_indexes)
        self.mrope_section = tuple(self.mrope_section)
        check_activation(self.hidden_act, "vision", "silu (Qwen2.5-VL)")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a whole head size divisible "
                "by 4 (the 2-D RoPE splits each head into (row, column) x (cos, sin) quarters)"
            )
        if self.window_size // (self.spatial_merge_size * self.patch_size) < 1:
            raise ValueError(
                f"window_size {self.window_size} px is smaller than one merged group of patches "
                f"({self.spatial_merge_size * self.patch_size} px): no window fits"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        """From a whole Qwen2.5-VL config.json, either shape (transformers 4.x flat, 5 nested): `vision_config`
        (with `in_chans` for `in_channels` and `rope_parameters.rope_theta` where given), the top-level
        `image_token_id`, and `mrope_section` from the text rope settings."""
        if "vision_config" not in d:
            raise ValueError(
                "config.json has no vision_config: it is not a Qwen2.5-VL text encoder with a vision tower"
            )
        vision = dict(d["vision_config"])
        if "in_channels" not in vision and "in_chans" in vision:
            vision["in_channels"] = vision["in_chans"]
        vision["rope_theta"] = (vision.get("rope_parameters") or {}).get("rope_theta", cls.rope_theta)
        text = {**d, **(d.get("text_config") or {})}
        rope = text.get("rope_parameters") or text.get("rope_scaling") or d.get("rope_scaling") or {}
        vision["mrope_section"] = rope.get("mrope_section", MROPE_SECTION)
        vision["image_token_id"] = d.get("image_token_id", IMAGE_TOKEN_ID)
        return super().from_dict(vision)

    @classmethod
    def tiny(cls, **overrides) -> "VisionConfig":
        """4 blocks, 32 wide, full attention in blocks 1 and 3, windows of 2x2 merged groups; out 64 wide (the
        tiny text encoder's width), for tests and CPU notebooks."""
        base = dict(
            depth=4,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            window_size=56,
            out_hidden_size=64,
            fullatt_block_indexes=(1, 3),
            mrope_section=(2, 3, 3),
        )
        return cls(**{**base, **overrides})


@dataclass
class VisionLayout:
    """Where each patch goes in the tower, from the grids alone (host-side, once per call).

    order: the patch at each position of the window-ordered sequence (N,); restore: the inverse permutation of
    merged groups (N / merge^2,); positions: (row, column) of each patch in window order (N, 2);
    windows / pictures: lengths of the runs that attend together in window and full-attention blocks."""

    order: np.ndarray
    restore: np.ndarray
    positions: np.ndarray
    windows: list
    pictures: list


def vision_layout(image_grid_thw, config: VisionConfig) -> VisionLayout:
    """The window permutation of transformers' `get_vision_window_index` and the 2-D positions of
    `get_vision_position_ids`, for pictures of grids (t, h, w) of patches."""
    m, unit = config.spatial_merge_size, config.spatial_merge_size**2
    ws = config.window_size // m // config.patch_size  # window side in merged groups
    groups, windows, pictures, positions = [], [], [], []
    offset = 0
    for t, h, w in np.asarray(image_grid_thw, np.int64).reshape(-1, 3).tolist():
        gh, gw = h // m, w // m
        nh, nw = -(-gh // ws), -(-gw // ws)
        index = np.full((t, nh * ws, nw * ws), -1, np.int64)
        index[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw) + offset
        index = index.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, ws * ws)
        for window in index:
            window = window[window >= 0]
            if len(window):
                groups.append(window)
                windows.append(len(window) * unit)
        pictures += [h * w] * t
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = [a.reshape(gh, m, gw, m).transpose(0, 2, 1, 3).reshape(-1) for a in (rows, cols)]
        positions.append(np.tile(np.stack(block, axis=1), (t, 1)))
        offset += t * gh * gw
    groups = np.concatenate(groups)
    order = (groups[:, None] * unit + np.arange(unit)).reshape(-1)
    return VisionLayout(order, np.argsort(groups), np.concatenate(positions)[order], windows, pictures)


class Segments:
    """Consecutive runs of a sequence that attend only within themselves (windows, or whole pictures).

    Runs of equal length are a reshape into a batch. Otherwise "padded" gathers the runs into a batch padded to
    the longest, with the padding keys masked; "masked" attends over the whole sequence with a block-diagonal
    mask, which costs N^2 instead of N x 64 per head. The default is "padded": benchmarks/bench_vision.py printed,
    for one window block of the real tower (16 heads of 80, float32) on 2 shared x86 cores, MLX 0.32.4 CPU:
    392x392 px (Edit-Plus's condition picture, 784 patches, 16 windows) padded 57 ms, masked 329 ms;
    1036x1036 px (Edit's 1024x1024 picture, 5476 patches, 100 windows) padded 0.54 s, masked 21.5 s."""

    def __init__(self, lengths, mode: str = "padded"):
        if mode not in ("padded", "masked"):
            raise ValueError(f"mode must be 'padded' or 'masked', not {mode!r}")
        lengths = np.array([n for n in lengths if n > 0], np.int64)
        self.count, self.longest = len(lengths), int(lengths.max())
        self.mode = "equal" if (lengths == self.longest).all() else mode
        if self.mode == "masked":
            run = np.repeat(np.arange(self.count), lengths)
            self.mask = mx.array(run[:, None] == run[None, :])
        elif self.mode == "padded":
            starts = np.cumsum(lengths) - lengths
            slot = np.arange(self.longest)
            valid = slot[None, :] < lengths[:, None]  # (S, Lmax)
            self.gather = mx.array(np.where(valid, starts[:, None] + slot[None, :], 0).reshape(-1))
            self.scatter = mx.array(np.flatnonzero(valid))
            self.mask = mx.array(valid[:, None, None, :])  # padding keys masked out

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        """q, k, v (N, H, Dh) -> (N, H, Dh), each position attending to its own run."""
        N, H, Dh = q.shape
        if self.mode == "masked":
            q, k, v = (t.transpose(1, 0, 2)[None] for t in (q, k, v))  # (1, H, N, Dh)
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=self.mask)
            return o[0].transpose(1, 0, 2)
        S, L = self.count, self.longest
        mask = None
        if self.mode == "padded":
            q, k, v = (t[self.gather] for t in (q, k, v))
            mask = self.mask
        q, k, v = (t.reshape(S, L, H, Dh).transpose(0, 2, 1, 3) for t in (q, k, v))  # (S, H, L, Dh)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        o = o.transpose(0, 2, 1, 3).reshape(S * L, H, Dh)
        return o[self.scatter] if self.mode == "padded" else o


def vision_rope(positions: np.ndarray, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """(row, column) positions (N, 2) -> (cos, sin) (N, head_dim) float32: head_dim/4 frequencies turn with the
    row, the same head_dim/4 with the column; the two halves of the head alike (rotate_half layout)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (mx.arange(0, half, 2, dtype=mx.float32) / half))
    angles = (mx.array(positions, mx.float32)[..., None] * inv_freq).reshape(len(positions), -1)  # (N, Dh/2)
    angles = mx.concatenate([angles, angles], axis=-1)
    return mx.cos(angles), mx.sin(angles)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x (..., S, H, Dh) or (B, H, S, Dh) with cos/sin broadcast to it; rotated in float32 as transformers."""
    xf = x.astype(mx.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d with kernel = stride = one (C, T, P, P) patch: a linear over flattened patches."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(config.patch_dim, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
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


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = VisionAttention(config)
        # the language model's gated MLP, with biases: act(gate) * up, silu in Qwen2.5-VL (SwiGLU)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=True)

    def __call__(self, x: mx.array, rope, segments: Segments) -> mx.array:
        x = x + self.attn(self.norm1(x), rope, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each 2x2 group of patches (adjacent in the sequence) concatenated and sent through an MLP
    with exact GELU to the language model's width."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.wide = wide = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = [nn.Linear(wide, wide), nn.GELU(), nn.Linear(wide, config.out_hidden_size)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.ln_q(x).reshape(-1, self.wide)  # (N / merge^2, merge^2 * hidden)
        for layer in self.mlp:
            x = layer(x)
        return x


class Qwen25VisionTransformer(nn.Module):
    """Qwen2.5-VL's vision tower: flattened patches (N, C*T*P*P) of pictures with grids (n, 3) -> one embedding
    per merged 2x2 group, (N / 4, out_hidden_size), pictures in order, each in row-major group order."""

    def __init__(self, config: VisionConfig, attention: str = "padded"):
        super().__init__()
        self.config = config
        self.attention = attention  # how uneven windows are batched: "padded" or "masked" (see Segments)
        self.patch_embed = PatchEmbed(config)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.merger = PatchMerger(config)

    def __call__(self, pixel_values, image_grid_thw) -> mx.array:
        config = self.config
        grid = self._check(pixel_values, image_grid_thw)
        layout = vision_layout(grid, config)
        x = self.patch_embed(mx.array(pixel_values).astype(self.dtype))[mx.array(layout.order)]  # window order
        rope = vision_rope(layout.positions, config.head_dim, config.rope_theta)
        windows, pictures = Segments(layout.windows, self.attention), Segments(layout.pictures, self.attention)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, pictures if i in config.fullatt_block_indexes else windows)
        return self.merger(x)[mx.array(layout.restore)]

    def _check(self, pixel_values, image_grid_thw) -> np.ndarray:
        config = self.config
        grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
        m = config.spatial_merge_size
        if (grid <= 0).any() or (grid[:, 1:] % m).any():
            raise ValueError(
                f"image_grid_thw {grid.tolist()}: every picture needs rows and columns of patches that are positive "
                f"multiples of {m} (the tower merges {m}x{m} groups), i.e. at least {m * config.patch_size} px a "
                "side; make the pixel values with process_images"
            )
        shape = tuple(pixel_values.shape)
        expected = (int(grid.prod(axis=1).sum()), config.patch_dim)
        if shape != expected:
            raise ValueError(
                f"pixel_values {shape} do not fit image_grid_thw {grid.tolist()}: expected {expected}, one row of "
                "C*T*P*P values per patch (made by process_images with this checkpoint's processor settings)"
            )
        return grid

    @property
    def dtype(self) -> mx.Dtype:
        return self.patch_embed.proj.weight.dtype

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """Checkpoint names -> this module's: the `visual.` (or transformers 5's `model.visual.`) prefix dropped,
        everything else (the language model, lm_head) left out, and the Conv3d patch weight (D, C, T, P, P)
        flattened to a linear's (D, C*T*P*P)."""
        out = {}
        for k, v in weights.items():
            prefix = next((p for p in ("model.visual.", "visual.") if k.startswith(p)), None)
            if prefix is None:
                continue
            k = k[len(prefix) :]
            if k == "patch_embed.proj.weight" and v.ndim == 5:
                v = v.reshape(v.shape[0], -1)
            out[k] = v
        return out


def is_vision_tower(name: str) -> bool:
    return name.startswith(("visual.", "model.visual."))


def load_vision_tower(
    folder, dtype: mx.Dtype = mx.bfloat16, attention: str = "padded", variant: str | None = None
) -> Qwen25VisionTransformer:
    """The vision tower of a checkpoint's `text_encoder/` folder, in `dtype`, loaded lazily and strictly (only the
    shards holding vision tensors are opened)."""
    folder = Path(folder)
    model = Qwen25VisionTransformer(VisionConfig.from_folder(folder), attention)
    weights = Qwen25VisionTransformer.sanitize(read_weights(folder, dtype, keep=is_vision_tower, variant=variant))
    if not weights:
        raise ValueError(
            f"{folder} holds no vision-tower weights (visual.*): the edit pipelines need the whole Qwen2.5-VL text "
            "encoder. Download the text_encoder/ folder with all its shards (e.g. from Qwen/Qwen-Image-Edit), not "
            "only the language model's"
        )
    load_strict(model, weights, "Qwen2.5-VL vision tower", prefix="visual.")
    return model


# ---------------------------------------------------------------------------------------------- the language model


def get_rope_index(
    input_ids,
    image_grid_thw,
    attention_mask=None,
    image_token_id: int = IMAGE_TOKEN_ID,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """3-D M-RoPE positions (3, B, L) int64 and deltas (B, 1), as transformers 5's `get_rope_index`: text tokens
    count up on all three rows; a picture's tokens sit at (t, row, column) of its merged grid, offset by the
    position reached, which then advances by the grid's longer side. Padding (mask 0) gets position 0."""
    ids = np.asarray(input_ids)
    B, L = ids.shape
    keep = np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter(np.asarray(image_grid_thw, np.int64).reshape(-1, 3).tolist() if image_grid_thw is not None else [])
    positions = np.zeros((3, B, L), np.int64)
    deltas = np.zeros((B, 1), np.int64)
    m = spatial_merge_size
    for b in range(B):
        is_image = ids[b][keep[b]] == image_token_id
        parts, current = [], 0
        for start, end in _runs(is_image):
            n = end - start
            if not is_image[start]:
                parts.append(np.broadcast_to(np.arange(n) + current, (3, n)))
                current += n
                continue
            t, h, w = next(grids, (0, 0, 0))
            if t * (h // m) * (w // m) != n:
                raise ValueError(
                    f"a run of {n} {IMAGE_PAD} tokens in text {b} does not fit its picture's grid {[t, h, w]} "
                    f"({t * (h // m) * (w // m)} merged patches): expand the placeholders with expand_image_pads"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
            parts.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + current)
            current += max(h, w) // m
        llm = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
        positions[:, b, keep[b]] = llm
        deltas[b, 0] = (llm.max() + 1 if llm.size else 0) - len(is_image)
    return positions, deltas


def _runs(flags: np.ndarray):
    """(start, end) of each run of equal values."""
    edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    bounds = np.concatenate([[0], edges, [len(flags)]]) if len(flags) else np.zeros(1, np.int64)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def mrope_table(positions, head_dim: int, theta: float, mrope_section) -> tuple[mx.array, mx.array]:
    """(3, B, L) positions -> (cos, sin) (B, 1, L, head_dim) float32: frequency chunk i of `mrope_section` turns
    with position row i % 3 (time, row, column); equal rows give plain RoPE."""
    if 2 * sum(mrope_section) != head_dim:
        raise ValueError(f"mrope_section {tuple(mrope_section)} must add up to half the head size {head_dim}")
    inv_freq = 1.0 / (theta ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))
    angles = mx.array(positions).astype(mx.float32)[..., None] * inv_freq  # (3, B, L, Dh/2)
    bounds = np.cumsum(mrope_section)[:-1].tolist()
    angles = mx.concatenate([chunk[i % 3] for i, chunk in enumerate(mx.split(angles, bounds, axis=-1))], axis=-1)
    angles = mx.concatenate([angles, angles], axis=-1)[:, None]  # (B, 1, L, Dh)
    return mx.cos(angles), mx.sin(angles)


def encode_with_images(
    encoder: QwenTextEncoder,
    input_ids,
    attention_mask=None,
    image_embeds: mx.array | None = None,
    positions=None,
    image_token_id: int = IMAGE_TOKEN_ID,
    mrope_section=MROPE_SECTION,
) -> mx.array:
    """The language model's final-norm hidden states (B, L, hidden) of ids (B, L) whose `<|image_pad|>` tokens are
    replaced, in order, by `image_embeds` (the tower's output, one row per token).

    positions: (3, B, L) from `get_rope_index` (the model as trained, and transformers when given
    `mm_token_type_ids`), or None for 0..L-1 on all rows: what transformers 5 does when a caller passes no
    `mm_token_type_ids`, as diffusers 0.42.1's Qwen-Image-Edit pipelines do."""
    config = encoder.config
    ids = np.asarray(input_ids)
    B, L = ids.shape
    x = encoder.model.embed_tokens(mx.array(ids))  # (B, L, hidden)
    slots = np.flatnonzero(ids.reshape(-1) == image_token_id)
    rows = 0 if image_embeds is None else image_embeds.shape[0]
    if len(slots) != rows:
        raise ValueError(
            f"the ids hold {len(slots)} picture tokens but {rows} picture embeddings were given: expand each "
            f"{IMAGE_PAD} with expand_image_pads (one token per merged patch)"
        )
    if rows:
        x = x.reshape(B * L, -1)
        x[mx.array(slots)] = image_embeds.astype(x.dtype)
        x = x.reshape(B, L, -1)
    # plain positions: the language model's own rotation (the same table, as one kernel)
    rope = None if positions is None else mrope_table(positions, config.head_dim, config.rope_theta, mrope_section)
    mask = None if attention_mask is None else mx.array(attention_mask)
    return encoder(None, mask, embeds=x, rope=rope)
