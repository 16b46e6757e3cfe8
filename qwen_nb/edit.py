"""Picture(s) + instruction -> edited picture: diffusers' `QwenImageEditPipeline` (Qwen/Qwen-Image-Edit) and
`QwenImageEditPlusPipeline` (Qwen-Image-Edit-2509, and -2511 with the transformer's `zero_cond_t`) on the qwen_nb
components; one class serves the three, reading which from the checkpoint.

`QwenImageEditPipeline.from_pretrained(...)` loads as `QwenImagePipeline` does (memory plan, quantization, LoRA,
sequencing), plus the text encoder's vision tower (qwen_nb.vision) and the `processor/` settings.
`generate(prompt, image)`, as diffusers 0.42.1:
- each picture is resized (Lanczos) to about 1024x1024 pixels of area, sides multiples of 32, keeping its aspect
  ratio, and encoded by the VAE (the posterior's mode); the output's size, when not given, is the last picture's;
- the vision tower reads each picture resized to 384x384 area (Edit-Plus) or its VAE-size copy (Edit); the prompt
  goes into the edit template ("Picture N: " before each picture for Edit-Plus) and its first 64 tokens are dropped;
  the negative prompt is encoded with the same pictures;
- at every step the pictures' packed latents follow the noise tokens, each picture a RoPE frame of its own, and only
  the noise tokens' velocity is used; CFG is diffusers' true CFG with the norm rescale; under `zero_cond_t` the
  pictures' tokens are modulated at sigma 0.
"""

import hashlib
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from . import image_input
from .components import ComponentStore, as_builder
from .hub import resolve
from .lora import _hub_file
from .memory import MemoryLimit, activation_bytes, tensor_shapes
from .pipeline import GenerationStats, QwenImagePipeline, fit_size, materialize
from .sampling import denoise, eval_every_blocks
from .scheduler import pack_latents
from .transformer import TransformerConfig
from .vision import (
    IMAGE_PAD,
    QwenVLProcessor,
    VisionConfig,
    encode_with_images,
    get_rope_index,
    is_vision_tower,
    load_vision_tower,
    open_picture,
    smart_resize,
    to_rgb,
)

# diffusers' prompt templates; the Edit one holds its single picture, Edit-Plus's get "Picture N: " + PICTURE each
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PLUS_TEMPLATE = EDIT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>{}", "{}")
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
DROP_IDX = 64  # the system turn and "<|im_start|>user\n": dropped from the embeddings
CONDITION_AREA = 384 * 384  # diffusers' CONDITION_IMAGE_SIZE: Edit-Plus's pictures for the vision tower
VAE_AREA = 1024 * 1024  # diffusers' VAE_IMAGE_SIZE: the pictures the VAE encodes, and the default output
# model_index.json `_class_name` -> (kind, the most pictures it takes): Edit was trained on one picture, Edit-Plus
# on up to three (its model card)
KINDS = {"QwenImageEditPipeline": ("edit", 1), "QwenImageEditPlusPipeline": ("plus", 3)}
LIGHTNING_REPO = "lightx2v/Qwen-Image-Lightning"
LIGHTNING_FILES = {
    "edit": "Qwen-Image-Edit-Lightning-{}steps-V1.0-bf16.safetensors",
    "plus": "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-{}steps-V1.0-bf16.safetensors",
}
PICTURE_TYPES = "a PIL image, a path to an image file, or a uint8 numpy array (H, W, 3)"


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about `area` pixels with width / height = ratio, each rounded to a multiple of 32 (Python's
    round: halves to even), as diffusers' edit pipelines size their pictures."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def read_picture(source, index: int = 0) -> Image.Image:
    """One input picture as RGB: a PIL image (transparency composited onto white, as Qwen2.5-VL's processor does;
    diffusers' VAE path takes RGB only), a path (EXIF orientation applied, alpha dropped, as diffusers'
    `load_image`) or a uint8 array."""
    what = f"picture {index + 1}"
    if isinstance(source, (str, Path)):
        picture = open_picture(Path(source).expanduser())
    elif isinstance(source, np.ndarray):
        picture = image_input.load_picture(source, what)
    elif isinstance(source, Image.Image):
        picture = source
    else:
        raise ValueError(f"{what} must be {PICTURE_TYPES}; got {type(source).__name__}")
    width, height = picture.size
    if width < 1 or height < 1:
        raise ValueError(f"{what} is {width}x{height} pixels: nothing to edit (the smallest it takes is 1x1)")
    if picture.mode == "RGB":  # as diffusers: the VAE reads the RGB as it is; a transparent colour (a PNG's tRNS,
        return picture  # kept in info) is composited on white for the vision tower only, after the resize
    return to_rgb(picture)


