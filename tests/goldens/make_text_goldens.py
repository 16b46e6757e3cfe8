"""Goldens for the tokenizer and the text encoder, made by transformers 5 and diffusers 0.42.1.

Run with the reference environment:
    /work/refenv/bin/python tests/goldens/make_text_goldens.py
It (re)writes, deterministically:
- text_tokenizer.json: 40+ strings and their ids from transformers' `Qwen2Tokenizer` for the tiny tokenizer in both
  folder layouts (tests/fixtures/tiny_tokenizer/{vocab_merges,json}), plus padded/truncated batch calls.
- text_encoder_tiny/: a tiny random `Qwen2_5_VLForConditionalGeneration` (float32, vision tower included) as
  transformers 5 `save_pretrained` writes it: nested config.json, names `model.layers.*`, `visual.*`, `lm_head.*`.
- text_encoder_tiny_flat_config.json: the same config in the flat transformers-4.x shape of the hub checkpoint.
- text_encoder_hidden.safetensors: token ids, masks and the final hidden states, without and with padding.
- text_encode_prompt.safetensors: prompt embeddings and masks of diffusers' `QwenImagePipeline.encode_prompt` on the
  tiny tokenizer (vocab.json + merges.txt, as the real folder) and the tiny text encoder.
"""

import json
import shutil
import tempfile
import unicodedata
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
TOKENIZER_DIR = HERE.parent / "fixtures" / "tiny_tokenizer"
ENCODER_DIR = HERE / "text_encoder_tiny"

TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


def nfd(s: str) -> str:
    return unicodedata.normalize("NFD", s)


STRINGS = [
    "",
    "a cat",
    "A photo of a red fox sitting in the snow",
    "一只可爱的小猫坐在窗台上",
    "通义千问 Qwen-Image 文生图，超清，4K",
    "こんにちは世界 カタカナ",
    "😀🚀✨",
    "👩‍👩‍👧‍👦 family, 🇯🇵 flag, ❤️ heart, 👍🏽",
    "3.14159 and 1,000,000 and 0042",
    "2024-01-31 12:34:56",
    "  leading spaces",
    "trailing spaces   ",
    "many     spaces    between words",
    "tab\tseparated\t\tvalues\t",
    "line one\nline two\n\n\nline five\n",
    "windows\r\nline\r\n\r\nend",
    " \t \n mixed \n\t whitespace \t",
    nfd("café naïve Ångström"),
    "café naïve Ångström",
    nfd("Zürich São Paulo résumé piñata"),
    "e\u0301\u0301 double combining",
    "Hangul in NFD: " + nfd("한국어 안녕하세요"),
    "<|im_start|>user\nhello<|im_end|>",
    "literal <|endoftext|> in the middle",
    "<|vision_start|><|image_pad|><|vision_end|>",
    '<tool_call>{"a": 1}</tool_call>',
    "<|im_start|",
    "<|IM_START|> is not special",
    " <|im_end|> spaces around ",
    "<|im_end|><|im_end|>\n\n<|endoftext|>",
    "it's don't WE'RE they've I'm you'll he'd",
    "Punctuation!!! ??? ... ,,, ;;; :: --",
    "C++ & Python's `code` {x: [1, 2]} <b>html</b>",
    "Ultra HD, 4K, cinematic composition. 超清，4K，电影级构图.",
    " ",
    "Ωμέγα привет مرحبا שלום",
    "∮ ⅀ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth",
    "ﬁ ligature ＦＵＬＬＷＩＤＴＨ",
    TEMPLATE.format('A coffee shop entrance with a chalkboard sign reading "Qwen Coffee 😊 $2 per cup"'),
    TEMPLATE.format("一只可爱的小猫坐在窗台上，阳光明媚，超清，4K，电影级构图。"),
    TEMPLATE.format(" "),
]

BATCH = [TEMPLATE.format("a red fox"), TEMPLATE.format("宫崎骏风格的动漫场景\n\n  蓝天白云 😀"), TEMPLATE.format("")]


def tokenizer_goldens() -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, Qwen2Tokenizer

    golden = {"strings": STRINGS, "ids": {}, "batch": {"texts": BATCH}}
    for layout in ("vocab_merges", "json"):
        folder = str(TOKENIZER_DIR / layout)
        hf = Qwen2Tokenizer.from_pretrained(folder)
        auto = AutoTokenizer.from_pretrained(folder)
        ids = [hf(s)["input_ids"] for s in STRINGS]
        assert ids == [auto(s)["input_ids"] for s in STRINGS], f"AutoTokenizer differs from Qwen2Tokenizer ({layout})"
        for s, i in zip(STRINGS, ids):
            assert hf.decode(i) == unicodedata.normalize("NFC", s), (s, hf.decode(i))
        golden["ids"][layout] = ids
        padded = hf(BATCH, max_length=1024 + 34, padding=True, truncation=True)
        cut = hf(BATCH, max_length=40, padding=True, truncation=True)
        golden["batch"][layout] = {
            "ids": padded["input_ids"],
            "mask": padded["attention_mask"],
            "pad_token_id": hf.pad_token_id,
            "cut_max_length": 40,
            "cut_ids": cut["input_ids"],
            "cut_mask": cut["attention_mask"],
        }
    assert golden["ids"]["vocab_merges"] == golden["ids"]["json"], "the two layouts disagree"
    # a folder whose tokenizer_config.json lacks added_tokens_decoder (older saves): added_tokens.json is used
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tok"
        shutil.copytree(TOKENIZER_DIR / "vocab_merges", folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        del config["added_tokens_decoder"]
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        hf = Qwen2Tokenizer.from_pretrained(str(folder))
        assert [hf(s)["input_ids"] for s in STRINGS] == golden["ids"]["vocab_merges"]
    plain = Tokenizer.from_file(str(TOKENIZER_DIR / "json" / "tokenizer.json"))
    assert golden["ids"]["json"] == [plain.encode(s).ids for s in STRINGS]
    (HERE / "text_tokenizer.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")


TEXT = dict(
    vocab_size=640,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
)
ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}  # 2 + 3 + 3 = head_dim / 2
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0])


