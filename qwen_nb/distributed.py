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
  after each). The text encoder is split the same way (its q/k/v and MLP gate/up by output, o_proj and down_proj by
  input, the token embedding by vocabulary), and so is each schedule's modulation table (every rank computes its
  rows of the img_mod/txt_mod projections; one `all_gather` joins them). Each rank reads only its rows or columns
  from the safetensors files (`ShardReader`), so no rank ever holds or reads the whole transformer, text encoder
  or modulation.

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
from .lora import _node, _set_module
from .quantize import (
    GROUP_SIZE,
    QuantizationReport,
    check_bits,
    is_modulation,
    is_timestep_weight,
    quantize_transformer,
)
from .switches import Switches
from .text_encoder import QwenTextEncoder, TextEncoderConfig, is_language_model, language_model_name
from .timestep_embedder import QwenTimestepProjEmbeddings
from .transformer import (
    BlockModulation,
    ModulationTable,
    OutputModulation,
    QwenImageTransformer,
    TransformerConfig,
    _table,
    _with_zero,
    prepare_transformer,
)

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


# The text encoder's linears in each decoder layer, paired the same way (checkpoint or module names).
TEXT_BY_OUTPUT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
TEXT_BY_INPUT = ("self_attn.o_proj", "mlp.down_proj")


def text_shard_axis(name: str) -> int | None:
    """The axis along which a text encoder weight is split over ranks, or None (replicated: the norms, and the
    vision tower an edit pipeline reads); the token embedding is split by vocabulary (rows)."""
    name = language_model_name(name)
    if name == "model.embed_tokens.weight":
        return 0
    if not name.startswith("model.layers."):
        return None
    module, _, kind = name.split(".", 3)[3].rpartition(".")
    if module in TEXT_BY_OUTPUT:
        return 0
    if module in TEXT_BY_INPUT and kind == "weight":
        return 1
    return None


def check_text_split(config: TextEncoderConfig, ranks: int) -> None:
    """ValueError unless `ranks` divides the text encoder's query heads, key/value heads (GQA: each rank keeps
    whole groups), MLP width and vocabulary."""
    for count, what in (
        (config.num_attention_heads, "attention heads"),
        (config.num_key_value_heads, "key/value heads (GQA)"),
    ):
        if count % ranks:
            fits = [n for n in range(2, count + 1) if config.num_key_value_heads % n == 0 and count % n == 0]
            raise ValueError(
                f"parallel='tensor' splits the text encoder's {count} {what} over {ranks} ranks, which does not "
                f"divide them: launch a number of ranks that divides {config.num_key_value_heads} (the key/value "
                f"heads), e.g. {' or '.join(map(str, fits)) or '1 (no split)'}"
            )
    for count, what in ((config.intermediate_size, "MLP width"), (config.vocab_size, "vocabulary")):
        if count % ranks:
            raise ValueError(f"parallel='tensor' cannot split the text encoder's {what} {count} over {ranks} ranks")


