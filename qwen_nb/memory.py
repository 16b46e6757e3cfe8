"""The memory plan: what each component needs in the chosen dtype and quantization, read from the safetensors
headers (nothing is loaded), against what the machine has (`mx.device_info()`).

Two ways to run: everything resident, or sequenced (encode the prompt, free the text encoder, then materialise the
transformer), which needs about the text encoder's size less. The plan picks sequenced where resident will not
fit, and refuses, suggesting `quantize=8` or `4`, where neither does. Activations are estimates (stated as such).
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .distributed import rank_shapes, shard_axis, text_shard_axis
from .hub import keep_rules
from .loading import read_config, read_header, weight_files
from .quantize import GROUP_SIZE, is_timestep_weight, quantized_bits

STORED_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "I8": 1, "U8": 1}
FLOATING = {"F64", "F32", "F16", "BF16"}
GB = 1e9
HEADROOM = 0.1  # of the device's memory, left for the allocator's cache, the graph and the rest of the system


class MemoryPlanError(RuntimeError):
    """The pipeline will not fit in this machine's memory; the message says what would."""


def tensor_shapes(folder: Path, keep=None, variant: str | None = None) -> dict[str, tuple[str, tuple]]:
    """{name: (safetensors dtype, shape)} of a component folder, from the file headers (`variant`: see
    `loading.weight_layout`)."""
    shapes = {}
    for f in weight_files(folder, keep, variant):
        for name, spec in read_header(f).items():
            if name != "__metadata__" and (keep is None or keep(name)):
                shapes[name] = (spec["dtype"], tuple(spec["shape"]))
    return shapes


def component_bytes(shapes: dict, dtype: mx.Dtype, bits: int | None = None, group_size: int = GROUP_SIZE) -> int:
    """Bytes of a component's tensors loaded in `dtype` (floating tensors cast, others as stored); with `bits`,
    the quantized linears at bits per weight plus a scale and a bias per group of `group_size`, in `dtype`."""
    item = dtype.size
    total = 0
    for name, (kind, shape) in shapes.items():
        n = 1
        for s in shape:
            n *= s
        b = quantized_bits(name, shape, bits, group_size) if bits else None
        if b is not None:
            total += n * b // 8 + 2 * (n // group_size) * item
        else:
            total += n * (item if kind in FLOATING else STORED_BYTES.get(kind, 4))
    return total


