"""Hub ids: a complete cached snapshot is used offline (HF_HUB_OFFLINE=1, a fake HF_HUB_CACHE built from the tiny
fixture), an incomplete one is named, and a download fetches only the needed files after stating their size
(HfApi and snapshot_download replaced by fakes: no network here)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import huggingface_hub.constants as hf_constants
import mlx.core as mx
import numpy as np
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from qwen_nb import hub
from qwen_nb.loading import CheckpointError
from qwen_nb.pipeline import QwenImagePipeline

FIXTURES = Path(__file__).parent / "fixtures" / "tiny_pipeline"
SOURCE = FIXTURES / "layout_a"
REPO = "TinyOrg/Tiny-Qwen-Image"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LM_HEAD_ONLY = "text_encoder/model-00001-of-00005.safetensors"
VISION_ONLY = "text_encoder/model-00005-of-00005.safetensors"


def fixture_files(src=SOURCE) -> list[str]:
    return sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())


def make_fake_cache(cache: Path, skip=()) -> Path:
    """The hub cache layout: blobs/<sha256>, snapshots/<commit>/<path> -> ../../blobs/<sha256>, refs/main."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for rel in fixture_files():
        if rel in skip:
            continue
        data = (SOURCE / rel).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def test_offline_from_fake_cache_in_a_fresh_process(tmp_path):
    """The real environment variables, read by huggingface_hub at import: a fresh interpreter."""
    snap = make_fake_cache(tmp_path / "hub", skip=(LM_HEAD_ONLY, VISION_ONLY))
    code = (
        "import mlx.core as mx, numpy as np\n"
        "from qwen_nb import QwenImagePipeline\n"
        f"p = QwenImagePipeline.from_pretrained({REPO!r}, dtype=mx.float32, verbose=False)\n"
        "img = p.generate('a fox', height=32, width=32, steps=2, seed=0, progress=False)\n"
        "print(p.folder, np.asarray(img).shape)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HOME", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{snap} (32, 32, 3)"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def no_network(*a, **k):
        raise AssertionError("the network was used")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)


def test_complete_cache_needs_no_network(tmp_path, offline):
    snap = make_fake_cache(tmp_path)
    pipe = QwenImagePipeline.from_pretrained(REPO, dtype=mx.float32, cache_dir=tmp_path, verbose=False)
    assert pipe.folder == snap
    golden = mx.load(str(FIXTURES / "goldens.safetensors"))
    image = pipe.generate(
        "A photo of a red fox sitting in the snow, soft morning light.",
        height=64,
        width=64,
        steps=3,
        latents=golden["square_cfg.noise"],
        progress=False,
    )
    assert np.abs(np.asarray(image).astype(int) - np.array(golden["square_cfg.image"]).astype(int)).max() <= 2


