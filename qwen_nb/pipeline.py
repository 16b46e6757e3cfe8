"""Prompt -> image: diffusers' `QwenImagePipeline` on the qwen_nb components.

`QwenImagePipeline.from_pretrained(hub id or folder)` finds the checkpoint (qwen_nb.hub), checks it is complete,
plans the memory (qwen_nb.memory) and reads the configs; the weights stay on disk until first used, and are
loaded lazily and strictly. `generate(prompt)` encodes the prompt (cached), draws or takes the noise
(1, 16, H/8, W/8), runs the flow-matching Euler loop with classifier-free guidance, decodes with the VAE and
returns a PIL image. On a machine where the text encoder and the transformer do not fit together, the text encoder
is freed before the transformer's weights are read (and the other way round when a new prompt needs encoding).
"""

import gc
import json
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .hub import KEEP, component_weight_files, resolve
from .loading import load_strict, read_config, read_weights
from .memory import MemoryPlan, activation_bytes, plan_memory
from .quantize import GROUP_SIZE, MODULATION_BITS, QuantizationReport, check_bits, quantize_transformer
from .scheduler import FlowMatchEulerScheduler, SchedulerConfig, cfg_combine, pack_latents, unpack_latents
from .switches import Switches
from .text_encoder import DROP_IDX, MAX_TOKENS, PROMPT_TEMPLATE, QwenTextEncoder, TextEncoderConfig, encode_prompt
from .tokenizer import QwenTokenizer
from .transformer import QwenImageTransformer, TransformerConfig, step_modulations
from .vae import load_vae, postprocess

# The model card's recommended sizes, (width, height).
ASPECTS = {
    "1:1": (1328, 1328),
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}
MULTIPLE = 16  # VAE factor 8 x 2x2 patches
LATENT_CHANNELS = 16
DTYPES = {"bfloat16": mx.bfloat16, "float32": mx.float32}


class GenerationInterrupted(KeyboardInterrupt):
    """A generation stopped by Ctrl-C (or a callback raising KeyboardInterrupt); the pipeline stays usable.
    `latents` holds the packed latents after the last finished step (`pipe.decode(...)` shows them)."""

    def __init__(self, step: int, steps: int, latents=None, height: int = 0, width: int = 0):
        self.step, self.steps, self.latents, self.height, self.width = step, steps, latents, height, width
        super().__init__(
            f"generation stopped after step {step} of {steps}; the pipeline is ready for the next call "
            f"(the latents so far are in .latents: pipe.decode(e.latents, {height}, {width}) shows them)"
        )


@dataclass
class GenerationStats:
    """Timings (seconds) and peak memory (GB) of one generate() call."""

    seed: int | None
    height: int
    width: int
    steps: int
    cfg: bool
    text_s: float = 0.0
    load_s: float = 0.0
    step_times_s: list = field(default_factory=list)
    decode_s: float = 0.0
    total_s: float = 0.0
    peak_gb: float = 0.0
    stage_peaks_gb: dict = field(default_factory=dict)  # peak so far at the end of each stage
    interrupted_at: int | None = None

    @property
    def step_s(self) -> float:
        return float(np.mean(self.step_times_s)) if self.step_times_s else 0.0

    def __str__(self) -> str:
        done = len(self.step_times_s)
        what = f"{done}/{self.steps} steps (interrupted)" if self.interrupted_at is not None else f"{done} steps"
        return (
            f"{what} at {self.step_s:.3f} s/step{' with CFG' if self.cfg else ''}; total {self.total_s:.2f} s "
            f"(text {self.text_s:.2f} s, weights {self.load_s:.2f} s, decode {self.decode_s:.2f} s); "
            f"peak memory {self.peak_gb:.2f} GB"
        )


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _presets() -> str:
    return ", ".join(f"{k} {w}x{h}" for k, (w, h) in ASPECTS.items())


def check_size(height, width) -> None:
    """ValueError unless height and width are positive multiples of 16 (naming the nearest valid sizes)."""
    for name, v in (("height", height), ("width", width)):
        if not _is_int(v):
            raise ValueError(f"{name} must be an integer number of pixels, got {v!r}")
        if v <= 0:
            raise ValueError(f"{name} must be a positive multiple of {MULTIPLE}, got {v}")
        if v % MULTIPLE:
            lo, hi = v // MULTIPLE * MULTIPLE, (v // MULTIPLE + 1) * MULTIPLE
            near = f"{lo} or {hi}" if lo > 0 else f"{hi}"
            raise ValueError(
                f"{name} {v} is not a multiple of {MULTIPLE} (8x VAE and 2x2 patches): use {near}. "
                f"The model card's sizes (width x height): {_presets()}."
            )


