"""Prompt (and condition pictures) -> image: diffusers' `QwenImage21Pipeline` on the qwen_nb components.

`QwenImage21Pipeline.from_pretrained("Qwen/Qwen-Image-2.1" or a folder)` checks the checkpoint, plans the memory and
reads the configs; the models load lazily, each with its own loader, in a `ComponentStore` (the text encoder's vision
tower only once a call brings pictures). `generate(prompt, image=...)` resizes the condition pictures to the output
resolution's area (one Lanczos resize of the RGBA picture feeds both the text encoder, composited on white, and the
VAE), encodes prompt and pictures with Qwen3-VL (cached), VAE-encodes the pictures, computes the schedule (the
author's `sample_sigmas` unless told otherwise), runs the block-causal transformer step by step (with the KV cache:
the first step prefills the text and condition tokens, every later step computes the target's tokens alone),
decodes and returns an RGBA PIL image, as diffusers does.
"""

import hashlib
import math
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .components import ComponentStore, as_builder
from .image_input import check_pixels
from .loading import CheckpointError, read_config, weight_files
from .lora import LoraMethods, LoraStack
from .memory import MemoryLimit, MemoryPlan, activation_bytes, plan_memory
from .pipeline import (
    GenerationInterrupted,
    GenerationStats,
    PipelineOptions,
    _is_int,
    check_seed,
    check_sigmas,
    check_size,
    materialize,
)
from .qwen3_vl import Qwen3VLProcessor, Qwen3VLTextEncoder, composite_on_white, load_qwen3_vl
from .sampling import Schedule, evaluated
from .scheduler import FLOW_MATCH_DEFAULTS, SchedulerConfig, euler_step, flow_match_sigmas
from .transformer21 import (
    TOKENS_PER_SLOT,
    KVCache,
    QwenImage21Transformer,
    Transformer21Config,
    load_transformer21,
    quantize_transformer21,
)
from .vae import postprocess
from .vae21 import AutoencoderKLQwenImage21, load_vae21

CLASS_NAME = "QwenImage21Pipeline"
COMPONENTS = ("transformer", "vae", "text_encoder", "processor", "scheduler")
DEFAULT_STEPS = 40  # diffusers' num_inference_steps, used when the checkpoint has no sample_sigmas
DEFAULT_RESOLUTION = 1024
VAE_FACTOR = 16  # diffusers' vae_scale_factor for 2.1, fixed whatever the VAE's config
MULTIPLE = 2 * VAE_FACTOR  # the VAE's 16x times the 2x2 latent tokens of one text-encoder slot
SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
# diffusers' templates: the prompt as the user turn; with pictures, each picture's slots before it
TEMPLATE = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n"
PICTURE = "<image{}><|vision_start|><|image_pad|><|vision_end|>"


