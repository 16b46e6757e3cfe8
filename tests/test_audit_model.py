"""The transformer as a public API and checkpoint folders, against diffusers 0.42.1 (goldens from
tests/fixtures/make_audit_model_fixtures.py, in tests/fixtures/audit_model/).

- `QwenImageTransformer(TransformerConfig(...))(latents, text, sigma, grid, text_mask)` on other configs (heads, head
  dim, RoPE axes, layers, in/out channels, patch sizes 1 and 3, zero_cond_t), batches with padded text masks, odd
  grids, several img_shapes entries and entries of several frames, as diffusers' `QwenImageTransformer2DModel`.
- `TransformerConfig` takes diffusers' whole set of keywords and refuses by name the flags it does not build.
- `QwenImagePipeline.from_pretrained` on folders as `save_pretrained` writes them (re-sharded with an index, float32,
  float16 `variant="fp16"` files, decoy variant files beside the plain ones, extra files diffusers ignores):
  the same latents and picture as diffusers.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qwen_nb import QwenImagePipeline, QwenImageTransformer, TransformerConfig
from qwen_nb.loading import CheckpointError, weight_files, weight_layout
from qwen_nb.switches import Switches

FIXTURES = Path(__file__).resolve().parent / "fixtures"
AUDIT = FIXTURES / "audit_model"
sys.path.insert(0, str(FIXTURES))
from make_audit_model_fixtures import TRANSFORMER_CASES, build_folder, case_inputs, weight  # noqa: E402

T_GOLDENS = mx.load(str(AUDIT / "transformer.safetensors"))
F_GOLDENS = mx.load(str(AUDIT / "folders.safetensors"))
F_META = json.loads((AUDIT / "folders.json").read_text())


# ---------------------------------------------------------------------------------------------- transformer
def build(cfg: dict, switches: Switches) -> QwenImageTransformer:
    model = QwenImageTransformer(TransformerConfig(**cfg), switches)
    params = dict(tree_flatten(model.parameters()))
    model.load_weights([(k, mx.array(weight(k, tuple(v.shape)))) for k, v in params.items()], strict=True)
    model.set_switches(switches)
    return model


def as_grid(shapes):
    """The grid argument: (h, w) for one single-frame picture, a list of (h, w) for several, diffusers'
    (frames, h, w) entries where a picture has several frames."""
    if any(f != 1 for f, _, _ in shapes):
        return [tuple(s) for s in shapes]
    grids = [(h, w) for _, h, w in shapes]
    return grids[0] if len(grids) == 1 else grids


@pytest.mark.parametrize("switches", ["default", "baseline"])
@pytest.mark.parametrize("name", list(TRANSFORMER_CASES))
def test_transformer_configs_match_diffusers(name, switches):
    cfg, shapes, _, _, _ = TRANSFORMER_CASES[name]
    model = build(cfg, Switches() if switches == "default" else Switches.baseline())
    x = case_inputs(name, TRANSFORMER_CASES[name])
    mask = mx.array(x["mask"]) if "mask" in x else None
    out = model(mx.array(x["latents"]), mx.array(x["text"]), mx.array(x["sigma"]), as_grid(shapes), mask)
    want = np.array(T_GOLDENS[f"{name}.out"])
    assert out.shape == want.shape
    np.testing.assert_allclose(np.array(out), want, rtol=1e-5, atol=3e-5)


def test_grid_in_diffusers_img_shapes_forms():
    """(1, h, w) triples, and diffusers' per-sample nesting, give what the (h, w) grids give."""
    name = "zero_cond_frames"
    cfg, shapes, _, _, _ = TRANSFORMER_CASES[name]
    model = build(cfg, Switches())
    x = case_inputs(name, TRANSFORMER_CASES[name])
    args = (mx.array(x["latents"]), mx.array(x["text"]), mx.array(x["sigma"]))
    want = np.array(T_GOLDENS[f"{name}.out"])
    for grid in ([tuple(s) for s in shapes], [[tuple(s) for s in shapes]] * 2):
        out = model(*args, grid, mx.array(x["mask"]))
        np.testing.assert_allclose(np.array(out), want, rtol=1e-5, atol=3e-5)
    with pytest.raises(ValueError, match="one grid serves the whole batch"):
        model(*args, [[(1, 4, 4), (1, 2, 5)], [(1, 4, 4), (1, 5, 2)]], mx.array(x["mask"]))
    with pytest.raises(ValueError, match="patches"):
        model(*args, [(1, 4, 4), (2, 2, 5)], mx.array(x["mask"]))


