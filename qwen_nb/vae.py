"""The Qwen-Image VAE: diffusers' `AutoencoderKLQwenImage` (the Wan-2.1 video VAE, decoder fine-tuned), the
single-image path, channels-last.

`decode(z (B, h, w, 16)) -> (B, 8h, 8w, 3)` in [-1, 1] from the transformer's normalised latents;
`encode(x (B, H, W, 3)) -> (B, H/8, W/8, 16)` normalised latents (posterior mean, or a sample).

Why 2-D convolutions are exact for an image. diffusers runs a video VAE: every conv is a causal
`QwenImageCausalConv3d` that pads time with two zero frames in front (or, for later chunks, two cached frames). An
image is one frame decoded as the first chunk, so a k=3 conv sees [0, 0, x] along time and only its last temporal
tap `w[:, :, 2]` meets data: it is exactly a 2-D 3x3 conv with that tap. k=1 convs have a single tap, `w[:, :, 0]`.
The resamplers' `time_conv` (temporal up/down-sampling) runs only when a previous chunk exists: on the first chunk
the upsampler marks its cache "Rep" and the downsampler stores its input, and both skip the conv. So for one frame
`time_conv` never runs; `sanitize` drops those weights, which the checkpoint does contain. `QwenImageRMS_norm` is
`F.normalize(x, dim=C) * sqrt(C) * gamma`, i.e. an RMSNorm over channels with weight `gamma`. It has no spatial
statistics, so the only non-local layer of the decoder is the single-head attention of its mid block.

Tiled decoding (`decode(z, tile=...)`): the latent-resolution part (post_quant_conv, conv_in, mid block with its
global attention) runs on the whole latent, which is small; the up blocks, where the memory goes, run on
overlapping latent tiles of side `tile`, and neighbouring tiles are blended linearly in their overlap. A tile's
pixels are wrong only within the decoder's receptive field of its cut edges (`VAEConfig.tile_margin`, 12.25 latent
pixels for this family's shape); with the default overlap, twice that rounded up (25), the blend uses only exact
pixels, so a tiled decode equals the plain one. A smaller overlap is cross-faded over the middle half of each
overlap, away from the cut edges, and is approximate. Measured on the random-weight test VAE in float32
(tests/test_vae.py): max |tiled - untiled| = 6e-8 with the default overlap; 0.021 with overlap 16 and 0.24 with
overlap 8 (tile 24; [-1, 1] units; random weights have strong edge effects, a trained decoder is smoother).
Activation memory scales with tile**2; `TILE` = 96 covers a 1328x1328 image (166x166 latents) with 2 x 2 tiles.
Each tile, and each query chunk of the mid block's attention, is evaluated as it is made: the only `mx.eval` calls in
the package's modules, because a memory bound is the point of tiling and one lazy graph would not keep it (a GPU
backend allocates the buffers of all queued work ahead of running it).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .loading import Config, load_strict, read_weights

LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Query rows per attention chunk are chosen so that one chunk's score matrix holds at most this many elements:
# the mid-block attention has one 384-wide head, which no fused SDPA kernel takes, so scores are materialised.
ATTN_CHUNK_ELEMENTS = 2**24
# A tile side (latent pixels) for memory-bounded decoding: 2 x 2 tiles at 1328x1328 (166 latents, overlap 25), so
# the up blocks decode 4 x 96^2 = 1.34x the latent area, each tile a third of the image's activations.
TILE = 96


@dataclass
class VAEConfig(Config):
    """`vae/config.json` of Qwen/Qwen-Image; the defaults are the real checkpoint."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple = ()
    temperal_downsample: tuple = (False, True, True)
    latents_mean: tuple = LATENTS_MEAN
    latents_std: tuple = LATENTS_STD

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} has {len(getattr(self, name))} values; it needs z_dim = {self.z_dim}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample has {len(self.temperal_downsample)} entries; the VAE downsamples between its "
                f"{len(self.dim_mult)} levels, so it needs len(dim_mult) - 1 = {len(self.dim_mult) - 1}"
            )

    @property
    def scale_factor(self) -> int:
        """Pixels per latent pixel along each side (8): 2 ** len(temperal_downsample), as diffusers reads it."""
        return 2 ** len(self.temperal_downsample)

    @property
    def tile_margin(self) -> float:
        """Latent pixels, from a cut edge, over which a decoded tile differs from the full decode: the receptive
        radius of the up blocks (every 3x3 conv adds one pixel at its own resolution)."""
        radius, res = 0.0, 1
        for i in range(len(self.dim_mult)):
            radius += 2 * (self.num_res_blocks + 1) / res
            if i != len(self.dim_mult) - 1:
                res *= 2
                radius += 1 / res  # the upsampler's conv
        return radius + 1 / res  # conv_out

    @property
    def exact_overlap(self) -> int:
        """The smallest tile overlap (latent pixels) at which tiled decoding is exact."""
        return math.ceil(2 * self.tile_margin)

    @classmethod
    def tiny(cls, **overrides) -> "VAEConfig":
        """The real structure (dim_mult [1, 2, 4, 4], two res blocks, z_dim 16) at base_dim 8, for tests."""
        return cls(**{"base_dim": 8, **overrides})


