"""Prompt -> image: diffusers' `QwenImagePipeline` on the qwen_nb components.

`QwenImagePipeline.from_pretrained(hub id or folder)` finds the checkpoint (qwen_nb.hub), checks it is complete,
plans the memory (qwen_nb.memory) and reads the configs; every size (latent channels, the VAE's factor, the patch
size, the native picture size) comes from them. The models load lazily on first use, each with its own loader, held
in a `ComponentStore`. `generate(prompt)` checks the request, encodes the prompt (cached), computes the schedule once
and, from it, every step's modulation (the weights that depend on sigma alone are then never resident), runs the
sampling loop of `qwen_nb.sampling` under the memory limit, decodes and returns a PIL image. On a machine where the
text encoder and the transformer do not fit together, one is freed before the other is read. With a picture
(`generate(prompt, image=..., strength=...)`, and `mask_image=`) it is diffusers' QwenImageImg2ImgPipeline (and
QwenImageInpaintPipeline): the loop starts from the noised picture (qwen_nb.image_input) at a later step.
"""

import hashlib
import inspect
import json
import os
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import image_input
from .checkpoint import save_pipeline
from .components import ComponentStore, as_builder
from .hub import resolve
from .loading import read_config
from .lora import LoraMethods, LoraStack
from .memory import MemoryLimit, MemoryPlan, activation_bytes, check_memory_limit, plan_memory
from .quantize import check_bits
from .sampling import Schedule, check_strength, denoise, eval_every_blocks, evaluated
from .scheduler import SchedulerConfig, pack_latents, unpack_latents
from .switches import Switches
from .text_encoder import (
    MAX_TOKENS,
    QwenTextEncoder,
    TextEncoderConfig,
    encode_prompt,
    load_text_encoder,
    prompt_length,
)
from .tokenizer import QwenTokenizer
from .transformer import (
    QwenImageTransformer,
    TransformerConfig,
    load_modulation_table,
    load_transformer,
    modulation_table,
    prepare_transformer,
)
from .vae import VAEConfig, load_vae, postprocess

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
DEFAULT_SIZE = (1024, 1024)  # (height, width) for a checkpoint that does not say its native size
DEFAULT_SAMPLE_SIZE = 128  # diffusers' default_sample_size: latent pixels a side; the default side is this x the VAE's
DEFAULT_STEPS, DEFAULT_CFG = 20, 4.0
PACK = 2  # diffusers' pipelines pack the latents in 2x2 patches (vae_scale_factor * 2, in_channels // 4)

# lightx2v's step-distilled Qwen-Image (ModelTC/Qwen-Image-Lightning): a LoRA per step count, the schedule it was
# distilled with (exponential time shift with base_shift = max_shift = ln 3, no terminal stretch), and CFG off.
LIGHTNING_REPO = "lightx2v/Qwen-Image-Lightning"
LIGHTNING_FILES = {8: "Qwen-Image-Lightning-8steps-V2.0.safetensors", 4: "Qwen-Image-Lightning-4steps-V2.0.safetensors"}
LIGHTNING_SCHEDULER = {
    "base_shift": float(np.log(3)),
    "max_shift": float(np.log(3)),
    "shift_terminal": None,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}
DTYPES = {"bfloat16": mx.bfloat16, "float32": mx.float32}
MAX_SEED = 2**64 - 1


