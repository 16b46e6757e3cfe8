"""LoRA for the transformer: diffusers' `QwenImageLoraLoaderMixin` (`load_lora_weights`, `set_adapters`,
`unload_lora_weights`) with peft's LoRA layers, as weight updates W + s * alpha/r * B @ A.

`read_lora(source)` reads a `.safetensors` LoRA (a file, a folder holding one, or a hub repo id) in any of the
formats in circulation and names every update by the diffusers module it changes (`transformer_blocks.0.attn.to_q`,
`transformer_blocks.3.img_mod.1`, `norm_out.linear`...):
- diffusers / peft: `transformer.<module>.lora_A.weight` and `lora_B.weight`, alpha in peft's config
  (the `lora_adapter_metadata` of the file), or none (alpha = rank);
- the Lightning release and most trainers: `diffusion_model.<module>.lora_down.weight`, `lora_up.weight` and
  `<module>.alpha`;
- kohya / ComfyUI: `lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight` and `.alpha`, whose flattened names
  are turned into dotted ones as diffusers' converter turns them;
- peft's extras, in diffusers/peft names as diffusers reads them: a bias on B (`lora_B.bias`, peft's lora_bias) and
  DoRA (`lora_magnitude_vector.weight`, peft's use_dora: W' = m / ||W + s B A||_row * (W + s B A)); diffusers' old
  `.lora.down.weight` / `.lora.up.weight` names.
As diffusers, a per-module alpha is folded into the tensors (alpha / r, in their dtype) as they are read, and modules
the transformer has not (a text encoder's, another variant's) are ignored with a warning when others fit.
A `LoraStack` holds the LoRAs a pipeline has loaded, each with its scale, and puts them into a transformer: fused
into the weights (`fuse`, exactly undone by `unfuse`), merged into high-precision weights before quantizing
(`apply_to_weights`, or `fuse(..., weights=)` on a quantized model), or as low-rank matmuls beside each linear
(`attach`, `LoRALinear`).
"""

import itertools
import json
import math
import re
import shutil
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers import distributed

from .attention import FUSED_PROJECTIONS, split_rows
from .hub import HubError, _gb, looks_like_repo_id
from .loading import read_header
from .quantize import is_timestep_weight
from .transformer import QwenImageTransformer, TransformerConfig
from .transformer21 import QwenImage21Transformer, Transformer21Config

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file diffusers' save_lora_weights writes
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FORMATS = (
    "`transformer.<module>.lora_A.weight` / `lora_B.weight` (diffusers/peft), "
    "`diffusion_model.<module>.lora_down.weight` / `lora_up.weight` / `<module>.alpha` (the Lightning release and "
    "most trainers), or `lora_unet_<module_with_underscores>.lora_down.weight` / `.alpha` (kohya/ComfyUI)"
)
# key suffix -> which tensor of a module's LoRA it is
SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
    ".lora_B.bias": "bias",
    ".lora_magnitude_vector.weight": "magnitude",
}
# diffusers' older attention-processor names, which it renames (`convert_unet_state_dict_to_peft`) when the file is
# read as it is (no alphas, no `lora_unet_` / `diffusion_model.` names, no `default.`)
LEGACY_SUFFIXES = {".lora.down.weight": "down", ".lora.up.weight": "up"}
PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.")
KOHYA_PREFIX = "lora_unet_"
# adapters that are not a plain LoRA, by a marker in their tensor names
OTHER_ADAPTERS = {
    ".lokr_": "LyCORIS LoKr (Kronecker-product factors, not B @ A)",
    ".hada_": "LyCORIS LoHa (Hadamard-product factors, not B @ A)",
    ".lora_up.bias": "a LoRA with a bias in kohya's names (diffusers reads peft's `lora_B.bias` only)",
}
# names of other models' LoRAs, for the message when a LoRA does not fit
OTHER_MODELS = {
    "double_blocks": "Flux",
    "single_blocks": "Flux",
    "single_transformer_blocks": "Flux (diffusers names)",
    "joint_blocks": "Stable Diffusion 3",
    "down_blocks": "a Stable Diffusion UNet",
    "up_blocks": "a Stable Diffusion UNet",
    "input_blocks": "a Stable Diffusion UNet",
    "output_blocks": "a Stable Diffusion UNet",
    "self_attn": "Wan or another DiT",
    "text_encoder": "a text encoder (qwen_nb applies LoRAs to the transformer only)",
    "lora_te": "a text encoder (qwen_nb applies LoRAs to the transformer only)",
    "txt_mod": "Qwen-Image (two streams): load it with QwenImagePipeline",
    "add_q_proj": "Qwen-Image (two streams): load it with QwenImagePipeline",
    "gate_layer": "Qwen-Image 2.1 (one stream): load it with QwenImage21Pipeline",
}


# ------------------------------------------------------------------------------------------------ module names
def linear_shapes(config: TransformerConfig | Transformer21Config) -> dict[str, tuple[int, int]]:
    """{diffusers module path: (out, in)} of every linear of a transformer of this config (Qwen-Image's or 2.1's),
    q/k/v separate and the modulation included (built lazily: no weights are made)."""
    model = QwenImage21Transformer(config) if isinstance(config, Transformer21Config) else QwenImageTransformer(config)
    return {p: tuple(m.weight.shape) for p, m in model.named_modules() if isinstance(m, nn.Linear)}


def _linear_biases(config: TransformerConfig | Transformer21Config) -> dict[str, bool]:
    """{diffusers module path: whether the linear has a bias} of a transformer of this config (built lazily)."""
    model = QwenImage21Transformer(config) if isinstance(config, Transformer21Config) else QwenImageTransformer(config)
    return {p: "bias" in m for p, m in model.named_modules() if isinstance(m, nn.Linear)}


def _module_names(config: TransformerConfig | Transformer21Config) -> set[str]:
    """Every module path of a transformer of this config (built lazily)."""
    model = QwenImage21Transformer(config) if isinstance(config, Transformer21Config) else QwenImageTransformer(config)
    return {p for p, _ in model.named_modules()}


@cache
def _flat_names() -> tuple[dict, dict]:
    """kohya's flattened names -> diffusers' dotted ones: ({block-local}, {top-level}), read off a one-block model."""
    block, top = {}, {}
    for path in reversed(linear_shapes(TransformerConfig.tiny(num_layers=1))):  # in the order they are built
        local = path.removeprefix("transformer_blocks.0.")
        table = block if local != path else top
        flat = local.replace(".", "_")
        assert flat not in table, f"two modules flatten to {flat}"
        table[flat] = local
    return block, top