class RMSNorm(nn.Module):
    """`QwenImageRMS_norm` over the channel (last) axis: x / rms(x) * gamma. F.normalize clamps the L2 norm at
    1e-12; eps = 1e-24 / C reproduces that for vanishing inputs and is invisible otherwise."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = mx.ones((dim,))
        self.eps = 1e-24 / dim

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.gamma, self.eps)


@mx.compile
def _add3(a: mx.array, b: mx.array, c: mx.array) -> mx.array:
    return a + b + c


def conv3x3(dim_in: int, dim_out: int) -> nn.Conv2d:
    return nn.Conv2d(dim_in, dim_out, 3, padding=1)


class ResidualBlock(nn.Module):
    """`QwenImageResidualBlock`: x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 shortcut when the
    width changes; shape (B, H, W, dim_in) -> (B, H, W, dim_out)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.norm1 = RMSNorm(dim_in)
        self.conv1 = conv3x3(dim_in, dim_out)
        self.norm2 = RMSNorm(dim_out)
        self.conv2 = conv3x3(dim_out, dim_out)
        if dim_in != dim_out:
            self.conv_shortcut = nn.Linear(dim_in, dim_out)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv_shortcut(x) if "conv_shortcut" in self else x
        x = self.conv1(nn.silu(self.norm1(x)))
        x = mx.conv2d(nn.silu(self.norm2(x)), self.conv2.weight, padding=1)
        return _add3(x, self.conv2.bias, h)  # bias and residual in one pass