def test_text_mask_of_the_wrong_shape_is_named():
    model = build(TRANSFORMER_CASES["patch1"][0], Switches())
    x = case_inputs("patch1", TRANSFORMER_CASES["patch1"])
    with pytest.raises(ValueError, match=r"text_mask has shape \(1, 2\)"):
        model(mx.array(x["latents"]), mx.array(x["text"]), mx.array(x["sigma"]), (5, 2), mx.ones((1, 2)))


DIFFUSERS_KEYWORDS = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=1,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=48,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
    zero_cond_t=False,
    use_additional_t_cond=False,
    use_layer3d_rope=False,
)


def test_config_takes_diffusers_keywords():
    """Every keyword of diffusers' QwenImageTransformer2DModel.__init__ (its flags false) builds a model."""
    config = TransformerConfig(**DIFFUSERS_KEYWORDS)
    assert config.dim == 64 and not config.guidance_embeds
    assert TransformerConfig.from_dict(DIFFUSERS_KEYWORDS) == config


@pytest.mark.parametrize("flag", ["guidance_embeds", "use_additional_t_cond", "use_layer3d_rope"])
def test_flags_not_built_are_refused_by_name(flag):
    for make in (TransformerConfig, TransformerConfig.from_dict):
        kw = {**DIFFUSERS_KEYWORDS, flag: True}
        with pytest.raises(ValueError, match=f"{flag}=true"):
            make(**kw) if make is TransformerConfig else make(kw)


def test_in_channels_not_a_multiple_of_the_patch_is_refused_only_for_latent_channels():
    config = TransformerConfig(**{**DIFFUSERS_KEYWORDS, "in_channels": 20, "patch_size": 3, "out_channels": 3})
    with pytest.raises(ValueError, match="patch_size"):
        _ = config.latent_channels


# ---------------------------------------------------------------------------------------------- folders
def generate(folder: Path, **options):
    g = F_META["generation"]
    pipe = QwenImagePipeline.from_pretrained(folder, dtype=mx.float32, verbose=False, **options)
    last = []
    image = pipe.generate(
        g["prompt"],
        g["negative_prompt"],
        g["height"],
        g["width"],
        g["steps"],
        g["cfg"],
        latents=F_GOLDENS["noise"],
        progress=False,
        callback=lambda i, x: last.append(np.array(x[0])),
    )
    return np.asarray(image), last[-1]


@pytest.mark.parametrize("name", list(F_META["cases"]))
def test_folders_as_save_pretrained_writes_them(tmp_path, name):
    case = F_META["cases"][name]
    folder = build_folder(case["kind"], tmp_path / name)
    image, latents = generate(folder, **case["qwen_nb_kwargs"])  # variant="fp16" where diffusers needed it
    np.testing.assert_allclose(latents, np.array(F_GOLDENS[f"{name}.latents"]), rtol=1e-4, atol=1e-4)
    diff = np.abs(image.astype(int) - np.array(F_GOLDENS[f"{name}.image"]).astype(int)).max()
    assert diff <= 2, f"{name}: {diff}/255 from diffusers"


def test_only_the_files_diffusers_reads_are_read(tmp_path):
    folder = build_folder("extra_files", tmp_path / "extra")
    assert [f.name for f in weight_files(folder / "transformer")] == ["diffusion_pytorch_model.safetensors"]
    assert [f.name for f in weight_files(folder / "text_encoder")] == ["model.safetensors"]
    folder = build_folder("plain_and_decoy_variant", tmp_path / "decoy")
    assert [f.name for f in weight_files(folder / "vae")] == ["diffusion_pytorch_model.safetensors"]


