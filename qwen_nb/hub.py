"""Finding a Qwen-Image checkpoint: a folder in diffusers layout, or a hub id (`Qwen/Qwen-Image`) fetched into the
Hugging Face cache with only the files the pipeline reads, and checked for completeness before anything is loaded.

A hub id resolves in this order: a complete cached snapshot (no network; what `HF_HUB_OFFLINE=1` needs), else a
download: the small files first (configs, shard indexes, tokenizer, processor), then the shards those indexes name,
skipping any text-encoder shard that holds only vision-tower or lm_head tensors (the edit pipelines, `vision=True`,
read the vision tower and skip only lm_head). The size is stated before it starts; `snapshot_download` shows the
progress and resumes an interrupted download when called again.
"""

import fnmatch
import json
import re
import shutil
from pathlib import Path

from .loading import CheckpointError, read_weight_map, shard_index, weight_files, weight_layout
from .text_encoder import is_language_model

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_COMPONENTS = ("transformer", "vae", "text_encoder")
CONFIG_FILES = {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
SMALL_FILES = [
    "model_index.json",
    "transformer/*.json",
    "vae/*.json",
    "text_encoder/*.json",
    "scheduler/*.json",
    "tokenizer/*",
    "processor/*",  # Qwen-Image-Edit's: the image processor's settings and the tokenizer with the vision tokens
]
LAYOUT = (
    "a Qwen-Image pipeline folder in diffusers layout: model_index.json beside transformer/, vae/, text_encoder/, "
    "tokenizer/ and scheduler/ (what Qwen/Qwen-Image holds on the hub, or what save_pretrained writes)"
)


EMBEDDED = Path(__file__).resolve().parents[1] / "assets" / "demo"  # the demo model, in a clone of the repository


def _offline_hint() -> str:
    return f" The embedded demo model needs no download: give its folder, {EMBEDDED}." if EMBEDDED.exists() else ""


class HubError(RuntimeError):
    """The hub could not be reached or refused the request; the message says what to do."""


def keep_rules(vision: bool = False) -> dict:
    """Per component, the tensors a pipeline reads: the text encoder's language model, and with `vision` (the edit
    pipelines) its vision tower too; never lm_head."""
    if vision:
        return {"text_encoder": lambda name: not name.startswith("lm_head.")}
    return {"text_encoder": is_language_model}


KEEP = keep_rules()  # the text-to-image pipeline's


def looks_like_repo_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and not s.startswith((".", "~"))


def component_weight_files(
    folder: Path, component: str, vision: bool = False, variant: str | None = None
) -> list[Path]:
    """The safetensors files of one component that the pipeline reads (`vision`: an edit pipeline's), each checked
    for completeness: missing ones are a FileNotFoundError listing them all, a truncated or corrupt one a
    CheckpointError naming it. `variant` ("fp16"): that variant's files where there are any (see
    `loading.weight_layout`)."""
    folder = Path(folder) / component
    rules = keep_rules(vision)
    keep = rules.get(component, lambda name: True)
    wanted = sorted({shard for name, shard in shard_index(folder, variant).items() if keep(name)})
    missing = [s for s in wanted if not (folder / s).exists()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(wanted)} weight files that {folder}'s index names are missing: "
            f"{', '.join(missing)}. Download them again (for a hub id, run the same from_pretrained call again: "
            "it resumes and fetches only what is missing), or copy them from the original checkpoint."
        )
    return weight_files(folder, rules.get(component), variant)


def check_pipeline_folder(folder, vision: bool = False, variant: str | None = None) -> Path:
    """Raise a FileNotFoundError / CheckpointError naming the problem and the fix unless `folder` is a complete
    Qwen-Image pipeline (with `vision`, an edit pipeline's: processor/ and the vision tower too); return it."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"{folder} does not exist. Give {LAYOUT}, or a hub id such as 'Qwen/Qwen-Image' to download one."
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is a file, not a folder. Give {LAYOUT}.")
    if not (folder / "model_index.json").exists():
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise FileNotFoundError(
            f"{folder} is not a pipeline: it has no model_index.json (found: {found}). Give {LAYOUT}."
        )
    try:
        kind = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    except ValueError as e:
        raise CheckpointError(f"{folder / 'model_index.json'} is not valid JSON ({e}): download it again.") from e
    if kind and not kind.startswith("QwenImage"):
        raise ValueError(f"{folder} holds a {kind}, not a QwenImagePipeline: qwen_nb runs Qwen-Image only.")
    if kind == "QwenImage21Pipeline":  # Qwen-Image 2.1: processor/ in place of tokenizer/, its own layout
        from .pipeline21 import check_pipeline21_folder

        return check_pipeline21_folder(folder)
    for c in COMPONENTS:
        if not (folder / c).is_dir():
            raise FileNotFoundError(
                f"{folder} has no {c}/ folder: a Qwen-Image pipeline needs {', '.join(COMPONENTS)}. "
                f"Copy the missing folder from the original checkpoint, or download it again."
            )
    for c, name in CONFIG_FILES.items():
        if not (folder / c / name).exists():
            raise FileNotFoundError(f"{folder / c / name} is missing: copy it from the original checkpoint.")
    tok = folder / "tokenizer"
    if not (tok / "tokenizer.json").exists() and not ((tok / "vocab.json").exists() and (tok / "merges.txt").exists()):
        raise FileNotFoundError(f"{tok} has neither tokenizer.json nor vocab.json + merges.txt: copy them again.")
    if vision and not (folder / "processor" / "preprocessor_config.json").exists():
        raise FileNotFoundError(
            f"{folder} has no processor/preprocessor_config.json: the edit pipelines read their pictures' settings "
            "and the tokenizer with the vision tokens from processor/ (as Qwen/Qwen-Image-Edit has it). Copy the "
            "folder from the original checkpoint."
        )
    for c in WEIGHT_COMPONENTS:
        component_weight_files(folder, c, vision, variant)
    return folder


def resolve(
    repo_id_or_folder,
    revision: str | None = None,
    cache_dir=None,
    verbose: bool = True,
    vision: bool = False,
    variant: str | None = None,
) -> Path:
    """A complete pipeline folder from a local path or a hub id (downloading what is missing). `vision`: for an
    edit pipeline, which reads the text encoder's vision tower and processor/ too."""
    s = str(repo_id_or_folder)
    path = Path(s).expanduser()
    if path.exists() or not looks_like_repo_id(s):
        return check_pipeline_folder(path, vision, variant)
    return download(s, revision=revision, cache_dir=cache_dir, verbose=verbose, vision=vision, variant=variant)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def cached_snapshot(repo_id: str, revision=None, cache_dir=None, vision: bool = False, variant=None) -> Path:
    """The cached snapshot folder of `repo_id`, checked complete; raises if there is none or it is incomplete."""
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=SMALL_FILES, local_files_only=True
    )
    return check_pipeline_folder(path, vision, variant)


