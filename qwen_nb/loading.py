"""Reading checkpoint folders: safetensors shards (with their `*.index.json`), checked for completeness before
use, loaded lazily with `mx.load`, and put into a model strictly with readable lists of what does not fit."""

import collections
import io
import json
import pickle
import re
import struct
import zipfile
from dataclasses import fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupt; the message names the file and the fix."""


def _fix(path: Path) -> str:
    real = Path(path).resolve()
    if real != Path(path).absolute():  # a hub cache snapshot links to a blob: that is the file to delete
        path = f"{real} (the cached file behind {path})"
    return (
        f"Delete {path} and download it again (for a hub checkpoint, run the same from_pretrained call again: "
        "the download resumes and fetches only what is missing)."
    )


# ------------------------------------------------------------------------------- PyTorch pickle weights (.bin)
# What diffusers' `save_pretrained(safe_serialization=False)` writes: torch.save's zip archive of a pickled state
# dict (`data.pkl`) and one uncompressed record per storage (`data/0`, ...). Read here without torch, with an
# unpickler that builds nothing but arrays (any other class in the pickle is refused).
TORCH_STORAGES = {
    "FloatStorage": ("F32", np.float32),
    "HalfStorage": ("F16", np.float16),
    "BFloat16Storage": ("BF16", np.uint16),
    "DoubleStorage": ("F64", np.float64),
    "LongStorage": ("I64", np.int64),
    "IntStorage": ("I32", np.int32),
    "ShortStorage": ("I16", np.int16),
    "CharStorage": ("I8", np.int8),
    "ByteStorage": ("U8", np.uint8),
    "BoolStorage": ("BOOL", np.bool_),
}


class _Rebuilt:
    """A tensor of a torch pickle before its data is read: storage (kind, key), offset, shape and stride."""

    def __init__(self, storage, offset, shape, stride, *_):
        self.kind, self.key = storage
        self.offset, self.shape, self.stride = int(offset), tuple(int(d) for d in shape), tuple(int(d) for d in stride)


class _TorchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Rebuilt
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *_: data
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in TORCH_STORAGES:
            return name
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor: refused")

    def persistent_load(self, pid):  # ("storage", storage type, key, location, numel)
        return pid[1], str(pid[2])


def _torch_pickle(path: Path) -> tuple[zipfile.ZipFile, str, dict]:
    """(the open archive, its folder prefix, {name: _Rebuilt}) of a torch.save zip file."""
    try:
        archive = zipfile.ZipFile(path)
        pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        state = _TorchUnpickler(io.BytesIO(archive.read(pkl))).load()
    except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is not a PyTorch weights file qwen_nb can read ({e}). {_fix(path)}") from e
    tensors = {k: v for k, v in state.items() if isinstance(v, _Rebuilt)}
    return archive, pkl[: -len("data.pkl")], tensors


def _torch_header(path: Path) -> dict:
    """A safetensors-like header of a torch pickle file: {name: {"dtype", "shape", "data_offsets"}}."""
    archive, _, tensors = _torch_pickle(path)
    archive.close()
    return {
        k: {"dtype": TORCH_STORAGES[t.kind][0], "shape": list(t.shape), "data_offsets": [0, 0]}
        for k, t in tensors.items()
    }


def load_torch_pickle(path: Path) -> dict[str, mx.array]:
    """The tensors of a torch.save file (diffusers' `diffusion_pytorch_model.bin`) as mx.arrays, bfloat16 kept."""
    archive, prefix, tensors = _torch_pickle(path)
    out, storages = {}, {}
    with archive:
        for name, t in tensors.items():
            dtype = TORCH_STORAGES[t.kind][1]
            if t.key not in storages:
                storages[t.key] = np.frombuffer(archive.read(f"{prefix}data/{t.key}"), dtype)
            data = storages[t.key]
            item = data.itemsize
            a = np.lib.stride_tricks.as_strided(
                data[t.offset :], t.shape, tuple(s * item for s in t.stride), writeable=False
            ).copy()
            if t.kind == "BFloat16Storage":  # the top half of a float32: exact
                out[name] = mx.array((a.astype(np.uint32) << 16).view(np.float32)).astype(mx.bfloat16)
            else:
                out[name] = mx.array(a)
    return out


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}, "__metadata__": ...}.
    Raises CheckpointError when the file is missing, not safetensors, or shorter than the header says."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Missing checkpoint file {path}. {_fix(path)}")
    if path.suffix == ".bin":  # a PyTorch pickle (diffusers' safe_serialization=False)
        return _torch_header(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size or n > 100_000_000:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}): a corrupt download. {_fix(path)}") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        raise CheckpointError(
            f"{path} is truncated: {size:,} bytes on disk, its header needs {8 + n + end:,}. "
            f"An interrupted download. {_fix(path)}"
        )
    return header


def check_safetensors(path: Path) -> None:
    """Raise CheckpointError unless `path` exists and is as long as its safetensors header says."""
    read_header(path)