class QwenImagePipeline:
    """Qwen-Image text-to-image: `from_pretrained(...)`, then `generate(prompt) -> PIL.Image`."""

    def __init__(
        self,
        tokenizer: QwenTokenizer,
        scheduler_config: SchedulerConfig | None = None,
        *,
        folder: Path | None = None,
        builders: dict | None = None,
        dtype: mx.Dtype = mx.bfloat16,
        quantize: int | None = None,
        plan: MemoryPlan | None = None,
        keep_text_encoder: bool = True,
        check_memory: bool = True,
        switches: Switches | None = None,
        max_sequence_length: int = 512,
        vae_tile: int | None = None,
        cache_size: int = 32,
        verbose: bool = True,
        eval_every: int | None = None,
        memory_limit_gb: float | str | None = "auto",
    ):
        """Use `from_pretrained` (a checkpoint) or `from_components` (models in memory)."""
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.folder = None if folder is None else Path(folder)
        self._builders = builders or {}
        self.dtype = dtype
        self.quantize = check_bits(quantize)
        self.memory_plan = plan
        self.keep_text_encoder = keep_text_encoder
        self.check_memory = check_memory
        self.switches = switches or Switches()
        self.max_sequence_length = max_sequence_length
        self.vae_tile = vae_tile
        self.verbose = verbose
        # mx.eval after every this many transformer blocks (None: once per step). On a GPU, MLX queues a whole
        # step's kernels ahead of the device, and buffers are freed only as the kernels finish: at 1024x1024 a
        # step holds ~9 GB of activations in flight; evaluating every few blocks bounds that, for some speed.
        if eval_every is not None and (not _is_int(eval_every) or eval_every < 1):
            raise ValueError(f"eval_every must be a number of blocks >= 1, or None; got {eval_every!r}")
        self.eval_every = eval_every
        # mx.set_memory_limit while generating: GB, "auto" (the weights held once loaded + AUTO_LIMIT_MARGIN) or
        # None (MLX's default). On an H200 at 1024x1024, 29 GB kept the whole generation at 29.5 GB instead of
        # 37 GB, and no slower (assets/bench/pipeline_h200_memory_limit29.json).
        ok = memory_limit_gb in (None, "auto") or (
            isinstance(memory_limit_gb, (int, float)) and not isinstance(memory_limit_gb, bool) and memory_limit_gb > 0
        )
        if not ok:
            raise ValueError(
                f"memory_limit_gb must be a positive number of GB, 'auto' or None; got {memory_limit_gb!r}"
            )
        self.memory_limit_gb = memory_limit_gb
        self.quantization: QuantizationReport | None = None
        self.last_stats: GenerationStats | None = None
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self._transformer = None
        self._text_encoder = None
        self._vae = None
        self._schedule: tuple | None = None  # (key, modulations of every step) of the last schedule
        self._rebuildable = False  # from_components got a function that builds the transformer again

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_folder,
        dtype: mx.Dtype = mx.bfloat16,
        quantize: int | None = None,
        *,
        keep_text_encoder: bool | None = None,
        check_memory: bool = True,
        revision: str | None = None,
        cache_dir=None,
        switches: Switches | None = None,
        max_sequence_length: int = 512,
        vae_tile: int | None = None,
        plan_size: tuple[int, int] = (1024, 1024),
        verbose: bool = True,
        eval_every: int | None = None,
        memory_limit_gb: float | str | None = "auto",
    ) -> "QwenImagePipeline":
        """A pipeline from a hub id (downloaded into the HF cache, only the needed files) or a diffusers folder.

        `dtype`: bfloat16 (the checkpoint's) or float32. `quantize`: None, 8 or 4 (the transformer's linears;
        modulation layers at 8 bits). `keep_text_encoder`: None lets the memory plan decide, True keeps it
        resident, False frees it after each encoding. `check_memory=False` skips the refusal when the plan does
        not fit; `plan_size` (height, width) is the image size the plan is made for (generate() checks again
        at other sizes). `eval_every`: evaluate every so many transformer blocks, and `memory_limit_gb`: let MLX wait for
        queued work past this many GB (both bound the memory in flight on a GPU). Nothing heavy is read here: weights load lazily on first use."""
        bits = check_bits(quantize)
        if dtype not in DTYPES.values():
            raise ValueError(
                f"dtype must be mx.bfloat16 (the checkpoint's) or mx.float32, got {dtype}: float16 overflows in "
                "Qwen-Image's activations"
            )
        if not (_is_int(max_sequence_length) and 1 <= max_sequence_length <= MAX_TOKENS):
            raise ValueError(f"max_sequence_length must be an integer in 1..{MAX_TOKENS}, got {max_sequence_length}")
        folder = resolve(repo_id_or_folder, revision=revision, cache_dir=cache_dir, verbose=verbose)
        stored = read_config(folder / "transformer").get("quantization")
        if stored and bits not in (None, stored["bits"]):
            raise ValueError(
                f"{folder} holds a {stored['bits']}-bit transformer: load it with quantize=None (or "
                f"{stored['bits']}); to change the bits, quantize the original checkpoint"
            )
        h, w = plan_size
        plan = plan_memory(folder, dtype, bits, keep_text_encoder, height=h, width=w)
        if check_memory and not plan.fits:
            alternatives = {b: plan_memory(folder, dtype, b, None, h, w, budget=plan.budget) for b in (8, 4)}
            plan.check(alternatives)
        if verbose:
            print(plan)
        return cls(
            QwenTokenizer.from_pretrained(folder / "tokenizer"),
            SchedulerConfig.from_file(folder / "scheduler" / "scheduler_config.json"),
            folder=folder,
            dtype=dtype,
            quantize=stored["bits"] if stored else bits,
            plan=plan,
            keep_text_encoder=plan.keep_text_encoder,
            check_memory=check_memory,
            switches=switches,
            max_sequence_length=max_sequence_length,
            vae_tile=vae_tile,
            verbose=verbose,
            eval_every=eval_every,
            memory_limit_gb=memory_limit_gb,
        )

    @classmethod
    def from_components(
        cls,
        tokenizer: QwenTokenizer,
        transformer,
        text_encoder,
        vae,
        scheduler_config: SchedulerConfig | None = None,
        *,
        dtype: mx.Dtype = mx.bfloat16,
        quantize: int | None = None,
        keep_text_encoder: bool = True,
        **options,
    ) -> "QwenImagePipeline":
        """A pipeline from models in memory (tests, benchmarks, notebooks). `transformer`, `text_encoder` and
        `vae` are modules, or zero-argument functions that build one: with functions the pipeline can free a
        model and build it again, so keep_text_encoder=False sequences them as it does a checkpoint's."""
        builders = {
            name: (m if callable(m) and not isinstance(m, nn.Module) else (lambda m=m: m))
            for name, m in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae))
        }
        pipe = cls(
            tokenizer,
            scheduler_config,
            builders=builders,
            dtype=dtype,
            quantize=quantize,
            keep_text_encoder=keep_text_encoder,
            check_memory=False,
            **options,
        )
        pipe._rebuildable = callable(transformer) and not isinstance(transformer, nn.Module)
        return pipe

    def load_transformer(self) -> QwenImageTransformer:
        """The transformer, built and loaded lazily (and quantized, still lazily): nothing is read yet."""
        if self.folder is None:
            model = self._builders["transformer"]()
            if self.quantize and not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
                self.quantization = quantize_transformer(model, self.quantize)
            if self.switches.fused_qkv:
                model.fuse_projections()
            return model
        folder = self.folder / "transformer"
        raw = read_config(folder)
        model = QwenImageTransformer(TransformerConfig.from_dict(raw), self.switches)
        stored = raw.get("quantization")
        if stored:  # a folder written by save_pretrained: the structure first, then its quantized tensors
            self.quantization = quantize_transformer(
                model,
                stored["bits"],
                stored.get("group_size", GROUP_SIZE),
                stored.get("modulation_bits", MODULATION_BITS),
            )
        load_strict(model, read_weights(folder, self.dtype), "transformer")
        if self.quantize and not stored:
            self.quantization = quantize_transformer(model, self.quantize)
        if self.switches.fused_qkv:
            model.fuse_projections()  # after loading, which is strict on the checkpoint's separate names
        if self.quantization and self.quantization.skipped and self.verbose:
            print(
                f"note: {len(self.quantization.skipped)} linear(s) kept in full precision (input width not a "
                f"multiple of {self.quantization.group_size}): {', '.join(self.quantization.skipped[:6])}"
            )
        return model

    def load_text_encoder(self) -> QwenTextEncoder:
        """The text encoder's language model (no vision tower, no lm_head, whose shards need not exist), lazily."""
        if self.folder is None:
            return self._builders["text_encoder"]()
        folder = self.folder / "text_encoder"
        model = QwenTextEncoder(TextEncoderConfig.from_dict(read_config(folder)), self.switches)
        weights = QwenTextEncoder.sanitize(read_weights(folder, self.dtype, keep=KEEP["text_encoder"]))
        load_strict(model, weights, "Qwen2.5-VL text encoder")
        return model

    @property
    def transformer(self) -> QwenImageTransformer:
        if self._transformer is None:
            self._transformer = self.load_transformer()
        return self._transformer

    def load_vae(self):
        if self.folder is None:
            return self._builders["vae"]()
        return load_vae(self.folder / "vae", self.dtype)

    @property
    def vae(self):
        if self._vae is None:
            self._vae = self.load_vae()
        return self._vae

    @property
    def text_encoder(self) -> QwenTextEncoder:
        if self._text_encoder is None:
            self._text_encoder = self.load_text_encoder()
        return self._text_encoder

    def _release(self, name: str) -> None:
        if getattr(self, name) is not None:
            setattr(self, name, None)
            gc.collect()
            mx.clear_cache()

    def materialize_transformer(self, progress: bool = False) -> None:
        """Read (and quantize) the transformer's weights now, block by block so the peak stays near their size."""
        materialize(self.transformer, "reading the transformer" if progress else None)

    # ------------------------------------------------------------------ modulation over a schedule
    def _can_release_modulation(self) -> bool:
        """The modulation weights may be dropped when they can be read again: from the checkpoint, or from a
        builder function. Quantized transformers keep theirs (8-bit): putting them back would mean quantizing them
        again, or reading a saved quantized checkpoint's packed tensors, which `restore_modulation` does not do."""
        return (
            self.switches.schedule_modulation and not self.quantize and (self.folder is not None or self._rebuildable)
        )

    def _restore_modulation(self, model: QwenImageTransformer) -> None:
        names = model.modulation_names()
        if self.folder is not None:
            wanted = set(names)
            weights = read_weights(self.folder / "transformer", self.dtype, keep=wanted.__contains__)
        else:
            fresh = dict(tree_flatten(self._builders["transformer"]().parameters()))
            weights = {k: fresh[k] for k in names}
        model.restore_modulation(weights)

    def schedule_modulations(self, timesteps):
        """Every step's modulation (shift/scale/gate of every block, and the output norm's) for one schedule,
        computed up front in one batch of sigmas, block by block; then, when they can be read again, the
        modulation weights are released, so they are never resident with the rest of the transformer. The last
        schedule is kept: the next generation with the same steps and size costs nothing here."""
        key = (tuple(float(t) for t in timesteps), str(self.dtype))
        model = self.transformer
        release = self._can_release_modulation()
        if self._schedule is not None and self._schedule[0] == key:
            if release and not model.modulation_released:
                model.release_modulation()  # a transformer built again (sequenced): its weights were never read
            return self._schedule[1]
        self._schedule = None
        if model.modulation_released:
            self._restore_modulation(model)
        temb = model.time_text_embed(model_sigmas(timesteps, self.dtype), self.dtype)
        mx.eval(temb)
        blocks = []
        for i, block in enumerate(model.transformer_blocks):
            mods = block.modulation(temb)
            mx.eval(mods)  # reads this block's modulation weights only
            blocks.append(mods)
            if release:
                model.release_modulation([i])
        out = model.norm_out.modulation(temb)
        mx.eval(out)
        if release:
            model.release_modulation()
            gc.collect()
            mx.clear_cache()
        self._schedule = (key, (blocks, out))
        return self._schedule[1]

    # ------------------------------------------------------------------ text
    def _key(self, text: str):
        return (text, self.max_sequence_length)

    def _check_length(self, text: str) -> None:
        n = len(self.tokenizer.encode(PROMPT_TEMPLATE.format(text))) - DROP_IDX
        if n > MAX_TOKENS:
            raise ValueError(
                f"the prompt is {n} tokens long (with the template's 5-token tail), more than the {MAX_TOKENS} the "
                f"text encoder takes: shorten it. It starts {text[:60]!r}"
            )
        if n > self.max_sequence_length and self.verbose:
            print(
                f"note: the prompt is {n} tokens; only the first {self.max_sequence_length} are used "
                "(max_sequence_length, as in diffusers)"
            )

    def encode(self, text: str):
        """(embeds (1, L, hidden), mask (1, L) or None) of one prompt, as diffusers' encode_prompt gives them
        (an all-ones mask becomes None). Cached by text, so a (prompt, negative prompt) pair seen before costs
        nothing and needs no text encoder."""
        key = self._key(text)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        self._check_length(text)
        if self._text_encoder is None and not self.keep_text_encoder:
            self._release("_transformer")  # sequenced: the two large models are never resident together
        embeds, mask = encode_prompt(self.tokenizer, self.text_encoder, text, self.max_sequence_length)
        mx.eval(embeds, mask)
        value = (embeds, None if bool(mx.all(mask == 1)) else mask)
        self._cache[key] = value
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return value

    def encode_prompts(
        self,
        prompt: str,
        negative_prompt: str | None,
        stats: "GenerationStats | None" = None,
        progress: bool = False,
    ):
        """(cond, uncond) embeddings; uncond is None without a negative prompt. Frees the text encoder afterwards
        when the pipeline runs sequenced. Both prompts are checked before the text encoder is loaded."""
        texts = [prompt] if negative_prompt is None else [prompt, negative_prompt]
        missing = [t for t in texts if self._key(t) not in self._cache]
        for t in missing:
            self._check_length(t)
        if missing:
            if self._text_encoder is None and not self.keep_text_encoder:
                self._release("_transformer")
            start = time.perf_counter()
            materialize(self.text_encoder, "reading the text encoder" if progress else None)
            if stats is not None:
                stats.load_s += time.perf_counter() - start
        start = time.perf_counter()
        cond = self.encode(prompt)
        uncond = self.encode(negative_prompt) if negative_prompt is not None else None
        if stats is not None:
            stats.text_s = time.perf_counter() - start
            stats.stage_peaks_gb["text"] = mx.get_peak_memory() / 1e9
        if not self.keep_text_encoder:
            self._release("_text_encoder")
        return cond, uncond

    # ------------------------------------------------------------------ sampling
    def initial_noise(self, height: int, width: int, seed: int | None = None, latents=None) -> mx.array:
        """The unpacked noise (1, 16, H/8, W/8) in the pipeline's dtype: `latents` checked, or drawn from `seed`."""
        shape = (1, LATENT_CHANNELS, height // 8, width // 8)
        if latents is None:
            return mx.random.normal(shape, key=mx.random.key(seed)).astype(self.dtype)
        z = mx.array(latents) if not isinstance(latents, mx.array) else latents
        if tuple(z.shape) == (1, 1, *shape[1:]):  # diffusers' (B, 1, C, h, w) before packing
            z = z.reshape(shape)
        if tuple(z.shape) != shape:
            raise ValueError(
                f"latents have shape {tuple(z.shape)}; for a {height}x{width} (H x W) image they must be {shape} "
                f"(or {(1, 1, *shape[1:])}, as diffusers draws them before packing)"
            )
        return z.astype(self.dtype)

    def timesteps(self, steps: int, grid: tuple[int, int]) -> list:
        return FlowMatchEulerScheduler(self.scheduler_config).set_timesteps(steps, grid[0] * grid[1])

    def denoise(self, latents: mx.array, cond, uncond, cfg_scale: float, steps: int, grid: tuple[int, int]):
        """The sampling loop as a generator: yields the packed latents (1, N, 64) after each step, unevaluated.

        With the `batched_cfg` switch the conditional and unconditional passes are one batch of two when their
        texts have one length (otherwise two passes: see below); with `schedule_modulation` every step's modulation is computed before the loop."""
        scheduler = FlowMatchEulerScheduler(self.scheduler_config)
        timesteps = scheduler.set_timesteps(steps, grid[0] * grid[1])
        model = self.transformer
        table = self.schedule_modulations(timesteps) if self.switches.schedule_modulation else None
        if table is None and model.modulation_released:
            self._restore_modulation(model)
        # One batch of two only when the two texts need no padding: a padded-text mask takes attention off MLX's
        # fused kernel (1024x1024 on an H200: 0.73 s per step and 18 GB more, against 0.32 s as two passes).
        batched = uncond is not None and self.switches.batched_cfg
        batched = batched and cond[0].shape == uncond[0].shape and cond[1] is None and uncond[1] is None
        if batched:
            text, mask = batch_texts(cond, uncond)
        hook = None
        if self.eval_every:
            k = self.eval_every

            def hook(i, img, txt):
                if (i + 1) % k == 0:
                    mx.eval(img, txt)

        sigmas = model_sigmas(timesteps, latents.dtype)
        x = latents
        for i in range(len(timesteps)):
            sigma = sigmas[i : i + 1]
            mods = None if table is None else step_modulations(table, i)
            if batched:
                v = model(mx.concatenate([x, x]), text, sigma, grid, mask, mods=mods, block_hook=hook)
                v = cfg_combine(v[:1], v[1:], cfg_scale)
            else:
                v = model(x, cond[0], sigma, grid, cond[1], mods=mods, block_hook=hook)
                if uncond is not None:
                    v_uncond = model(x, uncond[0], sigma, grid, uncond[1], mods=mods, block_hook=hook)
                    v = cfg_combine(v, v_uncond, cfg_scale)
            x = scheduler.step(v, i, x)
            yield x

    def decode(self, latents: mx.array, height: int, width: int):
        """Packed latents (1, N, 64) -> PIL image."""
        from PIL import Image

        z = unpack_latents(latents, (height // MULTIPLE, width // MULTIPLE))  # (1, 16, H/8, W/8)
        images = self.vae.decode(z.transpose(0, 2, 3, 1), tile=self.vae_tile)  # (1, H, W, 3)
        return Image.fromarray(postprocess(images)[0])

    def _check_memory_at(self, height: int, width: int) -> None:
        plan = self.memory_plan
        if not self.check_memory or plan is None or plan.size == (height, width):
            return
        act = activation_bytes(self.folder, self.dtype, height, width)
        replace(plan, activations=act, size=(height, width)).check()

    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = " ",
        height: int = 1024,
        width: int = 1024,
        steps: int = 20,
        cfg_scale: float = 4.0,
        seed: int | None = None,
        latents=None,
        callback=None,
        progress: bool = True,
        preview=None,
        preview_every: int = 1,
    ):
        """One image, as diffusers' QwenImagePipeline(prompt, negative_prompt, true_cfg_scale=cfg_scale, ...).

        CFG runs when cfg_scale > 1 and negative_prompt is not None (" " is the model card's "no negative
        prompt"). `latents` is the noise (1, 16, H/8, W/8) before packing; otherwise it is drawn from `seed`
        (random when None; the seed used is in `last_stats`). `callback(step, latents)` is called after each
        step with the packed latents. `preview(step, image)`, when given, is called after every `preview_every`-th
        step (steps count from 0: after steps preview_every - 1, 2 preview_every - 1, ...) and after the last, with
        a PIL image of the model's current guess of the final picture (qwen_nb.preview: a linear latent-to-RGB map
        fitted once per VAE; no decode). Ctrl-C, or KeyboardInterrupt raised in `callback` or `preview`, stops at
        the end of the current step with GenerationInterrupted."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string (one image per call), got {type(prompt).__name__}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
        check_size(height, width)
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not np.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
        if cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (4.0 is the model card's; <= 1 turns CFG off), got {cfg_scale}")
        if seed is not None and not _is_int(seed):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        if preview is not None and not callable(preview):
            raise ValueError(f"preview must be a function (step, PIL image) or None, got {type(preview).__name__}")
        if not _is_int(preview_every) or preview_every < 1:
            raise ValueError(f"preview_every must be an integer >= 1 (steps between previews), got {preview_every!r}")
        if latents is None and seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        noise = self.initial_noise(height, width, seed, latents)
        self._check_memory_at(height, width)

        # MLX queues kernels ahead of the device and frees buffers as they finish; a limit makes it wait instead
        fixed = self.memory_limit_gb not in (None, "auto")
        previous = mx.set_memory_limit(int(self.memory_limit_gb * 1e9)) if fixed else None
        try:
            do_cfg = cfg_scale > 1 and negative_prompt is not None
            stats = GenerationStats(seed if latents is None else None, height, width, steps, do_cfg)
            self.last_stats = stats
            gc.collect()
            mx.reset_peak_memory()
            start = time.perf_counter()

            cond, uncond = self.encode_prompts(prompt, negative_prompt if do_cfg else None, stats, progress)

            grid = (height // MULTIPLE, width // MULTIPLE)
            t = time.perf_counter()
            if self.switches.schedule_modulation:  # before the rest is read: the modulation weights are then released
                self.schedule_modulations(self.timesteps(steps, grid))
            self.materialize_transformer(progress)
            stats.load_s += time.perf_counter() - t
            stats.stage_peaks_gb["weights"] = mx.get_peak_memory() / 1e9
            if self.memory_limit_gb == "auto":  # what is held now, and room for a step's work
                held = mx.get_active_memory()
                previous = mx.set_memory_limit(int(held + AUTO_LIMIT_MARGIN))

            x = pack_latents(noise)
            if preview is not None:
                from . import preview as previews
                from .scheduler import flow_match_sigmas

                projection = previews.projection_for(self.vae)  # fitted once per VAE, from a few small decodes
                sigmas = flow_match_sigmas(steps, grid[0] * grid[1], self.scheduler_config)
            try:
                from tqdm.auto import tqdm

                with tqdm(total=steps, desc="denoising", unit="step", disable=not progress) as bar:
                    t = time.perf_counter()
                    for i, x_next in enumerate(self.denoise(x, cond, uncond, cfg_scale, steps, grid)):
                        mx.eval(x_next)
                        x, before = x_next, x
                        stats.step_times_s.append(time.perf_counter() - t)
                        bar.update()
                        if callback is not None:
                            callback(i, x)
                        if preview is not None and ((i + 1) % preview_every == 0 or i == steps - 1):
                            guess = previews.x0_guess(before, x, float(sigmas[i]), float(sigmas[i + 1]))
                            preview(i, previews.preview(projection, guess, height, width))
                        t = time.perf_counter()  # the callbacks' own time is not the step's
            except KeyboardInterrupt:
                stats.interrupted_at = len(stats.step_times_s)
                stats.total_s = time.perf_counter() - start
                stats.peak_gb = mx.get_peak_memory() / 1e9
                raise GenerationInterrupted(stats.interrupted_at, steps, x, height, width) from None

            stats.stage_peaks_gb["denoise"] = mx.get_peak_memory() / 1e9
            t = time.perf_counter()
            image = self.decode(x, height, width)
            stats.decode_s = time.perf_counter() - t
            stats.stage_peaks_gb["decode"] = mx.get_peak_memory() / 1e9
            stats.total_s = time.perf_counter() - start
            stats.peak_gb = mx.get_peak_memory() / 1e9
            return image
        finally:
            if previous is not None:
                mx.set_memory_limit(previous)

    __call__ = generate

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, folder, overwrite: bool = False, max_shard_size: int = 5_000_000_000) -> Path:
        """Write a pipeline folder that `from_pretrained` loads without the original download: the transformer
        as held (quantized included, marked in transformer/config.json), the other components copied.
        Refuses a non-empty folder unless `overwrite=True` (then files of the same names are replaced)."""
        out = Path(folder).expanduser()
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} is a file: give a folder to save the pipeline into")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{out} is not empty; nothing was written. Give a new or empty folder, or pass overwrite=True to "
                "write into it (files of the same names are replaced)."
            )
        src = self.folder.resolve()
        if out.resolve() == src or src in out.resolve().parents or out.resolve() in src.parents:
            raise ValueError(f"cannot save into {out}: it overlaps the folder the pipeline reads from ({src})")
        out.mkdir(parents=True, exist_ok=True)

        _copy(self.folder / "model_index.json", out / "model_index.json")
        for c in ("tokenizer", "scheduler"):
            for f in sorted((self.folder / c).iterdir()):
                if f.is_file():
                    _copy(f, out / c / f.name)
        for c in ("vae", "text_encoder"):
            for f in sorted((self.folder / c).iterdir()):
                if f.is_file() and not f.name.endswith(".safetensors"):
                    _copy(f, out / c / f.name)
            for f in component_weight_files(self.folder, c):
                _copy(f, out / c / f.name)

        tdir = out / "transformer"
        tdir.mkdir(parents=True, exist_ok=True)
        config = read_config(self.folder / "transformer")
        config.pop("quantization", None)
        if self.quantize:
            self.transformer  # noqa: B018 (built so that self.quantization is known)
            config["quantization"] = self.quantization.to_config()
        (tdir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        model = self.transformer
        if model.modulation_released:
            self._restore_modulation(model)
            self._schedule = None
        _save_sharded(model.diffusers_weights(), tdir, max_shard_size)
        return out


def model_sigmas(timesteps, dtype: mx.Dtype) -> mx.array:
    """The sigmas the transformer sees, (S,): diffusers passes timestep = t.to(latents.dtype) / 1000, so sigma is
    rounded through 1000*sigma in the dtype (bfloat16: 989.70 -> 988)."""
    return mx.array([float(t) for t in timesteps], dtype=mx.float32).astype(dtype) / 1000


# "auto" memory limit: the bytes held once the weights are in, plus this. MLX may go past a limit (it is a
# guideline), but first waits for queued work to finish and free its buffers. A 1024x1024 step needs well under a
# gigabyte at a time; what goes past it on a GPU is work queued ahead (on an H200 a limit 0.6 GB above the weights
# cost nothing in speed).
AUTO_LIMIT_MARGIN = 2e9


def batch_texts(cond, uncond):
    """Two (embeds (1, L, D), mask or None) as one batch (2, L, D) with a (2, L) mask: the shorter padded with
    zeros that the mask hides (None when both are full and of one length)."""
    (a, ma), (b, mb) = cond, uncond
    L = max(a.shape[1], b.shape[1])
    if a.shape[1] == b.shape[1] and ma is None and mb is None:
        return mx.concatenate([a, b]), None

    def pad(e, m):
        n = e.shape[1]
        m = mx.ones((1, n), mx.int32) if m is None else m.astype(mx.int32)
        if n < L:
            e = mx.concatenate([e, mx.zeros((1, L - n, e.shape[2]), e.dtype)], axis=1)
            m = mx.concatenate([m, mx.zeros((1, L - n), mx.int32)], axis=1)
        return e, m

    (a, ma), (b, mb) = pad(a, ma), pad(b, mb)
    return mx.concatenate([a, b]), mx.concatenate([ma, mb])


def materialize(module, desc: str | None = None) -> None:
    """Evaluate a module's parameters group by group (each numbered block separately), so reading or quantizing
    lazily loaded weights never holds more than one block's sources at a time. With `desc`, a progress bar when
    there is more than a gigabyte to read."""
    groups = {}
    for name, v in tree_flatten(module.parameters()):
        parts = name.split(".")
        key = next((".".join(parts[: i + 1]) for i, p in enumerate(parts) if p.isdigit()), parts[0])
        groups.setdefault(key, []).append(v)
    total = sum(v.nbytes for arrays in groups.values() for v in arrays)
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=desc is None or total < 1e9) as bar:
        for arrays in groups.values():
            mx.eval(arrays)
            bar.update(sum(v.nbytes for v in arrays))


def _copy(src: Path, dst: Path) -> None:
    """Copy a file (a hard link when possible: the hub cache's blobs are large), following the cache's symlinks."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    real = Path(src).resolve()
    try:
        os.link(real, dst)
    except OSError:
        shutil.copyfile(real, dst)


def _save_sharded(weights: dict, folder: Path, max_shard_size: int, name: str = "diffusion_pytorch_model") -> None:
    """safetensors shards of at most max_shard_size bytes (a single file when it fits), with diffusers' index."""
    shards, current, size = [], {}, 0
    for k in sorted(weights):
        nbytes = weights[k].nbytes
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[k] = weights[k]
        size += nbytes
    shards.append(current)
    for old in list(folder.glob(f"{name}*.safetensors")) + list(folder.glob(f"{name}*.index.json")):
        old.unlink()
    if len(shards) == 1:
        mx.save_safetensors(str(folder / f"{name}.safetensors"), shards[0], metadata={"format": "mlx"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"{name}-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / fname), shard, metadata={"format": "mlx"})
        weight_map.update({k: fname for k in shard})
        total += sum(v.nbytes for v in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{name}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


__all__ = ["ASPECTS", "GenerationInterrupted", "GenerationStats", "QwenImagePipeline", "check_size"]
