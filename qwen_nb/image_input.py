"""Pictures in: img2img and inpainting as diffusers' `QwenImageImg2ImgPipeline` and `QwenImageInpaintPipeline` do
them, with their `VaeImageProcessor` settings (Lanczos resize to height x width; the picture to [-1, 1], the mask
to grayscale and binarized at 0.5).

`prepare(image, mask_image, height, width)` reads and checks the inputs (before any model loads);
`img2img_latents(vae, image, height, width)` encodes the picture to the packed, normalised latents of the VAE
posterior's mode; `noised(latents, noise, sigma)` is the scheduler's `scale_noise`, the start of img2img at the
first step run; `packed_mask` and `inpaint_blend` give inpainting's per-step `blend` for `sampling.denoise`.

What is taken, and how (diffusers' VaeImageProcessor takes PIL images and arrays; a path is read as diffusers'
`load_image` reads it):
- a path (str or Path): opened by Pillow, EXIF orientation applied, converted to RGB (alpha dropped, not composited)
  exactly as `diffusers.utils.load_image`; any format Pillow reads (PNG, JPEG, WebP, GIF's first frame, BMP, TIFF);
- a PIL image: RGB as given; another mode (L, P, RGBA, CMYK, I;16, ...) is converted to RGB by Pillow (diffusers
  would hand the VAE its 1, 2 or 4 channels and fail), for a mask resized in its own mode then made grayscale;
- a float numpy array (H, W, 3) or (1, H, W, 3) with values in [0, 1]: as diffusers takes it: resized by nearest
  neighbour (torch's `interpolate`), then 2x - 1 (an array with values below 0 is taken as already in [-1, 1], as
  diffusers does); (H, W) or (H, W, 1) is grey, (H, W, 4) has its alpha dropped;
- a uint8 numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4): the PIL picture of it (0..255; diffusers would
  take the raw 0..255 values as [0, 1] ones);
- a mask as a numpy array (H, W), (H, W, 1) or (1, H, W, 1), of any number type or bool: as diffusers takes it:
  resized by nearest neighbour and binarized on its raw values (>= 0.5 repainted: a 0/1 and a 0/255 uint8 mask
  both work); a uint8 (H, W, 3) or (H, W, 4) mask is the PIL picture of it.
The mask must have the picture's size (diffusers would resize each to height x width on its own, so a mask of
another size would not mark the pixels it was drawn on: `load_pair` refuses it).
"""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .scheduler import pack_latents

PICTURE_TYPES = (
    "a PIL image, a path to an image file, or a numpy array (uint8 or float in [0, 1]) of shape (H, W, 3) or (H, W)"
)


def _open_path(source, what: str):
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(source).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{what}: {path} is a folder, not a picture file")
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {path}")
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(
            f"{what}: cannot read {path} as a picture ({e}); use a PNG, JPEG, WebP, GIF, BMP or TIFF file"
        ) from None


def check_pixels(size: tuple, what: str) -> None:
    """Refuse a (width, height) picture without a pixel, naming it as `what`."""
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"{what} is {width}x{height} pixels (width x height): it needs at least one pixel")


def load_picture(source, what: str = "image"):
    """A PIL image from a PIL image, a path (opened as diffusers' `load_image` opens it: EXIF orientation applied,
    RGB) or a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, Path)):
        return _open_path(source, what)
    if isinstance(source, mx.array):
        source = np.array(source)
    if isinstance(source, np.ndarray):
        a = source[..., 0] if source.ndim == 3 and source.shape[-1] == 1 else source
        if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
            raise ValueError(
                f"{what}: a numpy array must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4); got {source.dtype} "
                f"{source.shape}. Floats in [0, 1]: (a * 255).round().astype(np.uint8)"
            )
        check_pixels((a.shape[1], a.shape[0]), what)
        return Image.fromarray(a)
    raise ValueError(f"{what} must be {PICTURE_TYPES}; got {type(source).__name__}")


def _float_picture(a: np.ndarray, what: str) -> np.ndarray:
    """A float array as diffusers' VaeImageProcessor takes a numpy picture, checked: (H, W, 3) in its own dtype."""
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"{what}: an array of {a.shape[0]} pictures {a.shape}; give one picture per call")
        a = a[0]
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{what}: a float array must have shape (H, W, 3) (channels last, values in [0, 1]), (H, W) or (H, W, 4); "
            f"got {a.shape}"
        )
    check_pixels((a.shape[1], a.shape[0]), what)
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: the array holds NaN or infinite values")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)  # grey: each of R, G, B
    return a[..., :3]


