"""Reading checkpoint folders: safetensors shards (with their `*.index.json`), checked for completeness before
use, loaded lazily with `mx.load`, and put into a model strictly with readable lists of what does not fit."""

import json
import struct
from dataclasses import fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
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


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}, "__metadata__": ...}.
    Raises CheckpointError when the file is missing, not safetensors, or shorter than the header says."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Missing checkpoint file {path}. {_fix(path)}")
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


def shard_index(folder: Path) -> dict[str, str]:
    """{tensor name: shard file name} from a component folder's `*.safetensors.index.json` files ({} if none)."""
    weight_map = {}
    for index in sorted(Path(folder).glob("*.safetensors.index.json")):
        try:
            weight_map.update(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid shard index ({e}). {_fix(index)}") from e
    return weight_map


def weight_files(folder: Path, keep=None) -> list[Path]:
    """The safetensors files of a component folder: those its `*.safetensors.index.json` names, or the
    single/plain `*.safetensors` files when there is no index. Every file is checked for completeness.

    `keep(name) -> bool` limits an indexed folder to the shards holding at least one kept tensor (a shard of
    vision-tower tensors only is then not needed, and need not have been downloaded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    if list(folder.glob("*.safetensors.index.json")):
        files = []
        for name, shard in shard_index(folder).items():
            if (keep is None or keep(name)) and folder / shard not in files:
                files.append(folder / shard)
        files.sort()
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    for f in files:
        check_safetensors(f)
    return files


def read_weights(folder: Path, dtype: mx.Dtype | None = None, keep=None) -> dict[str, mx.array]:
    """All tensors of a component folder (those with `keep(name)` when given), lazily (nothing is read until
    evaluated), optionally cast."""
    weights = {}
    for f in weight_files(folder, keep):
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