def test_two_variants_and_no_plain_weights_are_refused(tmp_path):
    """diffusers without variant= refuses such a folder too: the error names the variants and the keyword, which
    then reads the one asked for."""
    folder = build_folder("two_variants", tmp_path / "two")
    with pytest.raises(CheckpointError, match=r'variants fp16, half .*variant="fp16"'):
        QwenImagePipeline.from_pretrained(folder, dtype=mx.float32, verbose=False)
    pipe = QwenImagePipeline.from_pretrained(folder, dtype=mx.float32, verbose=False, variant="half")
    assert all(".half" in f.name for f in weight_files(folder / "transformer", variant="half"))
    assert pipe.transformer is not None


def test_layout_rules():
    """diffusers reads a stem's index before its single file, transformers the single file before the index."""
    names = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"]
    assert weight_layout(names) == (None, [], ["diffusion_pytorch_model.safetensors.index.json"])
    names = ["model.safetensors", "model.safetensors.index.json", "model.fp16.safetensors"]
    assert weight_layout(names) == (None, ["model.safetensors"], [])
    assert weight_layout(["model.fp16.safetensors", "config.json"]) == ("fp16", ["model.fp16.safetensors"], [])
    assert weight_layout(["weights.safetensors"]) is None


def test_variant_keyword_reads_that_variant(tmp_path):
    """`variant="fp16"` (diffusers' from_pretrained keyword) reads the fp16 files, here 0.5 x the plain weights as
    build_folder wrote them; a variant the folder lacks falls back to the plain files, as diffusers does."""
    from qwen_nb.loading import read_weights
    from qwen_nb.transformer import load_transformer

    folder = build_folder("plain_and_decoy_variant", tmp_path / "decoy") / "transformer"
    plain, fp16 = read_weights(folder, mx.float32), read_weights(folder, mx.float32, variant="fp16")
    assert all(".fp16-" in f.name for f in weight_files(folder, variant="fp16"))
    assert plain.keys() == fp16.keys()
    for k, v in plain.items():
        np.testing.assert_array_equal(np.array(fp16[k]), np.array((0.5 * v).astype(mx.float16).astype(mx.float32)))
    assert weight_files(folder, variant="bf16") == weight_files(folder)
    model, _ = load_transformer(folder, mx.float32, variant="fp16")
    np.testing.assert_array_equal(np.array(model.img_in.weight), np.array(fp16["img_in.weight"]))


