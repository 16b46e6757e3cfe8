"""Qwen-Image over several processes (Macs, GPUs) with MLX's own distributed engine, `mx.distributed`.

Started under `mlx.launch` (ring, MPI, JACCL or NCCL backend), every process (rank) runs the same pipeline, and
`Parallel(mode)` says how they share the work:

- "cfg": the conditional and unconditional passes of classifier-free guidance run on different ranks (even ranks
  the prompt, odd ranks the negative prompt); each rank holds the whole model and the two predictions meet once
  per step (`all_gather`), after which both ranks apply diffusers' CFG with the norm rescale. With 2k ranks the
  k pairs share `num_images` pictures.
- "tensor": the transformer's weights are split over the ranks in the Megatron way (`mlx.nn.layers.distributed`):
  q/k/v and the MLPs' first linears by output (`AllToShardedLinear`: each rank holds its heads and its part of the
  hidden width), the attention outputs and the MLPs' second linears by input (`ShardedToAllLinear`: one `all_sum`
  after each). Each rank reads only its rows or columns from the safetensors files (`ShardReader`), so no rank
  ever holds the whole transformer.

Nothing here moves data by itself: every exchange is an `mx.distributed` collective.
"""

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import (
    AllToShardedLinear,
    QuantizedAllToShardedLinear,
    QuantizedShardedToAllLinear,
    ShardedToAllLinear,
)
from mlx.utils import tree_flatten

from .loading import CheckpointError, read_config, read_header, weight_files
from .quantize import (
    GROUP_SIZE,
    QuantizationReport,
    check_bits,
    is_timestep_weight,
    quantize_transformer,
)
from .switches import Switches
from .transformer import QwenImageTransformer, TransformerConfig, prepare_transformer

MODES = ("cfg", "tensor")

# The linears of a block split by output (their outputs are per head or per hidden unit) and by input (they sum
# over heads or hidden units): Megatron's pairing, so that one all_sum closes each attention and each MLP.
BY_OUTPUT = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "img_mlp.net.0.proj",
    "txt_mlp.net.0.proj",
)
BY_INPUT = ("attn.to_out.0", "attn.to_add_out", "img_mlp.net.2", "txt_mlp.net.2")


def shard_axis(name: str) -> int | None:
    """The axis along which a transformer weight (checkpoint name) is split over ranks, or None (replicated)."""
    if not name.startswith("transformer_blocks."):
        return None
    module, _, kind = name.partition(".")[2].partition(".")[2].rpartition(".")
    if module in BY_OUTPUT:
        return 0  # weight rows and bias entries
    if module in BY_INPUT and kind == "weight":
        return 1  # weight columns; the bias is added once, after the all_sum
    return None


def check_tensor_split(config: TransformerConfig, ranks: int) -> None:
    """ValueError unless `ranks` divides the head count and the MLP's hidden width."""
    hidden = 4 * config.dim
    if config.num_attention_heads % ranks:
        raise ValueError(
            f"parallel='tensor' splits the {config.num_attention_heads} attention heads over {ranks} ranks, which "
            f"does not divide them: launch a number of ranks that divides {config.num_attention_heads}"
        )
    if hidden % ranks:
        raise ValueError(f"parallel='tensor' cannot split the MLP's hidden width {hidden} over {ranks} ranks")