def rank_shapes(shapes: dict, axis_of, ranks: int) -> dict:
    """{name: (dtype, shape)} of one rank's part: each tensor's split axis (`axis_of(name)`) divided by `ranks`."""
    out = {}
    for name, (kind, shape) in shapes.items():
        axis = axis_of(name)
        if axis is not None:
            shape = (*shape[:axis], shape[axis] // ranks, *shape[axis + 1 :])
        out[name] = (kind, tuple(shape))
    return out


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
        self.readers = {}  # tensor mode: the ShardReader of each component read so far (its bytes_read)
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
    def check_split(self, transformer: TransformerConfig, text_encoder: TextEncoderConfig) -> None:
        """ValueError, naming the rank counts that work, unless this group's size divides every split of the
        transformer and the text encoder."""
        check_tensor_split(transformer, self.size)
        check_text_split(text_encoder, self.size)

    def load_transformer(self, folder, dtype, quantize=None, switches=None, modulation=False, loras=None):
        """(this rank's shard of the transformer, QuantizationReport or None, the ShardReader) from a checkpoint's
        `transformer/` folder: see `load_sharded_transformer`."""
        model, report, reader = load_sharded_transformer(
            folder, self.group, dtype, quantize, switches, modulation, loras
        )
        self.readers["transformer"] = reader
        return model, report, reader

    def load_text_encoder(self, folder, dtype, switches=None) -> QwenTextEncoder:
        """This rank's shard of a checkpoint's `text_encoder/` (see `load_sharded_text_encoder`)."""
        model, self.readers["text_encoder"] = load_sharded_text_encoder(folder, self.group, dtype, switches)
        return model

    def load_modulation_table(self, folder, sigmas, dtype, quantize=None, loras=None) -> ModulationTable:
        """A schedule's whole modulation table, each rank reading and computing its rows (see
        `load_sharded_modulation_table`)."""
        table, self.readers["modulation"] = load_sharded_modulation_table(
            folder, self.group, sigmas, dtype, quantize, loras
        )
        return table


# ---------------------------------------------------------------------------------------------- reading shards
NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class ShardReader:
    """Reads one rank's rows or columns of safetensors tensors through a memory map: only those bytes are read
    from disk (`bytes_read` counts them). `keep(name)` picks the tensors; `rename(name)` gives a checkpoint name's
    name in the module (the text encoder's transformers-5 names)."""

    def __init__(self, folder, rank: int, size: int, keep=None, rename=None):
        self.rank, self.size, self.bytes_read = rank, size, 0
        self.tensors = {}  # name -> (file, offset of the data, dtype, shape)
        for f in weight_files(Path(folder), keep):
            header = read_header(f)
            with open(f, "rb") as fh:  # the data starts after the 8-byte length and the header
                start = 8 + int.from_bytes(fh.read(8), "little")
            for name, spec in header.items():
                if name != "__metadata__" and (keep is None or keep(name)):
                    info = (f, start + spec["data_offsets"][0], spec["dtype"], tuple(spec["shape"]))
                    self.tensors[rename(name) if rename else name] = info

    def read(self, name: str, axis: int | None) -> mx.array:
        """The tensor `name`, or this rank's equal part of it along `axis`."""
        if name not in self.tensors:
            raise CheckpointError(f"the checkpoint has no tensor {name}: is it the component's folder?")
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


def read_into(module: nn.Module, reader: ShardReader, axis_of, dtype, loras=None, prefix: str = "", names=None):
    """Load this rank's part of `module`'s parameters (`names`, default all) from `reader`, whose names are
    `prefix` + the module's: each cut along `axis_of(checkpoint name)`, floats cast to `dtype`, the updates of
    `loras` (a LoraStack) added where they apply, cut the same way (shard after fusing). Returns the arrays."""
    expected = dict(tree_flatten(module.parameters()))
    targets = set(loras.targets) if loras is not None and len(loras) else set()
    weights = []
    for name in names or expected:
        full = prefix + name
        axis = axis_of(full)
        w = reader.read(full, axis)
        if mx.issubdtype(w.dtype, mx.floating):
            w = w.astype(dtype)
        path, _, kind = full.rpartition(".")
        if kind == "weight" and path in targets:
            delta = loras.delta(path)
            if axis is not None:
                delta = mx.split(delta, reader.size, axis=axis)[reader.rank]
            w = (w.astype(mx.float32) + delta).astype(w.dtype)
        if tuple(w.shape) != tuple(expected[name].shape):
            raise ValueError(f"{full} has shape {tuple(w.shape)}; this rank's part should be {expected[name].shape}")
        weights.append((name, w))
    module.load_weights(weights, strict=False)
    return [w for _, w in weights]


def load_shards(model: nn.Module, reader: ShardReader, axis_of, dtype, what: str, loras=None, after=None) -> None:
    """Fill a sharded model (its layout built with random weights, never evaluated) from `reader`, layer by layer:
    each layer's part is read, `after(layer)` may change it (quantize), and it is evaluated before the next is
    read, so the peak stays near one layer above the shard. The names must match exactly."""
    expected = dict(tree_flatten(model.parameters()))
    missing, unexpected = (
        sorted(expected.keys() - reader.tensors.keys()),
        sorted(reader.tensors.keys() - expected.keys()),
    )
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not fit the {what}: {len(missing)} missing {missing[:8]}, {len(unexpected)} "
            f"unexpected {unexpected[:8]}. Is the config.json beside the weights the one they were saved with?"
        )
    layers = {}
    for name in expected:  # "transformer_blocks.3", "model.layers.3", or "" for the rest
        parts = name.split(".")
        cut = next((i + 1 for i, p in enumerate(parts) if p.isdigit()), 0)
        layers.setdefault(".".join(parts[:cut]), []).append(name)
    for layer, names in layers.items():
        arrays = read_into(model, reader, axis_of, dtype, loras, names=names)
        if after is not None and layer:
            after(layer)
        mx.eval(_node(model, layer).parameters() if layer else arrays)