def plan_download(
    repo_id: str, small_folder: Path, sizes: dict[str, int], vision: bool = False, variant: str | None = None
) -> tuple[list[str], list[str]]:
    """(weight files to fetch, files skipped) from the downloaded indexes and the repo's file list (`vision`: for
    an edit pipeline, the vision tower's shards fetched too)."""
    rules = keep_rules(vision)
    wanted, skipped = [], []
    for c in WEIGHT_COMPONENTS:
        in_repo = sorted(f for f in sizes if fnmatch.fnmatch(f, f"{c}/*.safetensors"))
        # the files diffusers / transformers read, by the repo's names: the plain weights, else the only variant's
        names = sorted(f[len(c) + 1 :] for f in sizes if fnmatch.fnmatch(f, f"{c}/*"))
        layout = weight_layout(names, f"{repo_id}/{c}", variant)
        index = {}
        for name in layout[2] if layout else ():
            index.update(read_weight_map(small_folder / c / name))
        if index:
            keep = rules.get(c, lambda name: True)
            needed = sorted({f"{c}/{shard}" for name, shard in index.items() if keep(name)})
            skipped += sorted({f"{c}/{shard}" for shard in index.values()} - set(needed))
        elif layout:
            needed = [f"{c}/{name}" for name in layout[1]]
        else:
            needed = in_repo
        if not needed:
            raise FileNotFoundError(f"{repo_id} has no safetensors weights under {c}/: is it a Qwen-Image pipeline?")
        wanted += needed
    return wanted, skipped


def download(
    repo_id: str,
    revision: str | None = None,
    cache_dir=None,
    verbose: bool = True,
    vision: bool = False,
    variant: str | None = None,
) -> Path:
    """Fetch what the pipeline needs from `repo_id` into the hub cache (resuming) and return the snapshot folder."""
    from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return cached_snapshot(repo_id, revision, cache_dir, vision, variant)
    except (LocalEntryNotFoundError, FileNotFoundError) as e:  # not cached, or partly: download what is missing
        problem = e
    # a corrupt cached file (CheckpointError) is raised as it is: downloading again would not replace it
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"{repo_id} is not complete in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids downloading "
            f"({problem}). Run the same call once online (about 58 GB for Qwen/Qwen-Image; an interrupted download "
            f"resumes), or give the folder of a local copy.{_offline_hint()}"
        ) from problem

    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except GatedRepoError as e:
        raise HubError(f"{repo_id} is gated: accept its terms on huggingface.co and log in (`hf auth login`)") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{repo_id} has no revision {revision!r}") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id} is not a model on the Hugging Face hub (or it is private: log in with `hf auth login`). "
            f"For a local folder, give its path (e.g. ./{repo_id})."
        ) from e
    except Exception as e:  # the network: httpx / OS errors
        raise HubError(
            f"could not reach the Hugging Face hub for {repo_id} ({type(e).__name__}: {e}). Check the connection, "
            f"or give the folder of a local copy; HF_HUB_OFFLINE=1 uses only what is in the cache.{_offline_hint()}"
        ) from e
    revision = info.sha or revision
    sizes = {s.rfilename: s.size or 0 for s in info.siblings}
    small = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=SMALL_FILES))
    if not (small / "model_index.json").exists():
        raise FileNotFoundError(f"{repo_id} has no model_index.json: it is not a diffusers pipeline. Give {LAYOUT}.")
    wanted, skipped = plan_download(repo_id, small, sizes, vision, variant)

    total = sum(sizes.get(f, 0) for f in wanted)
    have = sum(
        sizes.get(f, 0)
        for f in wanted
        if isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache_dir, revision=revision), str)
    )
    need = total - have
    if verbose:
        print(
            f"{repo_id}: {_gb(total)} of weights in {len(wanted)} files, {_gb(have)} already in the cache; "
            f"downloading {_gb(need)} into {cache} (resumable: run again if interrupted)."
        )
        if skipped:
            print(
                f"  skipping {len(skipped)} file(s) ({_gb(sum(sizes.get(f, 0) for f in skipped))}) that hold only "
                + ("lm_head tensors" if vision else "vision-tower / lm_head tensors")
            )
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if need > free:
        raise HubError(
            f"not enough disk space for {repo_id}: {_gb(need)} to download, {_gb(free)} free under {cache}. "
            "Free some space or point HF_HUB_CACHE at a larger disk."
        )
    folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=SMALL_FILES + wanted)
    return check_pipeline_folder(folder, vision, variant)
