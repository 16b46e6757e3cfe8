"""Qwen2's byte-level BPE tokenizer, as transformers' `Qwen2Tokenizer` builds it, on the `tokenizers` library.

Reads a checkpoint's `tokenizer/` folder in either layout: `tokenizer.json`, or `vocab.json` + `merges.txt` with the
added tokens listed in `tokenizer_config.json` (`added_tokens_decoder`) or `added_tokens.json` (the real
Qwen/Qwen-Image folder has no tokenizer.json). Added tokens (`<|im_start|>` ...) written literally in a text are
matched before BPE, as in transformers. `__call__` returns right-padded (ids, mask) int32 arrays.
"""

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

# Qwen2's pre-tokenizer split: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newline runs, and whitespace (a run before a word keeps its last space for the word).
SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _token_content(value) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, a dict with "content", or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_merges(path: Path) -> list[list[str]]:
    merges = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#version"):
            continue
        a, b = line.split(" ")
        merges.append([a, b])
    return merges


def _added_tokens(folder: Path, vocab: dict[str, int]) -> list[dict]:
    """Added tokens with their ids and flags: `added_tokens_decoder` of tokenizer_config.json when it has one,
    else added_tokens.json (special when named in the special tokens)."""
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.exists() else {}
    decoder = config.get("added_tokens_decoder")
    if decoder:
        return [
            {
                "id": int(i),
                "content": t["content"],
                "single_word": t.get("single_word", False),
                "lstrip": t.get("lstrip", False),
                "rstrip": t.get("rstrip", False),
                "normalized": t.get("normalized", not t.get("special", False)),
                "special": t.get("special", False),
            }
            for i, t in sorted(decoder.items(), key=lambda kv: int(kv[0]))
        ]
    special = {_token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        special |= {_token_content(t) for t in config.get(key) or []}
    added_path = folder / "added_tokens.json"
    added = _read_json(added_path) if added_path.exists() else {}
    for token in special - {None} - added.keys():
        if token in vocab:
            added[token] = vocab[token]
    return [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": t not in special,  # as transformers adds the plain ones
            "special": t in special,
        }
        for t, i in sorted(added.items(), key=lambda kv: kv[1])
    ]


def build_from_vocab_merges(folder: Path) -> Tokenizer:
    """The Qwen2 pipeline on vocab.json + merges.txt: NFC, regex split, byte-level BPE, and the added tokens."""
    vocab = _read_json(folder / "vocab.json")
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(folder, vocab),
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": _read_merges(folder / "merges.txt"),
        },
    }
    tok = Tokenizer.from_str(json.dumps(spec))
    for t in spec["added_tokens"]:
        if tok.token_to_id(t["content"]) != t["id"]:
            raise ValueError(
                f"{folder}: added token {t['content']!r} should have id {t['id']} but gets "
                f"{tok.token_to_id(t['content'])}: the added tokens must follow the vocabulary without gaps"
            )
    return tok


class QwenTokenizer:
    """Text -> token ids exactly as transformers' `Qwen2Tokenizer` (no BOS/EOS added, right padding)."""

    def __init__(self, tokenizer: Tokenizer, pad_token: str = "<|endoftext|>"):
        self.tokenizer = tokenizer
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"the pad token {pad_token!r} is not in the vocabulary")
        self.pad_token = pad_token
        self.pad_token_id = pad_id

    @classmethod
    def from_pretrained(cls, folder) -> "QwenTokenizer":
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist or is not a folder")
        if (folder / "tokenizer.json").exists():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            tok = build_from_vocab_merges(folder)
        else:
            raise FileNotFoundError(
                f"{folder} has neither tokenizer.json nor vocab.json + merges.txt: is it a checkpoint's tokenizer/ "
                "folder?"
            )
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.exists() else {}
        return cls(tok, _token_content(config.get("pad_token")) or "<|endoftext|>")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __call__(
        self, texts: list[str], max_length: int | None = None, truncation: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """A batch of texts -> (ids (B, S), mask (B, S)) int32, right-padded to the longest with `pad_token_id`;
        with `truncation`, each text is cut to its first `max_length` tokens."""
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self.encode(t) for t in texts]
        if truncation and max_length is not None:
            encoded = [e[:max_length] for e in encoded]
        S = max(len(e) for e in encoded)
        ids = np.full((len(encoded), S), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(encoded), S), dtype=np.int32)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = e
            mask[i, : len(e)] = 1
        return ids, mask
