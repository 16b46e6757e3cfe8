"""Checkpoint folders written by qwen_nb: `save_pipeline` (what `QwenImagePipeline.save_pretrained` does) and
safetensors shards with diffusers' index. A saved folder loads with `from_pretrained` like the original: the
transformer as the pipeline holds it (quantized included, marked in transformer/config.json), the other components
copied (hard links where the file system allows).
"""

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx

from .hub import component_weight_files
from .loading import read_config


def save_pipeline(
    source: Path,
    out,
    transformer_weights: dict,
    quantization: dict | None,
    overwrite: bool = False,
    max_shard_size: int = 5_000_000_000,
    vision: bool = False,
) -> Path:
    """Write a pipeline folder: everything of `source` but the transformer's weights, which are
    `transformer_weights` (checkpoint names; consumed shard by shard, so the dict should be the only holder of
    its arrays), with `quantization` (a QuantizationReport's config) marked in transformer/config.json. Refuses a
    non-empty folder unless `overwrite=True` (then files of the same names are replaced). `vision`: an edit
    pipeline's, whose text-encoder vision tower and processor/ are copied too."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: give a folder to save the pipeline into")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} is not empty; nothing was written. Give a new or empty folder, or pass overwrite=True to "
            "write into it (files of the same names are replaced)."
        )
    src = Path(source).resolve()
    if out.resolve() == src or src in out.resolve().parents or out.resolve() in src.parents:
        raise ValueError(f"cannot save into {out}: it overlaps the folder the pipeline reads from ({src})")
    out.mkdir(parents=True, exist_ok=True)

    _copy(source / "model_index.json", out / "model_index.json")
    for c in ("tokenizer", "scheduler") + (("processor",) if vision else ()):
        for f in sorted((source / c).iterdir()):
            if f.is_file():
                _copy(f, out / c / f.name)
    for c in ("vae", "text_encoder"):
        for f in sorted((source / c).iterdir()):
            if f.is_file() and not f.name.endswith(".safetensors"):
                _copy(f, out / c / f.name)
        for f in component_weight_files(source, c, vision):
            _copy(f, out / c / f.name)

    tdir = out / "transformer"
    tdir.mkdir(parents=True, exist_ok=True)
    config = read_config(source / "transformer")
    config.pop("quantization", None)
    if quantization:
        config["quantization"] = quantization
    (tdir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_sharded(transformer_weights, tdir, max_shard_size)
    return out


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


def save_sharded(weights: dict, folder: Path, max_shard_size: int, name: str = "diffusion_pytorch_model") -> None:
    """safetensors shards of at most max_shard_size bytes (a single file when it fits), with diffusers' index.
    Each shard's arrays are dropped from `weights` once written, so a lazily loaded model is read a shard at a time."""
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
    weights.clear()
    single = len(shards) == 1
    weight_map, total = {}, 0
    for i in range(len(shards)):
        shard = shards[i]
        fname = f"{name}.safetensors" if single else f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / fname), shard, metadata={"format": "mlx"})
        weight_map.update({k: fname for k in shard})
        total += sum(v.nbytes for v in shard.values())
        shards[i] = None  # written: its arrays may go
    if single:
        return
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{name}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