class AttentionBlock(nn.Module):
    """`QwenImageAttentionBlock`: single-head self-attention over all pixels of each image; shape-preserving."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, bounded: bool = False) -> mx.array:
        B, H, W, C = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(B, 1, H * W, 3 * C)  # one head
        q, k, v = mx.split(qkv, 3, axis=-1)
        # Chunking the queries keeps each materialised score matrix under ATTN_CHUNK_ELEMENTS; it is exact.
        # A GPU backend allocates every queued chunk's scores before the first one runs, so in the memory-bounded
        # (tiled) decode each chunk is evaluated as it is made: 27556^2 scores at 1328x1328 would be 3 GB at once.
        step = max(1, ATTN_CHUNK_ELEMENTS // (H * W))
        out = []
        for i in range(0, H * W, step):
            out.append(mx.fast.scaled_dot_product_attention(q[:, :, i : i + step], k, v, scale=C**-0.5))
            if bounded:
                mx.eval(out[-1])
        out = out[0] if len(out) == 1 else mx.concatenate(out, axis=2)
        return x + self.proj(out.reshape(B, H, W, C))


def upsample2x(x: mx.array) -> mx.array:
    """Nearest-neighbour x2 ("nearest-exact" at an integer factor): (B, H, W, C) -> (B, 2H, 2W, C)."""
    B, H, W, C = x.shape
    return mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)


def subpixel_kernels(w: mx.array) -> mx.array:
    """A 3x3 conv after nearest x2 upsampling, as 2x2 convs on the low-resolution input, one per output phase
    (row parity a, column parity b): (O, 3, 3, I) -> (4 O, 2, 2, I), phases in the order (a, b) = 11, 10, 01, 00.
    Upsampled rows 2i-1, 2i, 2i+1 are input rows i-1, i, i, so phase a=0 applies (w0, w1+w2) to rows (i-1, i)
    and phase a=1 applies (w0+w1, w2) to rows (i, i+1); columns likewise."""

    def fold(k, axis, phase):
        t = [mx.take(k, j, axis=axis) for j in range(3)]
        pair = (t[0], t[1] + t[2]) if phase == 0 else (t[0] + t[1], t[2])
        return mx.stack(pair, axis=axis)

    return mx.concatenate([fold(fold(w, 1, a), 2, b) for a in (1, 0) for b in (1, 0)], axis=0)


class Upsample(nn.Module):
    """`QwenImageResample` in mode upsample2d/upsample3d for one frame: nearest x2 then a 3x3 conv that halves
    the width; (B, H, W, C) -> (B, 2H, 2W, C/2). (upsample3d's `time_conv` never runs for one frame.)

    With `subpixel` (the default) the conv runs at the input resolution as four 2x2 phase kernels in one conv
    (per 2x2 block of outputs and channel pair, 4 x 4 = 16 multiply-adds instead of 4 x 9 = 36, and no upsampled
    copy of the input); the result is the same up to float rounding. `resample.0` stands for diffusers'
    parameter-free upsampling layer, so the conv keeps the name `resample.1`."""

    def __init__(self, dim: int, subpixel: bool = True):
        super().__init__()
        self.resample = [nn.Identity(), conv3x3(dim, dim // 2)]
        self.subpixel = subpixel

    def __call__(self, x: mx.array) -> mx.array:
        conv = self.resample[1]
        if not self.subpixel:
            return conv(upsample2x(x))
        B, H, W, _ = x.shape
        O = conv.weight.shape[0]
        # Window p of the padded 2x2 conv covers input rows p-1, p: phase a=0 of output row 2p, phase a=1 of
        # output row 2p-1. With the phases stored as (1 - a, 1 - b), interleaving is one transpose.
        z = mx.conv2d(x, subpixel_kernels(conv.weight), padding=1)  # (B, H+1, W+1, 4 O)
        z = z.reshape(B, H + 1, W + 1, 2, 2, O).transpose(0, 1, 3, 2, 4, 5) + conv.bias  # (B, H+1, 2, W+1, 2, O)
        return z.reshape(B, 2 * H + 2, 2 * W + 2, O)[:, 1:-1, 1:-1]


class Downsample(nn.Module):
    """`QwenImageResample` in mode downsample2d/downsample3d for one frame: zero-pad right and bottom by one, then
    a stride-2 3x3 conv; (B, H, W, C) -> (B, H/2, W/2, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.resample = [nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2)]

    def __call__(self, x: mx.array) -> mx.array:
        conv = self.resample[1]
        return mx.conv_general(x, conv.weight, stride=2, padding=([0, 0], [1, 1])) + conv.bias


class MidBlock(nn.Module):
    """`QwenImageMidBlock`: resnet, attention, resnet at constant width."""

    def __init__(self, dim: int):
        super().__init__()
        self.resnets = [ResidualBlock(dim, dim), ResidualBlock(dim, dim)]
        self.attentions = [AttentionBlock(dim)]

    def __call__(self, x: mx.array, bounded: bool = False) -> mx.array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x), bounded))


