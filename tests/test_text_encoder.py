"""QwenTextEncoder and encode_prompt against transformers' Qwen2_5_VLForConditionalGeneration and diffusers'
QwenImagePipeline.encode_prompt, on the tiny random model and tokenizer of tests/goldens/make_text_goldens.py."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen_nb.switches import Switches
from qwen_nb.text_encoder import (
    DROP_IDX,
    PROMPT_TEMPLATE,
    QwenTextEncoder,
    TextEncoderConfig,
    encode_prompt,
    load_text_encoder,
)
from qwen_nb.tokenizer import QwenTokenizer

TESTS = Path(__file__).resolve().parent
GOLDENS = TESTS / "goldens"
ENCODER = GOLDENS / "text_encoder_tiny"
FLAT_CONFIG = GOLDENS / "text_encoder_tiny_flat_config.json"
TOKENIZER = TESTS / "fixtures" / "tiny_tokenizer" / "vocab_merges"
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    vocab_size=640,
    hidden_act="silu",
)


@pytest.fixture(scope="module")
def hidden():
    return mx.load(str(GOLDENS / "text_encoder_hidden.safetensors"))


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder(ENCODER, mx.float32)


@pytest.fixture(scope="module")
def tokenizer():
    return QwenTokenizer.from_pretrained(TOKENIZER)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.array(a.astype(mx.float32)), np.array(b), rtol=tol, atol=tol)


# ---- parity with transformers ---------------------------------------------------------------------------------


def test_hidden_states_without_padding(encoder, hidden):
    out = encoder(hidden["ids1"])
    assert out.shape == (1, 23, 64) and out.dtype == mx.float32
    close(out, hidden["hidden1"])
    close(encoder(hidden["ids1"], mx.ones(hidden["ids1"].shape, mx.int32)), hidden["hidden1"])


def test_hidden_states_with_padding(encoder, hidden):
    """Batch of 2, the second right-padded after 12 tokens: every position (padding rows included) as transformers."""
    out = encoder(hidden["ids2"], hidden["mask2"])
    close(out, hidden["hidden2"])


def test_padding_does_not_change_the_tokens(encoder, hidden):
    alone = encoder(hidden["ids2"][1:, :12])
    close(alone, hidden["hidden2"][1:, :12])


def test_naive_switches_agree(hidden):
    naive = load_text_encoder(ENCODER, mx.float32, Switches.baseline())
    close(naive(hidden["ids2"], hidden["mask2"]), hidden["hidden2"])
    close(naive(hidden["ids1"]), hidden["hidden1"])


@pytest.mark.parametrize("batch", [1, 2])
def test_bfloat16(hidden, batch):
    enc = load_text_encoder(ENCODER, mx.bfloat16)
    assert enc.dtype == mx.bfloat16
    out = enc(hidden["ids2"][:batch], hidden["mask2"][:batch])
    assert out.shape == (batch, 19, 64) and out.dtype == mx.bfloat16
    ref = np.array(hidden["hidden2"][:batch])
    # bf16 keeps 8 bits of mantissa: rounded weights and activations through two layers and the final norm put
    # the worst element ~2% of the activations' scale (max |h| ~ 4.2) off float32 (measured 0.09); bound at 5%.
    err = np.abs(np.array(out.astype(mx.float32)) - ref).max()
    assert err < 0.05 * np.abs(ref).max(), err


# ---- config shapes and weight names ---------------------------------------------------------------------------


def test_defaults_are_the_real_checkpoint():
    """The hub's text_encoder/config.json (flat, transformers 4.53; spec section 5) gives the defaults."""
    hub = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "hidden_act": "silu",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "max_position_embeddings": 128000,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 3584},
        "vocab_size": 152064,
    }
    assert TextEncoderConfig.from_dict(hub) == TextEncoderConfig()
    assert asdict(TextEncoderConfig()) == dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        head_dim=128,
        intermediate_size=18944,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        vocab_size=152064,
        hidden_act="silu",
    )