class EditPictures:
    """The checked input pictures and what diffusers makes of them: the VAE's size of each (width, height), the
    pictures the vision tower reads (PIL), and a digest that keys the prompt cache."""

    def __init__(self, pictures: list, kind: str, vae_area: int, condition_area: int, processor, listed=False):
        self.pictures = pictures
        self.vae_sizes = [self._size(p, vae_area, i, "the VAE") for i, p in enumerate(pictures)]
        if kind == "edit" and listed:  # diffusers' image_processor.resize passes a list through: the picture as given
            self.condition = list(pictures)
        elif kind == "edit":  # the VAE-size copy goes to the vision tower too
            self.condition = [p.resize(s, Image.Resampling.LANCZOS) for p, s in zip(pictures, self.vae_sizes)]
        else:
            sizes = [self._size(p, condition_area, i, "the vision tower") for i, p in enumerate(pictures)]
            self.condition = [p.resize(s, Image.Resampling.LANCZOS) for p, s in zip(pictures, sizes)]
        config = processor.image_config
        for p in self.condition:  # the processor's checks, before any model loads
            smart_resize(p.size[1], p.size[0], config.factor, config.min_pixels, config.max_pixels)
        digest = hashlib.sha256(repr(listed and kind == "edit").encode())
        for p in pictures:
            digest.update(repr((p.size, p.info.get("transparency"))).encode() + p.tobytes())
        self.key = digest.hexdigest()

    @staticmethod
    def _size(picture: Image.Image, area: int, index: int, what: str) -> tuple[int, int]:
        width, height = calculate_dimensions(area, picture.size[0] / picture.size[1])
        if width < 32 or height < 32:
            raise ValueError(
                f"picture {index + 1} is {picture.size[0]}x{picture.size[1]} pixels: at the {math.isqrt(area)}^2-pixel "
                f"area {what} reads, its aspect ratio gives {width}x{height}, too thin to patch. Crop or pad it "
                "towards a squarer shape."
            )
        return width, height

    @property
    def last_ratio(self) -> float:
        width, height = self.pictures[-1].size
        return width / height


class WithConditions:
    """The transformer with the condition pictures' packed latents (1, M, C) appended after the noise tokens, their
    (h, w) grids as RoPE frames 1, 2, ...; returns the noise tokens' velocity only. `sampling.denoise` runs it."""

    def __init__(self, model, latents: mx.array, grids: list):
        self.model, self.latents, self.grids = model, latents, list(grids)

    def __call__(self, x, text, sigma, grid, text_mask=None, **kwargs):
        B, N, _ = x.shape
        conditions = mx.broadcast_to(self.latents.astype(x.dtype), (B, *self.latents.shape[1:]))
        v = self.model(mx.concatenate([x, conditions], axis=1), text, sigma, [grid, *self.grids], text_mask, **kwargs)
        return v[:, :N]