class Encoder(nn.Module):
    """`QwenImageEncoder3d` for one frame: (B, H, W, 3) -> (B, H/8, W/8, 2 z_dim) (mean and log-variance)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv_in = conv3x3(3, dims[0])
        self.down_blocks = []
        scale = 1.0
        for i, (dim_in, dim_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                self.down_blocks.append(ResidualBlock(dim_in, dim_out))
                if scale in config.attn_scales:
                    self.down_blocks.append(AttentionBlock(dim_out))
                dim_in = dim_out
            if i != len(config.dim_mult) - 1:
                self.down_blocks.append(Downsample(dim_out))
                scale /= 2
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = conv3x3(dims[-1], 2 * config.z_dim)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for layer in self.down_blocks:
            x = layer(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.norm_out(x)))


class UpBlock(nn.Module):
    """`QwenImageUpBlock`: num_res_blocks + 1 resnets, then an optional upsampler."""

    def __init__(self, dim_in: int, dim_out: int, num_res_blocks: int, upsample: bool, subpixel: bool = True):
        super().__init__()
        self.resnets = [ResidualBlock(dim_in if i == 0 else dim_out, dim_out) for i in range(num_res_blocks + 1)]
        if upsample:
            self.upsamplers = [Upsample(dim_out, subpixel)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x


class Decoder(nn.Module):
    """`QwenImageDecoder3d` for one frame: (B, h, w, z_dim) -> (B, 8h, 8w, 3), unclamped. `features` is its
    latent-resolution part (conv_in, mid block), `pixels` the up blocks and output head."""

    def __init__(self, config: VAEConfig, subpixel: bool = True):
        super().__init__()
        mult = config.dim_mult
        dims = [config.base_dim * m for m in (mult[-1], *mult[::-1])]
        self.conv_in = conv3x3(config.z_dim, dims[0])
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = []
        for i, (dim_in, dim_out) in enumerate(zip(dims[:-1], dims[1:])):
            dim_in = dim_in // 2 if i > 0 else dim_in  # each upsampler halved the width
            last = i == len(mult) - 1
            self.up_blocks.append(UpBlock(dim_in, dim_out, config.num_res_blocks, not last, subpixel))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = conv3x3(dims[-1], 3)

    def features(self, z: mx.array, bounded: bool = False) -> mx.array:
        return self.mid_block(self.conv_in(z), bounded)

    def pixels(self, x: mx.array) -> mx.array:
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.norm_out(x)))

    def __call__(self, z: mx.array) -> mx.array:
        return self.pixels(self.features(z))


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread starts of the fewest tiles of side `tile` that cover `size` with overlaps >= `overlap`."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _blend_weights(starts: list[int], tile: int, size: int, margin: int) -> list[mx.array]:
    """Per-tile 1-D weights (in pixels) that sum to one at every pixel: each overlap is cut at its middle and
    cross-faded linearly over a band that keeps `margin` pixels from both tiles' cut edges when the overlap is
    wide enough (then only exact pixels are used), else over the middle half of the overlap."""
    n = len(starts)
    cuts, halves = [], []
    for i in range(n - 1):
        lo, hi = starts[i + 1], min(starts[i] + tile, size)  # the overlap of tiles i and i+1
        cuts.append((lo + hi) // 2)
        halves.append((hi - lo) // 2 - margin if hi - lo >= 2 * margin else (hi - lo) // 4)
    for i in range(n - 1):  # neighbouring bands must not overlap when tiles overlap three deep
        if i > 0:
            halves[i] = min(halves[i], (cuts[i] - cuts[i - 1]) // 2)
        if i < n - 2:
            halves[i] = min(halves[i], (cuts[i + 1] - cuts[i]) // 2)
    pos = np.arange(size) + 0.5
    ramps = [
        np.clip((pos - (c - h)) / (2 * h), 0, 1) if h > 0 else (pos >= c).astype(float) for c, h in zip(cuts, halves)
    ]
    weights = []
    for i, s in enumerate(starts):
        w = np.ones(size)
        if i > 0:
            w *= ramps[i - 1]
        if i < n - 1:
            w *= 1 - ramps[i]
        weights.append(mx.array(w[s : s + tile], dtype=mx.float32))
    return weights


class AutoencoderKLQwenImage(nn.Module):
    """diffusers' `AutoencoderKLQwenImage` for single images, channels-last, parameter names verbatim.
    `subpixel=False` upsamples in the decoder the plain way (nearest x2, then the 3x3 conv), for comparison."""

    def __init__(self, config: VAEConfig | None = None, subpixel: bool = True):
        super().__init__()
        self.config = config or VAEConfig()
        self.encoder = Encoder(self.config)
        self.quant_conv = nn.Linear(2 * self.config.z_dim, 2 * self.config.z_dim)
        self.post_quant_conv = nn.Linear(self.config.z_dim, self.config.z_dim)
        self.decoder = Decoder(self.config, subpixel)

    def _check_latents(self, z: mx.array) -> None:
        zd = self.config.z_dim
        if z.ndim != 4 or z.shape[-1] != zd:
            raise ValueError(
                f"latents must be channels-last (B, h, w, {zd}) with z_dim = {zd} channels; got shape {tuple(z.shape)}"
                f"{' (channels-first? use z.transpose(0, 2, 3, 1))' if z.ndim == 4 and z.shape[1] == zd else ''}"
            )

    def decode(self, z: mx.array, tile: int | None = None, overlap: int | None = None) -> mx.array:
        """Normalised latents (B, h, w, z_dim) -> images (B, 8h, 8w, 3) in [-1, 1], in the model's dtype.
        `tile` (latent pixels) bounds the memory of the up blocks, whose activations scale with tile**2; tiles
        overlap by `overlap` latent pixels (default `config.exact_overlap`, which keeps the decode exact)."""
        self._check_latents(z)
        c = self.config
        dtype = self.post_quant_conv.weight.dtype
        z = z.astype(dtype) * mx.array(c.latents_std, dtype=dtype) + mx.array(c.latents_mean, dtype=dtype)
        x = self.decoder.features(self.post_quant_conv(z), bounded=tile is not None)
        if tile is None:
            return mx.clip(self.decoder.pixels(x), -1, 1)
        return mx.clip(self._tiled_pixels(x, tile, c.exact_overlap if overlap is None else overlap), -1, 1)

    def _tiled_pixels(self, x: mx.array, tile: int, overlap: int) -> mx.array:
        if not 0 <= overlap < tile:
            raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap}), and overlap >= 0")
        B, h, w, _ = x.shape
        f = self.config.scale_factor
        margin = math.ceil(f * self.config.tile_margin)
        rows, cols = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
        wr = _blend_weights([f * r for r in rows], f * tile, f * h, margin)
        wc = _blend_weights([f * c for c in cols], f * tile, f * w, margin)
        out = mx.zeros((B, f * h, f * w, 3), dtype=mx.float32)
        for r, w_r in zip(rows, wr):
            for c, w_c in zip(cols, wc):
                piece = self.decoder.pixels(x[:, r : r + tile, c : c + tile])
                piece = piece * (w_r[:, None, None] * w_c[None, :, None])
                ph, pw = piece.shape[1:3]
                out = out + mx.pad(piece, [(0, 0), (f * r, f * (h - r) - ph), (f * c, f * (w - c) - pw), (0, 0)])
                # The one place a module evaluates: built as one lazy graph, all tiles' buffers could be live
                # at once, and a memory bound is the point of tiling.
                mx.eval(out)
        return out.astype(x.dtype)

    def encode(self, x: mx.array, sample: bool = False, key: mx.array | None = None) -> mx.array:
        """Images (B, H, W, 3) in [-1, 1], H and W multiples of 8 -> normalised latents (B, H/8, W/8, z_dim): the
        posterior mean, or with `sample=True` a draw mean + std * N(0, 1) using `key`."""
        c = self.config
        f = c.scale_factor
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be channels-last (B, H, W, 3) RGB; got shape {tuple(x.shape)}")
        H, W = x.shape[1:3]
        if H % f or W % f:
            raise ValueError(
                f"image sides must be multiples of {f}; got {H}x{W} (H x W). Crop or resize to "
                f"{H // f * f}x{W // f * f} or {-(-H // f) * f}x{-(-W // f) * f}."
            )
        dtype = self.quant_conv.weight.dtype
        moments = self.quant_conv(self.encoder(x.astype(dtype)))
        mean, logvar = mx.split(moments, 2, axis=-1)
        if sample:
            std = mx.exp(0.5 * mx.clip(logvar, -30.0, 20.0))
            mean = mean + std * mx.random.normal(mean.shape, dtype=mean.dtype, key=key)
        lat_mean, lat_std = mx.array(c.latents_mean, dtype=dtype), mx.array(c.latents_std, dtype=dtype)
        return (mean - lat_mean) / lat_std

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """diffusers' state dict -> this module's: 5-D causal conv weights (O, I, T, kh, kw) keep their last
        temporal tap, conv weights become channels-last (O, kh, kw, I), or (O, I) for 1x1 convs (held as
        Linear), `gamma` (C, 1, 1[, 1]) becomes (C,), and the unused `time_conv` weights are dropped."""
        out = {}
        for k, v in weights.items():
            if ".time_conv." in k:
                continue
            if k.endswith(".gamma"):
                v = v.reshape(-1)
            elif k.endswith(".weight") and v.ndim == 5:
                v = v[:, :, -1]
            if k.endswith(".weight") and v.ndim == 4:
                v = v[:, :, 0, 0] if v.shape[2:] == (1, 1) else v.transpose(0, 2, 3, 1)
            out[k] = v
        return out


def load_vae(
    folder, dtype: mx.Dtype = mx.float32, subpixel: bool = True, variant: str | None = None
) -> AutoencoderKLQwenImage:
    """The VAE of a checkpoint's `vae/` folder (config.json + safetensors in diffusers' layout), lazily loaded."""
    folder = Path(folder)
    model = AutoencoderKLQwenImage(VAEConfig.from_folder(folder), subpixel)
    model.set_dtype(dtype)
    load_strict(model, model.sanitize(read_weights(folder, dtype, variant=variant)), f"VAE ({folder})")
    return model


def postprocess(images: mx.array) -> np.ndarray:
    """Decoded images (B, H, W, 3) in [-1, 1] -> uint8 (B, H, W, 3), rounded exactly as diffusers'
    `VaeImageProcessor.postprocess`: (x * 0.5 + 0.5).clamp(0, 1) in the images' dtype, then float32, * 255, round."""
    x = mx.clip(images * 0.5 + 0.5, 0, 1).astype(mx.float32)
    return np.round(np.array(x) * 255).astype(np.uint8)
