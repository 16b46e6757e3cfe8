"""Pictures in: img2img and inpainting as diffusers' `QwenImageImg2ImgPipeline` and `QwenImageInpaintPipeline` do
them, with their `VaeImageProcessor` settings (Lanczos resize to height x width; the picture to [-1, 1], the mask
to grayscale and binarized at 0.5).

`prepare(image, mask_image, height, width)` reads and checks the inputs (before any model loads);
`img2img_latents(vae, image, height, width)` encodes the picture to the packed, normalised latents of the VAE
posterior's mode; `noised(latents, noise, sigma)` is the scheduler's `scale_noise`, the start of img2img at the
first step run; `packed_mask` and `inpaint_blend` give inpainting's per-step `blend` for `sampling.denoise`.
"""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .scheduler import pack_latents

PICTURE_TYPES = "a PIL image, a path to an image file, or a uint8 numpy array (H, W, 3) or (H, W)"


def load_picture(source, what: str = "image"):
    """A PIL image from a PIL image, a path (opened as diffusers' `load_image` opens it: EXIF orientation applied,
    RGB) or a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no such file {path}")
        try:
            with Image.open(path) as im:
                return ImageOps.exif_transpose(im).convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{what}: cannot read {path} as a picture ({e}); use a PNG, JPEG or WebP file") from None
    if isinstance(source, np.ndarray):
        a = source[..., 0] if source.ndim == 3 and source.shape[-1] == 1 else source
        if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
            raise ValueError(
                f"{what}: a numpy array must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4); got {source.dtype} "
                f"{source.shape}. Floats in [0, 1]: (a * 255).round().astype(np.uint8)"
            )
        return Image.fromarray(a)
    raise ValueError(f"{what} must be {PICTURE_TYPES}; got {type(source).__name__}")


def preprocess_image(image, height: int, width: int) -> np.ndarray:
    """The picture as diffusers' VaeImageProcessor.preprocess makes it: RGB (diffusers takes RGB only), Pillow's
    Lanczos resize to width x height, [0, 1] in float32, then 2x - 1. Returns (1, H, W, 3) float32."""
    from PIL import Image

    image = load_picture(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    x = np.asarray(image).astype(np.float32) / 255.0
    return (2.0 * x - 1.0)[None]


def preprocess_mask(mask, height: int, width: int) -> np.ndarray:
    """The mask as the inpainting pipeline's mask processor makes it: Pillow's Lanczos resize to width x height in
    its own mode, then grayscale, [0, 1], binarized (< 0.5 -> 0 kept, >= 0.5 -> 1 repainted). (H, W) float32."""
    from PIL import Image

    mask = load_picture(mask, "mask_image")
    mask = mask.resize((width, height), resample=Image.Resampling.LANCZOS).convert("L")
    m = np.asarray(mask).astype(np.float32) / 255.0
    return (m >= 0.5).astype(np.float32)


@dataclass
class PictureRequest:
    """A checked img2img / inpainting request: the picture (PIL) and the mask (H, W) of 0/1 at the output size,
    or None."""

    image: object
    mask: np.ndarray | None


def load_pair(image, mask_image, names: tuple = ("image", "mask_image")):
    """(picture, mask or None) as PIL images, checked: a mask needs a picture, of the same size. `names` are how
    the two are called in messages (the CLI's --image, --mask)."""
    if image is None:
        if mask_image is not None:
            raise ValueError(f"{names[1]} needs {names[0]}: the picture whose masked (white) region is repainted")
        return None, None
    picture = load_picture(image, names[0])
    if mask_image is None:
        return picture, None
    mask = load_picture(mask_image, names[1])
    if mask.size != picture.size:
        raise ValueError(
            f"{names[1]} is {mask.size[0]}x{mask.size[1]} but {names[0]} is {picture.size[0]}x{picture.size[1]} "
            "(width x height): the mask marks the picture's pixels to repaint (white) and keep (black), so give it "
            "the picture's size"
        )
    return picture, mask


def prepare(image, mask_image, height: int, width: int) -> PictureRequest | None:
    """The checked request of `generate(image=, mask_image=)` at height x width; None for text-to-image."""
    picture, mask = load_pair(image, mask_image)
    if picture is None:
        return None
    return PictureRequest(picture, None if mask is None else preprocess_mask(mask, height, width))


def img2img_latents(vae, image, height: int, width: int, patch: int = 2) -> mx.array:
    """The picture resized to height x width and encoded: the VAE posterior's mode, normalised with the latent
    statistics, packed: (1, (H/16)(W/16), 4 z_dim). diffusers draws a sample of the posterior; the mode is
    reproducible."""
    pixels = mx.array(preprocess_image(image, height, width))
    z = vae.encode(pixels)  # (1, H/8, W/8, z_dim)
    return pack_latents(z.transpose(0, 3, 1, 2), patch)


def noised(latents: mx.array, noise: mx.array, sigma) -> mx.array:
    """The flow-matching forward process at sigma (the scheduler's `scale_noise`), in the latents' dtype."""
    sigma = mx.array(sigma, dtype=latents.dtype)
    return sigma * noise.astype(latents.dtype) + (1 - sigma) * latents


def packed_mask(mask: np.ndarray, factor: int, channels: int, patch: int = 2) -> mx.array:
    """The (H, W) 0/1 mask at latent resolution (nearest: every factor-th pixel, as torch's interpolate picks them
    for an exact factor), repeated over the latent channels and packed like the latents: (1, N, channels p^2) bool."""
    m = mx.array(mask[::factor, ::factor] > 0.5)  # (H/8, W/8)
    m = mx.broadcast_to(m[None, None], (1, channels, *m.shape))
    return pack_latents(m, patch)


def inpaint_blend(image_latents: mx.array, noise: mx.array, mask: mx.array, sigmas: np.ndarray):
    """`blend(i, x)` for `sampling.denoise`: after step i the kept region (mask False) is the picture's latents
    noised to the next sigma; after the last step, the picture's latents themselves (as diffusers: not noised to
    the terminal sigma, which is 1 under invert_sigmas)."""
    last = len(sigmas) - 2

    def blend(i: int, x: mx.array) -> mx.array:
        kept = image_latents if i >= last else noised(image_latents, noise, sigmas[i + 1])
        return mx.where(mask, x, kept.astype(x.dtype))

    return blend


__all__ = [
    "PictureRequest",
    "img2img_latents",
    "inpaint_blend",
    "load_pair",
    "load_picture",
    "noised",
    "packed_mask",
    "prepare",
    "preprocess_image",
    "preprocess_mask",
]
