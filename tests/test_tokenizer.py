"""QwenTokenizer against transformers' Qwen2Tokenizer: ids saved by tests/goldens/make_text_goldens.py for the tiny
BPE of tests/fixtures/tiny_tokenizer in both folder layouts (vocab.json + merges.txt; tokenizer.json)."""

import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from qwen_nb.tokenizer import QwenTokenizer

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures" / "tiny_tokenizer"
GOLDEN = json.loads((TESTS / "goldens" / "text_tokenizer.json").read_text(encoding="utf-8"))
LAYOUTS = ["vocab_merges", "json"]
CASES = list(range(len(GOLDEN["strings"])))


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request):
    return request.param, QwenTokenizer.from_pretrained(FIXTURES / request.param)


def test_fixture_layouts_are_as_described():
    assert sorted(p.name for p in (FIXTURES / "json").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in (FIXTURES / "vocab_merges").iterdir()) == [
        "added_tokens.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    assert len(GOLDEN["strings"]) >= 30


@pytest.mark.parametrize("case", CASES)
def test_ids_equal_transformers(layout, case):
    name, tok = layout
    text = GOLDEN["strings"][case]
    assert tok.encode(text) == GOLDEN["ids"][name][case], repr(text)


@pytest.mark.parametrize("case", CASES)
def test_decode_gives_back_the_nfc_text(layout, case):
    _, tok = layout
    text = GOLDEN["strings"][case]
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_batch_is_right_padded_like_transformers(layout):
    name, tok = layout
    ref = GOLDEN["batch"][name]
    ids, mask = tok(GOLDEN["batch"]["texts"], max_length=1024 + 34, truncation=True)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    np.testing.assert_array_equal(ids, ref["ids"])
    np.testing.assert_array_equal(mask, ref["mask"])
    assert tok.pad_token_id == ref["pad_token_id"]


def test_truncation_like_transformers(layout):
    name, tok = layout
    ref = GOLDEN["batch"][name]
    ids, mask = tok(GOLDEN["batch"]["texts"], max_length=ref["cut_max_length"], truncation=True)
    np.testing.assert_array_equal(ids, ref["cut_ids"])
    np.testing.assert_array_equal(mask, ref["cut_mask"])


def test_added_tokens_json_without_added_tokens_decoder(tmp_path):
    """An older tokenizer_config.json without `added_tokens_decoder`: the ids come from added_tokens.json
    (transformers gives the same ids for this folder; the golden script checks that)."""
    folder = tmp_path / "tok"
    shutil.copytree(FIXTURES / "vocab_merges", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = QwenTokenizer.from_pretrained(folder)
    assert [tok.encode(s) for s in GOLDEN["strings"]] == GOLDEN["ids"]["vocab_merges"]


def test_special_tokens_are_single_ids(layout):
    _, tok = layout
    added = json.loads((FIXTURES / "vocab_merges" / "added_tokens.json").read_text())
    for token, i in added.items():
        assert tok.encode(token) == [i]
    assert tok.pad_token_id == added["<|endoftext|>"]


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        QwenTokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.json"):
        QwenTokenizer.from_pretrained(tmp_path)


def test_gap_in_added_token_ids_is_reported(tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(FIXTURES / "vocab_merges", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    config["added_tokens_decoder"] = {str(int(k) + 5): v for k, v in decoder.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="should have id"):
        QwenTokenizer.from_pretrained(folder)
