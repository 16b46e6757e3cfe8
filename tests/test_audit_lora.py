"""More LoRA layouts against diffusers 0.42.1 + peft (goldens by tests/fixtures/make_audit_lora_fixtures.py): peft's
DoRA and lora_bias, alpha folded into 16-bit tensors as diffusers folds it, text-encoder keys and modules the model
lacks (ignored, as diffusers ignores them), diffusers' old `.lora.down.weight` names, kohya names as diffusers'
converter maps them (Qwen-Image 2.1 too), and the file diffusers picks in a folder."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_lora import generate, load_pipeline  # the tiny pipeline and the square_cfg case of tests/fixtures/lora

from qwen_nb import lora as L
from qwen_nb.loading import load_strict, read_weights
from qwen_nb.pipeline import QwenImagePipeline
from qwen_nb.switches import Switches
from qwen_nb.transformer import QwenImageTransformer, TransformerConfig

FIXTURES = Path(__file__).parent / "fixtures"
AUDIT = FIXTURES / "audit_lora"
PIPELINE = FIXTURES / "tiny_pipeline" / "layout_a"
META = json.loads((FIXTURES / "lora" / "goldens.json").read_text())  # the square_cfg case's settings
BASE = mx.load(str(FIXTURES / "tiny_pipeline" / "goldens.safetensors"))
GOLDENS = mx.load(str(AUDIT / "goldens.safetensors"))
AUDIT_META = json.loads((AUDIT / "goldens.json").read_text())
CASES = {c["name"]: c for c in AUDIT_META["cases"]}
QWEN = [n for n, c in CASES.items() if c["pipeline"] == "qwen"]
Q21 = [n for n, c in CASES.items() if c["pipeline"] == "qwen21"]
Q21_FIXTURE = FIXTURES / "tiny_qwen21"
WARNS = {"other_keys", "kohya_te", "q21_kohya"}  # files with keys diffusers ignores (and qwen_nb warns about)


def assert_matches(steps, image, name):
    """`generate`'s every step's latents and image against diffusers' last latents and image."""
    np.testing.assert_allclose(steps[-1], np.array(GOLDENS[f"{name}.latents"]), rtol=1e-5, atol=1e-5)
    diff = int(np.abs(image.astype(int) - np.array(GOLDENS[f"{name}.image"]).astype(int)).max())
    assert diff <= 2, f"max pixel difference {diff}/255"


def load(pipe, case: str) -> list:
    loras = []
    for entry in CASES[case]["loras"]:
        if case in WARNS:
            with pytest.warns(UserWarning, match="ignored, as diffusers ignores them"):
                loras.append(pipe.load_lora(AUDIT / entry["file"], entry["scale"]))
        else:
            loras.append(pipe.load_lora(AUDIT / entry["file"], entry["scale"]))
    # the modules diffusers made peft layers for, no more, no fewer
    assert sorted({t for lo in loras for t in lo.targets}) == CASES[case]["peft_layers"]
    return loras


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


@pytest.mark.parametrize("case", QWEN)
def test_layouts_match_diffusers(pipe, case):
    """Each layout (and DoRA + lora_bias + folded alphas stacked at 0.6, -0.5 and 1.3): diffusers' last latents and
    its image, with the modulation computed up front from weights read with the LoRA merged."""
    load(pipe, case)
    try:
        assert_matches(*generate(pipe), case)
    finally:
        pipe.unload_lora()


@pytest.mark.parametrize("case", ["dora", "lora_bias", "stacked"])
def test_modulation_in_the_model_and_separate_qkv(case):
    """The same with the modulation weights in the model (fused there) and q/k/v as separate linears."""
    pipe = load_pipeline(schedule_modulation=False, fused_qkv=False)
    load(pipe, case)
    assert_matches(*generate(pipe), case)


def test_in_memory_model_fuses_dora_and_bias_and_unfuses_to_the_very_arrays():
    src = load_pipeline()
    model = QwenImageTransformer(TransformerConfig.tiny(joint_attention_dim=64), Switches())
    load_strict(model, read_weights(PIPELINE / "transformer", mx.float32), "transformer")
    model.fuse_projections()
    mem = QwenImagePipeline.from_components(src.tokenizer, model, src.text_encoder, src.vae, src.scheduler_config,
                                            dtype=mx.float32, verbose=False)  # fmt: skip
    before = dict(tree_flatten(model.parameters()))
    load(mem, "stacked")
    assert_matches(*generate(mem), "stacked")
    mem.unload_lora()
    assert all(v is before[k] for k, v in tree_flatten(model.parameters()))