def read_image(source, what: str = "image"):
    """The img2img picture, checked: a PIL image (from a PIL image, a path or a uint8 array), or a float array
    (H, W, 3) that `preprocess_image` takes as diffusers does (nearest resize, 2x - 1)."""
    if isinstance(source, mx.array):
        source = np.array(source)
    if isinstance(source, np.ndarray) and np.issubdtype(source.dtype, np.floating):
        return _float_picture(source, what)
    if isinstance(source, np.ndarray) and source.dtype != np.uint8:
        raise ValueError(
            f"{what}: a numpy array must be uint8 (0..255) or float (0..1); got {source.dtype} {source.shape}"
        )
    picture = load_picture(source, what)
    check_pixels(picture.size, what)
    return picture


def read_mask(source, what: str = "mask_image"):
    """The inpainting mask, checked: a PIL image (from a PIL image, a path or a uint8 (H, W, 3|4) array) or a
    numeric array (H, W) whose raw values `preprocess_mask` binarizes at 0.5, as diffusers does."""
    if isinstance(source, mx.array):
        source = np.array(source)
    if isinstance(source, np.ndarray):
        a = source
        if a.ndim == 4 and a.shape[0] == 1 and a.shape[-1] == 1:
            a = a[0]
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim == 3 and a.shape[-1] in (3, 4) and a.dtype == np.uint8:
            return read_image(a, what)  # a colour picture of the mask: Pillow's grayscale of it
        if a.ndim != 2 or not (a.dtype == bool or np.issubdtype(a.dtype, np.number)):
            raise ValueError(
                f"{what}: a numpy mask must be (H, W) of numbers or bools (>= 0.5 repainted, below kept), or a uint8 "
                f"picture (H, W, 3); got {source.dtype} {source.shape}"
            )
        check_pixels((a.shape[1], a.shape[0]), what)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise ValueError(f"{what}: the mask holds NaN or infinite values")
        return a
    return read_image(source, what)


def _size(picture) -> tuple[int, int]:
    """(width, height) of a PIL picture or an (H, W, ...) array."""
    return (picture.shape[1], picture.shape[0]) if isinstance(picture, np.ndarray) else picture.size


def _nearest(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="nearest") over the first two axes: source index floor(i * in / out)
    in float32 (an equal size copied, a doubled one i >> 1), as diffusers resizes arrays."""

    def index(n_in: int, n_out: int) -> np.ndarray:
        i = np.arange(n_out)
        if n_out == n_in:
            return i
        if n_out == 2 * n_in:
            return i >> 1
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(i.astype(np.float32) * scale).astype(np.int64), n_in - 1)

    return a[index(a.shape[0], height)][:, index(a.shape[1], width)]


def preprocess_image(image, height: int, width: int) -> np.ndarray:
    """The picture as diffusers' VaeImageProcessor.preprocess makes it: RGB (diffusers takes RGB only), Pillow's
    Lanczos resize to width x height, [0, 1] in float32, then 2x - 1; a float array as diffusers takes one (nearest
    resize, then 2x - 1 unless it has values below 0). Returns (1, H, W, 3) float32."""
    from PIL import Image

    image = read_image(image)
    if isinstance(image, np.ndarray):
        x = _nearest(image, height, width)
        x = x if x.min() < 0 else 2.0 * x - 1.0  # diffusers: values below 0 mean the array is already in [-1, 1]
        return x.astype(np.float32)[None]
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    x = np.asarray(image).astype(np.float32) / 255.0
    return (2.0 * x - 1.0)[None]


def preprocess_mask(mask, height: int, width: int) -> np.ndarray:
    """The mask as the inpainting pipeline's mask processor makes it: Pillow's Lanczos resize to width x height in
    its own mode, then grayscale, [0, 1], binarized (< 0.5 -> 0 kept, >= 0.5 -> 1 repainted); an (H, W) array
    resized by nearest neighbour and binarized on its raw values, as diffusers does. (H, W) float32."""
    from PIL import Image

    mask = read_mask(mask)
    if isinstance(mask, np.ndarray):
        return (_nearest(mask, height, width) >= 0.5).astype(np.float32)
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
    """(picture, mask or None), read and checked (`read_image`, `read_mask`): a mask needs a picture, of the same
    size (diffusers would stretch each to the output size on its own, so a mask of another size would not sit where
    it was drawn: refused). `names` are how the two are called in messages (the CLI's --image, --mask)."""
    if image is None:
        if mask_image is not None:
            raise ValueError(f"{names[1]} needs {names[0]}: the picture whose masked (white) region is repainted")
        return None, None
    picture = read_image(image, names[0])
    if mask_image is None:
        return picture, None
    mask = read_mask(mask_image, names[1])
    (pw, ph), (mw, mh) = _size(picture), _size(mask)
    if (mw, mh) != (pw, ph):
        raise ValueError(
            f"{names[1]} is {mw}x{mh} but {names[0]} is {pw}x{ph} (width x height): the mask marks the picture's "
            "pixels to repaint (white) and keep (black), so give it the picture's size"
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
    "read_image",
    "read_mask",
]
