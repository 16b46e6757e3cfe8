"""LoRA against diffusers + peft on the tiny pipeline (goldens by tests/fixtures/make_lora_fixtures.py) in every
format, stacked with two scales, on the modulation, fused q/k/v; unloading bit for bit; the updates against the
closed form W + s * alpha/r * B @ A; quantized models both ways; reading files, folders and hub ids; every error."""

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import huggingface_hub.constants as hf_constants
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qwen_nb import lora as L
from qwen_nb.loading import load_strict, read_weights
from qwen_nb.pipeline import QwenImagePipeline
from qwen_nb.quantize import quantize_transformer
from qwen_nb.switches import Switches
from qwen_nb.transformer import QwenImageTransformer, TransformerConfig

FIXTURES = Path(__file__).parent / "fixtures"
LORAS = FIXTURES / "lora"
PIPELINE = FIXTURES / "tiny_pipeline" / "layout_a"
GOLDENS = mx.load(str(LORAS / "goldens.safetensors"))
META = json.loads((LORAS / "goldens.json").read_text())
CASES = {c["name"]: c for c in META["cases"]}
BASE = mx.load(str(FIXTURES / "tiny_pipeline" / "goldens.safetensors"))  # the same case without LoRA
BASE_CASE = META["base_case"]
FILES = ["diffusers_attn_mlp", "lightning_attn_mlp", "kohya_attn_mlp", "kohya_modulation"]
CONFIG = TransformerConfig.tiny(joint_attention_dim=64)  # the tiny pipeline's transformer


def load_pipeline(schedule_modulation: bool = True, **switches) -> QwenImagePipeline:
    """The tiny pipeline (by default as users get it: the modulation computed up front, its weights not held)."""
    return QwenImagePipeline.from_pretrained(
        PIPELINE,
        dtype=mx.float32,
        verbose=False,
        schedule_modulation=schedule_modulation,
        switches=Switches().only(**switches),
    )


def generate(pipe) -> tuple[np.ndarray, np.ndarray]:
    """(every step's packed latents, the uint8 image) of the goldens' case with its saved noise."""
    steps = []
    image = pipe.generate(
        META["prompt"],
        META["negative_prompt"],
        META["height"],
        META["width"],
        META["steps"],
        META["cfg_scale"],
        latents=BASE[f"{BASE_CASE}.noise"],
        progress=False,
        callback=lambda i, x: steps.append(np.array(x[0])),
    )
    return np.stack(steps), np.asarray(image)


def assert_matches(latents, image, golden_latents, golden_image):
    """diffusers' latents within 1e-5 at every step (float32), its uint8 image within 2/255."""
    np.testing.assert_allclose(latents, np.array(golden_latents), rtol=1e-5, atol=1e-5)
    diff = int(np.abs(image.astype(int) - np.array(golden_image).astype(int)).max())
    assert diff <= 2, f"max pixel difference {diff}/255"


def tiny_model(fused: bool = False) -> QwenImageTransformer:
    """The tiny pipeline's transformer with its weights, in float32."""
    model = QwenImageTransformer(CONFIG, Switches())
    load_strict(model, read_weights(PIPELINE / "transformer", mx.float32), "transformer")
    if fused:
        model.fuse_projections()
    return model


def raw(name: str) -> dict:
    """The tensors of a fixture LoRA as stored, in float64 numpy."""
    return {
        k: np.array(v.astype(mx.float32)).astype(np.float64)
        for k, v in mx.load(str(LORAS / f"{name}.safetensors")).items()
    }


