"""The Qwen-Image 2.1 VAE: diffusers' `AutoencoderKLQwenImage21` (Wan-2.2-style residual blocks, 16x spatial
compression into 64 channels, RGBA in and out), the single-image path, channels-last.

`encode(x (B, H, W, 4)) -> (B, H/16, W/16, 64)` normalised latents (the posterior mean, as the pipeline takes it);
`decode(z (B, h, w, 64)) -> (B, 16h, 16w, 4)` in [-1, 1].

For one frame its convolutions are plain 2-D convolutions (diffusers' `QwenImage21CausalConv3d` is an `nn.Conv2d`
that squeezes the frame axis), the temporal resamplers skip their `time_conv` on the first chunk, and the two
shortcuts reduce to pixel (un)shuffles: `AvgDown3D` averages each group of channels of the space-to-depth input,
with a zero frame in front where it also halves time; `DupUp3D` repeats channels into a depth-to-space output and
keeps the last temporal copy. The residual, attention and resampling layers are those of `qwen_nb.vae`.
"""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .loading import Config, load_strict, read_weights
from .vae import AttentionBlock, AutoencoderKLQwenImage, Downsample, MidBlock, ResidualBlock, RMSNorm, conv3x3
from .vae import Upsample as _Upsample

# The real checkpoint's per-channel latent statistics (diffusers' class defaults).
LATENTS_MEAN = (
    0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722, 1.8873, -1.7177, -0.6510, 0.2732, 0.7562,
    -0.6163, -1.0277, 3.8363, 2.0210, 0.0472, 0.9320, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464, -0.5236, 1.2826,
    3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955, -0.0342, -1.0265, -0.7636, 3.0555, 0.0746, -3.0751, -0.1076,
    1.7376, -1.0914, -1.9435, -0.2784, -1.3680, 0.4809, -0.4433, 0.3764, 0.5729, -2.0595, 1.0960, -1.3260, -2.0211,
    -5.0179, 0.5275, 4.0162, 1.8505, 0.3026, 1.9373, 1.4937, 0.2632, 0.5547, -1.7121, -0.1562, 0.0304,
)  # fmt: skip
LATENTS_STD = (
    3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910, 3.0785, 3.6500, 3.9308, 3.0904, 2.8778, 3.7675,
    3.7320, 5.0756, 3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489, 3.4896, 3.8513, 3.9323, 3.4719,
    3.7498, 4.2830, 3.5694, 4.2467, 3.9037, 3.2947, 5.0770, 3.5075, 3.2700, 3.4767, 2.8063, 5.1125, 3.5327, 4.7833,
    3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875, 3.9624, 4.0168, 3.5643, 4.0550, 5.5614, 4.2963, 4.4080, 3.4959,
    3.8747, 3.7608, 3.5735, 3.1490, 3.7662, 3.6746, 3.4563, 3.8161,
)  # fmt: skip