# The weight files' names as diffusers (`diffusion_pytorch_model`) and transformers (`model`) write them, plain or
# with a `variant` (diffusers' and transformers' `save_pretrained(variant="fp16")`): `{stem}.safetensors`,
# `{stem}.safetensors.index.json` naming shards `{stem}-00001-of-00002.safetensors`; with a variant
# `{stem}.fp16.safetensors`, `{stem}.safetensors.index.fp16.json` and `{stem}.fp16-00001-of-00002.safetensors`.
STEMS = ("diffusion_pytorch_model", "model")
_NAME = re.compile(
    r"^(?P<stem>diffusion_pytorch_model|model)(?:"
    r"(?:\.(?P<v1>[^.\-]+))?\.safetensors"  # single
    r"|\.safetensors\.index(?:\.(?P<v2>[^.]+))?\.json"  # index
    r"|(?:\.(?P<v3>[^.\-]+))?-\d+-of-\d+\.safetensors"  # shard
    r")$"
)


def parse_weight_name(name: str) -> tuple[str, str | None, str] | None:
    """(stem, variant or None, "single" | "index" | "shard") of a weight file named as diffusers or transformers
    name them, else None."""
    m = _NAME.match(name)
    if not m:
        return None
    kind = "single" if name.endswith(".safetensors") and "-of-" not in name else "index"
    if m["v3"] is not None or re.search(r"-\d+-of-\d+\.safetensors$", name):
        kind = "shard"
    return m["stem"], m["v1"] or m["v2"] or m["v3"], kind


def weight_layout(names, where="", variant: str | None = None) -> tuple[str | None, list[str], list[str]] | None:
    """Which of a component folder's file names hold its weights, as diffusers / transformers choose them:
    (variant, single files, index files), or None when no file is named as they name them.

    The plain files (no variant) when there are any, as `from_pretrained` without `variant=` reads them; a folder
    holding only one variant's files (`save_pretrained(variant="fp16")`) is read in that variant (diffusers and
    transformers would then need `variant="fp16"`; qwen_nb takes the only weights there are); several variants and
    no plain files are ambiguous and refused. Of a stem with both an index and a single file, diffusers reads the
    index and transformers the single file. `variant` ("fp16", as diffusers' `from_pretrained(variant=...)`):
    that variant's files where the folder has them, else as without it (diffusers too falls back, component by
    component, to the plain files)."""
    parsed = {n: parse_weight_name(n) for n in names}
    parsed = {n: p for n, p in parsed.items() if p is not None and p[2] != "shard"}
    if not parsed:
        return None
    if variant is not None and any(v == variant for _, v, _ in parsed.values()):
        pass
    elif any(v is None for _, v, _ in parsed.values()):
        variant = None
    else:
        variants = sorted({v for _, v, _ in parsed.values()})
        if len(variants) > 1:
            raise CheckpointError(
                f"{where or 'the folder'} holds weights in the variants {', '.join(variants)} and none without a "
                f'variant: it is not clear which to read. Say which: from_pretrained(..., variant="{variants[0]}") '
                "(as diffusers' variant=)."
            )
        variant = variants[0]
    singles, indexes = [], []
    for stem in STEMS:
        mine = {k for n, (s, v, k) in parsed.items() if s == stem and v == variant}
        single = [n for n, (s, v, k) in parsed.items() if s == stem and v == variant and k == "single"]
        index = [n for n, (s, v, k) in parsed.items() if s == stem and v == variant and k == "index"]
        if mine == {"single", "index"}:  # both: diffusers reads the index, transformers the single file
            (single if stem == "diffusion_pytorch_model" else index).clear()
        singles += single
        indexes += index
    return variant, sorted(singles), sorted(indexes)


def _layout(folder: Path, variant: str | None = None):
    return weight_layout(sorted(p.name for p in Path(folder).iterdir() if p.is_file()), str(folder), variant)


def shard_index(folder: Path, variant: str | None = None) -> dict[str, str]:
    """{tensor name: shard file name} from the shard index a component folder's weights are read by (see
    `weight_layout`: the plain `*.safetensors.index.json`, or the variant's); {} if none."""
    folder = Path(folder)
    layout = _layout(folder, variant) if folder.is_dir() else None
    weight_map = {}
    for name in layout[2] if layout else ():
        weight_map.update(read_weight_map(folder / name))
    return weight_map


def read_weight_map(index: Path) -> dict[str, str]:
    """{tensor name: shard file name} of one shard index file (safetensors' or PyTorch pickles')."""
    try:
        return json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{index} is not a valid shard index ({e}). {_fix(index)}") from e


def _tensor_names(path: Path) -> set[str]:
    return {k for k in read_header(path) if k != "__metadata__"}