def test_both_config_shapes():
    nested = json.loads((ENCODER / "config.json").read_text())
    flat = json.loads(FLAT_CONFIG.read_text())
    assert "text_config" in nested and "rope_parameters" in nested["text_config"]
    assert "text_config" not in flat and "rope_theta" in flat and "rope_scaling" in flat
    assert asdict(TextEncoderConfig.from_dict(nested)) == TINY
    assert asdict(TextEncoderConfig.from_dict(flat)) == TINY
    # transformers 4.5x wrote both: the flat fields and a text_config copy with rope_theta / rope_scaling
    mixed = {**flat, "text_config": {k: flat[k] for k in ("hidden_size", "rope_theta", "rope_scaling")}}
    assert asdict(TextEncoderConfig.from_dict(mixed)) == TINY
    theta = {**flat, "rope_theta": 5e5, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    assert TextEncoderConfig.from_dict(theta).rope_theta == 5e5


def test_unsupported_config():
    flat = json.loads(FLAT_CONFIG.read_text())
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        TextEncoderConfig.from_dict({**flat, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="must equal hidden_size"):
        TextEncoderConfig.tiny(head_dim=8)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        TextEncoderConfig.tiny(num_key_value_heads=3)


def _transformers5_names(weights):
    """The names transformers 5 keeps in memory (and some converted checkpoints carry)."""
    out = {}
    for k, v in weights.items():
        if k.startswith("model."):
            k = "model.language_model." + k[len("model.") :]
        elif k.startswith("visual."):
            k = "model." + k
        out[k] = v
    return out


@pytest.mark.parametrize("config_file", ["nested", "flat"])
@pytest.mark.parametrize("names", ["model.layers", "model.language_model.layers"])
def test_loads_both_config_shapes_and_weight_names(tmp_path, hidden, config_file, names):
    weights = mx.load(str(ENCODER / "model.safetensors"))
    assert any(k.startswith("visual.") for k in weights) and "lm_head.weight" in weights
    if names == "model.language_model.layers":
        weights = _transformers5_names(weights)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    shutil.copy(ENCODER / "config.json" if config_file == "nested" else FLAT_CONFIG, tmp_path / "config.json")
    enc = load_text_encoder(tmp_path, mx.float32)
    close(enc(hidden["ids1"]), hidden["hidden1"])


def test_sharded_checkpoint_with_vision_only_shard(tmp_path, hidden):
    weights = mx.load(str(ENCODER / "model.safetensors"))
    shards = {
        "model-00001-of-00002.safetensors": {k: v for k, v in weights.items() if not k.startswith("visual.")},
        "model-00002-of-00002.safetensors": {k: v for k, v in weights.items() if k.startswith("visual.")},
    }
    for name, part in shards.items():
        mx.save_safetensors(str(tmp_path / name), part)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(FLAT_CONFIG, tmp_path / "config.json")
    close(load_text_encoder(tmp_path, mx.float32)(hidden["ids1"]), hidden["hidden1"])


def test_sanitize():
    w = {
        "model.embed_tokens.weight": 1,
        "model.language_model.layers.0.mlp.up_proj.weight": 2,
        "model.language_model.norm.weight": 3,
        "visual.blocks.0.attn.qkv.weight": 4,
        "model.visual.merger.ln_q.weight": 5,
        "lm_head.weight": 6,
    }
    assert QwenTextEncoder.sanitize(w) == {
        "model.embed_tokens.weight": 1,
        "model.layers.0.mlp.up_proj.weight": 2,
        "model.norm.weight": 3,
    }


def test_wrong_checkpoint_is_reported(tmp_path):
    weights = mx.load(str(ENCODER / "model.safetensors"))
    del weights["model.layers.1.self_attn.q_proj.bias"]
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    config = json.loads(FLAT_CONFIG.read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing: .*model.layers.1.self_attn.q_proj.bias.*model.layers.2"):
        load_text_encoder(tmp_path, mx.float32)


# ---- encode_prompt against diffusers --------------------------------------------------------------------------

PROMPT_GOLDENS = GOLDENS / "text_encode_prompt.safetensors"


def _cases():
    from safetensors import safe_open

    with safe_open(str(PROMPT_GOLDENS), "np") as f:
        return json.loads(f.metadata()["cases"])


@pytest.mark.parametrize("case", ["batch", "batch_cut", "single"])
def test_encode_prompt_equals_diffusers(tokenizer, encoder, case):
    golden = mx.load(str(PROMPT_GOLDENS))
    spec = _cases()[case]
    embeds, mask = encode_prompt(tokenizer, encoder, spec["prompts"], spec["max_sequence_length"])
    ref_embeds, ref_mask = golden[f"{case}_embeds"], golden[f"{case}_mask"]
    assert embeds.shape == ref_embeds.shape and embeds.dtype == mx.float32
    assert mask.dtype == mx.int32
    np.testing.assert_array_equal(np.array(mask), np.array(ref_mask))
    close(embeds, ref_embeds)


def test_encode_prompt_bfloat16_dtype(tokenizer):
    enc = load_text_encoder(ENCODER, mx.bfloat16)
    embeds, mask = encode_prompt(tokenizer, enc, ["a cat", "a red fox in the snow"])
    assert embeds.dtype == mx.bfloat16 and mask.dtype == mx.int32
    assert (np.array(embeds.astype(mx.float32))[np.array(mask) == 0] == 0).all()


def test_max_sequence_length_over_1024(tokenizer, encoder):
    with pytest.raises(ValueError, match="cannot be greater than 1024 but is 1025"):
        encode_prompt(tokenizer, encoder, "a cat", max_sequence_length=1025)


def test_prompt_length_limit(tokenizer, encoder):
    """Every digit is one token (Qwen2 splits digits singly), so a run of digits sets the length exactly. 1024 tokens
    after the drop are encoded whole; a longer prompt is cut there, as diffusers' tokenizer cuts it (truncation at
    tokenizer_max_length + drop_idx): two prompts alike in their first 1100 tokens encode alike."""
    base = len(tokenizer.encode(PROMPT_TEMPLATE.format(""))) - DROP_IDX
    fits = "7" * (1024 - base)
    embeds, mask = encode_prompt(tokenizer, encoder, fits, max_sequence_length=1024)
    assert embeds.shape[1] == 1024 and int(np.array(mask).sum()) == 1024
    a, ma = encode_prompt(tokenizer, encoder, ["a cat", "7" * 1100 + "1"], max_sequence_length=1024)
    b, mb = encode_prompt(tokenizer, encoder, ["a cat", "7" * 1100 + "2"], max_sequence_length=1024)
    assert a.shape[1] == 1024 and int(np.array(ma)[1].sum()) == 1024
    assert np.array_equal(np.array(a), np.array(b)) and np.array_equal(np.array(ma), np.array(mb))