@dataclass
class VAE21Config(Config):
    """`vae/config.json` of Qwen/Qwen-Image-2.1 (diffusers' class defaults); `decoder_base_dim` None: base_dim."""

    base_dim: int = 96
    decoder_base_dim: int | None = 144
    z_dim: int = 64
    dim_mult: tuple = (1, 2, 4, 8, 8)
    num_res_blocks: int = 2
    attn_scales: tuple = ()  # not used by the residual layout (as in diffusers)
    temperal_downsample: tuple = (False, True, True, True)
    latents_mean: tuple = LATENTS_MEAN
    latents_std: tuple = LATENTS_STD
    is_residual: bool = True
    in_channels: int = 4
    out_channels: int = 4
    patch_size: int | None = None

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.decoder_base_dim is None:
            self.decoder_base_dim = self.base_dim
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} has {len(getattr(self, name))} values; it needs z_dim = {self.z_dim}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample has {len(self.temperal_downsample)} entries; the VAE downsamples between its "
                f"{len(self.dim_mult)} levels, so it needs len(dim_mult) - 1 = {len(self.dim_mult) - 1}"
            )
        if not self.is_residual:
            raise ValueError(
                "is_residual=false describes the Qwen-Image (2.0) VAE layout, not 2.1's: load it with "
                "qwen_nb.vae.load_vae"
            )
        if self.patch_size not in (None, 1):
            raise ValueError(
                f"patch_size {self.patch_size}: QwenImage21Pipeline takes the VAE's factor to be 16 without patching "
                "(diffusers hard-codes it), so a patched VAE does not fit the pipeline"
            )
        # attn_scales: diffusers builds attention at those scales only in the non-residual layout, so the residual
        # 2.1 VAE reads and ignores it (kept here as the config says)
        for i, (a, b) in enumerate(zip(self.dims[:-1], self.dims[1:])):
            last = i == len(self.dim_mult) - 1
            t = 2 if not last and self.temperal_downsample[i] else 1
            s = 1 if last else 2
            if a * t * s * s % b:
                raise ValueError(f"encoder level {i}: {a} channels x {t * s * s} is not divisible by {b}")

    @property
    def dims(self) -> list[int]:
        return [self.base_dim * m for m in (1, *self.dim_mult)]

    @property
    def decoder_dims(self) -> list[int]:
        return [self.decoder_base_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]

    @property
    def scale_factor(self) -> int:
        """Pixels per latent pixel along each side: one halving per level but the last (16)."""
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def tiny(cls, **overrides) -> "VAE21Config":
        """The real structure (five levels, 16x, residual blocks) at widths 2 / 3 and z_dim 16, for tests."""
        rng = np.random.default_rng(0)
        z = overrides.get("z_dim", 16)
        base = dict(
            base_dim=2,
            decoder_base_dim=3,
            z_dim=z,
            num_res_blocks=1,
            latents_mean=tuple(rng.normal(0, 1, z).round(4)),
            latents_std=tuple(rng.uniform(2, 5, z).round(4)),
        )
        return cls(**{**base, **overrides})


