"""Cheap previews during sampling: a linear map from the 16 latent channels to RGB, fitted once per VAE.

The VAE decodes each latent pixel into an 8x8 block of pixels; averaged over the block, the colour is close to an
affine function of the latent's 16 channels. `fit_projection` decodes a few small latents with the pipeline's own
VAE (random normal ones, and the encodings of smooth random colour fields, which look like real images' latents),
average-pools the pictures by 8 and solves the least-squares problem [z, 1] W = rgb. The fit is cached on the VAE
(`projection_for`); a preview then costs one (h*w, 16) x (16, 3) product instead of a decode.

What is previewed is the model's guess of the final latents, x0 = x - sigma v (diffusers' flow matching: x = (1 -
sigma) x0 + sigma noise, v = noise - x0). Between two steps, x' = x + (sigma' - sigma) v, so the guess follows from
the latents before and after a step (`x0_guess`) without the velocity.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .scheduler import unpack_latents

FACTOR = 8  # the VAE's spatial factor: one latent pixel decodes to 8x8 pixels
_CACHE = "_qwen_nb_preview"


@dataclass
class LatentProjection:
    """rgb = z @ weight + bias, for normalised latents z (..., 16) -> (..., 3) in the VAE's [-1, 1] range."""

    weight: np.ndarray  # (16, 3)
    bias: np.ndarray  # (3,)
    rmse: float = 0.0  # on the fitting data, in [-1, 1] units

    def __call__(self, z) -> np.ndarray:
        z = np.asarray(z.astype(mx.float32) if isinstance(z, mx.array) else z, np.float32)
        return z @ self.weight + self.bias

    def to_uint8(self, z) -> np.ndarray:
        """Channels-last latents (h, w, 16) -> uint8 (h, w, 3), rounded like the VAE's postprocess."""
        return np.round(np.clip(self(z) * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8)


def pool(images, factor: int = FACTOR) -> np.ndarray:
    """(B, H, W, 3) -> (B, H/factor, W/factor, 3): the mean of each factor x factor block, in float32."""
    x = np.asarray(images.astype(mx.float32) if isinstance(images, mx.array) else images, np.float32)
    B, H, W, C = x.shape
    return x.reshape(B, H // factor, factor, W // factor, factor, C).mean(axis=(2, 4))


def smooth_colour_fields(n: int, side: int, seed: int = 0, cells: int = 4) -> np.ndarray:
    """n pictures (n, side, side, 3) in [-1, 1]: a cells x cells grid of random colours, blocky, float32."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(-1, 1, (n, cells, cells, 3)).astype(np.float32)
    k = side // cells
    return np.repeat(np.repeat(low, k, axis=1), k, axis=2)


def fitting_latents(vae, n: int = 4, side: int = 16, seed: int = 0) -> mx.array:
    """2n latents (2n, side, side, z_dim): n drawn from N(0, 1) and n encodings of smooth colour fields."""
    z_dim = vae.config.z_dim
    noise = mx.random.normal((n, side, side, z_dim), key=mx.random.key(seed))
    fields = vae.encode(mx.array(smooth_colour_fields(n, side * FACTOR, seed)))
    return mx.concatenate([noise, fields.astype(mx.float32)], axis=0)


def solve(z: np.ndarray, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares [z, 1] W = rgb over all rows: (N, 16), (N, 3) -> weight (16, 3), bias (3,)."""
    z = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
    rgb = np.asarray(rgb, np.float64).reshape(-1, 3)
    a = np.concatenate([z, np.ones((len(z), 1))], axis=1)
    w = np.linalg.lstsq(a, rgb, rcond=None)[0]
    return w[:-1].astype(np.float32), w[-1].astype(np.float32)


def fit_projection(vae, latents=None, n: int = 4, side: int = 16, seed: int = 0) -> LatentProjection:
    """Fit the latent -> RGB map of `vae` on `latents` (B, h, w, z_dim), or on `fitting_latents(vae, n, side)`."""
    z = fitting_latents(vae, n, side, seed) if latents is None else latents
    z = z if isinstance(z, mx.array) else mx.array(z)
    target = pool(vae.decode(z))  # (B, h, w, 3)
    z = np.asarray(z.astype(mx.float32))
    weight, bias = solve(z, target)
    residual = z.reshape(-1, z.shape[-1]) @ weight + bias - target.reshape(-1, 3)
    return LatentProjection(weight, bias, float(np.sqrt(np.mean(residual**2))))


def projection_for(vae) -> LatentProjection:
    """The VAE's fitted projection, computed on first use and kept on the VAE object."""
    proj = getattr(vae, _CACHE, None)
    if proj is None:
        proj = fit_projection(vae)
        object.__setattr__(vae, _CACHE, proj)
    return proj


def x0_guess(before: mx.array, after: mx.array, sigma_before: float, sigma_after: float) -> mx.array:
    """The model's guess of the clean latents at a step, from the latents before and after it (any same shape)."""
    v = (after.astype(mx.float32) - before.astype(mx.float32)) / (sigma_after - sigma_before)
    return after.astype(mx.float32) - sigma_after * v


def preview(projection: LatentProjection, packed: mx.array, height: int, width: int, upscale: bool = True):
    """Packed latents (1, N, 64) of a height x width image -> a PIL preview (width x height when `upscale`, else
    the latent grid's size, one pixel per latent pixel)."""
    from PIL import Image

    grid = (height // (2 * FACTOR), width // (2 * FACTOR))
    z = unpack_latents(packed, grid)[0].transpose(1, 2, 0)  # (H/8, W/8, 16)
    image = Image.fromarray(projection.to_uint8(z))
    return image.resize((width, height), Image.BILINEAR) if upscale else image


__all__ = ["LatentProjection", "fit_projection", "pool", "preview", "projection_for", "solve", "x0_guess"]