# ---------------------------------------------------------------------------------------------- the sharded model
def _split_linears(module, by_output, by_input, group) -> None:
    """Replace `module`'s linears at the paths `by_output` / `by_input` by MLX's split ones (empty, lazily)."""
    for path in (*by_output, *by_input):
        linear = _node(module, path)
        out, inp = linear.weight.shape
        kind = AllToShardedLinear if path in by_output else ShardedToAllLinear
        _set_module(module, path, kind(inp, out, "bias" in linear, group=group))


def shard_layout(model: QwenImageTransformer, group) -> QwenImageTransformer:
    """Give a transformer's blocks the sharded structure (random weights, lazily: load a shard into them), in place.
    Heads per rank: num_attention_heads / group.size()."""
    N = group.size()
    check_tensor_split(model.config, N)
    for block in model.transformer_blocks:
        _split_linears(block, BY_OUTPUT, BY_INPUT, group)
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
            _set_module(block, path, kind.from_linear(_node(block, path), group=group))
        block.attn.heads = model.config.num_attention_heads // N
    return model


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
    report = QuantizationReport(bits, GROUP_SIZE, 8) if bits else None

    def quantize_block(layer: str) -> None:
        block = _node(model, layer)
        for path in BY_OUTPUT + BY_INPUT:
            q = quantize_shard(_node(block, path), bits)
            if q is None:
                report.skipped.append(f"{layer}.{path}")
            else:
                _set_module(block, path, q)
                report.quantized += 1

    load_shards(model, reader, shard_axis, dtype, "transformer", loras, quantize_block if bits else None)
    if bits:  # the replicated linears (embedders, output; the modulation when built), as the whole model's
        rest = quantize_transformer(model, bits)
        report.quantized += rest.quantized
        report.skipped += rest.skipped
    prepare_transformer(model, None, switches)  # q/k/v fused per rank: each rank's rows of q, k and v stacked
    return model, report, reader


# ---------------------------------------------------------------------------------------------- the text encoder
class ShardedEmbedding(nn.Module):
    """A token embedding split by vocabulary: each rank holds vocab / N rows, looks up the ids in its range (zeros
    for the others) and one all_sum gives every rank the whole (B, S, dims) lookup."""

    def __init__(self, vocab: int, dims: int, group):
        super().__init__()
        self.group = group
        rows = vocab // group.size()
        self.first = group.rank() * rows
        self.weight = mx.zeros((rows, dims))

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.first
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = self.weight[mx.where(mine, local, 0)]
        return mx.distributed.all_sum(mx.where(mine[..., None], x, mx.zeros((), x.dtype)), group=self.group)


def shard_text_layout(model: QwenTextEncoder, group) -> QwenTextEncoder:
    """Give a text encoder the sharded structure in place (random weights, never evaluated): each decoder layer's
    q/k/v and MLP gate/up split by output, o_proj and down_proj by input; heads and key/value heads per rank
    divided by group.size(); the token embedding split by vocabulary."""
    config, N = model.config, group.size()
    check_text_split(config, N)
    text = model.model
    text.embed_tokens = ShardedEmbedding(config.vocab_size, config.hidden_size, group)
    for layer in text.layers:
        _split_linears(layer, TEXT_BY_OUTPUT, TEXT_BY_INPUT, group)
        layer.self_attn.heads = config.num_attention_heads // N
        layer.self_attn.kv_heads = config.num_key_value_heads // N
    return model