def device_memory() -> tuple[int | None, str]:
    """(bytes the device can use, where the number comes from)."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "total_memory", "memory_size"):
        if info.get(key):
            return int(info[key]), f"mx.device_info()['{key}']"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical RAM"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def activation_bytes(
    folder: Path, dtype: mx.Dtype, height: int, width: int, text_tokens: int = 512, condition_tokens: int = 0
) -> dict:
    """Estimated working memory of each stage at height x width (order of magnitude, not a measurement);
    `condition_tokens`: an edit's condition pictures' tokens, in the denoising sequence beside the image's.

    Stage by stage: the live tensors of one layer (about 16 hidden-width copies of the sequence in the
    transformer, 4 hidden + 3 MLP widths in the text encoder, 8 copies of the full-resolution feature map in the
    VAE decoder), plus attention scores in float32 where attention is not fused (the CPU)."""
    tr = read_config(folder / "transformer")
    te = read_config(folder / "text_encoder")
    te = {**te, **(te.get("text_config") or {})}
    vae = read_config(folder / "vae")
    item = dtype.size
    fused = mx.default_device() == mx.gpu

    heads, dim = (
        tr.get("num_attention_heads", 24),
        tr.get("num_attention_heads", 24) * tr.get("attention_head_dim", 128),
    )
    T = (height // 16) * (width // 16) + condition_tokens + text_tokens
    denoise = 16 * T * dim * item + (0 if fused else 2 * heads * T * T * 4)

    S = 1024 + 34  # the longest tokenized prompt
    hidden, inter = te.get("hidden_size", 3584), te.get("intermediate_size", 18944)
    text = S * (4 * hidden + 3 * inter) * item + (0 if fused else 2 * te.get("num_attention_heads", 28) * S * S * 4)

    factor = 2 ** len(vae.get("temperal_downsample", (False, True, True)))  # diffusers' vae_scale_factor
    pixels, latent_pixels = height * width, (height // factor) * (width // factor)
    decoder_width = vae.get("decoder_base_dim") or vae.get("base_dim", 96)  # 2.1's decoder is wider than its encoder
    decode = 8 * pixels * decoder_width * item + (0 if fused else 2 * latent_pixels**2 * 4)
    return {"text": text, "denoise": denoise, "decode": decode}


@dataclass
class MemoryPlan:
    """Bytes per component and per stage, the device budget, and whether the text encoder stays resident."""

    components: dict  # bytes of text_encoder, transformer, vae as loaded
    activations: dict  # estimated bytes of the text, denoise and decode stages
    budget: int | None
    budget_source: str
    keep_text_encoder: bool
    dtype: mx.Dtype = mx.bfloat16
    quantize: int | None = None
    size: tuple = (1024, 1024)
    notes: list = field(default_factory=list)

    @property
    def resident_peak(self) -> int:
        return sum(self.components.values()) + max(self.activations.values())

    @property
    def sequenced_peak(self) -> int:
        c, a = self.components, self.activations
        return max(
            c["text_encoder"] + c["vae"] + a["text"],
            c["transformer"] + c["vae"] + max(a["denoise"], a["decode"]),
        )

    @property
    def peak(self) -> int:
        return self.resident_peak if self.keep_text_encoder else self.sequenced_peak

    @property
    def usable(self) -> float | None:
        """The bytes the plan may use: the device's memory less the headroom."""
        return None if self.budget is None else self.budget * (1 - HEADROOM)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.peak <= self.usable

    def __str__(self) -> str:
        c, a = self.components, self.activations
        q = f"{self.quantize}-bit transformer" if self.quantize else "unquantized"
        lines = [
            f"memory plan ({str(self.dtype).split('.')[-1]}, {q}, {self.size[0]}x{self.size[1]}):",
            f"  text encoder {c['text_encoder'] / GB:6.1f} GB   transformer {c['transformer'] / GB:6.1f} GB   "
            f"VAE {c['vae'] / GB:5.2f} GB",
            f"  working memory (estimate): text {a['text'] / GB:.1f} GB, denoise {a['denoise'] / GB:.1f} GB, "
            f"decode {a['decode'] / GB:.1f} GB",
            f"  peak {self.peak / GB:.1f} GB "
            + (
                "with the text encoder kept resident"
                if self.keep_text_encoder
                else "with the text encoder freed before the transformer is loaded"
            )
            + (f" (resident: {self.resident_peak / GB:.1f} GB)" if not self.keep_text_encoder else ""),
            f"  available {self.budget / GB:.1f} GB ({self.budget_source}), {self.usable / GB:.1f} GB of it usable"
            if self.budget
            else "  available: unknown",
        ]
        return "\n".join(lines + [f"  {n}" for n in self.notes])

    def check(self, alternatives: dict | None = None) -> None:
        """Raise MemoryPlanError unless the plan fits; `alternatives` {quantize: plan} feed the suggestion."""
        if self.fits:
            return
        if alternatives is None:
            advice = "Load with quantize=8 or quantize=4, or make a smaller image"
        else:
            fitting = [q for q, p in alternatives.items() if p.fits and (not self.quantize or q < self.quantize)]
            if fitting:
                best, least = max(fitting), min(fitting)
                advice = f"Load with quantize={best} (peak {alternatives[best].peak / GB:.1f} GB)"
                if least != best:
                    advice += f" or quantize={least} (peak {alternatives[least].peak / GB:.1f} GB)"
            else:
                advice = "Even quantize=4 will not fit: use a machine with more memory or a smaller image size"
        if self.keep_text_encoder and self.sequenced_peak <= (self.usable or 0):
            advice = "Let the pipeline free the text encoder (keep_text_encoder=None or False)"
        raise MemoryPlanError(
            f"Qwen-Image will not fit: it needs about {self.peak / GB:.1f} GB and this device has "
            f"{self.budget / GB:.1f} GB ({self.budget_source}; {self.usable / GB:.1f} GB usable, leaving "
            f"{HEADROOM:.0%} for the rest).\n{self}\n{advice}. "
            "check_memory=False skips this check (the machine may swap or the process be killed)."
        )