def test_bias_lora_as_adapters_beside_the_linear_equals_the_merged_weights():
    """attach(): base(x) + x D^T U^T + s * b_B equals the linear with the merged weight and bias; a DoRA cannot run
    that way and says how to load it."""
    weights = read_weights(PIPELINE / "transformer", mx.float32)
    model = QwenImageTransformer(TransformerConfig.tiny(joint_attention_dim=64), Switches(), modulation=True)
    load_strict(model, weights, "transformer")
    stack = L.LoraStack()
    stack.add(L.read_lora(AUDIT / "lora_bias.safetensors"), -0.5)
    merged = stack.apply_to_weights(weights)
    stack.attach(model)
    x = mx.random.normal((3, 64), key=mx.random.key(0))
    for path in ["transformer_blocks.0.attn.to_out.0", "proj_out", "transformer_blocks.1.txt_mod.1"]:
        module = L._node(model, path)
        assert isinstance(module, L.LoRALinear)
        expected = x @ merged[f"{path}.weight"].T + merged[f"{path}.bias"]
        np.testing.assert_allclose(np.array(module(x)), np.array(expected), rtol=1e-5, atol=1e-5)
    stack.unfuse(model)
    stack.add(L.read_lora(AUDIT / "dora.safetensors"), 1.0)
    with pytest.raises(ValueError, match="DoRA.*lora_adapters=False"):
        stack.attach(model)


def test_dora_closed_form():
    """peft's DoRA: W' = m / ||W + s B A||_row * (W + s B A), s = scale * lora_alpha / r (8 / 4 here)."""
    weights = read_weights(PIPELINE / "transformer", mx.float32)
    t = mx.load(str(AUDIT / "dora.safetensors"))
    stack = L.LoraStack()
    stack.add(L.read_lora(AUDIT / "dora.safetensors"), 0.7)
    merged = stack.apply_to_weights(weights)
    for path in CASES["dora"]["peft_layers"]:
        w = np.array(weights[f"{path}.weight"]).astype(np.float64)
        a, b = (np.array(t[f"transformer.{path}.lora_{x}.weight"]).astype(np.float64) for x in "AB")
        m = np.array(t[f"transformer.{path}.lora_magnitude_vector.weight"]).astype(np.float64)
        v = w + 0.7 * 2.0 * b @ a
        expected = (m / np.linalg.norm(v, axis=1))[:, None] * v
        np.testing.assert_allclose(np.array(merged[f"{path}.weight"]), expected, rtol=1e-5, atol=1e-6)
        assert mx.array_equal(merged[f"{path}.bias"], weights[f"{path}.bias"])


def test_alphas_are_folded_into_16_bit_tensors_as_diffusers_folds_them():
    """diffusers multiplies down by alpha / r (up by a power of two when that is below 1/2) in the file's dtype."""
    t = mx.load(str(AUDIT / "alpha_folding_bf16.safetensors"))
    lora = L.read_lora(AUDIT / "alpha_folding_bf16.safetensors")
    for path, w in lora.modules.items():
        alpha = t[f"diffusion_model.{path}.alpha"].astype(mx.float32).item()
        assert w.scale == alpha / 4 and w.alpha == alpha and w.down.dtype == mx.bfloat16
        down = t[f"diffusion_model.{path}.lora_down.weight"]
        sd, su = (alpha / 4, 1.0) if alpha / 4 >= 0.5 else (alpha / 4 * 2, 0.5)  # 0.3 / 4 = 0.075 -> 0.15 * 0.5...
        while sd * 2 < su:
            sd, su = sd * 2, su / 2
        assert mx.array_equal(w.down, (down.astype(mx.float32) * sd).astype(mx.bfloat16))
        assert w.multiplier == 1.0


@pytest.mark.parametrize("case", Q21)
def test_qwen21_layouts_match_diffusers(case):
    """Qwen-Image 2.1's names in kohya's layout (`img_mlp_gate_layer` is ignored: diffusers' converter makes it
    `img_mlp.gate.layer`) and in `diffusion_model.` lora_A/lora_B + alpha (bfloat16) names."""
    from qwen_nb.pipeline21 import QwenImage21Pipeline

    c = json.loads((Q21_FIXTURE / "goldens.json").read_text())
    spec = next(x for x in c["cases"] if x["name"] == CASES[case]["base_case"])
    noise = mx.load(str(Q21_FIXTURE / "goldens.safetensors"))[f"{spec['name']}.noise"]
    pipe = QwenImage21Pipeline.from_pretrained(Q21_FIXTURE / "pipeline", dtype=mx.float32, verbose=False)
    load(pipe, case)
    steps = []
    image = pipe.generate(spec["prompt"], spec["negative_prompt"], spec["height"], spec["width"], None,
                          spec["cfg_scale"], latents=noise, use_kv_cache=spec["use_kv_cache"], sigmas=spec["sigmas"],
                          output_resolution=spec["output_resolution"], progress=False,
                          callback=lambda i, x: steps.append(np.array(x[0].astype(mx.float32))))  # fmt: skip
    assert_matches(steps, np.asarray(image), case)