def test_download_plan_takes_the_files_diffusers_reads(tmp_path):
    from qwen_nb.hub import plan_download

    for c in ("transformer", "vae", "text_encoder"):
        (tmp_path / c).mkdir()
    index = {"weight_map": {"a": "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                            "b": "diffusion_pytorch_model.fp16-00002-of-00002.safetensors"}}  # fmt: skip
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(json.dumps(index))
    sizes = {
        "transformer/diffusion_pytorch_model.safetensors": 10,
        "transformer/diffusion_pytorch_model.fp16.safetensors": 5,
        "transformer/extra.safetensors": 1,
        "vae/diffusion_pytorch_model.safetensors.index.fp16.json": 1,
        "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors": 5,
        "vae/diffusion_pytorch_model.fp16-00002-of-00002.safetensors": 5,
        "text_encoder/model.safetensors": 10,
        "text_encoder/model.fp16.safetensors": 5,
    }
    wanted, _ = plan_download("x/y", tmp_path, sizes)
    assert wanted == [
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "text_encoder/model.safetensors",
    ]
    wanted, _ = plan_download("x/y", tmp_path, sizes, variant="fp16")
    assert wanted[0] == "transformer/diffusion_pytorch_model.fp16.safetensors"
    assert wanted[-1] == "text_encoder/model.fp16.safetensors"


# ---------------------------------------------------------------------------------------------- .bin weights
def test_torch_pickle_tensors_read_as_torch_wrote_them():
    """torch.save's zip pickle (what diffusers' safe_serialization=False writes), read without torch: bfloat16,
    float16, int64, a transposed view and views into one storage, against the values torch saved."""
    from qwen_nb.loading import load_torch_pickle, read_header

    got = load_torch_pickle(AUDIT / "tensors.bin")
    want = mx.load(str(AUDIT / "tensors_expected.safetensors"))
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(np.array(got[k].astype(mx.float32)), np.array(v.astype(mx.float32)), err_msg=k)
    header = read_header(AUDIT / "tensors.bin")
    assert header["bf16"]["dtype"] == "BF16" and header["transposed"]["shape"] == [5, 6]


def test_transformer_folder_of_bin_weights_matches_diffusers():
    """diffusers' save_pretrained(safe_serialization=False) of the "patch1" transformer loads and runs as diffusers'."""
    from qwen_nb.transformer import load_transformer

    model, _ = load_transformer(AUDIT / "transformer_bin", mx.float32)
    x = case_inputs("patch1", TRANSFORMER_CASES["patch1"])
    out = model(mx.array(x["latents"]), mx.array(x["text"]), mx.array(x["sigma"]), (5, 2))
    np.testing.assert_allclose(np.array(out), np.array(T_GOLDENS["patch1.out"]), rtol=1e-5, atol=3e-5)


def test_pickles_of_other_objects_are_refused(tmp_path):
    import pickle
    import zipfile

    from qwen_nb.loading import load_torch_pickle

    path = tmp_path / "diffusion_pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": pytest.raises}))
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_torch_pickle(path)


def test_inputs_that_do_not_fit_are_named():
    """diffusers fails on these too (torch shape errors); qwen_nb says which input is off."""
    model = build(TRANSFORMER_CASES["patch1"][0], Switches())
    x = case_inputs("patch1", TRANSFORMER_CASES["patch1"])
    lat, txt = mx.array(x["latents"]), mx.array(x["text"])
    with pytest.raises(ValueError, match="text embeddings have batch 2, latents 1"):
        model(lat, mx.concatenate([txt, txt]), mx.array(x["sigma"]), (5, 2))
    with pytest.raises(ValueError, match=r"sigma has shape \(3,\)"):
        model(lat, txt, mx.full((3,), 0.5), (5, 2))
    with pytest.raises(ValueError, match="must be 3-D"):
        model(lat[0], txt, mx.array(x["sigma"]), (5, 2))
    # a scalar sigma is the (1,) one
    want = np.array(T_GOLDENS["patch1.out"])
    np.testing.assert_allclose(np.array(model(lat, txt, float(x["sigma"][0]), (5, 2))), want, rtol=1e-5, atol=3e-5)


def test_edit_and_21_pipelines_take_variant():
    """`variant=` reaches every loader of the edit and 2.1 pipelines (their transformer, text encoder with its vision
    tower, VAE); a variant a folder lacks reads the plain files, as diffusers falls back to them."""
    from qwen_nb.edit import QwenImageEditPipeline
    from qwen_nb.pipeline21 import QwenImage21Pipeline

    fixtures = Path(__file__).parent / "fixtures"
    for cls, folder in (
        (QwenImageEditPipeline, fixtures / "tiny_edit" / "checkpoint"),
        (QwenImage21Pipeline, fixtures / "tiny_qwen21" / "pipeline"),
    ):
        pipe = cls.from_pretrained(folder, dtype=mx.float32, verbose=False, variant="fp16")
        assert pipe.options.variant == "fp16"
        for name in ("transformer", "text_encoder", "vae"):
            assert pipe.components[name] is not None
    edit = QwenImageEditPipeline.from_pretrained(
        fixtures / "tiny_edit" / "checkpoint", dtype=mx.float32, verbose=False, variant="x"
    )
    assert edit.vision_tower is not None