def closed_form(name: str, path: str) -> np.ndarray:
    """alpha / r * B @ A of one module, from the file's own tensors and alpha (the metadata's for diffusers/peft)."""
    t = raw(name)
    if name.startswith("diffusers"):
        cfg = json.loads(mx.load(str(LORAS / f"{name}.safetensors"), return_metadata=True)[1]["lora_adapter_metadata"])
        a, b = t[f"transformer.{path}.lora_A.weight"], t[f"transformer.{path}.lora_B.weight"]
        alpha = cfg["transformer.lora_alpha"]
    elif name.startswith("lightning"):
        a, b = t[f"diffusion_model.{path}.lora_down.weight"], t[f"diffusion_model.{path}.lora_up.weight"]
        alpha = t[f"diffusion_model.{path}.alpha"].item()
    else:
        flat = "lora_unet_" + path.replace(".", "_")
        a, b, alpha = t[f"{flat}.lora_down.weight"], t[f"{flat}.lora_up.weight"], t[f"{flat}.alpha"].item()
    return alpha / a.shape[0] * (b @ a)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("schedule_modulation", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_diffusers_and_peft(case, schedule_modulation):
    """Each format alone, the modulation LoRA, and two LoRAs stacked with scales 0.7 and -0.4: diffusers' latents
    at every step and its image, with the same noise; with the modulation computed up front from weights read
    with the LoRA merged (the default), and with the modulation in the model."""
    pipe = load_pipeline(schedule_modulation)
    assert pipe.transformer.transformer_blocks[0].attn.fused  # the default fuses q/k/v: LoRAs on to_k go in rows
    for entry in CASES[case]["loras"]:
        pipe.load_lora(LORAS / entry["file"], entry["scale"])
    assert_matches(*generate(pipe), GOLDENS[f"{case}.latents"], GOLDENS[f"{case}.image"])


# more layouts diffusers reads (tests/fixtures/make_lora_extra_fixtures.py)
EXTRA = json.loads((LORAS / "extra.json").read_text())["cases"]
EXTRA_GOLDENS = mx.load(str(LORAS / "extra.safetensors"))


@pytest.mark.parametrize("c", EXTRA, ids=[c["name"] for c in EXTRA])
def test_more_layouts_match_diffusers(pipe, c):
    """Mixed ranks with no alpha anywhere (scale 1 each), diffusion_model. lora_A/lora_B with per-module alphas,
    peft's metadata with rank_pattern, alpha_pattern and rsLoRA, peft's `.default.` names: the scales diffusers gives
    (every module's scaling checked by the fixture script), its latents at every step and its image."""
    lora = pipe.load_lora(LORAS / c["file"])
    try:
        assert {m: w.scale for m, w in lora.modules.items()} == pytest.approx(c["applied_scale"], rel=1e-6)
        assert_matches(*generate(pipe), EXTRA_GOLDENS[f"{c['name']}.latents"], EXTRA_GOLDENS[f"{c['name']}.image"])
    finally:
        pipe.unload_lora()


def test_parity_with_separate_qkv():
    pipe = load_pipeline(fused_qkv=False)
    assert not pipe.transformer.transformer_blocks[0].attn.fused
    for entry in CASES["stacked"]["loras"]:
        pipe.load_lora(LORAS / entry["file"], entry["scale"])
    assert_matches(*generate(pipe), GOLDENS["stacked.latents"], GOLDENS["stacked.image"])


def test_a_modulation_lora_renews_the_schedule_table_and_unload_restores_it():
    """The table of a schedule is kept between generations; a LoRA on the modulation must replace it, loaded
    before or after the table was made, and unloading must bring the LoRA-free one back."""
    pipe = load_pipeline()
    assert_matches(*generate(pipe), BASE[f"{BASE_CASE}.latents"], BASE[f"{BASE_CASE}.image"])  # table made
    pipe.load_lora(LORAS / "kohya_modulation.safetensors", 1.0)
    assert_matches(*generate(pipe), GOLDENS["modulation.latents"], GOLDENS["modulation.image"])
    pipe.unload_lora()
    assert_matches(*generate(pipe), BASE[f"{BASE_CASE}.latents"], BASE[f"{BASE_CASE}.image"])


def test_unloading_one_lora_keeps_the_others():
    """unload_lora(lora) takes out the one LoRA load_lora returned: a modulation LoRA loaded over the 'lightning'
    case and taken out again leaves diffusers' 'lightning' picture; taking that out too, the base picture."""
    pipe = load_pipeline()
    lightning = pipe.load_lora(LORAS / "lightning_attn_mlp.safetensors", 1.0)
    extra = pipe.load_lora(LORAS / "kohya_modulation.safetensors", 1.0)
    pipe.unload_lora(extra)
    assert_matches(*generate(pipe), GOLDENS["lightning.latents"], GOLDENS["lightning.image"])
    with pytest.raises(ValueError, match="is not loaded: pass what load_lora returned"):
        pipe.unload_lora(extra)
    pipe.unload_lora(lightning)
    assert len(pipe.loras) == 0
    assert_matches(*generate(pipe), BASE[f"{BASE_CASE}.latents"], BASE[f"{BASE_CASE}.image"])


def test_unload_restores_the_base_weights_exactly_and_the_image():
    pipe = load_pipeline()
    before = {k: np.array(v) for k, v in tree_flatten(pipe.transformer.parameters())}
    for name in FILES:
        pipe.load_lora(LORAS / f"{name}.safetensors", 0.5)
    changed = dict(tree_flatten(pipe.transformer.parameters()))
    assert sum(not np.array_equal(np.array(changed[k]), v) for k, v in before.items()) > 0
    pipe.unload_lora()
    after = dict(tree_flatten(pipe.transformer.parameters()))
    assert after.keys() == before.keys()
    assert all(np.array_equal(np.array(after[k]), v) for k, v in before.items())  # every bit
    assert_matches(*generate(pipe), BASE[f"{BASE_CASE}.latents"], BASE[f"{BASE_CASE}.image"])


def test_in_memory_models_fuse_and_unfuse_to_the_very_arrays():
    """From models in memory (from_components) the updates are added in place and the original arrays kept."""
    src = load_pipeline()
    model = tiny_model(fused=True)
    pipe = QwenImagePipeline.from_components(src.tokenizer, model, src.text_encoder, src.vae, src.scheduler_config,
                                             dtype=mx.float32, verbose=False)  # fmt: skip
    before = dict(tree_flatten(model.parameters()))
    pipe.load_lora(LORAS / "kohya_attn_mlp.safetensors", 0.5)
    assert sum(v is not before[k] for k, v in tree_flatten(model.parameters())) > 0
    pipe.unload_lora()
    assert all(v is before[k] for k, v in tree_flatten(model.parameters()))  # the very arrays


def test_bfloat16_weights_get_the_update_in_float32_rounded_once():
    model = tiny_model()
    model.set_dtype(mx.bfloat16)
    path = "transformer_blocks.0.attn.add_v_proj"
    w0 = model.transformer_blocks[0].attn.add_v_proj.weight
    stack = L.LoraStack()
    stack.add(L.read_lora(LORAS / "kohya_attn_mlp.safetensors"), 1.0)
    stack.fuse(model)
    w = model.transformer_blocks[0].attn.add_v_proj.weight
    assert w.dtype == mx.bfloat16
    exact = np.array(w0.astype(mx.float32), np.float64) + closed_form("kohya_attn_mlp", path)
    got = np.array(w.astype(mx.float32), np.float64)
    assert np.all(np.abs(got - exact) <= 2.0**-8 * np.abs(exact) + 1e-12)  # within bfloat16's rounding
    stack.unfuse(model)
    assert model.transformer_blocks[0].attn.add_v_proj.weight is w0


# ---------------------------------------------------------------------------------------------- closed form
@pytest.mark.parametrize(
    "name, path",
    [
        ("diffusers_attn_mlp", "transformer_blocks.1.img_mlp.net.0.proj"),
        ("lightning_attn_mlp", "transformer_blocks.0.attn.to_q"),  # alpha 8, bfloat16
        ("lightning_attn_mlp", "transformer_blocks.0.attn.to_k"),  # alpha 2
        ("kohya_attn_mlp", "transformer_blocks.0.attn.to_add_out"),
        ("kohya_modulation", "time_text_embed.timestep_embedder.linear_1"),
        ("kohya_modulation", "transformer_blocks.1.txt_mod.1"),
    ],
)
def test_delta_is_alpha_over_rank_times_b_a(name, path):
    lora = L.read_lora(LORAS / f"{name}.safetensors")
    expected = closed_form(name, path)
    np.testing.assert_allclose(np.array(lora.delta(path)), expected, rtol=1e-5, atol=1e-7)
    stack = L.LoraStack()
    stack.add(lora, -0.3)
    np.testing.assert_allclose(np.array(stack.delta(path)), -0.3 * expected, rtol=1e-5, atol=1e-7)


def test_fused_weights_are_w_plus_the_scaled_updates():
    model = tiny_model()
    original = {k: np.array(v).astype(np.float64) for k, v in model.diffusers_weights().items()}
    stack = L.LoraStack()
    stack.add(L.read_lora(LORAS / "diffusers_attn_mlp.safetensors"), 0.7)
    stack.add(L.read_lora(LORAS / "lightning_attn_mlp.safetensors"), -0.4)
    assert stack.fuse(model) == []
    fused = model.diffusers_weights()
    path = "transformer_blocks.1.attn.to_v"  # in both
    expected = original[f"{path}.weight"] + 0.7 * closed_form("diffusers_attn_mlp", path)
    expected -= 0.4 * closed_form("lightning_attn_mlp", path)
    np.testing.assert_allclose(np.array(fused[f"{path}.weight"]), expected, rtol=1e-6, atol=1e-6)
    untouched = "transformer_blocks.0.img_mod.1.weight"
    assert np.array_equal(np.array(fused[untouched]), original[untouched].astype(np.float32))


# ---------------------------------------------------------------------------------------------- fused q/k/v
def test_fused_qkv_gets_the_update_in_its_row_block():
    """A LoRA on to_k alone changes the middle third of to_qkv's rows, nothing else, and unfuses exactly, also
    after the model's q/k/v were split in between."""
    model = tiny_model(fused=True)
    attn = model.transformer_blocks[0].attn
    w0 = attn.to_qkv.weight
    n = w0.shape[0] // 3
    k = "transformer_blocks.0.attn.to_k"
    down, up = mx.random.normal((4, 64), key=mx.random.key(1)), mx.random.normal((64, 4), key=mx.random.key(2))
    stack = L.LoraStack()
    stack.add(L.LoRA({k: L.LoraWeights(down, up, 0.25, 1.0)}, "test"), 2.0)
    stack.fuse(model)
    w = np.array(attn.to_qkv.weight)
    assert np.array_equal(w[:n], np.array(w0[:n])) and np.array_equal(w[2 * n :], np.array(w0[2 * n :]))
    expected = np.array(w0[n : 2 * n]).astype(np.float64) + 0.5 * (
        np.array(up, np.float64) @ np.array(down, np.float64)
    )
    np.testing.assert_allclose(w[n : 2 * n], expected, rtol=1e-6, atol=1e-6)
    stack.unfuse(model)
    assert attn.to_qkv.weight is w0

    stack.fuse(model)
    model.split_projections()  # the structure changes while the LoRA is in
    stack.unfuse(model)
    assert np.array_equal(np.array(attn.to_k.weight), np.array(w0[n : 2 * n]))
    assert np.array_equal(np.array(attn.to_q.weight), np.array(w0[:n]))


# ---------------------------------------------------------------------------------------------- the stack
def test_stack_targets_version_and_modulation():
    stack = L.LoraStack()
    v0 = stack.version
    stack.add(L.read_lora(LORAS / "kohya_attn_mlp.safetensors"))
    assert stack.version != v0 and not stack.touches_modulation
    v1 = stack.version
    stack.add(L.read_lora(LORAS / "kohya_modulation.safetensors"), 0.5)
    assert stack.version != v1 and stack.touches_modulation
    assert {"img_in", "norm_out.linear", "transformer_blocks.0.img_mod.1"} <= set(stack.targets)
    v2 = stack.version
    stack.clear()
    assert stack.version not in (v0, v1, v2) and stack.targets == [] and not stack.touches_modulation
    assert L.LoraStack().version not in (v0, v1, v2)  # versions are unique across stacks


def test_modulation_without_its_modules_is_skipped_and_applied_to_weights():
    """A model built without its modulation weights: `fuse` skips those targets and says so; `apply_to_weights` adds
    the same updates to the checkpoint-named weights they are computed from."""
    model = tiny_model()
    for b in model.transformer_blocks:
        b.img_mod, b.txt_mod = [], []
    stack = L.LoraStack()
    stack.add(L.read_lora(LORAS / "kohya_modulation.safetensors"), 1.5)
    stack.check(model)
    skipped = stack.fuse(model)
    assert skipped == [f"transformer_blocks.{i}.{m}.1" for i in range(2) for m in ("img_mod", "txt_mod")]
    weights = read_weights(PIPELINE / "transformer", mx.float32)
    adjusted = stack.apply_to_weights(weights)
    for path in skipped + ["norm_out.linear"]:
        expected = np.array(weights[f"{path}.weight"], np.float64) + 1.5 * closed_form("kohya_modulation", path)
        np.testing.assert_allclose(np.array(adjusted[f"{path}.weight"]), expected, rtol=1e-6, atol=1e-6)
    assert adjusted["txt_in.bias"] is weights["txt_in.bias"]
    assert adjusted["transformer_blocks.0.attn.to_q.weight"] is weights["transformer_blocks.0.attn.to_q.weight"]
    # the modules the model has got the same update as the dict
    assert np.array_equal(np.array(model.norm_out.linear.weight), np.array(adjusted["norm_out.linear.weight"]))


# ---------------------------------------------------------------------------------------------- quantized
def test_quantized_merge_before_quantizing_equals_quantizing_the_merged_weights():
    """Option (a): a quantized model re-quantized from W + update equals loading W + update and quantizing it."""
    stack = L.LoraStack()
    stack.add(L.read_lora(LORAS / "diffusers_attn_mlp.safetensors"), 0.8)
    stack.add(L.read_lora(LORAS / "kohya_modulation.safetensors"), 1.0)
    weights = read_weights(PIPELINE / "transformer", mx.float32)

    model = tiny_model()
    quantize_transformer(model, 4)
    model.fuse_projections()
    stack.fuse(model, weights=weights)

    reference = QwenImageTransformer(CONFIG, Switches())
    load_strict(reference, stack.apply_to_weights(weights), "transformer")
    quantize_transformer(reference, 4)
    reference.fuse_projections()
    got, want = dict(tree_flatten(model.parameters())), dict(tree_flatten(reference.parameters()))
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(np.array(got[k]), np.array(want[k])), k


def test_quantized_runtime_adapter_adds_the_low_rank_product():
    """Option (b): LoRALinear beside the quantized linear gives base(x) + x @ update^T; every block gets the same
    structure; unfuse puts the quantized modules back."""
    model = tiny_model()
    quantize_transformer(model, 8)
    model.fuse_projections()
    base = {p: m for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    stack = L.LoraStack()
    lora = L.read_lora(LORAS / "lightning_attn_mlp.safetensors")  # touches block 0 partly, block 1 more
    stack.add(lora, 0.6)
    stack.attach(model)
    b0, b1 = (dict(tree_flatten(b.parameters())) for b in model.transformer_blocks)
    assert {k: v.shape for k, v in b0.items()} == {k: v.shape for k, v in b1.items()}

    x = mx.random.normal((1, 5, 64), key=mx.random.key(3))
    to_qkv = model.transformer_blocks[0].attn.to_qkv
    assert isinstance(to_qkv, L.LoRALinear) and isinstance(to_qkv.base, nn.QuantizedLinear)
    update = np.zeros((192, 64))
    for j, name in enumerate(("to_q", "to_k", "to_v")):
        path = f"transformer_blocks.0.attn.{name}"
        if path in lora.modules:
            update[64 * j : 64 * (j + 1)] = 0.6 * closed_form("lightning_attn_mlp", path)
    expected = np.array(to_qkv.base(x), np.float64) + np.array(x, np.float64) @ update.T
    np.testing.assert_allclose(np.array(to_qkv(x)), expected, rtol=1e-5, atol=1e-5)
    model(mx.zeros((1, 4, 64)), mx.zeros((1, 3, 64)), mx.array([0.5]), (2, 2))  # runs, compiled blocks included

    stack.unfuse(model)
    assert all(m is base[p] for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear))
    assert {p for p, m in model.named_modules() if isinstance(m, L.LoRALinear)} == set()


@pytest.mark.parametrize("adapters", [False, True])
def test_quantized_pipeline_merges_before_quantizing_or_attaches_adapters(adapters):
    """quantize=8: the LoRA merged into the high-precision weights before they are quantized (the default), or run
    beside the quantized linears (lora_adapters=True); both close to diffusers' float32 LoRA picture, and unloading
    gives back the quantized base model's picture exactly."""
    pipe = QwenImagePipeline.from_pretrained(
        PIPELINE, dtype=mx.float32, verbose=False, quantize=8, lora_adapters=adapters
    )
    base_latents, base_image = generate(pipe)
    pipe.load_lora(LORAS / "kohya_attn_mlp.safetensors")
    attached = {p for p, m in pipe.transformer.named_modules() if isinstance(m, L.LoRALinear)}
    assert ("transformer_blocks.1.txt_mlp.net.2" in attached) == adapters
    latents, image = generate(pipe)
    effect = np.array(GOLDENS["kohya.latents"]) - np.array(BASE[f"{BASE_CASE}.latents"])  # diffusers, float32
    error = np.abs((latents - base_latents) - effect).max() / np.abs(effect).max()
    print(f"the LoRA's effect on the latents, 8-bit against float32: relative error {error:.3f}")
    assert error < 0.1
    pipe.unload_lora()
    again_latents, again_image = generate(pipe)
    assert np.array_equal(again_latents, base_latents) and np.array_equal(again_image, base_image)


def test_quantized_without_high_precision_weights_names_both_options():
    model = tiny_model()
    quantize_transformer(model, 4)
    stack = L.LoraStack()
    stack.add(L.read_lora(LORAS / "kohya_attn_mlp.safetensors"))
    with pytest.raises(ValueError, match="is quantized.*Pass weights=.*attach\\(\\)"):
        stack.fuse(model)
    stored = {"transformer_blocks.0.attn.add_q_proj.weight": mx.zeros((64, 8), mx.uint32)}
    with pytest.raises(ValueError, match="stored quantized.*original checkpoint"):
        stack.apply_to_weights(stored)


# ---------------------------------------------------------------------------------------------- reading
def lora_tensors(modules=("transformer_blocks.0.attn.to_q",), rank=4, fmt="lightning", alpha=2.0, shape=(64, 64)):
    out, inp = shape
    t = {}
    for m in modules:
        down, up = mx.ones((rank, inp)), mx.ones((out, rank))
        if fmt == "diffusers":
            t[f"transformer.{m}.lora_A.weight"], t[f"transformer.{m}.lora_B.weight"] = down, up
        elif fmt == "kohya":
            flat = "lora_unet_" + m.replace(".", "_")
            t[f"{flat}.lora_down.weight"], t[f"{flat}.lora_up.weight"] = down, up
            t[f"{flat}.alpha"] = mx.array(alpha)
        else:
            t[f"diffusion_model.{m}.lora_down.weight"], t[f"diffusion_model.{m}.lora_up.weight"] = down, up
            t[f"diffusion_model.{m}.alpha"] = mx.array(alpha)
    return t


def test_formats_map_onto_diffusers_names():
    kohya = L.parse_lora(lora_tensors(["norm_out.linear", "transformer_blocks.7.img_mlp.net.0.proj"], fmt="kohya"))
    assert kohya.targets == ["norm_out.linear", "transformer_blocks.7.img_mlp.net.0.proj"]
    assert kohya.format == "kohya" and kohya.modules["norm_out.linear"].scale == 0.5
    peft = {f"transformer_blocks.0.attn.to_out.0.lora_{x}.default.weight": mx.ones((4, 4)) for x in "AB"}
    lora = L.parse_lora(peft)  # peft's own names, no prefix, no alpha: scale 1
    assert lora.targets == ["transformer_blocks.0.attn.to_out.0"] and lora.modules[lora.targets[0]].scale == 1.0
    meta = {
        "lora_adapter_metadata": json.dumps(
            {"transformer.lora_alpha": 8, "transformer.r": 4, "transformer.use_rslora": True}
        )
    }
    rs = L.parse_lora(lora_tensors(fmt="diffusers"), meta)
    assert rs.modules["transformer_blocks.0.attn.to_q"].scale == 4.0  # rsLoRA: alpha / sqrt(r)
    assert "lora_down/lora_up" in repr(L.parse_lora(lora_tensors()))


def save(path: Path, tensors: dict, metadata=None) -> Path:
    mx.save_safetensors(str(path), tensors, metadata=metadata or {})
    return path


def test_a_lora_for_another_model_lists_its_names_and_ours():
    flux = {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": mx.ones((4, 64)),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": mx.ones((64, 4)),
    }
    flux.update(lora_tensors(["double_blocks.0.img_attn.qkv"], fmt="kohya"))
    stack = L.LoraStack()
    with pytest.raises(ValueError) as e:
        stack.check(tiny_model(), L.parse_lora(flux, source="flux.safetensors"))
    msg = str(e.value)
    assert "flux.safetensors: 2 of the LoRA's modules are not linears of this Qwen-Image transformer" in msg
    assert "double_blocks_0_img_attn_qkv" in msg and "single_transformer_blocks.0.attn.to_q" in msg
    assert "Flux" in msg and "transformer_blocks.<0..1>" in msg and "img_mod.1" in msg and "norm_out.linear" in msg
    assert "Use a LoRA trained for Qwen-Image" in msg
    with pytest.raises(ValueError, match="with more blocks: this one has 2"):
        stack.check(tiny_model(), L.parse_lora(lora_tensors(["transformer_blocks.59.attn.to_q"])))
    assert stack.entries == []


def test_shapes_that_do_not_fit():
    lora = L.parse_lora(lora_tensors(shape=(3072, 3072)), source="big.safetensors")
    with pytest.raises(
        ValueError,
        match="do not fit this transformer's shapes: .*to_q \\(the LoRA's update is "
        "3072x3072, the linear 64x64\\).*another size",
    ):
        L.LoraStack().check(tiny_model(), lora)
    with pytest.raises(ValueError, match="not a pair \\(r, in\\) and \\(out, r\\)"):
        L.parse_lora({"x.lora_down.weight": mx.ones((4, 64)), "x.lora_up.weight": mx.ones((64, 8))})


def test_a_file_without_lora_tensors(tmp_path):
    shard = next(iter(sorted((PIPELINE / "transformer").glob("*.safetensors"))))
    with pytest.raises(ValueError, match="holds no LoRA tensors.*model's own weights.*from_pretrained"):
        L.read_lora(shard)
    with pytest.raises(ValueError, match="holds no tensors at all"):
        L.read_lora(save(tmp_path / "empty.safetensors", {}))


def test_missing_partners():
    t = lora_tensors(["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"])
    del t["diffusion_model.transformer_blocks.0.attn.to_q.lora_up.weight"]
    del t["diffusion_model.transformer_blocks.0.attn.to_k.lora_down.weight"]
    del t["diffusion_model.transformer_blocks.0.attn.to_k.lora_up.weight"]
    with pytest.raises(ValueError) as e:
        L.parse_lora(t, source="broken.safetensors")
    msg = str(e.value)
    assert "broken.safetensors is incomplete" in msg
    assert "diffusion_model.transformer_blocks.0.attn.to_k.alpha has no lora_down/lora_up partner" in msg
    assert "to_q.lora_down.weight and diffusion_model.transformer_blocks.0.attn.to_q.alpha has no lora_up" in msg
    assert "export the LoRA again" in msg
    with pytest.raises(ValueError, match="an alpha is one number"):
        L.parse_lora({**lora_tensors(), "diffusion_model.transformer_blocks.0.attn.to_q.alpha": mx.ones((2,))})


def test_unknown_formats_and_other_adapters():
    odd = {"transformer_blocks.0.attn.to_q.lora.down.weight": mx.ones((4, 64)), **lora_tensors()}
    with pytest.raises(
        ValueError,
        match="in a format qwen_nb does not read: 1 of its 4 tensors .*lora.down.weight.*"
        "The formats read are .*lora_A.*lora_down.*lora_unet_",
    ):
        L.parse_lora(odd)
    with pytest.raises(ValueError, match="LyCORIS LoKr.*not a plain LoRA"):
        L.parse_lora({"lora_unet_transformer_blocks_0_attn_to_q.lokr_w1": mx.ones((4, 4))})
    plain = L.parse_lora(lora_tensors())
    with pytest.warns(UserWarning, match="DoRA.*as diffusers does, its magnitudes are dropped"):  # lora_state_dict
        dora = L.parse_lora(
            {**lora_tensors(), "diffusion_model.transformer_blocks.0.attn.to_q.dora_scale": mx.ones((1, 64))}
        )
    assert sorted(dora.modules) == sorted(plain.modules)


def test_pickle_files_are_refused_with_the_reason_and_a_conversion(tmp_path):
    payload = pickle.dumps({"a": 1})  # never unpickled: the suffix or the first bytes give it away
    for name in ("lora.bin", "lora.pt", "lora.ckpt"):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(
            ValueError,
            match="is a pickle file: unpickling runs whatever code.*torch.load.*weights_only=True.*save_file",
        ):
            L.read_lora(tmp_path / name)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(b"PK\x03\x04" + payload)
    with pytest.raises(ValueError, match="torch.save's format, despite its .safetensors suffix"):
        L.read_lora(disguised)
    folder = tmp_path / "only_pickle"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(ValueError, match="adapter_model.bin is a pickle file \\(and .* has no .safetensors\\)"):
        L.read_lora(folder)


def test_a_safetensors_header_length_ending_in_0x80_is_not_taken_for_a_pickle(tmp_path):
    """The first byte of a safetensors file is the low byte of its header length: 0x80 for 1 file in 256, the
    byte a pickle starts with too. Such a file is read, not refused."""
    path = tmp_path / "lora.safetensors"
    for pad in range(256):  # metadata of growing length until the header length's low byte is 0x80
        mx.save_safetensors(str(path), lora_tensors(), metadata={"format": "pt", "pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert len(L.read_lora(path).modules) == len(L.parse_lora(lora_tensors()).modules)


def test_folders_pick_the_one_file_or_ask_for_weight_name(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copyfile(LORAS / "kohya_attn_mlp.safetensors", one / "my_lora.safetensors")
    (one / "README.md").write_text("a LoRA")
    assert L.read_lora(one).format == "kohya"
    count = len(list(LORAS.glob("*.safetensors")))
    with pytest.raises(
        ValueError, match=f"holds {count} .safetensors files: diffusers_attn_mlp.safetensors, extra.*weight_name="
    ):
        L.read_lora(LORAS)
    assert L.read_lora(LORAS, "lightning_attn_mlp.safetensors").format == "lora_down/lora_up"
    with pytest.raises(FileNotFoundError, match="has no nope.safetensors. Its .safetensors files: diffusers"):
        L.read_lora(LORAS, "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist. Give a LoRA's .safetensors file"):
        L.read_lora(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .safetensors file"):
        L.read_lora(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- the hub
REPO = "TinyOrg/tiny-qwen-lora"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


class FakeHub:
    """HfApi.model_info and hf_hub_download over a repo of fixture LoRAs, recording the downloads."""

    def __init__(self, files: dict, root: Path):
        self.files, self.root, self.downloads = files, root, []

    def model_info(self, repo_id, revision=None, files_metadata=False):
        assert files_metadata and repo_id == REPO
        siblings = [SimpleNamespace(rfilename=f, size=src.stat().st_size) for f, src in self.files.items()]
        return SimpleNamespace(sha=COMMIT, siblings=siblings + [SimpleNamespace(rfilename="README.md", size=10)])

    def hf_hub_download(self, repo_id, filename, revision=None, cache_dir=None):
        self.downloads.append(filename)
        out = self.root / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.files[filename], out)
        return str(out)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    def install(files):
        hub = FakeHub(files, tmp_path / "downloads")
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
        return hub

    return install


def test_hub_downloads_only_the_one_file_after_stating_its_size(fake_hub, tmp_path, capsys):
    hub = fake_hub({"qwen-lora.safetensors": LORAS / "kohya_modulation.safetensors"})
    lora = L.read_lora(REPO, cache_dir=tmp_path / "cache")
    size = (LORAS / "kohya_modulation.safetensors").stat().st_size
    assert f"{REPO}: downloading qwen-lora.safetensors ({size / 1e6:.1f} MB) into {tmp_path / 'cache'}" in (
        capsys.readouterr().out
    )
    assert hub.downloads == ["qwen-lora.safetensors"]
    assert "norm_out.linear" in lora.modules


def test_hub_repo_with_several_files_or_only_pickles(fake_hub, tmp_path):
    hub = fake_hub({f"{n}.safetensors": LORAS / f"{n}.safetensors" for n in FILES})
    with pytest.raises(
        ValueError,
        match=f"{REPO} holds 4 .safetensors files: diffusers_attn_mlp.safetensors \\(0.1 MB\\).*weight_name=",
    ):
        L.read_lora(REPO, cache_dir=tmp_path)
    assert hub.downloads == []
    assert L.read_lora(REPO, "kohya_attn_mlp.safetensors", cache_dir=tmp_path).format == "kohya"
    assert hub.downloads == ["kohya_attn_mlp.safetensors"]
    fake_hub({"pytorch_lora_weights.bin": LORAS / "goldens.json"})
    with pytest.raises(ValueError, match="pytorch_lora_weights.bin is a pickle file \\(and .* has no .safetensors"):
        L.read_lora(REPO, cache_dir=tmp_path)


def test_hub_refuses_when_the_disk_is_too_small(fake_hub, tmp_path, monkeypatch):
    hub = fake_hub({"a.safetensors": LORAS / "kohya_modulation.safetensors"})
    monkeypatch.setattr(L.shutil, "disk_usage", lambda p: SimpleNamespace(free=1000))
    with pytest.raises(RuntimeError, match="not enough disk space for .*a.safetensors.*HF_HUB_CACHE"):
        L.read_lora(REPO, cache_dir=tmp_path, verbose=False)
    assert hub.downloads == []


def fake_cache(cache: Path, files: dict) -> None:
    """The hub cache layout: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_hub_offline_uses_the_cache_or_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def no_network(*a, **k):
        raise AssertionError("the network was used")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE=1 forbids"):
        L.read_lora(REPO, cache_dir=tmp_path)
    fake_cache(tmp_path, {"a.safetensors": LORAS / "kohya_attn_mlp.safetensors"})
    assert L.read_lora(REPO, cache_dir=tmp_path).format == "kohya"
    assert L.read_lora(REPO, "a.safetensors", cache_dir=tmp_path).format == "kohya"


# ---------------------------------------------------------------------------------------------- Lightning
def test_lightning_preset_matches_diffusers_at_4_steps_without_cfg():
    """use_lightning(4): the Lightning-format LoRA, the distilled schedule (base_shift = max_shift = ln 3, no
    terminal stretch: sigmas 3/(3 + 1/t - 1) at t = 1, 3/4, 1/2, 1/4, i.e. 1, 0.9, 0.75, 0.5) and CFG off by default;
    diffusers' latents at every step and its image. use_base_schedule() and unload_lora() undo it."""
    golden = mx.load(str(LORAS / "lightning_schedule.safetensors"))
    pipe = load_pipeline()
    pipe.use_lightning(4, lora=LORAS / "lightning_attn_mlp.safetensors")
    t = np.array([1, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(np.array(golden["sigmas"])[:-1], 3 / (3 + 1 / t - 1), rtol=1e-6)
    steps = []
    image = pipe.generate(
        META["prompt"], height=64, width=64, latents=BASE[f"{BASE_CASE}.noise"], progress=False,
        callback=lambda i, x: steps.append(np.array(x[0])),
    )  # fmt: skip
    assert len(steps) == 4 and not pipe.last_stats.cfg
    assert_matches(np.stack(steps), np.asarray(image), golden["latents"], golden["image"])
    pipe.use_base_schedule()
    pipe.unload_lora()
    assert pipe.defaults == {"steps": 20, "cfg_scale": 4.0}
    assert_matches(*generate(pipe), BASE[f"{BASE_CASE}.latents"], BASE[f"{BASE_CASE}.image"])
    with pytest.raises(ValueError, match="8 or 4 steps"):
        pipe.use_lightning(6)