def test_kohya_names_are_mapped_as_diffusers_maps_them():
    assert L._unflatten("transformer_blocks_3_attn_add_q_proj") == "transformer_blocks.3.attn.add_q_proj"
    assert L._unflatten("transformer_blocks_0_img_mlp_net_0_proj") == "transformer_blocks.0.img_mlp.net.0.proj"
    assert L._unflatten("transformer_blocks_1_img_mlp_proj") == "transformer_blocks.1.img_mlp.proj"  # 2.1's
    assert L._unflatten("transformer_blocks_1_img_mlp_gate_layer") == "transformer_blocks.1.img_mlp.gate.layer"
    assert L._unflatten("norm_out_linear") == "norm_out.linear"


@pytest.mark.parametrize("i", range(len(AUDIT_META["best_guess_weight_name"])))
def test_folder_picks_the_file_diffusers_picks(tmp_path, i):
    """No scheduler, optimizer or checkpoint files; pytorch_lora_weights.safetensors first."""
    case = AUDIT_META["best_guess_weight_name"][i]
    for f in case["files"]:
        shutil.copyfile(AUDIT / "legacy_dot.safetensors", tmp_path / f)
    shutil.copyfile(AUDIT / "dora.safetensors", tmp_path / case["picked"])
    assert L.read_lora(tmp_path).source == str(tmp_path / case["picked"])


def test_weight_name_in_a_subfolder(tmp_path):
    (tmp_path / "sub").mkdir()
    shutil.copyfile(AUDIT / "legacy_dot.safetensors", tmp_path / "sub" / "lora.safetensors")
    assert L.read_lora(tmp_path, "sub/lora.safetensors").targets == CASES["legacy_dot"]["peft_layers"]


def test_what_diffusers_refuses_is_refused_with_the_reason():
    t = {k: v for k, v in mx.load(str(AUDIT / "lora_bias.safetensors")).items()}
    moved = {k.replace("transformer.", "diffusion_model.", 1): v for k, v in t.items()}
    with pytest.raises(ValueError, match="LoRA bias or DoRA magnitude .* diffusers reads these only in diffusers/peft"):
        L.parse_lora(moved)
    d = {k: v for k, v in mx.load(str(AUDIT / "dora.safetensors")).items() if "magnitude" not in k}
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8,
                                                 "transformer.use_dora": True})}  # fmt: skip
    with pytest.raises(ValueError, match="use_dora=true.*without its magnitudes"):
        L.parse_lora(d, meta)
    # a LoRA none of whose modules the model has is still refused (diffusers: NoMatchingPeftModuleError)
    model = QwenImageTransformer(TransformerConfig.tiny(joint_attention_dim=64), Switches())
    only_te = {k: v for k, v in mx.load(str(AUDIT / "other_keys.safetensors")).items() if "text_encoder" in k}
    with pytest.raises(ValueError, match="not linears of this Qwen-Image transformer.*text encoder"):
        L.LoraStack().check(model, L.parse_lora(only_te))


def test_a_lora_on_a_norm_is_refused_as_peft_refuses_it():
    model = QwenImageTransformer(TransformerConfig.tiny(joint_attention_dim=64), Switches())
    t = dict(mx.load(str(AUDIT / "legacy_dot.safetensors")))
    t["transformer.txt_norm.lora.down.weight"], t["transformer.txt_norm.lora.up.weight"] = (
        mx.ones((2, 64)),
        mx.ones((64, 2)),
    )
    with pytest.raises(ValueError, match="txt_norm of the LoRA are modules of this transformer that are not linears"):
        L.LoraStack().check(model, L.parse_lora(t))


def test_a_state_dict_is_read_as_a_file_is():
    t = dict(mx.load(str(AUDIT / "alpha_folding_bf16.safetensors")))
    a, b = L.read_lora(t), L.read_lora(AUDIT / "alpha_folding_bf16.safetensors")
    assert a.targets == b.targets and all(mx.array_equal(a.delta(p), b.delta(p)) for p in a.targets)


@pytest.mark.parametrize("name, flag, kind", [("dora", "use_dora", "magnitude"), ("lora_bias", "lora_bias", "bias")])
def test_extras_the_peft_config_turns_off_are_ignored(name, flag, kind):
    """peft applies a DoRA's magnitudes or B's biases only when its config says use_dora / lora_bias: with the flag
    false they are left out (a warning says so) and the rest reads as the same file without them."""
    t = dict(mx.load(str(AUDIT / f"{name}.safetensors")))
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8,
                                                 f"transformer.{flag}": False})}  # fmt: skip
    with pytest.warns(UserWarning, match=f"{flag}=false, so its .* are ignored"):
        off = L.parse_lora(t, meta)
    plain = L.parse_lora(
        {k: v for k, v in t.items() if not k.endswith(("magnitude_vector.weight", "lora_B.bias"))}, meta
    )
    assert off.targets == plain.targets
    for path, w in off.modules.items():
        assert getattr(w, kind) is None
        np.testing.assert_array_equal(np.array(off.delta(path)), np.array(plain.delta(path)))