def calculate_dimensions(area: float, ratio: float) -> tuple[int, int]:
    """(width, height), multiples of 32, of a picture of about `area` pixels and aspect ratio width / height: the
    size diffusers gives condition pictures and, from the last one, the output (Python's round: halves to even)."""
    width = math.sqrt(area * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


def fit_size21(height: int, width: int) -> tuple[int, int]:
    """diffusers' rule for the output size: each side rounded down to a multiple of 32 (the VAE's 16x times the 2x2
    latent tokens of a text-encoder slot), with a warning when that changes it. (height, width) as generated."""
    fitted = (height // MULTIPLE * MULTIPLE, width // MULTIPLE * MULTIPLE)
    if fitted != (height, width):
        warnings.warn(
            f"height and width must be multiples of {MULTIPLE} (the VAE's 16x times the 2x2 latent tokens of a "
            f"text-encoder slot): {width}x{height} (width x height) is generated at {fitted[1]}x{fitted[0]}, rounded "
            "down as diffusers does",
            stacklevel=3,
        )
    return fitted


def template(prompt: str, pictures: int = 0) -> str:
    """diffusers' text for a prompt: the t2i template, or with n pictures "<image1>...<|vision_end|> <image2>..."
    before the prompt."""
    slots = " ".join(PICTURE.format(i) for i in range(1, pictures + 1))
    return TEMPLATE.format(slots + prompt)


def drop_count(processor: Qwen3VLProcessor) -> int:
    """The system turn's tokens, dropped from the embeddings: the processor's chat template applied to the system
    message alone, tokenized, as diffusers derives it."""
    message = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]
    return len(processor.tokenizer.encode(processor.apply_chat_template(message)))


def sigma_schedule(sigmas, image_seq_len: int, config: SchedulerConfig) -> np.ndarray:
    """The steps + 1 sigmas (float32, ending in 0) of `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=, mu=)`
    as QwenImage21Pipeline calls it: the given sigmas shifted (mu from the target's token count), stretched to end at
    shift_terminal (skipped at one step, where diffusers makes NaN: see qwen_nb.scheduler)."""
    return flow_match_sigmas(len(sigmas), image_seq_len, config, sigmas=sigmas)


def read_scheduler(folder: Path) -> SchedulerConfig:
    return SchedulerConfig.from_dict({**FLOW_MATCH_DEFAULTS, **read_config(folder, "scheduler_config.json")})


def open_picture(picture) -> Image.Image:
    """A condition picture: a PIL image, an (H, W, C) uint8 array, or a file path (EXIF orientation applied, its
    mode kept: an alpha channel matters to 2.1)."""
    if isinstance(picture, Image.Image):
        return picture
    if isinstance(picture, np.ndarray):
        try:
            return Image.fromarray(picture)  # as diffusers
        except TypeError as e:
            raise ValueError(
                f"a condition picture array must be one Pillow makes a picture of, e.g. uint8 (H, W), (H, W, 3) or "
                f"(H, W, 4); got {picture.dtype} {picture.shape} ({e}). Floats in [0, 1]: (a * 255).round().astype(np.uint8)"
            ) from None
    if isinstance(picture, (str, Path)):
        path = Path(picture).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no picture at {path}")
        try:
            with Image.open(path) as p:
                return ImageOps.exif_transpose(p).copy()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path} is not a picture Pillow can read ({e})") from e
    if isinstance(picture, (list, tuple)):
        raise ValueError(
            "`image` is one flat set of condition pictures (a picture or a list of them), not nested lists"
        )
    raise ValueError(
        f"a condition picture must be a PIL image, a uint8 numpy array or a file path, not {type(picture).__name__}"
    )


def digest(picture: Image.Image) -> str:
    return hashlib.sha256(picture.tobytes()).hexdigest() + f"{picture.size}{picture.mode}"


def check_pipeline21_folder(folder) -> Path:
    """Raise naming the problem and the fix unless `folder` is a complete Qwen-Image 2.1 pipeline."""
    folder = Path(folder).expanduser()
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"{folder} is not a pipeline folder (no model_index.json): give Qwen-Image 2.1 in diffusers layout "
            "(model_index.json beside transformer/, vae/, text_encoder/, processor/, scheduler/) or its hub id"
        )
    kind = read_config(folder, "model_index.json").get("_class_name")
    if kind != CLASS_NAME:
        raise ValueError(
            f"{folder} holds a {kind}, not a {CLASS_NAME}: "
            + ("load it with qwen_nb.QwenImagePipeline" if kind == "QwenImagePipeline" else "use its own pipeline")
        )
    for c in COMPONENTS:
        if not (folder / c).is_dir():
            raise FileNotFoundError(f"{folder} has no {c}/ folder: copy it from the original checkpoint")
    for c in ("transformer", "vae"):
        weight_files(folder / c)
    weight_files(folder / "text_encoder", lambda name: not name.startswith("lm_head."))  # lm_head is never read
    return folder


def resolve21(repo_id_or_folder, revision=None, cache_dir=None, verbose: bool = True, variant=None) -> Path:
    """A complete 2.1 folder from a local path, or a hub id downloaded by qwen_nb.hub (the vision tower included)."""
    from .hub import looks_like_repo_id

    s = str(repo_id_or_folder)
    path = Path(s).expanduser()
    if path.exists() or not looks_like_repo_id(s):
        return check_pipeline21_folder(path)
    from .hub import download

    folder = download(s, revision=revision, cache_dir=cache_dir, verbose=verbose, vision=True, variant=variant)
    return check_pipeline21_folder(folder)


