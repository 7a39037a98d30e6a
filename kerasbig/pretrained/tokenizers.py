"""A checkpoint's own tokenizer, read from its folder: SentencePiece `tokenizer.model` (Llama) or GPT-2's byte-level
BPE (`vocab.json` + `merges.txt`, or `tokenizer.json`, or a keras-hub preset's `assets/tokenizer/`). Token ids
equal those of the `transformers` tokenizer called with `add_special_tokens=False` (tests/fixtures hold its ids of
prose, code and non-ASCII text).

Clients tokenize too: `files` are what the run keeps in its workdir and the export in `assets.extra/`.
"""
from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

from kerasbig.data.corpus import PieceTokenizer
from kerasbig.errors import UsageError

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other symbols, each with one leading space.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt")
KERAS_HUB_ASSETS = pathlib.Path("assets") / "tokenizer"  # a keras-hub preset's GPT-2 vocabulary.json, merges.txt


@functools.lru_cache(maxsize=1)
def byte_symbols() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte value (`bytes_to_unicode`): printable Latin-1 bytes stand for
    themselves, the rest for code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return tuple(symbols[b] for b in range(256))


class ByteLevelBPE:
    """GPT-2's tokenizer: split by GPT2_SPLIT, map UTF-8 bytes to symbols, apply merges by rank."""

    model = None  # no SentencePiece model: the files below are the tokenizer

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], files: dict[str, bytes],
                 end_token: str = "<|endoftext|>"):
        import regex  # \p{L} and \p{N}, which `re` lacks

        self.vocab, self.files = vocab, files
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.pieces = {i: piece for piece, i in vocab.items()}
        self.vocab_size = max(vocab.values()) + 1
        self.separator = vocab.get(end_token, self.vocab_size - 1)
        self._split = regex.compile(GPT2_SPLIT)
        self._symbols = byte_symbols()
        self._bytes = {s: b for b, s in enumerate(self._symbols)}
        self._cache: dict[str, list[int]] = {}

    def _word(self, word: str) -> list[int]:
        if word not in self._cache:
            parts = [self._symbols[b] for b in word.encode("utf-8")]
            while len(parts) > 1:
                pairs = [(self.ranks.get(pair, len(self.ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
                rank, i = min(pairs)
                if rank == len(self.ranks):
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            self._cache[word] = [self.vocab[p] for p in parts]
        return self._cache[word]

    def encode(self, text: str) -> np.ndarray:
        return np.array([i for word in self._split.findall(text) for i in self._word(word)], np.int32)

    def decode(self, ids) -> str:
        symbols = "".join(self.pieces.get(int(i), "") for i in ids)
        return bytes(self._bytes[s] for s in symbols if s in self._bytes).decode("utf-8", "replace")

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each token (bits per byte); the end-of-text token counts one, as a NUL would."""
        counts = np.ones(self.vocab_size, np.int32)
        for piece, i in self.vocab.items():
            if i != self.separator:
                counts[i] = sum(s in self._bytes for s in piece)
        return counts


def _bpe_from_tokenizer_json(path: pathlib.Path) -> ByteLevelBPE:
    spec = json.loads(path.read_text(encoding="utf-8"))
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        raise UsageError(f"{path}: only GPT-2's byte-level BPE is read from tokenizer.json (model "
                         f"{model.get('type')!r}, pre_tokenizer {pre.get('type')!r}); for SentencePiece give "
                         "tokenizer.model")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = dict(model["vocab"])
    vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    return ByteLevelBPE(vocab, merges, {"tokenizer.json": path.read_bytes()})


def _bpe_from_vocab_and_merges(vocab: pathlib.Path, merges: pathlib.Path) -> ByteLevelBPE:
    """GPT-2's two files, kept under Hugging Face's names whatever they were called, so a workdir or an export
    reads back the same way."""
    files = {"vocab.json": vocab.read_bytes(), "merges.txt": merges.read_bytes()}
    lines = files["merges.txt"].decode("utf-8").splitlines()
    pairs = [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#version")]
    return ByteLevelBPE(json.loads(files["vocab.json"]), pairs, files)


def load(folder: pathlib.Path):
    """The tokenizer whose files are in `folder`, or None when it has none (e.g. a byte-level kerasbig run)."""
    try:
        if (folder / "tokenizer.model").is_file():
            return PieceTokenizer((folder / "tokenizer.model").read_bytes())
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return _bpe_from_vocab_and_merges(folder / "vocab.json", folder / "merges.txt")
        assets = folder / KERAS_HUB_ASSETS  # before tokenizer.json, which in a keras-hub preset is its config
        if (assets / "vocabulary.json").is_file() and (assets / "merges.txt").is_file():
            return _bpe_from_vocab_and_merges(assets / "vocabulary.json", assets / "merges.txt")
        if (folder / "tokenizer.json").is_file():
            return _bpe_from_tokenizer_json(folder / "tokenizer.json")
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # sentencepiece raises RuntimeError
        raise UsageError(f"{folder}: cannot read its tokenizer ({type(error).__name__}: {error}); the files "
                         f"({', '.join(TOKENIZER_FILES)}) are damaged or incomplete") from None
    return None