def plan_memory(
    folder,
    dtype: mx.Dtype = mx.bfloat16,
    quantize: int | None = None,
    keep_text_encoder: bool | None = None,
    height: int = 1024,
    width: int = 1024,
    budget: int | None = None,
    group_size: int = 64,
    schedule_modulation: bool = True,
    vision: bool = False,
    tensor_ranks: int = 1,
    variant: str | None = None,
    prefer_sequenced: bool = False,
) -> MemoryPlan:
    """The plan for loading the pipeline in `folder`; `keep_text_encoder=None` picks resident when it fits, or
    sequenced wherever it fits with `prefer_sequenced` (the default of Qwen-Image 2.1 and the edit pipelines). With
    `schedule_modulation` (the pipeline's default) the transformer is held without the weights that depend on sigma
    alone: they are read a block at a time for each new schedule and never resident. `vision`: an edit pipeline,
    which holds the text encoder's vision tower too and denoises beside a condition picture of the plan's size.
    `tensor_ranks` N > 1 (parallel="tensor"): the figures are one rank's, holding 1/N of the split weights of the
    transformer and the text encoder (each quantized per rank) and the rest whole. `variant`: the weight files read
    (see `loading.weight_layout`)."""
    folder = Path(folder)
    tr_config = read_config(folder / "transformer")
    prequantized = tr_config.get("quantization")
    bits = None if prequantized else quantize
    held = (lambda name: not is_timestep_weight(name)) if schedule_modulation else None
    text = tensor_shapes(folder / "text_encoder", keep_rules(vision)["text_encoder"], variant)
    transformer = tensor_shapes(folder / "transformer", held, variant)
    if tensor_ranks > 1:
        text = rank_shapes(text, text_shard_axis, tensor_ranks)
        transformer = rank_shapes(transformer, shard_axis, tensor_ranks)
    components = {
        "text_encoder": component_bytes(text, dtype),
        "transformer": component_bytes(transformer, dtype, bits, group_size),
        "vae": component_bytes(tensor_shapes(folder / "vae", variant=variant), dtype),
    }
    source = "given"
    if budget is None:
        budget, source = device_memory()
    plan = MemoryPlan(
        components,
        activation_bytes(
            folder, dtype, height, width, condition_tokens=(height // 16) * (width // 16) if vision else 0
        ),
        budget,
        source,
        keep_text_encoder=bool(keep_text_encoder),
        dtype=dtype,
        quantize=prequantized["bits"] if prequantized else quantize,
        size=(height, width),
    )
    if tensor_ranks > 1:
        plan.notes.append(f"per rank: the transformer and text encoder split over {tensor_ranks} ranks (tensor)")
    if keep_text_encoder is None:
        plan.keep_text_encoder = not prefer_sequenced and (budget is None or plan.resident_peak <= plan.usable)
        if prefer_sequenced:
            plan.notes.append(
                "sequenced by default: a new prompt reads the text encoder again (prompts seen before are cached); "
                "keep_text_encoder=True keeps every model resident"
            )
    return plan


# "auto" memory limit: the bytes held once the weights are in, plus this. MLX may go past a limit (it is a
# guideline), but first waits for queued work to finish and free its buffers. A 1024x1024 step needs well under a
# gigabyte at a time; what goes past it on a GPU is work queued ahead (on an H200 a 1 GB margin stalled the queue,
# 8.06 s instead of 6.59 s for a whole generation: assets/bench/pipeline_h200_limit_weights_plus_1gb.json).
AUTO_LIMIT_MARGIN = 2e9


def check_memory_limit(setting) -> None:
    ok = setting in (None, "auto") or (
        isinstance(setting, (int, float)) and not isinstance(setting, bool) and setting > 0
    )
    if not ok:
        raise ValueError(f"memory_limit_gb must be a positive number of GB, 'auto' or None; got {setting!r}")


class MemoryLimit:
    """MLX's memory limit while a generation runs, restored afterwards (a context manager).

    MLX queues a GPU's kernels ahead of the device and frees buffers only as they finish; under a limit it waits
    for queued work instead of allocating more. `setting`: GB, None (MLX's own limit) or "auto": once the weights
    are in (`weights_loaded()`), what is held plus AUTO_LIMIT_MARGIN."""

    def __init__(self, setting):
        check_memory_limit(setting)
        self.setting = setting
        self.previous = None

    def _set(self, nbytes: float) -> None:
        before = mx.set_memory_limit(int(nbytes))
        if self.previous is None:
            self.previous = before

    def __enter__(self) -> "MemoryLimit":
        if self.setting not in (None, "auto"):
            self._set(self.setting * GB)
        return self

    def weights_loaded(self) -> None:
        if self.setting == "auto":
            self._set(mx.get_active_memory() + AUTO_LIMIT_MARGIN)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            mx.set_memory_limit(self.previous)
            self.previous = None