class QwenImage21Pipeline(LoraMethods):
    """Qwen-Image 2.1: `from_pretrained(...)`, then `generate(prompt, image=None) -> PIL.Image` (RGBA)."""

    reads_pictures = True  # condition pictures, optional (qwen_nb.panel shows a picture upload)
    # keep_text_encoder=None: sequenced wherever it fits (on an H200 peak 18.1 GB instead of 34.4, 3.22 s against 3.15:
    # assets/bench/qwen21_h200.json), as the edit pipelines
    sequenced_by_default = True
    native_size = (DEFAULT_RESOLUTION, DEFAULT_RESOLUTION)  # without a picture, output_resolution square

    def __init__(
        self,
        processor: Qwen3VLProcessor,
        scheduler_config: SchedulerConfig,
        store: ComponentStore,
        options: PipelineOptions,
        sample_sigmas=None,
        *,
        folder: Path | None = None,
        plan: MemoryPlan | None = None,
    ):
        """Use `from_pretrained` (a checkpoint) or `from_components` (models in memory)."""
        self.processor = processor
        self.scheduler_config = scheduler_config
        self.sample_sigmas = None if sample_sigmas is None else [float(s) for s in sample_sigmas]
        self.components = store
        self.options = options
        self.folder = folder
        self.memory_plan = plan
        self.drop_idx = drop_count(processor)
        self.loras = LoraStack()
        self.quantization = None
        self.last_stats: GenerationStats | None = None
        self._cache: OrderedDict = OrderedDict()
        self._vision = False  # build the text encoder with its vision tower (once a call has pictures)
        self._rebuildable = False
        self._noted_steps = False
        self._transformer_config = None if folder is None else Transformer21Config.from_folder(folder / "transformer")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_folder,
        dtype: mx.Dtype | None = None,
        quantize: int | None = None,
        *,
        revision: str | None = None,
        cache_dir=None,
        plan_size: tuple[int, int] | None = None,
        attention: str = "segments",
        **options,
    ) -> "QwenImage21Pipeline":
        """A pipeline from a hub id (downloaded into the HF cache) or a diffusers folder of Qwen-Image 2.1.

        `dtype`: None (float32 on a CPU, bfloat16 on a GPU), bfloat16 or float32; `quantize`: None, 8 or 4 (the
        transformer's linears; its modulation at 8 bits). `attention`: the prefill's block-causal attention,
        "segments" or "mask" (`transformer21.BlockCausal`). The other keywords are `PipelineOptions`; vae_tile,
        max_sequence_length, schedule_modulation and switches belong to Qwen-Image (2.0) and are not used here."""
        opts = cls._options(dtype=dtype, quantize=quantize, **options)
        folder = resolve21(repo_id_or_folder, revision, cache_dir, opts.verbose, opts.variant)
        index = read_config(folder, "model_index.json")
        h, w = plan_size or (DEFAULT_RESOLUTION, DEFAULT_RESOLUTION)
        kinds = dict(schedule_modulation=False, variant=opts.variant, prefer_sequenced=cls.sequenced_by_default)
        plan = plan_memory(folder, opts.dtype, opts.quantize, opts.keep_text_encoder, h, w, **kinds)
        if opts.check_memory and not plan.fits:
            plan.check({b: plan_memory(folder, opts.dtype, b, None, h, w, budget=plan.budget, **kinds) for b in (8, 4)})
        if opts.verbose:
            print(plan)
        opts.keep_text_encoder = plan.keep_text_encoder
        pipe = None

        def transformer():
            adapters = opts.lora_adapters and len(pipe.loras) > 0
            adjust = pipe.loras.apply_to_weights if len(pipe.loras) and not adapters else None
            model, pipe.quantization = load_transformer21(
                folder / "transformer", opts.dtype, opts.quantize, attention, adjust, opts.variant
            )
            if adapters:
                pipe.loras.forget()
                pipe.loras.attach(model)
            return model

        store = ComponentStore(
            {
                "transformer": transformer,
                "text_encoder": lambda: load_qwen3_vl(
                    folder / "text_encoder", opts.dtype, vision=pipe._vision, variant=opts.variant
                ),
                "vae": lambda: load_vae21(folder / "vae", opts.dtype, variant=opts.variant),
            }
        )
        pipe = cls(
            Qwen3VLProcessor.from_pretrained(folder / "processor"),
            read_scheduler(folder / "scheduler"),
            store,
            opts,
            index.get("sample_sigmas"),
            folder=folder,
            plan=plan,
        )
        return pipe

    @classmethod
    def from_components(
        cls,
        processor: Qwen3VLProcessor,
        transformer,
        text_encoder,
        vae,
        scheduler_config: SchedulerConfig | None = None,
        sample_sigmas=None,
        **options,
    ) -> "QwenImage21Pipeline":
        """A pipeline from models in memory (tests, benchmarks): modules, or zero-argument functions building one
        (then the pipeline can free a model and build it again). The text encoder needs its vision tower for
        condition pictures."""
        options.setdefault("check_memory", False)
        options.setdefault("keep_text_encoder", True)
        opts = cls._options(**options)
        build = as_builder(transformer)
        pipe = None

        def denoiser():
            model = build()
            if pipe._rebuildable:
                pipe.loras.forget()  # a new model: nothing of the last one to put back
            if len(pipe.loras) and not opts.lora_adapters:  # merged before quantizing
                pipe.loras.fuse(model, keep=not pipe._rebuildable)
            if opts.quantize and not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
                pipe.quantization = quantize_transformer21(model, opts.quantize)
            if len(pipe.loras) and opts.lora_adapters:
                pipe.loras.attach(model)
            return model

        store = ComponentStore(
            {"transformer": denoiser, "text_encoder": as_builder(text_encoder), "vae": as_builder(vae)}
        )
        config = scheduler_config or SchedulerConfig.from_dict(FLOW_MATCH_DEFAULTS)
        pipe = cls(processor, config, store, opts, sample_sigmas)
        pipe._rebuildable = build is transformer
        return pipe

    @staticmethod
    def _options(**options) -> PipelineOptions:
        opts = PipelineOptions(**options)
        if opts.vae_tile is not None:
            raise ValueError("vae_tile: tiled decoding is built for Qwen-Image's VAE, not 2.1's; leave it None")
        return opts

    # ------------------------------------------------------------------ the models
    @property
    def transformer(self) -> QwenImage21Transformer:
        return self.components["transformer"]

    @property
    def text_encoder(self) -> Qwen3VLTextEncoder:
        return self.components["text_encoder"]

    @property
    def vae(self) -> AutoencoderKLQwenImage21:
        return self.components["vae"]

    @property
    def dtype(self) -> mx.Dtype:
        return self.options.dtype

    @property
    def keep_text_encoder(self) -> bool:
        return bool(self.options.keep_text_encoder)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent token along each side: 16, as diffusers' QwenImage21Pipeline hard-codes it (a VAE of
        other depth then decodes the 16x latent grid at its own factor, and its condition latents do not fit the
        text encoder's slots, as in diffusers)."""
        return VAE_FACTOR

    # ------------------------------------------------------------------ LoRA
    def _loras_changed(self) -> None:
        if self.folder is not None or self._rebuildable:
            self.components.release("transformer")
        elif self.options.lora_adapters:
            self.loras.attach(self.transformer)
        else:
            self.loras.fuse(self.transformer)

    # ------------------------------------------------------------------ text and pictures
    def condition_pictures(self, image, resolution: int) -> tuple[list, list]:
        """(the pictures as given, opened; the pictures as diffusers prepares them: RGBA, resized (Lanczos) to about
        resolution^2 pixels at their aspect ratio, sides multiples of 32)."""
        if image is None:
            return [], []
        pictures = [open_picture(p) for p in (image if isinstance(image, (list, tuple)) else [image])]
        if not pictures:
            raise ValueError("image is an empty list: give a picture, a list of pictures, or None")
        out = []
        for p in pictures:
            check_pixels(p.size, "a condition picture")
            p = p if p.mode == "RGBA" else p.convert("RGBA")
            w, h = calculate_dimensions(resolution * resolution, p.size[0] / p.size[1])
            if w <= 0 or h <= 0:
                raise ValueError(
                    f"a {p.size[0]}x{p.size[1]} picture at output_resolution {resolution} rounds to {w}x{h}: give a "
                    "larger output_resolution"
                )
            out.append(p.resize((w, h), Image.Resampling.LANCZOS))
        return pictures, out

    def _key(self, prompt: str, pictures: list):
        return (prompt, tuple(digest(p) for p in pictures))

    def encode(self, prompt: str, pictures: list | None = None):
        """(embeds (1, L, hidden), image_pad_mask (L,) bool) of a prompt with the resized condition pictures, as
        diffusers' `encode_prompt`: the template, Qwen3-VL's pre-norm last hidden state, the system turn dropped.
        Cached by prompt and pictures."""
        pictures = pictures or []
        key = self._key(prompt, pictures)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        text = template(prompt or " ", len(pictures))  # Qwen has no BOS: an empty prompt would leave nothing to read
        inputs = self.processor([text], [composite_on_white(p) for p in pictures] or None)
        if pictures:
            self._want_vision()
        hidden = self.text_encoder(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs.get("pixel_values"),
            inputs.get("image_grid_thw"),
            inputs["mm_token_type_ids"],
        )
        embeds = hidden[:, self.drop_idx :]
        mx.eval(embeds)
        slots = inputs["input_ids"][0, self.drop_idx :] == self.processor.image_token_id
        self._cache[key] = (embeds, slots)
        if len(self._cache) > self.options.cache_size:
            self._cache.popitem(last=False)
        return embeds, slots

    def _want_vision(self) -> None:
        """From now on the text encoder is built with its vision tower (read once a call brings pictures). The
        memory plan made at `from_pretrained` left the tower out: checked again with it before anything is read."""
        plan = self.memory_plan
        if not self._vision and self.options.check_memory and plan is not None:

            def with_vision(bits):
                return plan_memory(
                    self.folder, self.dtype, bits, plan.keep_text_encoder or None, *plan.size, budget=plan.budget,
                    schedule_modulation=False, vision=True, variant=self.options.variant,
                    prefer_sequenced=self.sequenced_by_default,
                )  # fmt: skip

            needed = with_vision(self.options.quantize)
            if not needed.fits:  # the alternatives only for the error's advice, as from_pretrained does
                needed.check({b: with_vision(b) for b in (8, 4)})
        self._vision = True
        if self.components.loaded("text_encoder") and not self.text_encoder.has_vision:
            self.components.release("text_encoder")

    def encode_prompts(self, prompt, negative, pictures, stats):
        """(cond, uncond or None), each (embeds, image_pad_mask); frees the text encoder afterwards when sequenced."""
        texts = [prompt] + ([negative] if negative is not None else [])
        missing = [t for t in texts if self._key(t, pictures) not in self._cache]
        if missing and pictures:
            self._want_vision()
        if missing:
            with stats.stage("text_weights", "load_s"):
                if not self.components.loaded("text_encoder") and not self.keep_text_encoder:
                    self.components.release("transformer")
                materialize(self.text_encoder)
        with stats.stage("text", "text_s"):
            cond = self.encode(prompt, pictures)
            uncond = self.encode(negative, pictures) if negative is not None else None
        if not self.keep_text_encoder:
            self.components.release("text_encoder")
        return cond, uncond

    def encode_pictures(self, pictures: list) -> mx.array | None:
        """The condition pictures' latents, packed one token per latent pixel and concatenated (1, sum h*w, C):
        diffusers' VaeImageProcessor (x / 255 * 2 - 1 on all four channels) and the posterior's mean, normalised."""
        if not pictures:
            return None
        out = []
        for p in pictures:
            x = np.asarray(p).astype(np.float32) / 255.0
            z = self.vae.encode(mx.array(2.0 * x - 1.0)[None])  # (1, h, w, C)
            out.append(z.reshape(1, -1, z.shape[-1]))
        return mx.concatenate(out, axis=1).astype(self.dtype)

    # ------------------------------------------------------------------ sampling
    def sigmas_for(self, steps, sigmas) -> list:
        """The sigmas given to the scheduler, as diffusers chooses them: `sigmas` when given, else the checkpoint
        author's `sample_sigmas` (then `steps` is ignored, with a warning once, as diffusers ignores
        num_inference_steps), else linspace(1, 1/steps, steps)."""
        if sigmas is not None:
            return check_sigmas(sigmas)
        if self.sample_sigmas is not None:
            if steps is not None and steps != len(self.sample_sigmas) and not self._noted_steps:
                self._noted_steps = True
                warnings.warn(
                    f"steps={steps} is ignored: this checkpoint's author set a {len(self.sample_sigmas)}-step schedule "
                    "(sample_sigmas), which diffusers runs whatever num_inference_steps says; pass sigmas=[...] "
                    f"(e.g. numpy.linspace(1, 1 / {steps}, {steps})) for a schedule of your own",
                    stacklevel=3,
                )
            return self.sample_sigmas
        steps = DEFAULT_STEPS if steps is None else steps
        return np.linspace(1.0, 1 / steps, steps).tolist()

    def schedule(self, steps, sigmas, image_seq_len: int) -> Schedule:
        values = self.sigmas_for(steps, sigmas)
        return Schedule(
            sigma_schedule(values, image_seq_len, self.scheduler_config), 0, self.scheduler_config.num_train_timesteps
        )

    def initial_noise(self, height: int, width: int, seed=None, latents=None) -> mx.array:
        """The unpacked noise (1, C, H/16, W/16) in the pipeline's dtype: `latents` checked, or drawn from `seed`."""
        f, C = self.vae_factor, self.vae.config.z_dim
        shape = (1, C, height // f, width // f)
        if latents is None:
            check_seed(seed)
            return mx.random.normal(shape, key=mx.random.key(seed)).astype(self.dtype)
        z = latents if isinstance(latents, mx.array) else mx.array(np.asarray(latents))
        if tuple(z.shape) == (1, 1, *shape[1:]):  # diffusers draws (B, 1, C, h, w) before packing
            z = z.reshape(shape)
        if tuple(z.shape) != shape:
            raise ValueError(
                f"latents have shape {tuple(z.shape)}; for a {height}x{width} (H x W) image they must be the unpacked "
                f"noise {shape} (or {(1, 1, *shape[1:])})"
            )
        return z.astype(self.dtype)

    def denoise(self, x, cond, uncond, cfg_scale: float, schedule: Schedule, layouts, condition, use_kv_cache: bool):
        """Flow-match Euler from the packed target latents x (1, N_t, C): yields the latents after each step,
        unevaluated. cond / uncond are (embeds, layout) pairs' embeds; `condition` the condition pictures' latents
        or None. With `use_kv_cache` the first step prefills each prompt's cache, later steps decode from it."""
        model = self.transformer
        sigmas = schedule.model_sigmas(x.dtype)
        every = self.options.eval_every
        hook = (lambda i, h: mx.eval(h) if (i + 1) % every == 0 else None) if every else None
        passes = [(cond, layouts[0])] + ([(uncond, layouts[1])] if uncond is not None else [])
        batched = (
            len(passes) == 2
            and self.options.batched_cfg
            and cond.shape == uncond.shape
            and layouts[0].runs == layouts[1].runs
            and layouts[0].blocks == layouts[1].blocks
        )
        if batched:
            passes = [(mx.concatenate([cond, uncond]), layouts[0])]
        caches = [KVCache(len(model.transformer_blocks)) if use_kv_cache else None for _ in passes]
        for i in range(schedule.start, schedule.steps):
            sigma = sigmas[i : i + 1]
            velocities = []
            for (text, layout), cache in zip(passes, caches):
                B = text.shape[0]
                inputs = x if cache is not None and cache.filled else _joint(condition, x)
                v = model(mx.broadcast_to(inputs, (B, *inputs.shape[1:])), text, sigma, layout, cache, hook)
                velocities += [v[b : b + 1] for b in range(B)]
            v = velocities[0]
            if len(velocities) == 2:
                v = velocities[1] + cfg_scale * (v - velocities[1])  # 2.1's guidance has no norm rescale
            x = euler_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1])
            yield x

    def decode(self, latents: mx.array, height: int, width: int) -> Image.Image:
        """Packed latents (1, N, C) -> an RGBA PIL image (diffusers returns the VAE's four channels as RGBA)."""
        f = self.vae_factor
        z = latents.reshape(1, height // f, width // f, -1)  # one token per latent pixel, row-major
        return Image.fromarray(postprocess(self.vae.decode(z))[0])

    # ------------------------------------------------------------------ generation
    def _check_memory_at(self, height: int, width: int) -> None:
        plan = self.memory_plan
        if not self.options.check_memory or plan is None or plan.size == (height, width):
            return
        replace(
            plan, activations=activation_bytes(self.folder, self.dtype, height, width), size=(height, width)
        ).check()

    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        cfg_scale: float = 1.0,
        seed: int | None = None,
        latents=None,
        image=None,
        use_kv_cache: bool = True,
        *,
        sigmas=None,
        output_resolution: int = DEFAULT_RESOLUTION,
        callback=None,
        progress: bool = True,
        preview=None,
        preview_every: int = 1,
    ) -> Image.Image:
        """One RGBA image, as diffusers' QwenImage21Pipeline(prompt, image, negative_prompt, true_cfg_scale=cfg_scale,
        ...), whose defaults these are: no CFG (2.1 is meant to be sampled without), the author's sample_sigmas
        (`steps` for linspace(1, 1/steps, steps) instead, `sigmas` for your own), the KV cache on.

        `image`: condition pictures (PIL, uint8 arrays or paths; one or a list), resized to about
        output_resolution^2 pixels; the output size defaults to the last one's (else output_resolution square).
        `height` / `width` that are not multiples of 32 are rounded down to them, with a warning, as diffusers does.
        `latents`: the unpacked noise (1, C, H/16, W/16); otherwise drawn from `seed` (random when None).
        `callback(step, latents)` after each step with the packed latents; `preview(step, image)` after every
        `preview_every`-th step and the last with a cheap RGB guess of the final picture (a linear map of the
        latents fitted once per VAE, no decode). Ctrl-C stops after the current step with GenerationInterrupted."""
        if not _is_int(output_resolution) or output_resolution < 32:
            raise ValueError(f"output_resolution must be an integer number of pixels >= 32, got {output_resolution!r}")
        given, pictures = self.condition_pictures(image, output_resolution)
        if pictures:
            w, h = calculate_dimensions(output_resolution**2, given[-1].size[0] / given[-1].size[1])
            height, width = height or h, width or w
        height, width = height or output_resolution, width or output_resolution
        self._check_request(prompt, negative_prompt, height, width, steps, cfg_scale, seed, use_kv_cache)
        height, width = fit_size21(height, width)
        if preview is not None and not callable(preview):
            raise ValueError(f"preview must be a function (step, PIL image) or None, got {type(preview).__name__}")
        if not _is_int(preview_every) or preview_every < 1:
            raise ValueError(f"preview_every must be an integer >= 1 (steps between previews), got {preview_every!r}")
        if latents is None and seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        noise = self.initial_noise(height, width, seed, latents)
        self._check_memory_at(height, width)
        do_cfg = cfg_scale > 1 and negative_prompt is not None
        if use_kv_cache and not self.transformer_config.causal_condition:
            warnings.warn("this transformer has causal_condition=false: no KV cache (as in diffusers)", stacklevel=2)
            use_kv_cache = False
        f = self.vae_factor
        target = (height // f) * (width // f)
        schedule = self.schedule(steps, sigmas, target)
        stats = self.last_stats = GenerationStats(
            seed if latents is None else None, height, width, schedule.steps, do_cfg
        )
        shapes = [(1, p.size[1] // f, p.size[0] // f) for p in pictures] + [(1, height // f, width // f)]

        with MemoryLimit(self.options.memory_limit_gb) as limit, stats.running():
            cond, uncond = self.encode_prompts(prompt, negative_prompt if do_cfg else None, pictures, stats)
            with stats.stage("picture", "image_s"):
                condition = self.encode_pictures(pictures)
            with stats.stage("weights", "load_s"):
                materialize(self.transformer, "reading the transformer" if progress else None)
            limit.weights_loaded()
            slots = np.ones(target // TOKENS_PER_SLOT, bool)
            layouts = [self.transformer.layout(np.concatenate([e[1], slots]), shapes) for e in (cond, uncond) if e]
            x = noise.reshape(1, noise.shape[1], -1).transpose(0, 2, 1)  # (1, h*w, C): 2.1 packs no patches
            loop = self.denoise(
                x, cond[0], uncond[0] if uncond else None, cfg_scale, schedule, layouts, condition, use_kv_cache
            )
            with stats.stage("denoise"):
                x = self._run(loop, x, schedule, stats, callback, progress, preview, preview_every)
            with stats.stage("decode", "decode_s"):
                picture = self.decode(x, height, width)
        return picture

    __call__ = generate

    def _check_request(self, prompt, negative, height, width, steps, cfg_scale, seed, use_kv_cache) -> None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string (one image per call), got {type(prompt).__name__}")
        if negative is not None and not isinstance(negative, str):
            raise ValueError(f"negative_prompt must be a string or None, got {type(negative).__name__}")
        check_size(height, width, 1)
        for name, v in (("height", height), ("width", width)):
            if v < MULTIPLE:
                raise ValueError(
                    f"{name} {v} is not a multiple of {MULTIPLE} (the VAE's 16x times the 2x2 latent tokens of a "
                    f"text-encoder slot), and diffusers' rounding down would leave nothing: use {MULTIPLE} or more"
                )
        if steps is not None and (not _is_int(steps) or steps < 1):
            raise ValueError(f"steps must be an integer >= 1 or None (the author's schedule), got {steps!r}")
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not np.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
        if cfg_scale > 1 and negative is None and self.options.verbose:
            print("note: cfg_scale > 1 without a negative_prompt runs no guidance (as diffusers); give one, e.g. ' '")
        check_seed(seed)
        if not isinstance(use_kv_cache, bool):
            raise ValueError(f"use_kv_cache must be True or False, got {use_kv_cache!r}")

    @property
    def transformer_config(self) -> Transformer21Config:
        if self._transformer_config is None:
            self._transformer_config = self.transformer.config
        return self._transformer_config

    def _run(self, loop, x, schedule: Schedule, stats, callback, progress, preview=None, preview_every=1):
        """Drive the loop: evaluate once per step, time it, report, preview; Ctrl-C ends it after a step."""
        from tqdm.auto import tqdm

        from .preview import x0_guess

        steps, (height, width) = schedule.steps, (stats.height, stats.width)
        projection = preview_projection(self.vae) if preview is not None else None
        try:
            with tqdm(total=steps, desc="denoising", unit="step", disable=not progress) as bar:
                t = time.perf_counter()
                for i, x_next in enumerate(evaluated(loop, self.options.overlap_steps)):
                    x, before = x_next, x
                    stats.step_times_s.append(time.perf_counter() - t)
                    bar.update()
                    if callback is not None:
                        callback(i, x)
                    if preview is not None and ((i + 1) % preview_every == 0 or i == steps - 1):
                        s = schedule.sigmas
                        guess = x0_guess(before, x, float(s[i]), float(s[i + 1]))
                        f = self.vae_factor
                        small = Image.fromarray(projection.to_uint8(guess.reshape(height // f, width // f, -1)))
                        preview(i, small.resize((width, height), Image.BILINEAR))
                    t = time.perf_counter()  # the callbacks' own time is not the step's
        except KeyboardInterrupt:
            stats.interrupted_at = len(stats.step_times_s)
            raise GenerationInterrupted(stats.interrupted_at, steps, x, height, width) from None
        return x


def preview_projection(vae: AutoencoderKLQwenImage21):
    """qwen_nb.preview's latent -> RGB map for the 2.1 VAE (16x, RGBA): fitted once per VAE on the decodes of a few
    small latents (random, and encodings of opaque smooth colour fields), their RGB pooled 16x16."""
    from .preview import _CACHE, LatentProjection, pool, smooth_colour_fields, solve

    proj = getattr(vae, _CACHE, None)
    if proj is None:
        f, n, side = vae.config.scale_factor, 4, 8
        fields = smooth_colour_fields(n, side * f)
        opaque = np.concatenate([fields, np.ones((*fields.shape[:3], 1), np.float32)], axis=-1)
        noise = mx.random.normal((n, side, side, vae.config.z_dim), key=mx.random.key(0))
        z = mx.concatenate([noise, vae.encode(mx.array(opaque)).astype(mx.float32)])
        target = pool(vae.decode(z)[..., :3], f)
        z = np.asarray(z.astype(mx.float32))
        weight, bias = solve(z, target)
        residual = z.reshape(-1, z.shape[-1]) @ weight + bias - target.reshape(-1, 3)
        proj = LatentProjection(weight, bias, float(np.sqrt(np.mean(residual**2))))
        object.__setattr__(vae, _CACHE, proj)
    return proj


def _joint(condition: mx.array | None, x: mx.array) -> mx.array:
    return x if condition is None else mx.concatenate([condition.astype(x.dtype), x], axis=1)


def is_qwen21_folder(folder) -> bool:
    """Whether a pipeline folder's model_index.json names QwenImage21Pipeline."""
    path = Path(folder) / "model_index.json"
    try:
        return path.exists() and read_config(Path(folder), "model_index.json").get("_class_name") == CLASS_NAME
    except (ValueError, CheckpointError):
        return False


def is_qwen21(model, revision=None, cache_dir=None) -> bool:
    """Whether `model` (a folder or a hub id) is a Qwen-Image 2.1 pipeline: its model_index.json, from the folder,
    the Hugging Face cache or a download of that one small file, names QwenImage21Pipeline. False when it cannot
    be read (the caller's loader then reports why)."""
    from .hub import looks_like_repo_id

    s = str(model)
    path = Path(s).expanduser()
    if path.exists() or not looks_like_repo_id(s):
        return is_qwen21_folder(path)
    try:
        import huggingface_hub
        from huggingface_hub import constants

        index = huggingface_hub.try_to_load_from_cache(s, "model_index.json", cache_dir=cache_dir, revision=revision)
        if not isinstance(index, str):
            if constants.HF_HUB_OFFLINE:
                return False
            index = huggingface_hub.hf_hub_download(s, "model_index.json", revision=revision, cache_dir=cache_dir)
        return is_qwen21_folder(Path(index).parent)
    except Exception:  # noqa: BLE001 - no network, no such repo: not for this function to report
        return False


__all__ = ["QwenImage21Pipeline", "calculate_dimensions", "is_qwen21", "is_qwen21_folder", "sigma_schedule"]