def _extra_files(folder: Path, chosen: list[Path], index: dict) -> list[Path]:
    """Other `*.safetensors` files of the folder (not named as diffusers / transformers name weights) that hold more
    tensors of the same model: none of their names is in the chosen files, and each begins as theirs do (a second
    file of attention biases, say). Anything else (a LoRA, a stray file of other tensors, another copy of the
    weights) is left out, as diffusers and transformers leave every such file out."""
    others = [p for p in sorted(folder.glob("*.safetensors")) if p not in chosen and parse_weight_name(p.name) is None]
    if not others:
        return []
    known = set(index)
    for f in chosen:
        known |= _tensor_names(f)
    roots = {k.split(".", 1)[0] for k in known}
    extra = []
    for f in others:
        names = _tensor_names(f)
        if names and not names & known and all(k.split(".", 1)[0] in roots for k in names):
            extra.append(f)
            known |= names
    return extra


def weight_files(folder: Path, keep=None, variant: str | None = None) -> list[Path]:
    """The weight files of a component folder, chosen as diffusers / transformers choose them (see
    `weight_layout`): those its shard index names, or the single file, plus any other file of more tensors of the
    same model (`_extra_files`); a folder with no safetensors so named: its PyTorch pickle weights as they name
    them (`diffusion_pytorch_model.bin`, read by `load_torch_pickle`), else all its `*.safetensors`. Every file is
    checked for completeness.

    `keep(name) -> bool` limits an indexed folder to the shards holding at least one kept tensor (a shard of
    vision-tower tensors only is then not needed, and need not have been downloaded). `variant`: see
    `weight_layout`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    layout = _layout(folder, variant)
    if layout is None:  # no safetensors named as diffusers / transformers name them: their .bin, else any
        files = _pickle_weight_files(folder, keep) or sorted(folder.glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickled:
                raise FileNotFoundError(
                    f"{folder} holds PyTorch pickle weights under other names ({', '.join(pickled[:3])}): qwen_nb "
                    "reads *.safetensors, and diffusion_pytorch_model.bin / pytorch_model.bin (or their shards with "
                    "a *.bin.index.json) as diffusers and transformers write them."
                )
            raise FileNotFoundError(f"no *.safetensors weights in {folder}")
        for f in files:
            check_safetensors(f)
        return files
    _, singles, indexes = layout
    index = shard_index(folder, variant) if indexes else {}
    files = [folder / n for n in singles]
    for name, shard in index.items():
        if (keep is None or keep(name)) and folder / shard not in files:
            files.append(folder / shard)
    files.sort()
    for f in files:
        check_safetensors(f)
    return files + _extra_files(folder, files, index)


def _pickle_weight_files(folder: Path, keep=None) -> list[Path]:
    """A folder's PyTorch pickle weights as diffusers / transformers name them (read only when it has no
    safetensors, as they do): `{diffusion_pytorch_model,pytorch_model}.bin`, or the shards that their
    `*.bin.index.json` names."""
    for stem in ("diffusion_pytorch_model", "pytorch_model"):
        index = folder / f"{stem}.bin.index.json"
        if index.exists():
            return sorted({folder / f for k, f in read_weight_map(index).items() if keep is None or keep(k)})
        if (folder / f"{stem}.bin").exists():
            return [folder / f"{stem}.bin"]
    return []


def read_weights(
    folder: Path, dtype: mx.Dtype | None = None, keep=None, variant: str | None = None
) -> dict[str, mx.array]:
    """All tensors of a component folder (those with `keep(name)` when given), lazily (nothing is read until
    evaluated), optionally cast. `variant`: see `weight_layout`."""
    weights = {}
    for f in weight_files(folder, keep, variant):
        if f.suffix == ".bin":
            weights.update(load_torch_pickle(f))
            continue
        try:
            weights.update(mx.load(str(f)))
        except RuntimeError as e:
            raise CheckpointError(f"could not read {f}: {e}. {_fix(f)}") from e
    if keep is not None:
        weights = {k: v for k, v in weights.items() if keep(k)}
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    return weights


def _listing(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_strict(model: nn.Module, weights: dict[str, mx.array], what: str = "model", prefix: str = "") -> None:
    """Put `weights` into `model`; every parameter must be given once with its exact shape, nothing extra. `prefix`
    is the model's path inside the checkpoint when it is a part of one (shown in the messages)."""
    expected = dict(tree_flatten(model.parameters()))
    missing = expected.keys() - weights.keys()
    unexpected = weights.keys() - expected.keys()
    misshaped = [
        f"{prefix}{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(prefix + k for k in missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(prefix + k for k in unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} with the wrong shape: {_listing(misshaped)}")
    if problems:
        raise ValueError(
            f"the checkpoint does not fit the {what}: " + "; ".join(problems) + ". Is the config.json beside the "
            "weights the one they were saved with?"
        )
    model.load_weights(list(weights.items()), strict=True)


def read_config(folder: Path, name: str = "config.json") -> dict:
    path = Path(folder) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: a component folder needs its {name}")
    return json.loads(path.read_text())


class Config:
    """Base of the models' config dataclasses: `from_dict` takes a `config.json` dict and keeps the keys the
    dataclass has, ignoring the rest (`_class_name`, `_diffusers_version`, keys of parts qwen_nb does not build);
    a subclass that must refuse or translate keys does so before calling it."""

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_folder(cls, folder, name: str = "config.json"):
        return cls.from_dict(read_config(folder, name))