def default_dtype() -> mx.Dtype:
    """bfloat16 on a GPU (the checkpoint's); float32 on a CPU, where bfloat16 matmuls are far slower
    (assets/bench/blas_cpu.json)."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _presets() -> str:
    return ", ".join(f"{k} {w}x{h}" for k, (w, h) in ASPECTS.items())


def check_size(height, width, multiple: int = 16) -> None:
    """ValueError unless height and width are positive multiples of `multiple` (the VAE's factor times the patch
    size: 16 for Qwen-Image), naming the nearest valid sizes."""
    for name, v in (("height", height), ("width", width)):
        if not _is_int(v):
            raise ValueError(f"{name} must be an integer number of pixels, got {v!r}")
        if v <= 0:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {v}")
        if v % multiple:
            lo, hi = v // multiple * multiple, (v // multiple + 1) * multiple
            near = f"{lo} or {hi}" if lo > 0 else f"{hi}"
            raise ValueError(
                f"{name} {v} is not a multiple of {multiple} (the VAE's factor x the 2x2 patches): use {near}. "
                f"The model card's sizes (width x height): {_presets()}."
            )


def fit_size(height, width, multiple: int = 16) -> tuple[int, int]:
    """diffusers' rule for a requested size: each side rounded down to a multiple of `multiple` (the VAE's factor
    times the patch size), with a warning; a side that is not an integer or is below `multiple` is a ValueError
    (`check_size`'s, naming the nearest valid sizes). Returns (height, width) as generated."""
    if not all(_is_int(v) and v >= multiple for v in (height, width)):
        check_size(height, width, multiple)
    fitted = (height // multiple * multiple, width // multiple * multiple)
    if fitted != (height, width):
        warnings.warn(
            f"height and width must be multiples of {multiple} (the VAE's factor x the 2x2 patches): {width}x{height} "
            f"(width x height) is generated at {fitted[1]}x{fitted[0]}, rounded down as diffusers does. The model "
            f"card's sizes: {_presets()}.",
            stacklevel=3,
        )
    return fitted


def check_sigmas(sigmas) -> list | None:
    """None, or `sigmas` as a list of floats in (0, 1] (the terminal 0 left out), else a ValueError."""
    if sigmas is None:
        return None
    try:
        values = [float(s) for s in np.asarray(sigmas, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError):
        values = []
    if not values or not all(np.isfinite(values)) or not all(0 < s <= 1 for s in values):
        raise ValueError(
            f"sigmas must be a non-empty list of numbers in (0, 1] (the terminal 0 left out), got {sigmas!r}"
        )
    return values


def check_seed(seed) -> None:
    """ValueError unless `seed` is None or an integer in 0..2**64 - 1 (what mx.random.key takes)."""
    if seed is not None and not (_is_int(seed) and 0 <= seed <= MAX_SEED):
        raise ValueError(
            f"seed must be an integer from 0 to 2**64 - 1 ({MAX_SEED}), or None for a random one; got {seed!r}"
        )


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
    steps: int  # the steps run (img2img skips some)
    cfg: bool
    text_s: float = 0.0
    image_s: float = 0.0  # img2img / inpainting: the picture's encoding
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

    @contextmanager
    def running(self):
        """Around a whole generation: total time and peak memory, also when it is interrupted."""
        mx.reset_peak_memory()
        start = time.perf_counter()
        try:
            yield self
        finally:
            self.total_s = time.perf_counter() - start
            self.peak_gb = mx.get_peak_memory() / 1e9

    @contextmanager
    def stage(self, name: str, seconds: str | None = None):
        """Around one stage: its time added to the field `seconds`, the peak so far recorded under `name`."""
        start = time.perf_counter()
        yield
        if seconds:
            setattr(self, seconds, getattr(self, seconds) + time.perf_counter() - start)
        self.stage_peaks_gb[name] = mx.get_peak_memory() / 1e9

    def __str__(self) -> str:
        done = len(self.step_times_s)
        what = f"{done}/{self.steps} steps (interrupted)" if self.interrupted_at is not None else f"{done} steps"
        return (
            f"{what} at {self.step_s:.3f} s/step{' with CFG' if self.cfg else ''}; total {self.total_s:.2f} s "
            f"(text {self.text_s:.2f} s, {f'picture {self.image_s:.2f} s, ' if self.image_s else ''}"
            f"weights {self.load_s:.2f} s, decode {self.decode_s:.2f} s); "
            f"peak memory {self.peak_gb:.2f} GB"
        )


@dataclass
class PipelineOptions:
    """How a pipeline loads and runs its models; every field is a keyword of `from_pretrained`/`from_components`.

    dtype: bfloat16 (the checkpoint's) or float32; None picks float32 on a CPU, bfloat16 on a GPU.
    quantize: None, or 8 / 4 (...) bits for the transformer's linears (modulation layers at 8 bits).
    keep_text_encoder: True keeps it resident, False frees it after each encoding, None lets the memory plan decide.
    check_memory: refuse (naming what fits) when the memory plan does not fit.
    max_sequence_length: prompt tokens used, at most 1024 (diffusers' default 512).
    vae_tile: decode in tiles of this many latent pixels (bounds the decoder's memory; exact at the default overlap).
    eval_every: evaluate every so many transformer blocks (None: once per step); bounds a GPU's queued work.
    memory_limit_gb: MLX's memory limit while generating: GB, "auto" (the weights held + 2 GB) or None.
    batched_cfg: CFG's two passes as one batch of two when both texts have one length.
    overlap_steps: build and queue each step's graph while the step before runs on the device (`sampling.evaluated`).
    schedule_modulation: every step's modulation computed before the loop; the transformer then runs without its
        modulation weights (6.8B of 20.4B parameters), which are read block by block and never resident.
    lora_adapters: run LoRAs as low-rank matmuls beside the (quantized) linears instead of merging them into the
        weights before quantizing (merging is the default: no cost per step).
    variant: read the weight files of this variant (e.g. "fp16": `model.fp16.safetensors`) where a component has
        them, else its plain files, as diffusers' `variant=`; None: the plain files (or a folder's only variant).
    switches: the model's speed techniques (`Switches`)."""

    dtype: mx.Dtype | None = None
    quantize: int | None = None
    keep_text_encoder: bool | None = None
    check_memory: bool = True
    max_sequence_length: int = 512
    vae_tile: int | None = None
    cache_size: int = 32
    verbose: bool = True
    eval_every: int | None = None
    memory_limit_gb: float | str | None = "auto"
    batched_cfg: bool = True
    overlap_steps: bool = True
    schedule_modulation: bool = True
    lora_adapters: bool = False
    variant: str | None = None
    switches: Switches = field(default_factory=Switches)

    def __post_init__(self):
        if self.dtype is None:
            self.dtype = default_dtype()
        if self.dtype not in DTYPES.values():
            raise ValueError(
                f"dtype must be mx.bfloat16 (the checkpoint's) or mx.float32, got {self.dtype}: float16 overflows in "
                "Qwen-Image's activations"
            )
        self.quantize = check_bits(self.quantize)
        if not (_is_int(self.max_sequence_length) and 1 <= self.max_sequence_length <= MAX_TOKENS):
            raise ValueError(
                f"max_sequence_length must be an integer in 1..{MAX_TOKENS}, got {self.max_sequence_length}"
            )
        if self.eval_every is not None and (not _is_int(self.eval_every) or self.eval_every < 1):
            raise ValueError(f"eval_every must be a number of blocks >= 1, or None; got {self.eval_every!r}")
        if self.vae_tile is not None and (not _is_int(self.vae_tile) or self.vae_tile < 1):
            raise ValueError(f"vae_tile must be a number of latent pixels >= 1, or None; got {self.vae_tile!r}")
        check_memory_limit(self.memory_limit_gb)
        self.switches = self.switches or Switches()


@dataclass(frozen=True)
class Sizes:
    """The checkpoint's sizes that shape a generation: latent channels (the VAE's z_dim = the transformer's
    in_channels / patch_size**2), the VAE's spatial factor, the transformer's patch size, the native picture."""

    latent_channels: int = 16
    vae_factor: int = 8
    patch: int = 2
    native: tuple = DEFAULT_SIZE  # (height, width)
    native_declared: bool = False  # the checkpoint says it was trained at `native` only

    @classmethod
    def read(cls, transformer: TransformerConfig, vae: VAEConfig, native=None) -> "Sizes":
        """As diffusers' pipelines read them: the latents are packed in 2x2 patches whatever the transformer's
        patch_size (which only sizes its output layer: patch_size^2 x out_channels values a token), so the
        transformer takes in_channels = 4 x z_dim and must predict as many."""
        patch = PACK
        if transformer.in_channels != patch * patch * vae.z_dim:
            raise ValueError(
                f"the transformer takes {transformer.in_channels} channels = {patch}^2 patches x "
                f"{transformer.in_channels / patch**2:g} latent channels, but the VAE's z_dim is {vae.z_dim}: the two "
                "are not from one checkpoint"
            )
        predicted = transformer.patch_size**2 * transformer.out_channels
        if predicted != transformer.in_channels:
            raise ValueError(
                f"the transformer predicts {predicted} values a token (patch_size^2 {transformer.patch_size**2} x "
                f"out_channels {transformer.out_channels}) = {predicted / patch**2:g} latent channels, but the VAE's "
                f"z_dim is {vae.z_dim}: the two are not from one checkpoint"
            )
        side = DEFAULT_SAMPLE_SIZE * vae.scale_factor  # 1024 for the real VAE's 8
        size = (side, side) if native is None else tuple(int(v) for v in native)
        return cls(vae.z_dim, vae.scale_factor, patch, size, native is not None)

    @property
    def multiple(self) -> int:
        return self.vae_factor * self.patch

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.multiple, width // self.multiple

    def noise_shape(self, height: int, width: int) -> tuple:
        return (1, self.latent_channels, height // self.vae_factor, width // self.vae_factor)


def native_size(folder: Path):
    """(height, width) a checkpoint declares in model_index.json as `_native_size`, or None."""
    value = json.loads((folder / "model_index.json").read_text()).get("_native_size")
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value)):
        raise ValueError(f"{folder / 'model_index.json'}: _native_size must be [height, width], got {value!r}")
    return tuple(value)


class QwenImagePipeline(LoraMethods):
    """Qwen-Image text-to-image: `from_pretrained(...)`, then `generate(prompt) -> PIL.Image`."""

    reads_pictures = False  # the edit pipelines' (qwen_nb.edit): the text encoder's vision tower is read too
    # keep_text_encoder=None: resident where it fits; the edit pipelines sequence wherever that fits (their peak by
    # default: 30 GB instead of 91 GB on an H200, for 0.5 s of a 15.7 s edit: assets/bench/edit_pipeline_h200.json)
    sequenced_by_default = False

    def __init__(
        self,
        tokenizer: QwenTokenizer,
        scheduler_config: SchedulerConfig,
        store: ComponentStore,
        options: PipelineOptions,
        sizes: Sizes,
        *,
        folder: Path | None = None,
        plan: MemoryPlan | None = None,
        read_modulation=None,
    ):
        """Use `from_pretrained` (a checkpoint) or `from_components` (models in memory). `read_modulation(sigmas)`
        gives a schedule's ModulationTable without the denoising transformer (None: the transformer has its own)."""
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.components = store
        self.options = options
        self.sizes = sizes
        self.folder = folder
        self.memory_plan = plan
        self._read_modulation = read_modulation
        self.quantization = None  # the QuantizationReport, once the transformer is built quantized
        self.loras = LoraStack()  # the LoRAs loaded, each with its scale
        self.defaults = {"steps": DEFAULT_STEPS, "cfg_scale": DEFAULT_CFG}  # what generate() uses when not told
        self.last_stats: GenerationStats | None = None
        self._cache: OrderedDict = OrderedDict()
        self._table: tuple | None = None  # (key, ModulationTable) of the last schedule
        self._rebuildable = False  # from_components with a function that builds the transformer
        self._warned_size = False
        self.parallel = None  # a qwen_nb.distributed.Parallel when the pipeline runs over several ranks
        self.last_latents = None  # the packed latents (K, N, C) of the last generation's pictures

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_folder,
        dtype: mx.Dtype | None = None,
        quantize: int | None = None,
        *,
        scheduler_config: dict | None = None,
        revision: str | None = None,
        cache_dir=None,
        plan_size: tuple[int, int] | None = None,
        fast: int | None = None,
        parallel: str | None = None,
        **options,
    ) -> "QwenImagePipeline":
        """A pipeline from a hub id (downloaded into the HF cache, only the needed files) or a diffusers folder.

        `dtype`: None (float32 on a CPU, bfloat16 on a GPU), bfloat16 or float32. `quantize`: None, 8 or 4.
        `scheduler_config`: a dict of overrides merged into the checkpoint's scheduler config (e.g. a
        distilled schedule's shifts). `plan_size` (height, width): the size the memory plan is made for (default
        the checkpoint's native size; generate() checks again at other sizes). The other keywords are
        `PipelineOptions`. `fast=8` or `4`: `use_lightning(fast)` (the step-distilled LoRA, its schedule, CFG off).
        `parallel`: None, "cfg" or "tensor" to run over the ranks of `mx.distributed.init()` (started by
        `mlx.launch`; see qwen_nb.distributed). Nothing heavy is read here: weights load lazily on first use."""
        opts = PipelineOptions(dtype=dtype, quantize=quantize, **options)
        if parallel is not None:
            from .distributed import Parallel

            parallel = Parallel(parallel)
            opts.verbose = opts.verbose and parallel.is_main
            if parallel.mode == "tensor" and opts.lora_adapters:
                raise ValueError("parallel='tensor' merges LoRAs into each rank's part: use lora_adapters=False")
        vision = cls.reads_pictures
        if parallel is not None and parallel.mode == "tensor" and opts.variant is not None:
            raise ValueError("parallel='tensor' reads the plain weight files: leave variant=None")
        folder = resolve(repo_id_or_folder, revision, cache_dir, opts.verbose, vision, opts.variant)
        config = TransformerConfig.from_folder(folder / "transformer")
        sizes = Sizes.read(config, VAEConfig.from_folder(folder / "vae"), native_size(folder))
        stored = read_config(folder / "transformer").get("quantization")
        if stored and opts.quantize not in (None, stored["bits"]):
            raise ValueError(
                f"{folder} holds a {stored['bits']}-bit transformer: load it with quantize=None (or "
                f"{stored['bits']}); to change the bits, quantize the original checkpoint"
            )
        opts.quantize = stored["bits"] if stored else opts.quantize
        h, w = plan_size or sizes.native
        split = opts.schedule_modulation
        tensor = parallel is not None and parallel.mode == "tensor"
        if tensor:  # before anything is read: the rank count must divide every split
            parallel.check_split(config, TextEncoderConfig.from_folder(folder / "text_encoder"))
        # tensor mode: the plan counts one rank's part of the split models
        kinds = dict(
            schedule_modulation=split,
            vision=vision,
            tensor_ranks=parallel.size if tensor else 1,
            variant=opts.variant,
            prefer_sequenced=cls.sequenced_by_default,
        )
        plan = plan_memory(folder, opts.dtype, opts.quantize, opts.keep_text_encoder, h, w, **kinds)
        if parallel is not None:
            shared = repr(replace(opts, verbose=True))  # rank 0 alone is verbose
            parallel.agree("models or options", (read_config(folder / "transformer"), native_size(folder), shared))
        if opts.check_memory and not plan.fits:
            alternatives = {
                b: plan_memory(folder, opts.dtype, b, None, h, w, budget=plan.budget, **kinds) for b in (8, 4)
            }
            plan.check(alternatives)
        if opts.verbose:
            print(plan)
        opts.keep_text_encoder = plan.keep_text_encoder
        schedule = SchedulerConfig.from_file(folder / "scheduler" / "scheduler_config.json").merged(scheduler_config)

        pipe = None  # the transformer's loader records its quantization report on the pipeline

        def transformer():
            if tensor:
                loras = pipe.loras if len(pipe.loras) else None
                model, pipe.quantization, pipe.shard_reader = parallel.load_transformer(
                    folder / "transformer", opts.dtype, opts.quantize, opts.switches, not split, loras
                )
                return model
            adapters = opts.lora_adapters and len(pipe.loras) > 0
            model, pipe.quantization = load_transformer(
                folder / "transformer",
                opts.dtype,
                opts.quantize,
                opts.switches,
                modulation=not opts.schedule_modulation,
                adjust=pipe.loras.apply_to_weights if len(pipe.loras) and not adapters else None,
                variant=opts.variant,
            )
            if adapters:
                pipe.loras.forget()  # a new model: nothing of the last one to put back
                pipe.loras.attach(model)
            if pipe.quantization and pipe.quantization.skipped and opts.verbose:
                r = pipe.quantization
                print(
                    f"note: {len(r.skipped)} linear(s) kept in full precision (input width not a multiple of "
                    f"{r.group_size}): {', '.join(r.skipped[:6])}"
                )
            return model

        def read_modulation(sigmas):
            if tensor:  # each rank reads and computes its rows of the table
                loras = pipe.loras if len(pipe.loras) else None
                return parallel.load_modulation_table(folder / "transformer", sigmas, opts.dtype, opts.quantize, loras)
            adjust = pipe.loras.apply_to_weights if len(pipe.loras) else None
            return load_modulation_table(
                folder / "transformer", sigmas, opts.dtype, opts.quantize, adjust, variant=opts.variant
            )

        def text_encoder():
            if tensor:
                return parallel.load_text_encoder(folder / "text_encoder", opts.dtype, opts.switches)
            return load_text_encoder(folder / "text_encoder", opts.dtype, opts.switches, opts.variant)

        store = ComponentStore(
            {
                "transformer": transformer,
                "text_encoder": text_encoder,
                "vae": lambda: load_vae(folder / "vae", opts.dtype, variant=opts.variant),
            }
        )
        pipe = cls(
            QwenTokenizer.from_pretrained(folder / "tokenizer"),
            schedule,
            store,
            opts,
            sizes,
            folder=folder,
            plan=plan,
            read_modulation=read_modulation if opts.schedule_modulation else None,
        )
        pipe.parallel = parallel
        if fast is not None:
            pipe.use_lightning(fast, revision=revision, cache_dir=cache_dir)
        return pipe

    @classmethod
    def from_components(
        cls,
        tokenizer: QwenTokenizer,
        transformer,
        text_encoder,
        vae,
        scheduler_config: SchedulerConfig | None = None,
        *,
        native_size: tuple[int, int] | None = None,
        **options,
    ) -> "QwenImagePipeline":
        """A pipeline from models in memory (tests, benchmarks, notebooks). `transformer`, `text_encoder` and `vae`
        are modules, or zero-argument functions that build one: with functions the pipeline can free a model and
        build it again, so keep_text_encoder=False sequences them as it does a checkpoint's. A transformer function
        that takes a `modulation` keyword lets the pipeline build the denoising transformer without its modulation
        weights (with `schedule_modulation`) and the modulation alone, briefly, for each new schedule."""
        options.setdefault("check_memory", False)
        options.setdefault("keep_text_encoder", True)
        opts = PipelineOptions(**options)
        build = as_builder(transformer)
        rebuildable = build is transformer  # a function: the model can be built again, LoRAs merged as it is
        split = opts.schedule_modulation and "modulation" in inspect.signature(build).parameters
        pipe = None

        def denoiser():
            model = build(modulation=False) if split else build()
            if rebuildable:
                pipe.loras.forget()  # a new model: nothing of the last one to put back
            merge = len(pipe.loras) and not opts.lora_adapters
            if merge and rebuildable:  # merged before quantizing; unloading builds the model again
                pipe.loras.fuse(model, keep=False)
            pipe.quantization = prepare_transformer(model, opts.quantize, opts.switches) or pipe.quantization
            if merge and not rebuildable:  # a module given: keep its arrays, so unloading can put them back
                pipe.loras.fuse(model)
            elif len(pipe.loras) and opts.lora_adapters:
                pipe.loras.attach(model)
            return model

        def read_modulation(sigmas):
            model = build(modulation=True)
            if len(pipe.loras):  # the LoRAs' updates into this copy's weights (checkpoint names: q/k/v apart)
                model.load_weights(list(pipe.loras.apply_to_weights(dict(tree_flatten(model.parameters()))).items()))
            prepare_transformer(model, opts.quantize, opts.switches.only(fused_qkv=False))
            table = modulation_table(model, sigmas, opts.dtype)
            mx.eval(table.arrays())
            return table

        store = ComponentStore(
            {"transformer": denoiser, "text_encoder": as_builder(text_encoder), "vae": as_builder(vae)}
        )
        pipe = cls(
            tokenizer,
            scheduler_config or SchedulerConfig(),
            store,
            opts,
            Sizes(),
            read_modulation=read_modulation if split else None,
        )
        pipe.sizes = Sizes.read(store["transformer"].config, store["vae"].config, native_size)
        pipe._rebuildable = rebuildable
        return pipe

    # ------------------------------------------------------------------ the models
    @property
    def transformer(self) -> QwenImageTransformer:
        """The transformer that denoises (built without its modulation weights under `schedule_modulation`)."""
        return self.components["transformer"]

    @property
    def text_encoder(self) -> QwenTextEncoder:
        return self.components["text_encoder"]

    @property
    def vae(self):
        return self.components["vae"]

    @property
    def dtype(self) -> mx.Dtype:
        return self.options.dtype

    @property
    def quantize(self) -> int | None:
        return self.options.quantize

    @property
    def switches(self) -> Switches:
        return self.options.switches

    @property
    def keep_text_encoder(self) -> bool:
        return bool(self.options.keep_text_encoder)

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the checkpoint declares it was trained at, or diffusers' default: 128 x the VAE's
        factor a side (1024x1024 for the real VAE)."""
        return self.sizes.native

    def materialize_transformer(self, progress: bool = False) -> None:
        """Read (and quantize) the transformer's weights now, block by block so the peak stays near their size."""
        materialize(self.transformer, "reading the transformer" if progress else None)

    # ------------------------------------------------------------------ LoRA and the step-distilled schedule
    def _loras_changed(self) -> None:
        self._table = None  # a LoRA may change the modulation
        if self.folder is not None or self._rebuildable:
            self.components.release("transformer")  # built again with the LoRAs merged as it loads
        elif self.options.lora_adapters:
            self.loras.attach(self.transformer)
        else:
            self.loras.fuse(self.transformer)  # an empty stack puts the original arrays back

    def use_lightning(self, steps: int = 8, lora=None, revision: str | None = None, cache_dir=None) -> None:
        """The step-distilled Qwen-Image: lightx2v's Lightning LoRA for `steps` (8 or 4; `lora` a file or folder in
        place of the hub's), the schedule it was distilled with, and generate()'s defaults set to `steps` steps
        with CFG off (cfg_scale 1: one pass per step). `unload_lora()` and `use_base_schedule()` undo it."""
        if steps not in LIGHTNING_FILES:
            raise ValueError(f"the Lightning LoRAs are for 8 or 4 steps, got {steps!r}")
        if lora is None:
            self.load_lora(LIGHTNING_REPO, weight_name=LIGHTNING_FILES[steps], revision=revision, cache_dir=cache_dir)
        else:
            self.load_lora(lora)
        self._base_scheduler = getattr(self, "_base_scheduler", self.scheduler_config)
        self.scheduler_config = self._base_scheduler.merged(LIGHTNING_SCHEDULER)
        self._table = None
        self.defaults = {"steps": steps, "cfg_scale": 1.0}

    def use_base_schedule(self) -> None:
        """The checkpoint's own schedule and generate()'s defaults (20 steps, CFG 4) again."""
        self.scheduler_config = getattr(self, "_base_scheduler", self.scheduler_config)
        self._table = None
        self.defaults = {"steps": DEFAULT_STEPS, "cfg_scale": DEFAULT_CFG}

    # ------------------------------------------------------------------ text
    def _key(self, text: str):
        return (text, self.options.max_sequence_length)

    def _note_length(self, text: str) -> None:
        """With `verbose`, a note when a prompt is longer than the max_sequence_length tokens kept."""
        if not self.options.verbose:
            return
        n = prompt_length(self.tokenizer, text)
        if n > self.options.max_sequence_length:
            print(
                f"note: the prompt is {n} tokens; only the first {self.options.max_sequence_length} are used "
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
        self._note_length(text)
        if not self.components.loaded("text_encoder") and not self.keep_text_encoder:
            self.components.release("transformer")  # sequenced: the two large models are never resident together
        embeds, mask = encode_prompt(self.tokenizer, self.text_encoder, text, self.options.max_sequence_length)
        mx.eval(embeds, mask)
        value = (embeds, None if bool(mx.all(mask == 1)) else mask)
        self._cache[key] = value
        if len(self._cache) > self.options.cache_size:
            self._cache.popitem(last=False)
        return value

    def encode_prompts(self, prompt: str, negative_prompt: str | None, stats=None, progress: bool = False):
        """(cond, uncond) embeddings; uncond is None without a negative prompt. Frees the text encoder afterwards
        when the pipeline runs sequenced."""
        texts = [prompt] if negative_prompt is None else [prompt, negative_prompt]
        missing = [t for t in texts if self._key(t) not in self._cache]
        stats = stats or GenerationStats(None, 0, 0, 0, False)
        if missing:
            with stats.stage("text_weights", "load_s"):
                if not self.components.loaded("text_encoder") and not self.keep_text_encoder:
                    self.components.release("transformer")
                materialize(self.text_encoder, "reading the text encoder" if progress else None)
        with stats.stage("text", "text_s"):
            cond = self.encode(prompt)
            uncond = self.encode(negative_prompt) if negative_prompt is not None else None
        if not self.keep_text_encoder:
            self.components.release("text_encoder")
        return cond, uncond

    # ------------------------------------------------------------------ sampling
    def schedule(self, steps: int, grid: tuple[int, int], strength: float = 1.0, sigmas=None) -> Schedule:
        """The schedule of a generation of `steps` (or of the given `sigmas`) on a (h, w) patch grid."""
        return Schedule.make(self.scheduler_config, steps, grid[0] * grid[1], strength, sigmas)

    def modulation_table(self, schedule: Schedule):
        """Every step's modulation for `schedule` (a ModulationTable, evaluated), or None when the pipeline computes
        it per step (`schedule_modulation=False`). The last one is kept: the next generation with the same steps
        and size costs nothing here."""
        if not self.options.schedule_modulation:
            return None
        key = schedule.key(self.dtype)
        key = (key, self.loras.version)
        if self._table is None or self._table[0] != key:
            self._table = None
            sigmas = schedule.model_sigmas(self.dtype)
            if self._read_modulation is not None:
                table = self._read_modulation(sigmas)
            else:
                table = self.transformer.modulations(sigmas)
                mx.eval(table.arrays())
            self._table = (key, table)
        return self._table[1]

    def initial_noise(self, height: int, width: int, seed: int | None = None, latents=None) -> mx.array:
        """The unpacked noise (1, C, H/8, W/8) in the pipeline's dtype: `latents` checked, or drawn from `seed`."""
        shape = self.sizes.noise_shape(height, width)
        if latents is None:
            check_seed(seed)
            return mx.random.normal(shape, key=mx.random.key(seed)).astype(self.dtype)
        z = latents if isinstance(latents, mx.array) else mx.array(np.asarray(latents))
        grid, p = self.sizes.grid(height, width), self.sizes.patch
        packed = (1, grid[0] * grid[1], shape[1] * p * p)
        if tuple(z.shape) == (1, 1, *shape[1:]):  # diffusers' (B, 1, C, h, w) before packing
            z = z.reshape(shape)
        elif tuple(z.shape) == packed:  # diffusers' `latents=`: packed 2x2 patches
            z = unpack_latents(z, grid, p)
        if tuple(z.shape) != shape:
            raise ValueError(
                f"latents have shape {tuple(z.shape)}; for a {height}x{width} (H x W) image they must be {shape} "
                f"(or {(1, 1, *shape[1:])}, as diffusers draws them before packing, or {packed}, packed as diffusers' "
                "latents= takes them)"
            )
        return z.astype(self.dtype)

    def denoise(
        self,
        latents: mx.array,
        cond,
        uncond,
        cfg_scale: float,
        schedule: Schedule,
        grid: tuple[int, int],
        blend=None,
        cfg_pair=None,
    ):
        """`qwen_nb.sampling.denoise` with this pipeline's transformer, modulation table and options: a generator
        of the packed latents (1, N, C) after each step run, unevaluated (`blend`: inpainting's, or None)."""
        hook = eval_every_blocks(self.options.eval_every) if self.options.eval_every else None
        return denoise(
            self.transformer,
            latents,
            cond,
            schedule=schedule,
            grid=grid,
            negative=uncond,
            cfg_scale=cfg_scale,
            mods=self.modulation_table(schedule),
            batched_cfg=self.options.batched_cfg,
            block_hook=hook,
            blend=blend,
            cfg_pair=cfg_pair,
        )

    def picture_start(self, picture: image_input.PictureRequest, noise: mx.array, schedule: Schedule, height, width):
        """img2img and inpainting: (the packed start latents, the blend or None). The picture's latents (the VAE
        posterior's mode) are noised to the first step run; with a mask, `blend` keeps the unmasked region after
        every step (diffusers' QwenImageInpaintPipeline)."""
        latents = image_input.img2img_latents(self.vae, picture.image, height, width, self.sizes.patch)
        mx.eval(latents)
        start = image_input.noised(latents, noise, schedule.sigmas[schedule.start])
        if picture.mask is None:
            return start, None
        s = self.sizes
        mask = image_input.packed_mask(picture.mask, s.vae_factor, s.latent_channels, s.patch)
        return start, image_input.inpaint_blend(latents, noise, mask, schedule.sigmas)

    def decode(self, latents: mx.array, height: int, width: int):
        """Packed latents (1, N, C) -> PIL image."""
        from PIL import Image

        z = unpack_latents(latents, self.sizes.grid(height, width), self.sizes.patch)  # (1, C, H/8, W/8)
        images = self.vae.decode(z.transpose(0, 2, 3, 1), tile=self.options.vae_tile)  # (1, H, W, 3)
        return Image.fromarray(postprocess(images)[0])

    # ------------------------------------------------------------------ generation
    def _size(self, height, width) -> tuple[int, int]:
        """The requested size (rounded down to the size multiple, as diffusers does), the native one where not given;
        warns once when a model trained at one size is asked for another."""
        height = self.native_size[0] if height is None else height
        width = self.native_size[1] if width is None else width
        height, width = fit_size(height, width, self.sizes.multiple)
        if self.sizes.native_declared and (height, width) != self.native_size and not self._warned_size:
            self._warned_size = True
            warnings.warn(
                f"this checkpoint was trained at {self.native_size[1]}x{self.native_size[0]} (width x height) only; "
                f"at {width}x{height} expect a worse picture (generate() without height/width uses its size)",
                stacklevel=3,
            )
        return height, width

    def _check_memory_at(self, height: int, width: int) -> None:
        plan = self.memory_plan
        if not self.options.check_memory or plan is None or plan.size == (height, width):
            return
        act = activation_bytes(self.folder, self.dtype, height, width)
        replace(plan, activations=act, size=(height, width)).check()

    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = " ",
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        seed: int | None = None,
        latents=None,
        image=None,
        strength: float = 0.6,
        mask_image=None,
        callback=None,
        progress: bool = True,
        preview=None,
        preview_every: int = 1,
        num_images: int | None = None,
        sigmas=None,
    ):
        """One image, as diffusers' QwenImagePipeline(prompt, negative_prompt, true_cfg_scale=cfg_scale, ...).

        CFG runs when cfg_scale > 1 and negative_prompt is not None (" " is qwen_nb's default: the model card's
        "no negative prompt", which still runs CFG; diffusers' default None turns it off). height and width default
        to the checkpoint's native size (1024x1024 for the real ones); steps and cfg_scale to 20 and 4.0 (after
        `use_lightning(n)`: n and 1.0). `latents` is the noise (1, C, H/8, W/8) before packing (or packed,
        (1, H/16 * W/16, 4 C), as diffusers' `latents=`); otherwise it is drawn from `seed` (random when None; the
        seed used is in `last_stats`).

        With `image` (a PIL image, a path, a uint8 array, or a float array in [0, 1] as diffusers takes it) it is
        diffusers' QwenImageImg2ImgPipeline(..., image=image, strength=strength): the picture is resized (Lanczos) to height x width, which default to the
        native size as in diffusers (not to the picture's size), encoded to the VAE posterior's mode (diffusers
        draws a sample), noised to the first step run, and the first int(steps - steps * strength) steps are
        skipped. With `mask_image` too (the picture's size; white is repainted, black kept) it is
        QwenImageInpaintPipeline: after every step the kept region is the picture noised to the next step's level.
        (diffusers' padding_mask_crop is not supported: crop the picture and the mask before.)

        Steps count the steps run: `callback(step, latents)` is called after each with the packed latents (step
        0, 1, ... as diffusers' callback_on_step_end counts them). `preview(step, image)`, when given, is called
        after every `preview_every`-th step (after steps preview_every - 1, 2 preview_every - 1, ...) and after the
        last, with a PIL image of the model's current guess of the final picture (qwen_nb.preview: a linear
        latent-to-RGB map fitted once per VAE; no decode). Ctrl-C, or KeyboardInterrupt raised in `callback` or
        `preview`, stops at the end of the current step with GenerationInterrupted.

        `num_images=K`: K pictures of the prompt from seeds seed, seed + 1, ..., seed + K - 1 (each the picture that
        seed alone gives), denoised as one batch, returned as a list (K = 1 too). Under `parallel` (see
        qwen_nb.distributed) rank 0 returns the pictures and the other ranks None.

        `sigmas`: a schedule of one's own in place of linspace(1, 1/steps, steps), as diffusers' `sigmas=` (then
        the scheduler shifts them as usual and steps = len(sigmas))."""
        height, width = self._size(height, width)
        steps, sigmas = self._steps(steps, sigmas)
        cfg_scale = self.defaults["cfg_scale"] if cfg_scale is None else cfg_scale
        self._check_request(prompt, negative_prompt, steps, cfg_scale, seed, preview, preview_every)
        count = self._check_count(num_images, seed, latents, image)
        picture = image_input.prepare(image, mask_image, height, width)  # None: text-to-image
        if picture is not None:
            check_strength(strength, steps)
        if latents is None and seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        par = self.parallel
        if par is not None:
            seed = seed if latents is None else 0
            seed = par.share_seed(seed)
            request = (prompt, negative_prompt, height, width, steps, cfg_scale, seed, count, strength)
            shown = (latents,) + ((None, None) if picture is None else (picture.image, picture.mask))  # read, not paths
            given = [None if v is None else hashlib.sha256(np.asarray(v).tobytes()).hexdigest() for v in shown]
            loras = [(sorted(lora.modules), s) for lora, s in self.loras.entries]
            par.agree("requests (prompt, size, steps, cfg, seed, pictures, LoRAs)", (request, given, loras))
        share = list(range(count)) if par is None else par.images(count)  # the pictures this rank makes
        noise = mx.concatenate(
            [self.initial_noise(height, width, None if seed is None else seed + i, latents) for i in share]
        )
        self._check_memory_at(height, width)
        do_cfg = cfg_scale > 1 and negative_prompt is not None
        pair = par if par is not None and par.mode == "cfg" and do_cfg else None
        progress = progress and (par is None or par.is_main)
        grid = self.sizes.grid(height, width)
        schedule = self.schedule(steps, grid, 1.0 if picture is None else strength, sigmas)
        run = schedule.steps_run  # img2img skips the first steps
        stats = self.last_stats = GenerationStats(seed if latents is None else None, height, width, run, do_cfg)

        with MemoryLimit(self.options.memory_limit_gb) as limit, stats.running():
            if pair is not None:  # each rank encodes its own half of the pair
                cond, uncond = self.encode_prompts(prompt if pair.cond else negative_prompt, None, stats, progress)
            else:
                cond, uncond = self.encode_prompts(prompt, negative_prompt if do_cfg else None, stats, progress)
            x, blend = pack_latents(noise, self.sizes.patch), None
            if picture is not None:
                with stats.stage("picture", "image_s"):
                    x, blend = self.picture_start(picture, x, schedule, height, width)
            with stats.stage("weights", "load_s"):
                self.modulation_table(schedule)  # first: its weights are read and dropped before the rest is read
                self.materialize_transformer(progress)
            limit.weights_loaded()
            loop = self.denoise(x, cond, uncond, cfg_scale, schedule, grid, blend, pair)
            with stats.stage("denoise"):
                x = self._run(loop, x, schedule, stats, callback, preview, preview_every, progress)
            if par is not None:
                x = par.collect(x, count)
            self.last_latents = x
            if par is not None and not par.is_main:
                return None  # rank 0 decodes and returns the pictures
            with stats.stage("decode", "decode_s"):
                images = [self.decode(x[i : i + 1], height, width) for i in range(count)]
        return images[0] if num_images is None else images

    __call__ = generate

    def _steps(self, steps, sigmas) -> tuple:
        """(steps, sigmas) of a request: len(sigmas) steps when sigmas are given (checked), else `steps` or the
        pipeline's default."""
        sigmas = check_sigmas(sigmas)
        if sigmas is not None:
            return len(sigmas), sigmas
        return (self.defaults["steps"] if steps is None else steps), None

    def _check_count(self, num_images, seed, latents, image) -> int:
        """The number of pictures asked for (1 when num_images is None), checked against the other inputs."""
        if num_images is None:
            return 1
        if not _is_int(num_images) or num_images < 1:
            raise ValueError(
                f"num_images must be an integer >= 1 (pictures from seeds seed, seed+1, ...), got {num_images!r}"
            )
        if num_images > 1 and (latents is not None or image is not None):
            raise ValueError(
                "num_images > 1 draws each picture's noise from its own seed, for text-to-image: it does not go with "
                "latents= or image= (call generate once per picture)"
            )
        if seed is not None and seed + num_images - 1 > MAX_SEED:
            raise ValueError(f"seeds {seed}..{seed + num_images - 1} go past 2**64 - 1: choose a smaller seed")
        return int(num_images)

    def _check_request(self, prompt, negative_prompt, steps, cfg_scale, seed, preview, preview_every) -> None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string (one image per call), got {type(prompt).__name__}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not np.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
        if cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (4.0 is the model card's; <= 1 turns CFG off), got {cfg_scale}")
        check_seed(seed)
        if preview is not None and not callable(preview):
            raise ValueError(f"preview must be a function (step, PIL image) or None, got {type(preview).__name__}")
        if not _is_int(preview_every) or preview_every < 1:
            raise ValueError(f"preview_every must be an integer >= 1 (steps between previews), got {preview_every!r}")

    def _run(self, loop, x, schedule: Schedule, stats, callback, preview, preview_every, progress):
        """Drive the sampling loop from latents x: evaluate once per step, time it, report, preview; Ctrl-C ends it
        after a step. Returns the last latents."""
        from tqdm.auto import tqdm

        if preview is not None:
            from . import preview as previews

            projection = previews.projection_for(self.vae)  # fitted once per VAE, from a few small decodes
        run, (height, width) = schedule.steps_run, (stats.height, stats.width)
        try:
            with tqdm(total=run, desc="denoising", unit="step", disable=not progress) as bar:
                t = time.perf_counter()
                for k, x_next in enumerate(evaluated(loop, self.options.overlap_steps)):  # k: steps run
                    i = schedule.start + k  # the schedule's step
                    x, before = x_next, x
                    stats.step_times_s.append(time.perf_counter() - t)
                    bar.update()
                    if callback is not None:
                        callback(k, x)
                    if preview is not None and ((k + 1) % preview_every == 0 or k == run - 1):
                        s = schedule.sigmas
                        guess = previews.x0_guess(before[:1], x[:1], float(s[i]), float(s[i + 1]))  # the first
                        preview(k, previews.preview(projection, guess, height, width))
                    t = time.perf_counter()  # the callbacks' own time is not the step's
        except KeyboardInterrupt:
            stats.interrupted_at = len(stats.step_times_s)
            raise GenerationInterrupted(stats.interrupted_at, run, x, height, width) from None
        return x

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, folder, overwrite: bool = False, max_shard_size: int = 5_000_000_000) -> Path:
        """Write a pipeline folder that `from_pretrained` loads without the original download: the transformer
        as this pipeline runs it (quantized included, marked in transformer/config.json), the other components
        copied. Refuses a non-empty folder unless `overwrite=True` (then files of the same names are replaced)."""
        if self.folder is None:
            raise ValueError(
                "this pipeline was built from models in memory (from_components): there is no checkpoint to copy "
                "its tokenizer, text encoder and VAE from. Save from a pipeline made with from_pretrained."
            )
        adjust = self.loras.apply_to_weights if len(self.loras) else None  # LoRAs saved merged
        model, report = load_transformer(
            self.folder / "transformer",
            self.dtype,
            self.quantize,
            Switches().only(fused_qkv=False),
            adjust=adjust,
            variant=self.options.variant,
        )
        weights = model.diffusers_weights()
        del model  # the dict is the weights' only holder: they are read and written a shard at a time
        config = report.to_config() if report else None
        return save_pipeline(self.folder, folder, weights, config, overwrite, max_shard_size, self.reads_pictures)


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


__all__ = [
    "ASPECTS",
    "GenerationInterrupted",
    "GenerationStats",
    "PipelineOptions",
    "QwenImagePipeline",
    "check_seed",
    "check_size",
]