class QwenImageEditPipeline(QwenImagePipeline):
    """Qwen-Image-Edit, -2509 and -2511: `from_pretrained(...)`, then `generate(prompt, image) -> PIL.Image`."""

    reads_pictures = True
    sequenced_by_default = True

    @classmethod
    def from_pretrained(
        cls, repo_id_or_folder, dtype=None, quantize=None, *, revision=None, cache_dir=None, **options
    ) -> "QwenImageEditPipeline":
        """An edit pipeline from a hub id ("Qwen/Qwen-Image-Edit", "-2509", "-2511"; the text encoder's vision
        shards and processor/ are downloaded too) or a diffusers folder. The keywords are `QwenImagePipeline`'s
        (`fast=` aside: use `use_lightning(n, lora=...)`). A checkpoint's model_index.json may set
        `_vae_image_area` (pixels; qwen_nb's key for small test checkpoints) in place of 1024*1024."""
        if options.get("fast") is not None:
            raise ValueError("fast= is not taken by the edit pipelines: call pipe.use_lightning(steps) after loading")
        verbose, variant = options.get("verbose", True), options.get("variant")
        folder = resolve(repo_id_or_folder, revision, cache_dir, verbose, vision=True, variant=variant)
        kind, _, vision_config = edit_checkpoint(folder, variant)
        pipe = super().from_pretrained(folder, dtype, quantize, **options)
        index = json.loads((folder / "model_index.json").read_text())
        pipe._edit_parts(
            kind,
            QwenVLProcessor.from_pretrained(folder / "processor"),
            vision_config,
            lambda: load_vision_tower(folder / "text_encoder", pipe.options.dtype, variant=pipe.options.variant),
            int(index.get("_vae_image_area", VAE_AREA)),
            TransformerConfig.from_folder(folder / "transformer").zero_cond_t,
        )
        return pipe

    @classmethod
    def from_components(
        cls,
        processor: QwenVLProcessor,
        transformer,
        text_encoder,
        vae,
        vision_tower,
        scheduler_config=None,
        *,
        kind: str = "plus",
        vision_config: VisionConfig | None = None,
        vae_area: int = VAE_AREA,
        native_size: tuple[int, int] | None = None,
        **options,
    ) -> "QwenImageEditPipeline":
        """An edit pipeline from models in memory (benchmarks, tests): `processor` (a QwenVLProcessor), the
        transformer, text encoder and VAE as `QwenImagePipeline.from_components` takes them (modules, or functions
        that build one), and `vision_tower` (Qwen2.5-VL's, or a function that builds it). `kind` is "edit"
        (Qwen-Image-Edit: one picture) or "plus" (-2509/-2511: up to 3); `vision_config` (default: the real
        tower's) gives the picture token's id and the text's RoPE sections."""
        takes = dict(KINDS.values())
        if kind not in takes:
            raise ValueError(f"kind must be one of {sorted(takes)} (Qwen-Image-Edit / -2509 and -2511), not {kind!r}")
        pipe = super().from_components(
            processor.tokenizer, transformer, text_encoder, vae, scheduler_config, native_size=native_size, **options
        )
        vision_config = vision_config or VisionConfig()
        zero_cond_t = pipe.transformer.config.zero_cond_t
        pipe._edit_parts(kind, processor, vision_config, as_builder(vision_tower), int(vae_area), zero_cond_t)
        return pipe

    def _edit_parts(self, kind: str, processor, vision_config, vision_tower, vae_area: int, zero_cond_t: bool):
        """What an edit pipeline holds beside a text-to-image one (from_pretrained and from_components): the kind
        and how many pictures it takes, the processor (its picture token checked against the text encoder's), the
        vision tower's builder, the picture areas and the text positions."""
        self.kind, self.max_pictures = kind, dict(KINDS.values())[kind]
        self.vision_config, self.zero_cond_t, self.processor = vision_config, zero_cond_t, processor
        pad = processor.tokenizer.tokenizer.token_to_id(IMAGE_PAD)
        if pad != vision_config.image_token_id:
            raise ValueError(
                f"the processor's tokenizer gives {IMAGE_PAD} the id {pad}, but the text encoder takes picture tokens "
                f"as id {vision_config.image_token_id}: the processor and the text encoder are not from one checkpoint"
            )
        self.vae_area, self.condition_area = vae_area, CONDITION_AREA
        # "plain": 0..L-1, as diffusers 0.42.1 runs transformers 5 (no mm_token_type_ids); "mrope": Qwen2.5-VL's
        # 3-D positions of get_rope_index, as the model was trained (and transformers when given mm_token_type_ids)
        self.text_positions = "plain"
        self.vision = ComponentStore({"vision_tower": vision_tower})

    @property
    def vision_tower(self):
        return self.vision["vision_tower"]

    def use_lightning(self, steps: int = 8, lora=None, revision: str | None = None, cache_dir=None) -> None:
        """The step-distilled edit model: lightx2v's Lightning LoRA for this checkpoint (Qwen-Image-Edit's or
        -2509's from lightx2v/Qwen-Image-Lightning; for -2511 give `lora`, a file from
        lightx2v/Qwen-Image-Edit-2511-Lightning), its schedule, `steps` steps and CFG off by default."""
        if steps not in (4, 8):
            raise ValueError(f"the Lightning LoRAs are for 8 or 4 steps, got {steps!r}")
        if lora is None:
            if self.zero_cond_t:
                raise ValueError(
                    "Qwen-Image-Edit-2511 has its own Lightning LoRAs (lightx2v/Qwen-Image-Edit-2511-Lightning): "
                    "download one and give its file as lora="
                )
            name = LIGHTNING_FILES[self.kind].format(steps)
            lora = _hub_file(LIGHTNING_REPO, name, revision, cache_dir, self.options.verbose)
        super().use_lightning(steps, lora=lora)

    # ------------------------------------------------------------------ pictures and text
    def pictures(self, image) -> EditPictures:
        """The input picture(s) read and checked (count, sizes) before any model loads."""
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if image is None or not images:
            raise ValueError(f"image is required: the picture to edit ({PICTURE_TYPES}), or a list of them")
        if len(images) > self.max_pictures:
            name = "Qwen-Image-Edit" if self.kind == "edit" else "Qwen-Image-Edit-2509/2511"
            more = " (Qwen-Image-Edit-2509 and -2511 take up to 3)" if self.kind == "edit" else ""
            raise ValueError(
                f"{len(images)} pictures given; {name} takes at most {self.max_pictures}{more}: combine them, or "
                "edit in steps"
            )
        pictures = [read_picture(p, i) for i, p in enumerate(images)]
        listed = isinstance(image, (list, tuple))
        return EditPictures(pictures, self.kind, self.vae_area, self.condition_area, self.processor, listed)

    def prompt_text(self, prompt: str, count: int) -> str:
        """The prompt in diffusers' edit template, with the pictures' placeholders."""
        if self.kind == "edit":
            return EDIT_TEMPLATE.format(prompt)
        return PLUS_TEMPLATE.format("".join(PICTURE.format(i + 1) for i in range(count)) + prompt)

    def encode_edit(self, texts: list, pictures: EditPictures, stats=None, progress: bool = False) -> list:
        """(embeds (1, L, hidden), None) of each text with the pictures, as diffusers' encode_prompt gives them:
        the templated text and the pictures through the processor, the vision tower and the language model, the
        first 64 tokens dropped (no cut to max_sequence_length: diffusers' edit pipelines make none). Cached by
        (text, pictures); frees the text encoder and the vision tower afterwards when the pipeline runs sequenced."""
        if self.text_positions not in ("plain", "mrope"):
            raise ValueError(f"text_positions must be 'plain' (diffusers') or 'mrope', not {self.text_positions!r}")
        stats = stats or GenerationStats(None, 0, 0, 0, False)
        keys = [(t, pictures.key, self.text_positions) for t in texts]
        if any(k not in self._cache for k in keys):
            with stats.stage("text_weights", "load_s"):
                if not self.components.loaded("text_encoder") and not self.keep_text_encoder:
                    self.components.release("transformer")  # sequenced: never resident with the text encoder
                materialize(self.text_encoder, "reading the text encoder" if progress else None)
                materialize(self.vision_tower)
            with stats.stage("text", "text_s"):
                self._encode_missing(texts, keys, pictures)
        out = []
        for k in keys:
            self._cache.move_to_end(k)
            out.append(self._cache[k])
        if not self.keep_text_encoder:
            self.components.release("text_encoder")
            self.vision.release("vision_tower")
        return out

    def _encode_missing(self, texts, keys, pictures: EditPictures) -> None:
        config, embeds = self.vision_config, None
        for text, key in zip(texts, keys):
            if key in self._cache:
                continue
            inputs = self.processor(self.prompt_text(text, len(pictures.pictures)), pictures.condition)
            if embeds is None:  # the same pictures for every text
                embeds = self.vision_tower(inputs["pixel_values"], inputs["image_grid_thw"])
            positions = None
            if self.text_positions == "mrope":
                grid = inputs["image_grid_thw"]
                positions = get_rope_index(
                    inputs["input_ids"], grid, None, config.image_token_id, config.spatial_merge_size
                )[0]
            hidden = encode_with_images(
                self.text_encoder, inputs["input_ids"], None, embeds, positions, config.image_token_id,
                config.mrope_section,
            )  # fmt: skip
            value = (hidden[:, DROP_IDX:], None)
            mx.eval(value[0])
            self._cache[key] = value
            if len(self._cache) > self.options.cache_size:
                self._cache.popitem(last=False)

    def condition_latents(self, pictures: EditPictures) -> tuple[mx.array, list]:
        """The pictures at their VAE sizes, encoded (the posterior's mode), normalised and packed, in order:
        ((1, M, C) latents, the (h, w) patch grid of each)."""
        latents, grids = [], []
        for picture, (width, height) in zip(pictures.pictures, pictures.vae_sizes):
            pixels = mx.array(image_input.preprocess_image(picture, height, width)).astype(self.dtype)
            z = self.vae.encode(pixels)  # (1, H/8, W/8, z_dim)
            latents.append(pack_latents(z.transpose(0, 3, 1, 2), self.sizes.patch))
            grids.append(self.sizes.grid(height, width))
        latents = mx.concatenate(latents, axis=1).astype(self.dtype)
        mx.eval(latents)
        return latents, grids

    # ------------------------------------------------------------------ generation
    def _check_memory_at(self, height: int, width: int, condition_tokens: int = 0) -> None:
        """The memory plan again at this size, with the condition pictures' tokens in the denoising sequence."""
        plan = self.memory_plan
        if not self.options.check_memory or plan is None:
            return
        act = activation_bytes(self.folder, self.dtype, height, width, condition_tokens=condition_tokens)
        replace(plan, activations=act, size=(height, width)).check()

    def generate(
        self,
        prompt: str,
        image=None,
        negative_prompt: str | None = " ",
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        seed: int | None = None,
        latents=None,
        callback=None,
        progress: bool = True,
        preview=None,
        preview_every: int = 1,
        sigmas=None,
    ):
        """The edited picture, as diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline(image=image,
        prompt=prompt, negative_prompt=..., true_cfg_scale=cfg_scale, ...).

        `image`: one picture (a PIL image, a path or a uint8 array), or for Edit-2509/2511 a list of up to 3. For
        Qwen-Image-Edit a list of one picture is read as diffusers' QwenImageEditPipeline reads one: its vision tower
        then sees the picture at its own size (the processor's smart resize only), not the ~1024x1024-area copy it
        sees when given the picture itself.
        height and width default to the last picture's aspect ratio at about 1024x1024 pixels (sides multiples of
        32); given, they are rounded down to multiples of 16 (with a warning), as diffusers does. negative_prompt,
        steps, cfg_scale, seed, latents (the noise (1, C, H/8, W/8) before packing), callback, preview, interrupts and
        sigmas work as in `QwenImagePipeline.generate`."""
        pictures = self.pictures(image)
        if height is None or width is None:
            auto_width, auto_height = calculate_dimensions(self.vae_area, pictures.last_ratio)
            height = auto_height if height is None else height
            width = auto_width if width is None else width
        height, width = fit_size(height, width, self.sizes.multiple)
        steps, sigmas = self._steps(steps, sigmas)
        cfg_scale = self.defaults["cfg_scale"] if cfg_scale is None else cfg_scale
        self._check_request(prompt, negative_prompt, steps, cfg_scale, seed, preview, preview_every)
        if latents is None and seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        noise = self.initial_noise(height, width, seed, latents)
        grids = [self.sizes.grid(h, w) for w, h in pictures.vae_sizes]
        self._check_memory_at(height, width, sum(h * w for h, w in grids))
        do_cfg = cfg_scale > 1 and negative_prompt is not None
        grid = self.sizes.grid(height, width)
        schedule = self.schedule(steps, grid, sigmas=sigmas)  # the shift from the noise tokens alone, as diffusers
        stats = self.last_stats = GenerationStats(seed if latents is None else None, height, width, steps, do_cfg)

        with MemoryLimit(self.options.memory_limit_gb) as limit, stats.running():
            texts = [prompt] if not do_cfg else [prompt, negative_prompt]
            cond, *rest = self.encode_edit(texts, pictures, stats, progress)
            uncond = rest[0] if rest else None
            with stats.stage("picture", "image_s"):
                conditions, grids = self.condition_latents(pictures)
            with stats.stage("weights", "load_s"):
                self.modulation_table(schedule)  # first: its weights are read and dropped before the rest is read
                self.materialize_transformer(progress)
            limit.weights_loaded()
            x = pack_latents(noise, self.sizes.patch)
            hook = eval_every_blocks(self.options.eval_every) if self.options.eval_every else None
            loop = denoise(
                WithConditions(self.transformer, conditions, grids),
                x,
                cond,
                schedule=schedule,
                grid=grid,
                negative=uncond,
                cfg_scale=cfg_scale,
                mods=self.modulation_table(schedule),
                batched_cfg=self.options.batched_cfg,
                block_hook=hook,
            )
            with stats.stage("denoise"):
                x = self._run(loop, x, schedule, stats, callback, preview, preview_every, progress)
            with stats.stage("decode", "decode_s"):
                out = self.decode(x, height, width)
        return out

    __call__ = generate