def _hash(value) -> int:
    text = json.dumps(value, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


class Parallel:
    """One pipeline's place in an `mx.distributed` group and the collectives its mode needs."""

    def __init__(self, mode: str, group=None):
        if mode not in MODES:
            raise ValueError(f"parallel must be None, 'cfg' or 'tensor', got {mode!r}")
        self.mode = mode
        self.group = group or mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()
        if mode == "cfg" and self.size % 2:
            raise ValueError(
                f"parallel='cfg' puts the prompt's and the negative prompt's passes on two ranks, so it needs an even "
                f"number of ranks; this group has {self.size}. Launch with `mlx.launch -n 2 ...` (or 2k ranks)."
            )

    def __repr__(self) -> str:
        return f"Parallel({self.mode!r}, rank {self.rank} of {self.size})"

    @property
    def is_main(self) -> bool:
        """Rank 0 shows the progress, decodes and writes the pictures; the others stay quiet."""
        return self.rank == 0

    # ------------------------------------------------------------------ agreement between ranks
    def agree(self, what: str, value) -> None:
        """ValueError on every rank unless every rank passes the same `value` (compared by a hash)."""
        mine = mx.array([_hash(value)], dtype=mx.int32)
        hashes = np.array(mx.distributed.all_gather(mine, group=self.group)).ravel()
        others = [r for r, h in enumerate(hashes) if h != hashes[0]]
        if others:
            raise ValueError(
                f"the ranks were started with different {what}: rank(s) {others} differ from rank 0. Start every "
                "rank with the same command (model, options, prompt and seed)"
            )

    def share_seed(self, seed: int) -> int:
        """Rank 0's seed on every rank (a random seed is drawn on each rank; rank 0's wins)."""
        words = mx.array([seed >> 32, seed & 0xFFFFFFFF], dtype=mx.uint32)
        gathered = np.array(mx.distributed.all_gather(words[None], group=self.group))
        return int(gathered[0, 0]) << 32 | int(gathered[0, 1])

    # ------------------------------------------------------------------ CFG in parallel
    @property
    def cond(self) -> bool:
        """cfg mode: whether this rank runs the prompt's pass (even ranks) or the negative prompt's (odd ranks)."""
        return self.rank % 2 == 0

    @property
    def pairs(self) -> int:
        return self.size // 2 if self.mode == "cfg" else 1

    def images(self, count: int) -> list[int]:
        """The indices of the `count` pictures this rank's pair makes: every pairs-th one, padded with repeats so
        that every pair runs the same batch (the collectives need equal shapes)."""
        per = -(-count // self.pairs)
        mine = list(range(self.rank // 2 if self.mode == "cfg" else 0, count, self.pairs))
        return mine + [mine[-1] if mine else 0] * (per - len(mine))

    def exchange(self, v: mx.array) -> tuple[mx.array, mx.array]:
        """(cond, uncond) velocities of this rank's pair from this rank's own (B, N, C): one all_gather a step."""
        everyone = mx.distributed.all_gather(v, group=self.group)  # (size * B, N, C), rank-major
        B = v.shape[0]
        first = (self.rank // 2) * 2 * B
        return everyone[first : first + B], everyone[first + B : first + 2 * B]

    def collect(self, x: mx.array, count: int) -> mx.array:
        """The latents of all `count` pictures, in order, from each pair's share (B, N, C) (all_gather)."""
        if self.pairs == 1:
            return x[:count]
        everyone = mx.distributed.all_gather(x, group=self.group)  # (size * B, N, C)
        B = x.shape[0]
        rows = [everyone[(2 * (i % self.pairs)) * B + i // self.pairs] for i in range(count)]
        return mx.stack(rows)

    # ------------------------------------------------------------------ tensor parallel
    def load_transformer(self, folder, dtype, quantize=None, switches=None, modulation=False, loras=None):
        """(this rank's shard of the transformer, QuantizationReport or None, the ShardReader) from a checkpoint's
        `transformer/` folder: see `load_sharded_transformer`."""
        return load_sharded_transformer(folder, self.group, dtype, quantize, switches, modulation, loras)

    def transformer_bytes(self, folder, dtype, held=None) -> int:
        """Bytes of transformer weights one rank holds in `dtype` (unquantized), from the file headers."""
        total = 0
        for name, (_, shape) in _shapes(Path(folder), held).items():
            n = int(np.prod(shape)) if shape else 1
            total += (n // self.size if shard_axis(name) is not None else n) * dtype.size
        return total


def _shapes(folder: Path, keep=None) -> dict:
    shapes = {}
    for f in weight_files(folder, keep):
        for name, spec in read_header(f).items():
            if name != "__metadata__" and (keep is None or keep(name)):
                shapes[name] = (spec["dtype"], tuple(spec["shape"]))
    return shapes


# ---------------------------------------------------------------------------------------------- reading shards
NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class ShardReader:
    """Reads one rank's rows or columns of safetensors tensors through a memory map: only those bytes are read
    from disk (`bytes_read` counts them)."""

    def __init__(self, folder, rank: int, size: int, keep=None):
        self.rank, self.size, self.bytes_read = rank, size, 0
        self.tensors = {}  # name -> (file, offset of the data, dtype, shape)
        for f in weight_files(Path(folder), keep):
            header = read_header(f)
            with open(f, "rb") as fh:  # the data starts after the 8-byte length and the header
                start = 8 + int.from_bytes(fh.read(8), "little")
            for name, spec in header.items():
                if name != "__metadata__" and (keep is None or keep(name)):
                    self.tensors[name] = (f, start + spec["data_offsets"][0], spec["dtype"], tuple(spec["shape"]))

    def read(self, name: str, axis: int | None) -> mx.array:
        """The tensor `name`, or this rank's equal part of it along `axis`."""
        if name not in self.tensors:
            raise CheckpointError(f"the checkpoint has no tensor {name}: is it the transformer's folder?")
        path, offset, kind, shape = self.tensors[name]
        if kind not in NUMPY:
            raise ValueError(
                f"{name} is stored as {kind}: parallel='tensor' reads float checkpoints (load the original one; "
                "quantize= quantizes each rank's part)"
            )
        whole = np.memmap(path, dtype=NUMPY[kind], mode="r", offset=offset, shape=shape)
        part = whole
        if axis is not None:
            n = shape[axis] // self.size
            index = [slice(None)] * len(shape)
            index[axis] = slice(self.rank * n, (self.rank + 1) * n)
            part = whole[tuple(index)]
        part = np.ascontiguousarray(part)
        self.bytes_read += part.nbytes
        x = mx.array(part)
        return x.view(mx.bfloat16) if kind == "BF16" else x


# ---------------------------------------------------------------------------------------------- the sharded model
def shard_layout(model: QwenImageTransformer, group) -> QwenImageTransformer:
    """Give a transformer's blocks the sharded structure (random weights, lazily: load a shard into them), in place.
    Heads per rank: num_attention_heads / group.size()."""
    N = group.size()
    check_tensor_split(model.config, N)
    for block in model.transformer_blocks:
        for path in BY_OUTPUT + BY_INPUT:
            linear = _get(block, path)
            out, inp = linear.weight.shape
            kind = AllToShardedLinear if path in BY_OUTPUT else ShardedToAllLinear
            _set(block, path, kind(inp, out, "bias" in linear, group=group))
        block.attn.heads = model.config.num_attention_heads // N
    return model


def shard_model(model: QwenImageTransformer, group) -> QwenImageTransformer:
    """A loaded (unfused, unquantized) transformer's blocks split in place with `AllToShardedLinear.from_linear` /
    `ShardedToAllLinear.from_linear`: this rank keeps its part of each weight (the rest is freed when evaluated)."""
    N = group.size()
    check_tensor_split(model.config, N)
    for block in model.transformer_blocks:
        for path in BY_OUTPUT + BY_INPUT:
            kind = AllToShardedLinear if path in BY_OUTPUT else ShardedToAllLinear
            _set(block, path, kind.from_linear(_get(block, path), group=group))
        block.attn.heads = model.config.num_attention_heads // N
    return model


def _get(module, path: str):
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _set(module, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    parent = _get(module, parent) if parent else module
    if name.isdigit():
        parent[int(name)] = value
    else:
        setattr(parent, name, value)


def quantize_shard(layer, bits: int, group_size: int = GROUP_SIZE):
    """A sharded linear as its quantized counterpart (each rank quantizes its own part: groups run along the
    input, so a part's groups are those of the whole weight), or None when its input width is not a multiple of
    `group_size`."""
    out, inp = layer.weight.shape
    if inp % group_size:
        return None
    plain = nn.Linear(inp, out, bias="bias" in layer)
    plain.update({k: layer[k] for k in ("weight", "bias") if k in layer})
    q = plain.to_quantized(group_size=group_size, bits=bits)
    N = layer.group.size()
    if isinstance(layer, AllToShardedLinear):
        sharded = QuantizedAllToShardedLinear(inp, out * N, "bias" in layer, group_size, bits, group=layer.group)
    else:
        sharded = QuantizedShardedToAllLinear(inp * N, out, "bias" in layer, group_size, bits, group=layer.group)
    sharded.update(q.parameters())
    return sharded


def load_sharded_transformer(
    folder,
    group,
    dtype: mx.Dtype = mx.bfloat16,
    quantize: int | None = None,
    switches: Switches | None = None,
    modulation: bool = False,
    loras=None,
):
    """(this rank's transformer, QuantizationReport or None, ShardReader): the blocks' split linears hold only this
    rank's rows or columns, read from disk alone; the rest (embedders, norms, output) is replicated. Block by
    block: the part is read, the LoRAs of `loras` (a LoraStack) are added to it (their update's matching rows or
    columns: shard after fusing), it is quantized and evaluated, so the peak stays near one block above the
    shard. `modulation=False` (the pipeline's schedule_modulation) leaves out the weights that depend on sigma."""
    folder = Path(folder)
    raw = read_config(folder)
    if raw.get("quantization"):
        raise ValueError(
            f"{folder} holds a quantized transformer: parallel='tensor' splits the float checkpoint; load the "
            "original one with quantize= (each rank quantizes its part)"
        )
    bits = check_bits(quantize)
    switches = switches or Switches()
    keep = None if modulation else (lambda name: not is_timestep_weight(name))
    model = shard_layout(QwenImageTransformer(TransformerConfig.from_dict(raw), switches, modulation), group)
    reader = ShardReader(folder, group.rank(), group.size(), keep)
    expected = dict(tree_flatten(model.parameters()))
    unexpected = sorted(reader.tensors.keys() - expected.keys())
    if unexpected:
        raise ValueError(f"the checkpoint does not fit the transformer: {len(unexpected)} unexpected: {unexpected[:8]}")
    targets = set(loras.targets) if loras is not None and len(loras) else set()
    report = QuantizationReport(bits, GROUP_SIZE, 8) if bits else None

    groups = {}
    for name in expected:
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "transformer_blocks" else "rest"
        groups.setdefault(key, []).append(name)
    for key, names in groups.items():
        weights = []
        for name in names:
            axis = shard_axis(name)
            w = reader.read(name, axis)
            if mx.issubdtype(w.dtype, mx.floating):
                w = w.astype(dtype)
            module, _, kind = name.rpartition(".")
            if kind == "weight" and module in targets:  # the LoRA's update, cut like the weight
                delta = loras.delta(module)
                if axis is not None:
                    delta = mx.split(delta, group.size(), axis=axis)[group.rank()]
                w = (w.astype(mx.float32) + delta).astype(w.dtype)
            if tuple(w.shape) != tuple(expected[name].shape):
                raise ValueError(
                    f"{name} has shape {tuple(w.shape)}; this rank's part should be {expected[name].shape}"
                )
            weights.append((name, w))
        model.load_weights(weights, strict=False)
        if bits and key != "rest":
            block = model.transformer_blocks[int(key.split(".")[1])]
            for path in BY_OUTPUT + BY_INPUT:
                q = quantize_shard(_get(block, path), bits)
                if q is None:
                    report.skipped.append(f"{key}.{path}")
                else:
                    _set(block, path, q)
                    report.quantized += 1
        mx.eval(model.parameters() if key == "rest" else model.transformer_blocks[int(key.split(".")[1])].parameters())
    if bits:  # the replicated linears (embedders, output; the modulation when built), as the whole model's
        rest = quantize_transformer(model, bits)
        report.quantized += rest.quantized
        report.skipped += rest.skipped
    prepare_transformer(model, None, switches)  # q/k/v fused per rank: each rank's rows of q, k and v stacked
    return model, report, reader


def held_bytes(model: nn.Module) -> int:
    """Bytes of the arrays a model holds (this rank's part, for a sharded one)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


__all__ = [
    "BY_INPUT",
    "BY_OUTPUT",
    "Parallel",
    "ShardReader",
    "check_tensor_split",
    "held_bytes",
    "load_sharded_transformer",
    "quantize_shard",
    "shard_axis",
    "shard_layout",
    "shard_model",
]