# the words diffusers' kohya converter keeps together (`_convert_non_diffusers_qwen_lora_to_diffusers`)
KOHYA_PROTECTED = [
    ("add", "q", "proj"), ("add", "k", "proj"), ("add", "v", "proj"), ("to", "add", "out"),
    ("to", "q"), ("to", "k"), ("to", "v"), ("to", "out"), ("add", "q"), ("add", "k"), ("add", "v"),
    ("txt", "mlp"), ("img", "mlp"), ("txt", "mod"), ("img", "mod"),
]  # fmt: skip


def _unflatten(name: str) -> str:
    """A kohya module name (`transformer_blocks_0_attn_to_q`) as the diffusers path diffusers' converter makes of it
    (the top-level linears by name; in a block, `_` becomes `.` except inside its protected words, so a name it
    does not know, such as 2.1's `img_mlp_gate_layer`, becomes one no model has, as in diffusers), or unchanged."""
    _, top = _flat_names()
    if name in top:
        return top[name]
    if not name.startswith("transformer_blocks_"):
        return name
    parts, merged, i = name[len("transformer_blocks_") :].split("_"), [], 0
    while i < len(parts):
        for ngram in KOHYA_PROTECTED:  # the longest first, as diffusers
            if tuple(parts[i : i + len(ngram)]) == ngram:
                merged.append("_".join(ngram))
                i += len(ngram)
                break
        else:
            merged.append(parts[i])
            i += 1
    return "transformer_blocks." + ".".join(merged)


def _is_qwen_linear(path: str) -> bool:
    block, top = _flat_names()
    m = re.fullmatch(r"transformer_blocks\.\d+\.(.+)", path)
    return path in top.values() or (m is not None and m.group(1) in block.values())


def _names_look_like(config: TransformerConfig | Transformer21Config) -> str:
    last = config.num_layers - 1
    if isinstance(config, Transformer21Config):  # Qwen-Image 2.1: one stream, one shared modulation
        names = linear_shapes(Transformer21Config.tiny(num_layers=1))
        block = sorted({n.removeprefix("transformer_blocks.0.") for n in names if n.startswith("transformer_blocks.")})
        top = sorted(n for n in names if not n.startswith("transformer_blocks."))
        return (
            f"transformer_blocks.<0..{last}>.{{{', '.join(block)}}} and {', '.join(top)} (Qwen-Image 2.1's; e.g. "
            f"transformer_blocks.0.attn.to_q, transformer_blocks.{last}.img_mlp.gate_layer)"
        )
    block, top = _flat_names()
    return (
        f"transformer_blocks.<0..{last}>.{{{', '.join(block.values())}}} and {', '.join(top.values())}"
        f" (e.g. transformer_blocks.0.attn.to_q, transformer_blocks.{last}.img_mod.1)"
    )


# ------------------------------------------------------------------------------------------------ one LoRA
@dataclass(frozen=True)
class LoraWeights:
    """One module's update scale * up @ down: down (r, in), up (out, r); scale is alpha / r (peft's `scaling`).

    `factor` is what multiplies up @ down as stored, when part of `scale` is already in the tensors (diffusers folds
    a file's per-module alpha / r into them, in their own dtype, as it reads them: so does qwen_nb); None: `scale`.
    `bias` (out,): peft's `lora_bias` (the update adds factor * bias to the linear's bias). `magnitude` (out,): a
    DoRA's learnt norms (peft's `use_dora`), the linear becoming m / ||W + s B A||_row * (W + s B A)."""

    down: mx.array
    up: mx.array
    scale: float
    alpha: float | None = None  # as the file gives it; None: alpha = rank
    factor: float | None = None
    bias: mx.array | None = None
    magnitude: mx.array | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    @property
    def multiplier(self) -> float:
        """What multiplies up @ down (and the bias) as stored."""
        return self.scale if self.factor is None else self.factor


@dataclass
class LoRA:
    """A LoRA read from a file: {diffusers module path: LoraWeights}."""

    modules: dict
    format: str
    source: str = "<memory>"
    ignored: list = field(default_factory=list)  # modules of the file the transformer has not (skipped, as diffusers)

    @property
    def targets(self) -> list[str]:
        return sorted(self.modules)

    def delta(self, path: str, dtype: mx.Dtype = mx.float32) -> mx.array:
        """The (out, in) low-rank update of one module, scale * up @ down, computed in float32."""
        w = self.modules[path]
        return (w.multiplier * (w.up.astype(mx.float32) @ w.down.astype(mx.float32))).astype(dtype)

    def __repr__(self) -> str:
        ranks = sorted({w.rank for w in self.modules.values()})
        return f"LoRA({len(self.modules)} modules, rank {'/'.join(map(str, ranks))}, {self.format}, from {self.source})"


def _split_key(key: str, legacy: bool = False):
    """(module, kind, format) for a LoRA tensor name, or None; with `legacy`, diffusers' old `.lora.down.weight`."""
    suffixes = {**SUFFIXES, **LEGACY_SUFFIXES} if legacy else SUFFIXES
    suffix = next((x for x in suffixes if key.endswith(x)), None)
    if suffix is None:
        return None
    module, kind = key[: -len(suffix)], suffixes[suffix]
    if module.startswith(KOHYA_PREFIX):
        return _unflatten(module[len(KOHYA_PREFIX) :]), kind, "kohya"
    for prefix in PREFIXES:
        module = module.removeprefix(prefix)
    if kind in ("alpha", "bias", "magnitude"):
        fmt = None
    else:
        fmt = "diffusers" if "lora_A" in key or "lora_B" in key or ".lora." in key else "lora_down/lora_up"
    return module, kind, fmt


def _converted(tensors: dict) -> bool:
    """Whether diffusers reads the file through its Qwen converter (`_convert_non_diffusers_qwen_lora_to_diffusers`):
    alphas, kohya or `diffusion_model.` names, or peft's adapter name `default.` in the names."""
    return any(
        k.endswith(".alpha") or k.startswith(("lora_unet_", "diffusion_model.")) or "default." in k for k in tensors
    )


def _fold(t: mx.array, s: float) -> mx.array:
    """t * s rounded to t's dtype, as torch multiplies a tensor by a Python number (in float32 for 16-bit floats)."""
    if s == 1.0:
        return t
    return (t.astype(mx.float32) * s).astype(t.dtype) if t.dtype != mx.float64 else t * s