def avg_down(x: mx.array, dim_out: int, factor_t: int, factor_s: int) -> mx.array:
    """`AvgDown3D` on one frame: space-to-depth by factor_s (channel c*s*s + dy*s + dx), a zero frame in front
    when factor_t is 2 (the frame is padded to a pair), then the mean of each run of channels, one run per output
    channel. (B, H, W, C) -> (B, H/s, W/s, dim_out)."""
    B, H, W, C = x.shape
    s = factor_s
    x = x.reshape(B, H // s, s, W // s, s, C).transpose(0, 1, 3, 5, 2, 4).reshape(B, H // s, W // s, C, s * s)
    if factor_t > 1:
        x = mx.pad(x, [(0, 0), (0, 0), (0, 0), (0, 0), ((factor_t - 1) * s * s, 0)])  # (.., C, t * s * s)
    group = C * factor_t * s * s // dim_out
    return x.reshape(B, H // s, W // s, dim_out, group).mean(axis=-1)


def dup_up_index(dim_in: int, dim_out: int, factor_t: int, factor_s: int) -> mx.array:
    """For `DupUp3D` on a first chunk: the input channel behind output channel o at sub-pixel (dy, dx), (out, s, s).
    Channels are repeated r = out * t * s * s / in times, laid out as (out, t, s, s), and the last t is kept."""
    s, t = factor_s, factor_t
    r = dim_out * t * s * s // dim_in
    o, dy, dx = np.meshgrid(np.arange(dim_out), np.arange(s), np.arange(s), indexing="ij")
    return mx.array((o * t * s * s + (t - 1) * s * s + dy * s + dx) // r)


class DupUp(nn.Module):
    """`DupUp3D` on a first chunk: (B, H, W, C_in) -> (B, sH, sW, C_out), every output a copy of an input channel."""

    def __init__(self, dim_in: int, dim_out: int, factor_t: int, factor_s: int = 2):
        super().__init__()
        if dim_out * factor_t * factor_s**2 % dim_in:
            raise ValueError(f"DupUp: {dim_out} x {factor_t * factor_s**2} channels is not divisible by {dim_in}")
        self.s = factor_s
        self._index = dup_up_index(dim_in, dim_out, factor_t, factor_s)  # not a parameter

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, _ = x.shape
        O, s = self._index.shape[0], self.s
        y = mx.take(x, self._index.reshape(-1), axis=-1).reshape(B, H, W, O, s, s)
        return y.transpose(0, 1, 4, 2, 5, 3).reshape(B, H * s, W * s, O)


class Upsample(_Upsample):
    """`QwenImage21Resample` upsample2d/3d with `upsample_out_dim`: nearest x2 then a 3x3 conv to `dim_out`
    (qwen_nb.vae's, whose conv halves the width)."""

    def __init__(self, dim: int, dim_out: int, subpixel: bool = True):
        nn.Module.__init__(self)
        self.resample = [nn.Identity(), conv3x3(dim, dim_out)]
        self.subpixel = subpixel


class ResidualDownBlock(nn.Module):
    """`QwenImage21ResidualDownBlock`: res blocks, an optional stride-2 downsampler, plus the averaged shortcut."""

    def __init__(self, dim_in: int, dim_out: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.resnets = [ResidualBlock(dim_in if i == 0 else dim_out, dim_out) for i in range(num_res_blocks)]
        if down:
            self.downsampler = Downsample(dim_out)
        self.dim_out, self.factor_t, self.factor_s = dim_out, 2 if temporal else 1, 2 if down else 1

    def __call__(self, x: mx.array) -> mx.array:
        shortcut = avg_down(x, self.dim_out, self.factor_t, self.factor_s)
        for resnet in self.resnets:
            x = resnet(x)
        if "downsampler" in self:
            x = self.downsampler(x)
        return x + shortcut


class ResidualUpBlock(nn.Module):
    """`QwenImage21ResidualUpBlock` on a first chunk: res blocks, an optional upsampler, plus the duplicated
    shortcut."""

    def __init__(self, dim_in: int, dim_out: int, num_res_blocks: int, temporal: bool, up: bool, subpixel=True):
        super().__init__()
        self.resnets = [ResidualBlock(dim_in if i == 0 else dim_out, dim_out) for i in range(num_res_blocks + 1)]
        if up:
            self.upsampler = Upsample(dim_out, dim_out, subpixel)
            self.avg_shortcut = DupUp(dim_in, dim_out, 2 if temporal else 1)

    def __call__(self, x: mx.array) -> mx.array:
        shortcut = self.avg_shortcut(x) if "upsampler" in self else None
        for resnet in self.resnets:
            x = resnet(x)
        return x if shortcut is None else self.upsampler(x) + shortcut


class Encoder(nn.Module):
    """`QwenImage21Encoder3d` (residual) for one frame: (B, H, W, in) -> (B, H/16, W/16, 2 z_dim)."""

    def __init__(self, config: VAE21Config):
        super().__init__()
        dims, last = config.dims, len(config.dim_mult) - 1
        self.conv_in = conv3x3(config.in_channels, dims[0])
        self.down_blocks = [
            ResidualDownBlock(a, b, config.num_res_blocks, i != last and config.temperal_downsample[i], i != last)
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))
        ]
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = conv3x3(dims[-1], 2 * config.z_dim)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """`QwenImage21Decoder3d` (residual) for one frame: (B, h, w, z_dim) -> (B, 16h, 16w, out), unclamped."""

    def __init__(self, config: VAE21Config, subpixel: bool = True):
        super().__init__()
        dims, last = config.decoder_dims, len(config.dim_mult) - 1
        upsample = config.temperal_downsample[::-1]
        self.conv_in = conv3x3(config.z_dim, dims[0])
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = [
            ResidualUpBlock(a, b, config.num_res_blocks, i != last and upsample[i], i != last, subpixel)
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))
        ]
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = conv3x3(dims[-1], config.out_channels)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.norm_out(x)))