def test_offline_with_nothing_cached(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1 forbids downloading") as e:
        QwenImagePipeline.from_pretrained(REPO, cache_dir=tmp_path, verbose=False)
    assert "Run the same call once online" in str(e.value)


def test_offline_with_a_partial_cache_names_the_missing_shard(tmp_path, offline):
    """snapshot_download itself returns a partial snapshot without complaint; the completeness check does not."""
    missing = "transformer/diffusion_pytorch_model-00004-of-00008.safetensors"
    make_fake_cache(tmp_path, skip=(missing,))
    with pytest.raises(FileNotFoundError, match="00004-of-00008") as e:
        QwenImagePipeline.from_pretrained(REPO, cache_dir=tmp_path, verbose=False)
    assert "HF_HUB_OFFLINE" in str(e.value)


def test_broken_cache_blob_is_named(tmp_path, offline):
    snap = make_fake_cache(tmp_path)
    shard = snap / "vae" / "diffusion_pytorch_model-00002-of-00021.safetensors"
    blob = shard.resolve()
    blob.write_bytes(blob.read_bytes()[:-100])  # damaged on disk
    with pytest.raises(CheckpointError, match="truncated") as e:
        QwenImagePipeline.from_pretrained(REPO, cache_dir=tmp_path, verbose=False)
    assert str(blob) in str(e.value)  # the file to delete is the blob behind the snapshot's link


class FakeHub:
    """HfApi.model_info and snapshot_download over the fixture folder, recording what was asked for."""

    def __init__(self, root: Path):
        self.root = root
        self.calls = []

    def model_info(self, repo_id, revision=None, files_metadata=False):
        assert files_metadata
        files = fixture_files()
        files.append("README.md")
        sizes = {f: (SOURCE / f).stat().st_size if (SOURCE / f).exists() else 10 for f in files}
        return SimpleNamespace(sha=COMMIT, siblings=[SimpleNamespace(rfilename=f, size=s) for f, s in sizes.items()])

    def snapshot_download(self, repo_id, revision=None, cache_dir=None, allow_patterns=None, local_files_only=False):
        if local_files_only:
            raise LocalEntryNotFoundError("nothing cached")
        self.calls.append(list(allow_patterns))
        import fnmatch

        snap = self.root / "snapshot"
        for rel in fixture_files():
            if any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (snap / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(SOURCE / rel, snap / rel)
        return str(snap)


def test_download_states_size_and_skips_vision_only_shards(tmp_path, monkeypatch, capsys):
    fake = FakeHub(tmp_path)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: fake)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    pipe = QwenImagePipeline.from_pretrained(REPO, dtype=mx.float32, cache_dir=tmp_path / "cache")
    out = capsys.readouterr().out
    weights = [f for f in fixture_files() if f.endswith(".safetensors") and f not in (LM_HEAD_ONLY, VISION_ONLY)]
    total = sum((SOURCE / f).stat().st_size for f in weights)
    assert f"{REPO}: {total / 1e6:.1f} MB of weights in {len(weights)} files, 0.0 MB already in the cache" in out
    assert "skipping 2 file(s)" in out and "vision-tower / lm_head" in out
    small, everything = fake.calls
    assert small == hub.SMALL_FILES
    assert sorted(everything[len(hub.SMALL_FILES) :]) == weights  # the shards, by name; no vision-only ones
    assert not (pipe.folder / VISION_ONLY).exists() and not (pipe.folder / LM_HEAD_ONLY).exists()
    assert pipe.generate("a fox", height=32, width=32, steps=1, seed=0, progress=False).size == (32, 32)


def test_download_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: fake)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: SimpleNamespace(free=1000))
    with pytest.raises(RuntimeError, match="not enough disk space"):
        hub.download(REPO, cache_dir=tmp_path / "cache", verbose=False)
    assert len(fake.calls) == 1  # only the small files were fetched


def test_repo_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    assert hub.looks_like_repo_id("Qwen/Qwen-Image") and hub.looks_like_repo_id("Qwen/Qwen-Image-2512")
    for s in ("./Qwen/Qwen-Image", "/abs/folder", "~/models/qwen", "a/b/c", "folder"):
        assert not hub.looks_like_repo_id(s)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub.resolve(tmp_path / "nope")
    local = tmp_path / "Org" / "Name"  # an existing folder wins over the hub id it looks like
    shutil.copytree(SOURCE, local)
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("Org/Name") == Path("Org/Name")


def test_text_encoder_shards_not_needed_are_not_required(tmp_path):
    folder = tmp_path / "p"
    shutil.copytree(SOURCE, folder)
    (folder / VISION_ONLY).unlink()
    (folder / LM_HEAD_ONLY).unlink()
    assert hub.check_pipeline_folder(folder) == folder
    names = [p.name for p in hub.component_weight_files(folder, "text_encoder")]
    assert names == [f"model-0000{i}-of-00005.safetensors" for i in (2, 3, 4)]
    index = json.loads((folder / "text_encoder" / "model.safetensors.index.json").read_text())["weight_map"]
    assert {index[k] for k in index if k.startswith("visual.")} == {
        "model-00004-of-00005.safetensors",
        VISION_ONLY[13:],
    }
    (folder / "text_encoder" / "model-00004-of-00005.safetensors").unlink()  # mixed: language + vision
    with pytest.raises(FileNotFoundError, match="1 of the 3 weight files .* missing: model-00004-of-00005"):
        hub.check_pipeline_folder(folder)


def test_hub_unreachable_or_unknown_repo(tmp_path, monkeypatch):
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    class Down:
        def model_info(self, *a, **k):
            raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "HfApi", Down)
    with pytest.raises(hub.HubError, match="could not reach the Hugging Face hub .*HF_HUB_OFFLINE=1"):
        hub.download(REPO, cache_dir=tmp_path)

    class Unknown:
        def model_info(self, *a, **k):
            request = httpx.Request("GET", f"https://huggingface.co/api/models/{REPO}")
            raise RepositoryNotFoundError("404", response=httpx.Response(404, request=request))

    monkeypatch.setattr(huggingface_hub, "HfApi", Unknown)
    with pytest.raises(FileNotFoundError, match="is not a model on the Hugging Face hub"):
        hub.download(REPO, cache_dir=tmp_path)