def load_sharded_text_encoder(folder, group, dtype: mx.Dtype = mx.bfloat16, switches: Switches | None = None):
    """(this rank's text encoder, ShardReader) from a checkpoint's `text_encoder/` folder: the language model with
    its layers' split linears and the embedding holding only this rank's rows or columns, read from disk alone
    layer by layer; the norms replicated; the vision tower and lm_head never read."""
    folder = Path(folder)
    model = shard_text_layout(QwenTextEncoder(TextEncoderConfig.from_folder(folder), switches), group)
    reader = ShardReader(folder, group.rank(), group.size(), is_language_model, language_model_name)
    load_shards(model, reader, text_shard_axis, dtype, "Qwen2.5-VL text encoder")
    return model, reader


# ---------------------------------------------------------------------------------------------- the modulation
def load_sharded_modulation_table(
    folder, group, sigmas: mx.array, dtype: mx.Dtype = mx.bfloat16, quantize: int | None = None, loras=None
):
    """(a schedule's ModulationTable, ShardReader): `transformer.load_modulation_table` with each rank reading and
    computing only its rows of every modulation projection (img_mod, txt_mod, norm_out.linear: 1/N of their
    parameters, a block at a time; quantized per row as the whole model would be, the LoRAs' rows added); one
    all_gather joins the rows, so every rank ends with the whole table. The timestep embedder is read whole."""
    folder = Path(folder)
    config = TransformerConfig.from_dict(read_config(folder))
    check_tensor_split(config, group.size())
    N, D = group.size(), config.dim
    reader = ShardReader(folder, group.rank(), N, is_timestep_weight)
    axis_of = lambda name: 0 if is_modulation(name) else None  # noqa: E731

    def part(module: nn.Module, prefix: str) -> nn.Module:
        read_into(module, reader, axis_of, dtype, loras, prefix)
        if quantize:
            quantize_transformer(module, quantize, prefix=prefix)
        return module

    embedder = part(QwenTimestepProjEmbeddings(D), "time_text_embed.")
    temb = embedder(_with_zero(sigmas, config.zero_cond_t).astype(dtype), dtype)
    mx.eval(temb)
    rows = []  # this rank's rows of each block's img and txt modulation, then the output's
    for i in range(config.num_layers):
        block = BlockModulation(D)
        block.img_mod[1], block.txt_mod[1] = nn.Linear(D, 6 * D // N), nn.Linear(D, 6 * D // N)
        rows += part(block, f"transformer_blocks.{i}.").modulation(temb)
        mx.eval(rows[-2:])  # this block's rows are read here and dropped with the module
    out = OutputModulation(D)
    out.linear = nn.Linear(D, 2 * D // N)
    rows.append(part(out, "norm_out.").modulation(temb))
    widths = [r.shape[-1] for r in rows]
    every = mx.distributed.all_gather(mx.concatenate(rows, axis=-1)[None], group=group)  # (N, S, sum(widths))
    S, whole, start = every.shape[1], [], 0
    for w in widths:  # rank r's rows of a projection are its r-th slice: rank-major along the output
        whole.append(every[:, :, start : start + w].transpose(1, 0, 2).reshape(S, N * w))
        start += w
    mx.eval(whole)
    blocks = [(whole[2 * i], whole[2 * i + 1]) for i in range(config.num_layers)]
    return _table(blocks, whole[-1], config.zero_cond_t), reader


def held_bytes(model: nn.Module) -> int:
    """Bytes of the arrays a model holds (this rank's part, for a sharded one)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


__all__ = [
    "BY_INPUT",
    "BY_OUTPUT",
    "TEXT_BY_INPUT",
    "TEXT_BY_OUTPUT",
    "Parallel",
    "ShardReader",
    "ShardedEmbedding",
    "check_tensor_split",
    "check_text_split",
    "held_bytes",
    "load_shards",
    "load_sharded_modulation_table",
    "load_sharded_text_encoder",
    "load_sharded_transformer",
    "quantize_shard",
    "rank_shapes",
    "read_into",
    "shard_axis",
    "shard_layout",
    "shard_model",
    "shard_text_layout",
    "text_shard_axis",
]