def flat_config() -> dict:
    """The tiny config in the shape of the hub checkpoint's text_encoder/config.json (transformers 4.53)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        **TEXT,
        "image_token_id": 151655,
        "initializer_range": 0.02,
        "max_window_layers": 2,
        "model_type": "qwen2_5_vl",
        "rope_scaling": {"mrope_section": ROPE["mrope_section"], "rope_type": "default", "type": "default"},
        "rope_theta": ROPE["rope_theta"],
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.53.1",
        "use_cache": True,
        "use_sliding_window": False,
        "video_token_id": 151656,
        "vision_config": {"model_type": "qwen2_5_vl", **VISION},
        "vision_end_token_id": 151653,
        "vision_start_token_id": 151652,
        "vision_token_id": 151654,
    }


def make_encoder():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(text_config={**TEXT, "rope_parameters": dict(ROPE)}, vision_config=VISION)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    # Larger than the 0.02 init, so attention is far from uniform and every term of the layer matters.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model


def encoder_goldens(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    model = make_encoder()
    if ENCODER_DIR.exists():
        shutil.rmtree(ENCODER_DIR)
    model.save_pretrained(str(ENCODER_DIR))
    (ENCODER_DIR / "generation_config.json").unlink(missing_ok=True)
    (HERE / "text_encoder_tiny_flat_config.json").write_text(json.dumps(flat_config(), indent=2) + "\n")

    # transformers reads the flat shape to the same text model
    flat = Qwen2_5_VLConfig(**{k: v for k, v in flat_config().items() if k != "transformers_version"})
    for k in TEXT:
        assert getattr(flat.text_config, k) == getattr(model.config.text_config, k), k
    assert flat.text_config.rope_parameters["rope_theta"] == ROPE["rope_theta"]
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ENCODER_DIR)).eval()

    g = torch.Generator().manual_seed(2)
    ids1 = torch.randint(0, 640, (1, 23), generator=g)
    ids2 = torch.randint(0, 640, (2, 19), generator=g)
    mask2 = torch.ones_like(ids2)
    mask2[1, 12:] = 0
    ids2[1, 12:] = tokenizer.pad_token_id

    def run(m, ids, mask):
        with torch.no_grad():
            out = m(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-1]

    hidden1 = run(model, ids1, torch.ones_like(ids1))
    hidden1_nomask = run(model, ids1, None)
    hidden2 = run(model, ids2, mask2)
    assert torch.equal(hidden1, hidden1_nomask)
    assert torch.equal(hidden1, run(reloaded, ids1, torch.ones_like(ids1)))
    # the final norm's output: hidden_states[-1] is model.norm applied to the last layer's output
    with torch.no_grad():
        last = model.model.language_model(input_ids=ids1).last_hidden_state
    torch.testing.assert_close(hidden1, last, rtol=0, atol=0)
    save_file(
        {
            "ids1": ids1.to(torch.int32),
            "hidden1": hidden1.contiguous(),
            "ids2": ids2.to(torch.int32),
            "mask2": mask2.to(torch.int32),
            "hidden2": hidden2.contiguous(),
        },
        str(HERE / "text_encoder_hidden.safetensors"),
    )
    return model


PROMPTS = ["a red fox in the snow", "一只可爱的小猫坐在窗台上，阳光明媚 😀", "x", "Ultra HD, 4K.\n\n  tabs\there"]


def encode_prompt_goldens(model, tokenizer) -> None:
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=model, tokenizer=tokenizer, transformer=None)
    out = {}
    cases = {"batch": (PROMPTS, 512), "batch_cut": (PROMPTS, 6), "single": (PROMPTS[1], 512)}
    meta = {}
    for name, (prompts, max_len) in cases.items():
        with torch.no_grad():
            embeds, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=max_len)
        if mask is None:  # diffusers drops an all-ones mask; qwen_nb always returns it
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        out[f"{name}_embeds"] = embeds.contiguous()
        out[f"{name}_mask"] = mask.to(torch.int32).contiguous()
        meta[name] = {"prompts": prompts, "max_sequence_length": max_len}
    save_file(out, str(HERE / "text_encode_prompt.safetensors"), metadata={"cases": json.dumps(meta)})


def main() -> None:
    from transformers import Qwen2Tokenizer

    tokenizer_goldens()
    tokenizer = Qwen2Tokenizer.from_pretrained(str(TOKENIZER_DIR / "vocab_merges"))  # the real folder's layout
    model = encoder_goldens(tokenizer)
    encode_prompt_goldens(model, tokenizer)
    for p in sorted(HERE.glob("text_*")):
        size = sum(f.stat().st_size for f in p.rglob("*")) if p.is_dir() else p.stat().st_size
        print(f"{p.name:40s} {size / 1e3:8.1f} kB")


if __name__ == "__main__":
    main()