def edit_checkpoint(folder: Path, variant: str | None = None) -> tuple[str, int, VisionConfig]:
    """(kind, the most pictures it takes, the vision tower's config) of an edit checkpoint; a ValueError naming
    the problem for a text-to-image checkpoint or a text encoder without its vision tower."""
    name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    if name not in KINDS:
        raise ValueError(
            f"{folder} holds a {name or 'pipeline without a _class_name'}, not an edit checkpoint "
            f"({' or '.join(KINDS)}): give Qwen/Qwen-Image-Edit, -2509 or -2511 (QwenImagePipeline runs "
            "text-to-image checkpoints)"
        )
    kind, max_pictures = KINDS[name]
    try:
        config = VisionConfig.from_folder(folder / "text_encoder")
    except ValueError as e:
        raise ValueError(f"{folder / 'text_encoder'}: {e}; the edit pipelines need the vision tower") from None
    if not tensor_shapes(folder / "text_encoder", is_vision_tower, variant):
        raise ValueError(
            f"{folder / 'text_encoder'} holds no vision-tower weights (visual.*): the edit pipelines read the "
            "pictures with them. Download the whole text_encoder/ folder of the edit checkpoint (all its shards)."
        )
    return kind, max_pictures, config


__all__ = ["QwenImageEditPipeline", "WithConditions", "calculate_dimensions", "read_picture"]