def _alpha_scales(alpha: float, rank: int) -> tuple[float, float]:
    """diffusers' split of alpha / rank into (down, up) factors folded into the tensors (`get_alpha_scales`)."""
    scale_down, scale_up = alpha / rank, 1.0
    while scale_down * 2 < scale_up:
        scale_down *= 2
        scale_up /= 2
    return scale_down, scale_up


def _peft_config(metadata: dict | None) -> dict | None:
    """The transformer's peft LoraConfig from a file's `lora_adapter_metadata`, as diffusers reads it."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    config = json.loads(raw)
    ours = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    return ours or config


def _peft_scale(config: dict | None, module: str, rank: int) -> float:
    """peft's `scaling` of one module: lora_alpha / r (or / sqrt(r) with rsLoRA), alpha_pattern first."""
    if config is None:
        return 1.0
    alpha = config.get("lora_alpha", 8)  # peft's LoraConfig default
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


def _listing(names, limit: int = 8) -> str:
    names = list(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def parse_lora(tensors: dict, metadata: dict | None = None, source: str = "<memory>") -> LoRA:
    """A LoRA from its tensors (names as in the file) and the file's metadata, read as diffusers' Qwen-Image loader
    reads it (`QwenImageLoraLoaderMixin.lora_state_dict`, then peft); errors name the problem and the fix."""
    if not tensors:
        raise ValueError(f"{source} holds no tensors at all: it is not a LoRA. Give the LoRA's .safetensors file.")
    dora = [k for k in tensors if "dora_scale" in k]
    if dora:  # kohya's DoRA: diffusers filters the magnitudes out and loads the plain LoRA that is left
        warnings.warn(
            f"{source} is a DoRA in kohya's names ({len(dora)} `dora_scale` tensors, e.g. {dora[0]}): as diffusers "
            "does, its magnitudes are dropped and the rest is applied as a plain LoRA, W + s * alpha/r * B @ A, "
            "which is not what it was trained as. For the trained result, merge it with the tool that trained it.",
            stacklevel=3,
        )
        tensors = {k: v for k, v in tensors.items() if "dora_scale" not in k}
    for marker, what in OTHER_ADAPTERS.items():
        hits = [k for k in tensors if marker in k]
        if hits:
            raise ValueError(
                f"{source} is {what}, not a plain LoRA (e.g. {hits[0]}): qwen_nb applies LoRAs, W + s * alpha/r * "
                "B @ A. Merge it into the model with the tool that trained it, or use a plain-LoRA export."
            )
    config = _peft_config(metadata)
    converted = _converted(tensors)

    parts: dict[str, dict] = {}
    formats, unknown = set(), []
    for key, value in tensors.items():
        split = _split_key(key, legacy=not converted)
        if split is None:
            unknown.append(key)
            continue
        module, kind, fmt = split
        formats.add(fmt)
        parts.setdefault(module, {})[kind] = (key, value)
    if not parts:
        names = _listing(sorted(tensors), 4)
        full = any(_is_qwen_linear(k.rsplit(".", 1)[0]) for k in tensors if k.endswith((".weight", ".bias")))
        hint = (
            " They look like a model's own weights (a full checkpoint or a merged model), not a LoRA: load a model "
            "with QwenImagePipeline.from_pretrained."
            if full
            else ""
        )
        raise ValueError(
            f"{source} holds no LoRA tensors: its {len(tensors)} tensors are named like {names}, while a LoRA's are "
            f"{FORMATS}.{hint} Give the LoRA's own file."
        )
    if unknown:
        raise ValueError(
            f"{source} is in a format qwen_nb does not read: {len(unknown)} of its {len(tensors)} tensors are not "
            f"LoRA tensors of a known layout ({_listing(sorted(unknown))}). The formats read are {FORMATS}. Convert "
            "the file to one of these (the trainer's export options usually offer the diffusers or kohya layout)."
        )

    # peft's extras: a bias on B (lora_bias) and a DoRA's magnitudes, in diffusers/peft names only (diffusers'
    # converter for the other layouts refuses them)
    extras = {k: [p[k][0] for p in parts.values() if k in p] for k in ("bias", "magnitude")}
    if converted and (extras["bias"] or extras["magnitude"]):
        key = (extras["bias"] + extras["magnitude"])[0]
        raise ValueError(
            f"{source} has a LoRA bias or DoRA magnitude ({key}) in a layout with alphas, kohya or "
            "`diffusion_model.` names (or `default.`): diffusers reads these only in diffusers/peft names "
            "(`transformer.<module>.lora_B.bias`, `.lora_magnitude_vector.weight`, the peft config in the metadata)."
            " Save the LoRA in that layout."
        )
    if config and config.get("use_dora") and not extras["magnitude"]:
        raise ValueError(
            f"{source} is a DoRA (its peft config says use_dora=true) without its magnitudes "
            "(`<module>.lora_magnitude_vector.weight`): the file is incomplete; export it again."
        )
    used = {}  # the extras applied: those in the file, unless its peft config turns them off (peft ignores them)
    for kind, flag, what in (("magnitude", "use_dora", "DoRA magnitudes"), ("bias", "lora_bias", "lora_B biases")):
        used[kind] = bool(extras[kind])
        if used[kind] and config is not None and flag in config and not config[flag]:
            warnings.warn(
                f"{source}: its peft config says {flag}=false, so its {what} are ignored (as peft does)", stacklevel=3
            )
            used[kind] = False
    dora, biased = used["magnitude"], used["bias"]

    modules, problems = {}, []
    for module, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            have = " and ".join(p[k][0] for k in ("down", "up", "alpha", "bias", "magnitude") if k in p)
            missing = "lora_up / lora_B" if "down" in p else "lora_down / lora_A" if "up" in p else "lora_down/lora_up"
            problems.append(f"{have} has no {missing} partner")
            continue
        down, up = p["down"][1], p["up"][1]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            problems.append(
                f"{module}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a pair (r, in) and (out, r)"
            )
            continue
        alpha = None
        if "alpha" in p:
            a = p["alpha"][1]
            if a.size != 1:
                problems.append(f"{p['alpha'][0]} has shape {tuple(a.shape)}; an alpha is one number")
                continue
            alpha = float(a.astype(mx.float32).reshape(-1)[0].item())
        extra = {}
        for kind, wanted in (("bias", biased), ("magnitude", dora)):
            if kind in p and wanted:
                t = p[kind][1]
                if t.shape != (up.shape[0],):
                    problems.append(f"{p[kind][0]} has shape {tuple(t.shape)}; it should be ({up.shape[0]},)")
                extra[kind] = t
        if dora and "magnitude" not in p:
            problems.append(f"{module} has no DoRA magnitude (lora_magnitude_vector.weight), while others have")
        rank = down.shape[0]
        peft = _peft_scale(config, module, rank)
        scale = (1.0 if alpha is None else alpha / rank) * peft
        factor = None
        if alpha is not None:  # diffusers folds alpha / rank into the tensors as it reads them, in their dtype
            scale_down, scale_up = _alpha_scales(alpha, rank)
            down, up, factor = _fold(down, scale_down), _fold(up, scale_up), peft
        elif config is not None:
            alpha = scale * rank
        modules[module] = LoraWeights(down, up, scale, alpha, factor, extra.get("bias"), extra.get("magnitude"))
    if problems:
        raise ValueError(
            f"{source} is incomplete or inconsistent: {_listing(problems, 6)}. Every module needs its down (A) and "
            "up (B) matrices, and an alpha only beside them: export the LoRA again, or fetch the file again."
        )
    names = {"diffusers": "diffusers/peft", "lora_down/lora_up": "lora_down/lora_up", "kohya": "kohya"}
    fmt = " + ".join(names[f] for f in sorted(formats - {None}))
    fmt += " (DoRA)" if dora else ""
    return LoRA(modules, fmt, source)


# ------------------------------------------------------------------------------------------------ reading files
def _refuse_pickle(path, why: str = "") -> None:
    converted = Path(str(path)).with_suffix(".safetensors")
    raise ValueError(
        f"{path} is a pickle file{why}: unpickling runs whatever code the file holds, so qwen_nb reads LoRAs only "
        "from .safetensors (plain tensors). Convert it once, in an environment you trust, with torch and "
        'safetensors: python -c "import torch; from safetensors.torch import save_file; '
        f"sd = torch.load('{path}', map_location='cpu', weights_only=True); "
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{converted}')\" "
        "(weights_only=True refuses code objects). Many LoRA pages also offer a .safetensors download."
    )


def read_lora_file(path) -> LoRA:
    """A LoRA from one `.safetensors` file; a pickle file (`.bin`, `.pt`, `.ckpt`...) is refused."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header; its first byte may well be 0x80
    safetensors = len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size
    if not safetensors and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, a pickle
        _refuse_pickle(path, f" (torch.save's format, despite its {path.suffix or 'missing'} suffix)")
    read_header(path)  # a truncated or corrupt file is a CheckpointError naming it
    tensors, metadata = mx.load(str(path), return_metadata=True)
    return parse_lora(tensors, metadata, str(path))


def _pick(candidates: list[str], where: str, weight_name, sizes: dict | None = None) -> str:
    """The one LoRA file among `candidates` (or `weight_name`), else an error listing them."""
    if weight_name is not None:
        if weight_name in candidates:
            return weight_name
        raise FileNotFoundError(
            f"{where} has no {weight_name}. Its .safetensors files: {_listing(candidates, 12) or 'none'}."
        )
    # as diffusers' _best_guess_weight_name: no scheduler, optimizer or checkpoint files; pytorch_lora_weights first
    likely = [c for c in candidates if not any(x in c for x in ("scheduler", "optimizer", "checkpoint"))]
    if any(c.endswith(LORA_WEIGHT_NAME) for c in likely):
        likely = [c for c in likely if c.endswith(LORA_WEIGHT_NAME)]
    if len(likely) == 1:
        return likely[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(f"{where} holds no .safetensors file: give the LoRA file itself, or its folder.")
    shown = [f"{c} ({_gb(sizes[c])})" if sizes else c for c in candidates]
    raise ValueError(
        f"{where} holds {len(candidates)} .safetensors files: {_listing(shown, 12)}. Say which with "
        f"weight_name=..., e.g. weight_name={candidates[0]!r}."
    )


def _folder_file(folder: Path, weight_name) -> Path:
    if weight_name is not None and Path(weight_name).suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(folder / weight_name)
    if weight_name is not None and (folder / weight_name).is_file():  # also one in a subfolder, as diffusers
        return folder / weight_name
    candidates = sorted(p.name for p in folder.glob("*.safetensors"))
    if not candidates and weight_name is None:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            _refuse_pickle(folder / pickles[0], f" (and {folder} has no .safetensors)")
    return folder / _pick(candidates, str(folder), weight_name)


def _hub_file(repo_id: str, weight_name, revision, cache_dir, verbose: bool) -> Path:
    """One LoRA file of a hub repo in the HF cache: only that file is downloaded, after stating its size."""
    import huggingface_hub
    from huggingface_hub import constants

    if weight_name is not None and Path(weight_name).suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(f"{repo_id}/{weight_name}")
    if weight_name is not None:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, weight_name, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    if constants.HF_HUB_OFFLINE:
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            snap = Path(
                huggingface_hub.snapshot_download(
                    repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True, allow_patterns=[]
                )
            )
        except (LocalEntryNotFoundError, FileNotFoundError) as e:
            raise FileNotFoundError(
                f"{repo_id} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids downloading. "
                "Run the same call once online, or give the path of the .safetensors file."
            ) from e
        candidates = sorted(str(p.relative_to(snap)) for p in snap.rglob("*.safetensors"))
        return snap / _pick(candidates, f"{repo_id} (in the cache, offline)", weight_name)

    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = huggingface_hub.HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except GatedRepoError as e:
        raise HubError(f"{repo_id} is gated: accept its terms on huggingface.co and log in (`hf auth login`)") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{repo_id} has no revision {revision!r}") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id} is not a model on the Hugging Face hub (or it is private: log in with `hf auth login`). "
            f"For a local file or folder, give its path (e.g. ./{repo_id})."
        ) from e
    except Exception as e:  # the network: httpx / OS errors
        raise HubError(
            f"could not reach the Hugging Face hub for {repo_id} ({type(e).__name__}: {e}). Check the connection, "
            "or give the path of a local .safetensors file; HF_HUB_OFFLINE=1 uses only what is in the cache."
        ) from e
    sizes = {s.rfilename: s.size or 0 for s in info.siblings}
    candidates = sorted(f for f in sizes if f.endswith(".safetensors"))
    if not candidates and weight_name is None:
        pickles = sorted(f for f in sizes if Path(f).suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            _refuse_pickle(f"{repo_id}/{pickles[0]}", f" (and {repo_id} has no .safetensors)")
    name = _pick(candidates, repo_id, weight_name, sizes)
    revision = info.sha or revision
    cached = huggingface_hub.try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    size = sizes.get(name, 0)
    if verbose:
        print(f"{repo_id}: downloading {name} ({_gb(size)}) into {cache} (resumable: run again if interrupted).")
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if size > free:
        raise HubError(
            f"not enough disk space for {repo_id}/{name}: {_gb(size)} to download, {_gb(free)} free under {cache}. "
            "Free some space or point HF_HUB_CACHE at a larger disk."
        )
    return Path(huggingface_hub.hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir))


def read_lora(source, weight_name: str | None = None, *, revision=None, cache_dir=None, verbose: bool = True) -> LoRA:
    """A LoRA from a `.safetensors` file, a folder holding one (or `weight_name` in it), or a hub repo id (only
    that file is downloaded into the HF cache), or a state dict ({name: array}, as diffusers also takes).
    Pickle formats are refused; errors name the problem and the fix."""
    if isinstance(source, dict):
        tensors = {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in source.items()}
        return parse_lora(tensors, None, "<state dict>")
    s = str(source)
    path = Path(s).expanduser()
    if path.is_file():
        return read_lora_file(path)
    if path.is_dir():
        return read_lora_file(_folder_file(path, weight_name))
    if path.suffix.lower() in PICKLE_SUFFIXES + (".safetensors",) or not looks_like_repo_id(s):
        raise FileNotFoundError(
            f"{s} does not exist. Give a LoRA's .safetensors file, a folder holding one, or a hub repo id such as "
            "'lightx2v/Qwen-Image-Lightning' (with weight_name= when it holds several files)."
        )
    return read_lora_file(_hub_file(s, weight_name, revision, cache_dir, verbose))


# ------------------------------------------------------------------------------------------------ the model side
def _node(root, path: str):
    """The module (or list) at a dotted path, or None."""
    node = root
    for part in path.split(".") if path else []:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return None
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _set_module(root, path: str, module) -> None:
    parent, _, name = path.rpartition(".")
    node = _node(root, parent)
    if isinstance(node, list):
        node[int(name)] = module
    else:
        setattr(node, name, module)


def _is_linear(m) -> bool:
    return isinstance(m, LINEARS)


def _locate(model, path: str):
    """(module path in `model`, row block, number of row blocks) of a checkpoint linear, or None when the model has
    no such module: q/k/v fused into `to_qkv` / `add_qkv_proj` are row blocks [q; k; v] of one linear."""
    if _is_linear(_node(model, path)):
        return path, 0, 1
    parent, _, name = path.rpartition(".")
    for fused, names in FUSED_PROJECTIONS.items():
        if name in names and _is_linear(_node(model, f"{parent}.{fused}")):
            return f"{parent}.{fused}", names.index(name), len(names)
    return None


def _compute_dtype(module) -> mx.Dtype:
    return module.scales.dtype if isinstance(module, nn.QuantizedLinear) else module.weight.dtype


def _out_in(module) -> tuple[int, int]:
    if isinstance(module, nn.QuantizedLinear):
        return module.weight.shape[0], module.weight.shape[1] * 32 // module.bits
    return tuple(module.weight.shape)


def quantize_merged(module: nn.QuantizedLinear, weight: mx.array, delta: mx.array) -> dict:
    """The quantized arrays (weight, scales, biases) of high-precision `weight` + `delta`, with `module`'s group
    size, bits and mode: a LoRA merged before quantizing. The sum is made in float32 and rounded to the dtype the
    module was quantized from (that of its scales), as loading then quantizing that weight would."""
    merged = (weight.astype(mx.float32) + delta).astype(module.scales.dtype)
    wq, scales, *biases = mx.quantize(merged, module.group_size, module.bits, mode=module.mode)
    out = {"weight": wq, "scales": scales}
    if biases and biases[0] is not None:
        out["biases"] = biases[0]
    return out


class LoRALinear(nn.Module):
    """A linear (plain or quantized) with low-rank updates beside it, as peft's unfused LoRA layer:
    base(x) + sum_i s_i (x @ down_i^T) @ up_i^T, computed as one (x @ D^T) @ U^T with the scales in U."""

    def __init__(self, base: nn.Module, downs: list, ups: list, scales: list, bias: mx.array | None = None):
        super().__init__()
        self.base = base
        dtype = _compute_dtype(base)
        self.lora_down = mx.concatenate([d.astype(mx.float32) for d in downs], axis=0).astype(dtype)  # (R, in)
        up = [s * u.astype(mx.float32) for u, s in zip(ups, scales)]
        self.lora_up = mx.concatenate(up, axis=1).astype(dtype)  # (out, R)
        if bias is not None:  # peft's lora_bias: B's bias, scaled, added to the output
            self.lora_bias = bias.astype(dtype)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x) + (x @ self.lora_down.T) @ self.lora_up.T
        return y + self.lora_bias if "lora_bias" in self else y


_versions = itertools.count(1)


# the linears a LoRA can target, a rank's part of one too (qwen_nb.distributed, parallel="tensor")
LINEARS = (
    nn.Linear,
    nn.QuantizedLinear,
    LoRALinear,
    distributed.AllToShardedLinear,
    distributed.ShardedToAllLinear,
    distributed.QuantizedAllToShardedLinear,
    distributed.QuantizedShardedToAllLinear,
)


class LoraStack:
    """The LoRAs a pipeline has loaded, each with its scale, and what they change in a transformer.

    `version` changes with every `add` and `clear` (caches of anything computed from the weights, such as a
    schedule's modulation table, key on it). `fuse`/`attach` put the whole stack into a model (undoing what was
    there first), `unfuse` gives the model its original arrays back (the same objects: bit for bit)."""

    def __init__(self):
        self.entries: list[tuple[LoRA, float]] = []
        self.version = next(_versions)
        self._saved: dict = {}  # module path -> its original arrays ({name: array}) or, attached, its base module
        self.skipped: list[str] = []  # targets the last fuse/attach found no module for (modulation not built)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, lora: LoRA, scale: float = 1.0) -> None:
        self.entries.append((lora, float(scale)))
        self.version = next(_versions)

    def clear(self) -> None:
        self.entries = []
        self.version = next(_versions)

    def remove(self, lora: LoRA) -> None:
        """Take one LoRA (the object `add` got) out of the stack; the others keep their scales."""
        kept = [(lo, s) for lo, s in self.entries if lo is not lora]
        if len(kept) == len(self.entries):
            raise ValueError(f"{lora!r} is not loaded: pass what load_lora returned, or nothing to unload them all")
        self.entries = kept
        self.version = next(_versions)

    @property
    def targets(self) -> list[str]:
        return sorted({t for lora, _ in self.entries for t in lora.modules})

    @property
    def touches_modulation(self) -> bool:
        """Whether any LoRA changes a weight that depends on sigma alone (img_mod, txt_mod, norm_out.linear, the
        timestep embedder): a schedule's modulation table must then be computed with it."""
        return any(is_timestep_weight(t + ".weight") for t in self.targets)

    def _on(self, path: str) -> list:
        """[(LoraWeights, the LoRA's scale)] of every LoRA on one module, in the order they were loaded."""
        return [(w, s) for lora, s in self.entries if (w := lora.modules.get(path)) is not None]

    def has_dora(self, path: str | None = None) -> bool:
        """Whether a DoRA is on `path` (on any module without)."""
        paths = [path] if path is not None else self.targets
        return any(w.magnitude is not None for p in paths for w, _ in self._on(p))

    def low_rank(self, path: str) -> tuple[list, list, list]:
        """(downs, ups, scales) of every LoRA on one module, each scale = the LoRA's scale * its alpha / r."""
        downs, ups, scales = [], [], []
        for w, s in self._on(path):
            downs.append(w.down)
            ups.append(w.up)
            scales.append(s * w.multiplier)
        return downs, ups, scales

    def _sequential(self, path: str, weight: mx.array) -> tuple[mx.array, mx.array | None]:
        """(the module's weight with every LoRA, the change of its bias or None), float32, as peft's forward composes
        its adapters in order: a LoRA adds s * B @ A (and s * its B bias); a DoRA scales each output row of what is
        there by g = m / ||W + s * B @ A|| (W the original weight) and adds g * s * B @ A."""
        w0 = weight.astype(mx.float32)
        w, b = w0, None
        for lw, s in self._on(path):
            f = s * lw.multiplier
            d = f * (lw.up.astype(mx.float32) @ lw.down.astype(mx.float32))
            if lw.magnitude is None:
                w = w + d
                if lw.bias is not None:
                    b = (0.0 if b is None else b) + f * lw.bias.astype(mx.float32)
            else:
                g = lw.magnitude.astype(mx.float32) / mx.linalg.norm(w0 + d, axis=1)
                w = g[:, None] * (w + d)
                b = None if b is None else g * b
        return w, b

    def delta(self, path: str, dtype: mx.Dtype = mx.float32, weight: mx.array | None = None) -> mx.array:
        """sum_i scale_i * alpha_i / r_i * up_i @ down_i of one module, (out, in), computed in float32. A DoRA's
        update depends on the module's original weight: pass it as `weight` (out, in)."""
        if weight is None and any(w.magnitude is not None or w.bias is not None for w, _ in self._on(path)):
            raise ValueError(
                f"{path}: a DoRA's update depends on the original weight, and a LoRA bias changes the linear's bias, "
                "neither of which this way of loading handles (tensor-parallel loading): load without "
                "parallel='tensor', or use a plain LoRA"
            )
        if self.has_dora(path):
            return (self._sequential(path, weight)[0] - weight.astype(mx.float32)).astype(dtype)
        downs, ups, scales = self.low_rank(path)
        up = mx.concatenate([s * u.astype(mx.float32) for u, s in zip(ups, scales)], axis=1)
        down = mx.concatenate([d.astype(mx.float32) for d in downs], axis=0)
        return (up @ down).astype(dtype)

    def bias_delta(self, path: str, weight: mx.array | None = None) -> mx.array | None:
        """The (out,) change of one module's bias (peft's lora_bias: scale * bias of each LoRA's B), float32, or None
        when no LoRA on it has a bias. With a DoRA after it, the original `weight` is needed too."""
        on = self._on(path)
        if not any(w.bias is not None for w, _ in on):
            return None
        if self.has_dora(path):
            if weight is None:
                raise ValueError(f"{path}: a LoRA bias followed by a DoRA needs the original weight")
            return self._sequential(path, weight)[1]
        return sum(s * w.multiplier * w.bias.astype(mx.float32) for w, s in on if w.bias is not None)

    # -------------------------------------------------------------------- checks
    def check(self, model, lora: LoRA | None = None) -> None:
        """Raise a ValueError naming the problem and the fix unless every target of the stack (and of `lora`, one
        about to be added) is a linear of `model` with the LoRA's shape."""
        config = model.config
        shapes = linear_shapes(config)
        loras = [lo for lo, _ in self.entries] + ([lora] if lora is not None else [])
        unknown, misfit = {}, []
        for lo in loras:
            for path, w in sorted(lo.modules.items()):
                if path not in shapes:
                    unknown.setdefault(path, lo.source)
                elif w.shape != shapes[path]:
                    misfit.append(
                        f"{path} (the LoRA's update is {w.shape[0]}x{w.shape[1]}, the linear "
                        f"{shapes[path][0]}x{shapes[path][1]})"
                    )

        def guess(names) -> str:
            hints = sorted({what for n in names for key, what in OTHER_MODELS.items() if key in n})
            blocks = [int(m.group(1)) for n in names if (m := re.match(r"transformer_blocks[._](\d+)[._]", n))]
            if blocks and max(blocks) >= config.num_layers:
                hints.append(f"a Qwen-Image with more blocks: this one has {config.num_layers}")
            return f" They look like names of {' or '.join(hints)}." if hints else ""

        own = [p for p in lora.modules if p not in shapes] if lora is not None else []
        others = sorted(set(own) & _module_names(config))
        if others:  # peft refuses a LoRA on a module that is no linear (a norm...), as diffusers does
            raise ValueError(
                f"{lora.source}: {_listing(others)} of the LoRA are modules of this transformer that are not linears "
                "(norms, activations): a LoRA changes linears only, and diffusers (peft) refuses this file too. "
                f"This model's linears are {_names_look_like(config)}."
            )
        if unknown and own and len(own) < len(lora.modules) and set(unknown) == set(own):
            # as diffusers: peft puts the LoRA on the modules the transformer has and warns about the others (a
            # text encoder's, a module of another variant); a LoRA none of whose modules fit is refused below
            warnings.warn(
                f"{lora.source}: {len(own)} of the LoRA's {len(lora.modules)} modules are not linears of this "
                f"Qwen-Image transformer and are ignored, as diffusers ignores them: {_listing(sorted(own))}."
                f"{guess(own)}",
                stacklevel=3,
            )
            for p in own:
                del lora.modules[p]
            lora.ignored.extend(sorted(own))
            unknown = {}
        if unknown:
            names = sorted(unknown)
            raise ValueError(
                f"{_listing(sorted(set(unknown.values())), 3)}: {len(names)} of the LoRA's modules are not linears "
                f"of this Qwen-Image transformer: {_listing(names)}.{guess(names)} This model's linears are "
                f"{_names_look_like(config)}. Use a LoRA trained for Qwen-Image."
            )
        if misfit:
            raise ValueError(
                f"{len(misfit)} of the LoRA's modules do not fit this transformer's shapes: {_listing(misfit, 6)}. "
                "The LoRA was trained for a model of another size (the 20B Qwen-Image, or a smaller test model): "
                "use one trained for this model."
            )
        biased = _linear_biases(config)
        nobias = sorted({t for lo in loras for t, w in lo.modules.items() if w.bias is not None and not biased[t]})
        if nobias:
            raise ValueError(
                f"the LoRA has a bias on B (peft's lora_bias) for linears without a bias in this transformer: "
                f"{_listing(nobias)}. qwen_nb adds a LoRA bias to the linear's own bias only: use a LoRA without "
                "lora_bias for this model."
            )
        for path in {t for lo in loras for t in lo.modules}:
            if _locate(model, path) is None and not is_timestep_weight(path + ".weight"):
                raise ValueError(
                    f"{path} is a linear of Qwen-Image, but this transformer has no module there: was it changed "
                    "after loading? Load the LoRA into a transformer built from the checkpoint."
                )

    def _groups(self, model) -> dict:
        """{module path in model: (row blocks, {row block: target})}; targets without a module go to `skipped`."""
        groups, self.skipped = {}, []
        for path in self.targets:
            where = _locate(model, path)
            if where is None:
                self.skipped.append(path)
                continue
            mpath, index, parts = where
            groups.setdefault(mpath, (parts, {}))[1][index] = path
        return groups

    # -------------------------------------------------------------------- putting it in
    def fuse(self, model, weights: dict | None = None, keep: bool = True) -> list[str]:
        """Add the summed updates into `model`'s weights (in float32, then rounded to the weight's dtype), after
        undoing any earlier fuse/attach; returns the targets skipped because the model has no module for them
        (modulation weights not built: use `apply_to_weights` where they are made). A quantized linear is
        re-quantized from its high-precision checkpoint weight plus the update: `weights` must then hold it under
        the checkpoint's name (`transformer_blocks.0.attn.to_q.weight`). With `keep` the original arrays stay held
        until `unfuse` (as much memory again as the weights the LoRAs touch); without, nothing is held and the
        model cannot be restored (for a model that will be built again instead)."""
        self.unfuse(model)
        for mpath, (parts, members) in self._groups(model).items():
            module = _node(model, mpath)
            saved = {k: v for k, v in module.items() if isinstance(v, mx.array)}
            if isinstance(module, nn.QuantizedLinear):
                missing = [f"{t}.weight" for t in members.values() if weights is None or f"{t}.weight" not in weights]
                if missing:
                    raise ValueError(
                        f"{mpath} is quantized: a LoRA on it is merged into the high-precision weight, then quantized "
                        f"again. Pass weights= with {_listing(missing, 3)} from the checkpoint, or use attach() to "
                        "run the LoRA beside the quantized weights instead."
                    )
                names = [k for k in ("weight", "scales", "biases") if k in saved]
                rows = {k: split_rows(saved[k], parts) for k in names}
                originals = {}
                for i, t in members.items():
                    originals[i] = weights[f"{t}.weight"]
                    merged = quantize_merged(module, originals[i], self.delta(t, weight=originals[i]))
                    for k in names:
                        rows[k][i] = merged[k]
                for k in names:
                    module[k] = rows[k][0] if parts == 1 else mx.concatenate(rows[k], axis=0)
            else:
                w = saved["weight"]
                originals = dict(enumerate(split_rows(w, parts)))
                rows = list(originals.values())
                for i, t in members.items():
                    rows[i] = (rows[i].astype(mx.float32) + self.delta(t, weight=originals[i])).astype(w.dtype)
                module.weight = rows[0] if parts == 1 else mx.concatenate(rows, axis=0)
            changes = {i: self.bias_delta(t, weight=originals[i]) for i, t in members.items()}
            changes = {i: c for i, c in changes.items() if c is not None}
            if changes:  # a LoRA bias (peft's lora_bias) goes into the linear's bias (check() saw it has one)
                b = saved["bias"]
                brows = split_rows(b, parts)
                for i, c in changes.items():
                    brows[i] = (brows[i].astype(mx.float32) + c).astype(b.dtype)
                module.bias = brows[0] if parts == 1 else mx.concatenate(brows, axis=0)
            if keep:
                self._saved[mpath] = saved
        return list(self.skipped)

    def attach(self, model) -> list[str]:
        """Run the LoRAs beside the linears they change (`LoRALinear`: base(x) + (x @ D^T) @ U^T), the weights
        untouched (quantized ones included); after undoing any earlier fuse/attach. Every block gets the same
        structure (an update of one common rank, zero where a LoRA does not touch that block), so one compiled
        block still serves all blocks. Returns the targets skipped (see `fuse`)."""
        self.unfuse(model)
        if self.has_dora():
            raise ValueError(
                "a DoRA (a LoRA with magnitudes, peft's use_dora) rescales the whole weight, so it cannot run as a "
                "low-rank update beside it: load the pipeline with lora_adapters=False to merge it into the weights"
            )
        groups = self._groups(model)
        plans = {}
        for mpath, (parts, members) in groups.items():
            module = _node(model, mpath)
            out, _ = _out_in(module)
            rows = out // parts
            downs, ups, bias = [], [], None
            for i, t in members.items():
                d, u, s = self.low_rank(t)
                for d_j, u_j, s_j in zip(d, u, s):
                    full = mx.zeros((out, u_j.shape[1]), mx.float32)  # the update on its row block, zero elsewhere
                    full[i * rows : (i + 1) * rows] = s_j * u_j.astype(mx.float32)
                    downs.append(d_j.astype(mx.float32))
                    ups.append(full)
                change = self.bias_delta(t)
                if change is not None:
                    bias = mx.zeros((out,), mx.float32) if bias is None else bias
                    bias[i * rows : (i + 1) * rows] = change
            plans[mpath] = (module, downs, ups, bias)
        # blocks: the same modules with the same rank in every block (zero updates where a LoRA is absent)
        local, biased = {}, set()
        for mpath, (_, downs, _, bias) in plans.items():
            m = re.match(r"transformer_blocks\.\d+\.(.+)", mpath)
            if m:
                local[m.group(1)] = max(local.get(m.group(1), 0), sum(d.shape[0] for d in downs))
                if bias is not None:
                    biased.add(m.group(1))
        for name, rank in local.items():
            for i in range(len(model.transformer_blocks)):
                mpath = f"transformer_blocks.{i}.{name}"
                module = _node(model, mpath)
                if module is None:
                    continue
                _, downs, ups, bias = plans.get(mpath, (module, [], [], None))
                have = sum(d.shape[0] for d in downs)
                out, inp = _out_in(module)
                if have < rank:
                    downs = downs + [mx.zeros((rank - have, inp), mx.float32)]
                    ups = ups + [mx.zeros((out, rank - have), mx.float32)]
                if name in biased and bias is None:
                    bias = mx.zeros((out,), mx.float32)
                plans[mpath] = (module, downs, ups, bias)
        for mpath, (module, downs, ups, bias) in plans.items():
            _set_module(model, mpath, LoRALinear(module, downs, ups, [1.0] * len(ups), bias))
            self._saved[mpath] = module
        return list(self.skipped)

    def forget(self) -> None:
        """Drop what `fuse`/`attach` hold of a model that is gone (one built again needs nothing put back)."""
        self._saved = {}

    def unfuse(self, model) -> None:
        """Give `model` back the arrays (or modules) `fuse`/`attach` replaced: the same objects, bit for bit."""
        for mpath, saved in self._saved.items():
            if isinstance(saved, nn.Module):
                if not isinstance(_node(model, mpath), LoRALinear):
                    raise RuntimeError(f"{mpath} is no longer the LoRA adapter attach() put there: it was replaced")
                _set_module(model, mpath, saved)
            else:
                _restore_arrays(model, mpath, saved)
        self._saved = {}

    def apply_to_weights(self, weights: dict) -> dict:
        """Checkpoint-named weights with the stack's updates added to those it targets (in float32, then rounded
        to each weight's dtype); the others unchanged. For weights read from disk before they load: those of a
        transformer quantized after loading (the LoRA merged before quantizing), or the modulation weights from
        which a schedule's table is computed."""
        out = dict(weights)
        for t in self.targets:
            key = f"{t}.weight"
            if key not in out:
                continue
            w = out[key]
            if not mx.issubdtype(w.dtype, mx.floating) or f"{t}.scales" in out:
                raise ValueError(
                    f"{key} is stored quantized ({w.dtype}): a LoRA is merged into high-precision weights. Load the "
                    "original checkpoint (with quantize= to quantize after merging), or use attach() to run the "
                    "LoRA beside the quantized weights."
                )
            out[key] = (w.astype(mx.float32) + self.delta(t, weight=w)).astype(w.dtype)
            change = self.bias_delta(t, weight=w)
            if change is not None:
                if f"{t}.bias" not in out:
                    raise ValueError(
                        f"{t} has no bias among the weights given, while a LoRA on it has one (peft's lora_bias)"
                    )
                b = out[f"{t}.bias"]
                out[f"{t}.bias"] = (b.astype(mx.float32) + change).astype(b.dtype)
        return out


class LoraMethods:
    """`load_lora` / `unload_lora` of a pipeline holding `loras` (a LoraStack), `transformer`, `options` and a
    `_loras_changed()` that puts the stack into its transformer (Qwen-Image's pipelines and 2.1's)."""

    def load_lora(self, source, scale: float = 1.0, weight_name: str | None = None, **read_options) -> LoRA:
        """Add a LoRA (a .safetensors file, a folder holding one, or a hub repo id: only that file is downloaded)
        with its own `scale`; calls stack. Formats: diffusers/peft, lora_down/lora_up with alpha (the Lightning
        release, most trainers), kohya's flattened names. From a checkpoint the updates are merged into the weights
        as they are read (the transformer is read again; quantized ones are merged before quantizing, or run as
        adapters with `lora_adapters=True`); a model given in memory is fused in place. Returns the LoRA (for
        `unload_lora(lora)`)."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        lora = read_lora(source, weight_name, verbose=self.options.verbose, **read_options)
        self.loras.check(self.transformer, lora)
        self.loras.add(lora, scale)
        self._loras_changed()
        return lora

    def unload_lora(self, lora: LoRA | None = None) -> None:
        """Remove every LoRA: the base weights again, exactly (read again from the checkpoint, or put back). With
        `lora` (what `load_lora` returned) only that one; the others stay with their scales."""
        if lora is not None:
            self.loras.remove(lora)
            self._loras_changed()
        elif len(self.loras):
            self.loras.clear()
            self._loras_changed()


def _restore_arrays(model, mpath: str, saved: dict) -> None:
    """Put a module's original arrays back, also when its q/k/v were fused or split since."""
    module = _node(model, mpath)
    if _is_linear(module) and not isinstance(module, LoRALinear):
        for k, v in saved.items():
            module[k] = v
        return
    parent, _, name = mpath.rpartition(".")
    if name in FUSED_PROJECTIONS:  # fused when the LoRA went in, split since
        names = FUSED_PROJECTIONS[name]
        for j, sub in enumerate(names):
            part = _node(model, f"{parent}.{sub}")
            for k, v in saved.items():
                part[k] = split_rows(v, len(names))[j]
        return
    for fused, names in FUSED_PROJECTIONS.items():  # split when the LoRA went in, fused since
        if name in names and _is_linear(_node(model, f"{parent}.{fused}")):
            module = _node(model, f"{parent}.{fused}")
            for k, v in saved.items():
                rows = split_rows(module[k], len(names))
                rows[names.index(name)] = v
                module[k] = mx.concatenate(rows, axis=0)
            return
    raise RuntimeError(f"cannot restore {mpath}: the model has no module there any more")