class AutoencoderKLQwenImage21(nn.Module):
    """diffusers' `AutoencoderKLQwenImage21` for single images, channels-last, parameter names verbatim."""

    def __init__(self, config: VAE21Config | None = None, subpixel: bool = True):
        super().__init__()
        self.config = config = config or VAE21Config()
        self.encoder = Encoder(config)
        self.quant_conv = nn.Linear(2 * config.z_dim, 2 * config.z_dim)
        self.post_quant_conv = nn.Linear(config.z_dim, config.z_dim)
        self.decoder = Decoder(config, subpixel)

    @property
    def dtype(self) -> mx.Dtype:
        return self.post_quant_conv.weight.dtype

    def _stats(self, dtype):
        c = self.config
        return mx.array(c.latents_mean, dtype=dtype), mx.array(c.latents_std, dtype=dtype)

    def decode(self, z: mx.array) -> mx.array:
        """Normalised latents (B, h, w, z_dim) -> pictures (B, 16h, 16w, out_channels) in [-1, 1], the model's
        dtype (the pipeline de-normalises with the config's mean and std, then decodes and clamps)."""
        zd = self.config.z_dim
        if z.ndim != 4 or z.shape[-1] != zd:
            hint = " (channels-first? use z.transpose(0, 2, 3, 1))" if z.ndim == 4 and z.shape[1] == zd else ""
            raise ValueError(f"latents must be channels-last (B, h, w, {zd}); got shape {tuple(z.shape)}{hint}")
        mean, std = self._stats(self.dtype)
        z = z.astype(self.dtype) * std + mean
        return mx.clip(self.decoder(self.post_quant_conv(z)), -1, 1)

    def encode(self, x: mx.array) -> mx.array:
        """Pictures (B, H, W, in_channels) in [-1, 1], sides multiples of 16 -> the posterior mean, normalised
        ((mean - latents_mean) / latents_std), (B, H/16, W/16, z_dim): diffusers' `_encode_vae_image`."""
        c, f = self.config, self.config.scale_factor
        if x.ndim != 4 or x.shape[-1] != c.in_channels:
            raise ValueError(
                f"pictures must be channels-last (B, H, W, {c.in_channels}) (RGBA for 2.1); got {tuple(x.shape)}"
            )
        H, W = x.shape[1:3]
        if H % f or W % f:
            raise ValueError(f"picture sides must be multiples of {f}; got {H}x{W} (H x W)")
        moments = self.quant_conv(self.encoder(x.astype(self.dtype)))
        mean = mx.split(moments, 2, axis=-1)[0]
        lat_mean, lat_std = self._stats(mean.dtype)
        return (mean - lat_mean) / lat_std

    def moments(self, x: mx.array) -> mx.array:
        """The encoder's raw output after quant_conv: (B, H/16, W/16, 2 z_dim), mean then log-variance."""
        return self.quant_conv(self.encoder(x.astype(self.dtype)))

    # diffusers' state dict -> this module's: the same layout rules as the Qwen-Image VAE (4-D conv weights to
    # channels-last, 1x1 convs to linears, gamma flattened, the unused time_conv dropped)
    sanitize = staticmethod(AutoencoderKLQwenImage.sanitize)


def load_vae21(
    folder, dtype: mx.Dtype = mx.float32, subpixel: bool = True, variant: str | None = None
) -> AutoencoderKLQwenImage21:
    """The VAE of a 2.1 checkpoint's `vae/` folder, lazily and strictly loaded."""
    folder = Path(folder)
    model = AutoencoderKLQwenImage21(VAE21Config.from_folder(folder), subpixel)
    model.set_dtype(dtype)
    load_strict(model, model.sanitize(read_weights(folder, dtype, variant=variant)), f"Qwen-Image 2.1 VAE ({folder})")
    return model


__all__ = ["AttentionBlock", "AutoencoderKLQwenImage21", "VAE21Config", "load_vae21"]
