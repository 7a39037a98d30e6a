"""`corpus:GLOB`: plain UTF-8 text files for language models, with a tokenizer trained on their training split.

    python -m kerasbig.train --config=configs/gpt_small.py --config.data.name=corpus:'books/*.txt' \\
        --config.data.tokenizer=bpe:8000

Documents are the files (`**` matches folders recursively); with fewer than three files, each file is cut into
`PARTS` documents at line ends. They are split as `text.split_documents` splits CPython's: whole documents to
test and validation, each about a tenth of the bytes (seeded by `data.split_seed`), the rest to train, so no text
leaks between splits.

`data.tokenizer`: `bytes` (UTF-8 bytes, ids 0-255, NUL between documents), or `bpe:N` / `unigram:N`, a
SentencePiece model of N pieces trained on (a sample of up to `SAMPLE_LINES` lines of) the training split, with
identity normalisation and byte fallback so that decoding gives back the text exactly; `</s>` separates documents.

Tokens are written once to a cache (`data.cache_dir`, by default `logs/cache/`, beside the workdirs), one folder
per corpus state: the file paths, sizes and modification times, the tokenizer and the split seed name it, so a
changed file makes a new cache and an unchanged corpus reuses it. A folder holds `tokenizer.model`, `meta.json` and
each split's tokens in shards of `SHARD_TOKENS` (uint16 or uint32). Training reads windows of seq_len + 1 tokens
(overlapping by one, as `text_lm`) by offset from the shards, so memory stays flat however large the corpus.

Serving: the SavedModel takes and returns token ids (`tokens`), as TF Serving has no SentencePiece ops among its
core ones; `tokenizer.model` goes into its `assets.extra/` for clients (`sentencepiece.SentencePieceProcessor(
model_file=...)`), and `kerasbig.generate` reads and writes text through it.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

from kerasbig.data import text, windows as windows_lib
from kerasbig.data.spec import LANGUAGE_MODEL, DataSpec, Plan, Task, tensorflow_splits
from kerasbig.errors import UsageError

CACHE = pathlib.Path(__file__).resolve().parents[2] / "logs" / "cache"
FORMAT = 1  # bump when the cache layout changes
SHARD_TOKENS = 1 << 24
CHUNK_CHARS = 1 << 20  # text encoded per call (cut at a line end)
SAMPLE_LINES = 1_000_000
PARTS = 10
PIECE_KINDS = ("bpe", "unigram")
MIN_PIECES = 300  # SentencePiece needs room for the 256 byte pieces and the special ones


@dataclasses.dataclass(frozen=True, order=True)
class Document:
    """Bytes [start, end) of a file; its length is its size in bytes (what `text.split_documents` weighs)."""

    path: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def __len__(self) -> int:
        return self.size


def parse_tokenizer(value: str) -> tuple[str, int]:
    """`bytes` -> ("bytes", 256); `bpe:N` / `unigram:N` -> (kind, N); `pretrained:PATH` -> ("pretrained", 0),
    its size known once its files are read. Raises UsageError otherwise."""
    if value == "bytes":
        return "bytes", text.BYTE_VOCAB
    kind, _, size = value.partition(":")
    if kind == "pretrained" and size:
        return kind, 0
    if kind not in PIECE_KINDS or not size.isdigit() or int(size) < MIN_PIECES:
        raise UsageError(f"config.data.tokenizer={value!r} must be bytes, bpe:N or unigram:N with N >= {MIN_PIECES}, "
                         "or pretrained:FOLDER (a checkpoint's tokenizer files)")
    return kind, int(size)


def pretrained_tokenizer(value: str):
    """The tokenizer of `pretrained:FOLDER` (see kerasbig.pretrained.tokenizers)."""
    from kerasbig.pretrained import tokenizers  # imports this module

    folder = pathlib.Path(value.partition(":")[2]).expanduser()
    tokenizer = tokenizers.load(folder)
    if tokenizer is None:
        raise UsageError(f"config.data.tokenizer={value!r}: {folder} holds no tokenizer files "
                         f"({', '.join(tokenizers.TOKENIZER_FILES)})")
    return tokenizer


class ByteTokenizer:
    """UTF-8 bytes; NUL separates documents."""

    vocab_size = text.BYTE_VOCAB
    separator = text.PAD
    model = None
    files: dict[str, bytes] = {}

    def encode(self, string: str) -> np.ndarray:
        return text.encode(string)

    def decode(self, ids) -> str:
        return text.decode(ids)

    def token_bytes(self) -> np.ndarray:
        return np.ones(self.vocab_size, np.int32)


class PieceTokenizer:
    """A trained SentencePiece model (serialised in `model`); `</s>` separates documents."""

    def __init__(self, model: bytes):
        import sentencepiece  # only corpora with trained tokenizers need it

        self.model = model
        self.files = {"tokenizer.model": model}  # what the run and the export keep for clients
        self._processor = sentencepiece.SentencePieceProcessor(model_proto=model)
        self.vocab_size = self._processor.get_piece_size()
        self.separator = self._processor.eos_id()

    def encode(self, string: str) -> np.ndarray:
        return np.array(self._processor.encode(string), np.int32)

    def decode(self, ids) -> str:
        return self._processor.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each piece; a byte piece is one byte, and so is the document separator (as NUL is in
        the byte-level stream); other control pieces none."""
        p = self._processor
        return np.array([1 if p.is_byte(i) or i == self.separator else
                         0 if p.is_control(i) or p.is_unknown(i) else
                         len(p.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
                         for i in range(self.vocab_size)], np.int32)


def _paths(pattern: str, flag: str) -> list[str]:
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise UsageError(f"{flag}: no files match {pattern!r}; quote the pattern and check the folder "
                         "(e.g. corpus:'books/**/*.txt')")
    return paths


def _documents(paths: list[str]) -> list[Document]:
    """Whole files, or with fewer than three, `PARTS` pieces of each cut at line ends."""
    if len(paths) >= 3:
        return [Document(p, 0, os.path.getsize(p)) for p in paths]
    documents = []
    for path in paths:
        size, cuts = os.path.getsize(path), [0]
        with open(path, "rb") as f:
            for part in range(1, PARTS):
                f.seek(max(cuts[-1], part * size // PARTS))
                f.readline()
                cuts.append(min(f.tell(), size))
        cuts.append(size)
        documents += [Document(path, a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    return documents


def _chunks(document: Document, errors: str, flag: str):
    """The document's text in pieces of about CHUNK_CHARS that end at line ends."""
    with open(document.path, "rb") as f:
        f.seek(document.start)
        left = document.size
        while left > 0:
            data = f.read(min(left, CHUNK_CHARS))
            if len(data) < left:
                data += f.readline(left - len(data))
            left -= len(data)
            try:
                yield data.decode("utf-8", errors)
            except UnicodeDecodeError as error:
                raise UsageError(f"{flag}: {document.path} is not UTF-8 text (near byte {f.tell() - len(data) + error.start}); "
                                 "convert it, or set --config.data.decode_errors=replace") from None


def _train_pieces(kind: str, size: int, documents: list[Document], errors: str, flag: str) -> bytes:
    import sentencepiece

    def lines():
        for document in documents:
            for chunk in _chunks(document, errors, flag):
                yield from chunk.splitlines()

    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, model_type=kind, vocab_size=size,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"], unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, max_sentence_length=1 << 16,
            input_sentence_size=SAMPLE_LINES, shuffle_input_sentence=True, minloglevel=2)
    except RuntimeError as error:  # e.g. more pieces asked for than the text has
        reason = str(error).strip().splitlines()[-1]
        raise UsageError(f"{flag}: cannot train a {kind} tokenizer of {size} pieces on the training split "
                         f"({reason}); choose a smaller N in --config.data.tokenizer") from None
    return model.getvalue()


def _fingerprint(data_config, documents: list[Document]) -> str:
    tokenizer = data_config.tokenizer
    if tokenizer.startswith("pretrained:"):  # its files, not only their folder, name the tokens
        files = sorted(pretrained_tokenizer(tokenizer).files.items())
        tokenizer = [tokenizer, hashlib.sha256(b"".join(name.encode() + content for name, content in files)).hexdigest()]
    state = {"format": FORMAT, "tokenizer": tokenizer, "seed": data_config.split_seed,
             "errors": data_config.decode_errors,
             "files": [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in sorted({d.path for d in documents})]}
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:24]


def _write_split(folder: pathlib.Path, split: str, documents: list[Document], tokenizer, dtype, errors: str,
                 flag: str) -> list[int]:
    """Tokenizes `documents`, separated by the tokenizer's separator, into shard files of SHARD_TOKENS; returns
    the tokens in each shard."""
    counts: list[int] = []
    shard = None
    try:
        for i, document in enumerate(documents):
            separator = [np.array([tokenizer.separator], np.int32)] if i else []
            for ids in separator + [tokenizer.encode(chunk) for chunk in _chunks(document, errors, flag)]:
                while len(ids):
                    if shard is None or counts[-1] == SHARD_TOKENS:
                        if shard is not None:
                            shard.close()
                        shard = open(folder / f"{split}-{len(counts):05d}.bin", "wb")
                        counts.append(0)
                    take = ids[:SHARD_TOKENS - counts[-1]]
                    shard.write(take.astype(dtype).tobytes())
                    counts[-1] += len(take)
                    ids = ids[len(take):]
    finally:
        if shard is not None:
            shard.close()
    return counts


def _build(folder: pathlib.Path, splits: dict[str, list[Document]], data_config, flag: str) -> None:
    """Trains the tokenizer and writes every split's shards into a temporary folder renamed to `folder`."""
    kind, size = parse_tokenizer(data_config.tokenizer)
    errors = data_config.decode_errors
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        if kind == "bytes":
            tokenizer = ByteTokenizer()
        elif kind == "pretrained":  # read from its own folder each time, not kept in the cache
            tokenizer = pretrained_tokenizer(data_config.tokenizer)
        else:
            tokenizer = PieceTokenizer(_train_pieces(kind, size, splits["train"], errors, flag))
            (tmp / "tokenizer.model").write_bytes(tokenizer.model)
        dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
        shards = {split: _write_split(tmp, split, documents, tokenizer, dtype, errors, flag)
                  for split, documents in splits.items()}
        _window_counts(shards, data_config.seq_len, flag)  # a corpus too small is refused before it is cached
        meta = {"dtype": dtype, "vocab_size": tokenizer.vocab_size, "shard_tokens": SHARD_TOKENS, "shards": shards,
                "documents": {split: [dataclasses.astuple(d) for d in documents] for split, documents in splits.items()}}
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, folder)  # another run may have built the same cache meanwhile: either is the same
    except OSError as error:
        if not (folder / "meta.json").is_file():
            raise UsageError(f"config.data.cache_dir: cannot write the token cache in {folder.parent} "
                             f"({error.strerror}); choose a writable folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_folder(data_config, documents: list[Document]) -> pathlib.Path:
    root = pathlib.Path(data_config.cache_dir) if data_config.cache_dir else CACHE
    return root / f"corpus-{_fingerprint(data_config, documents)}"


class Shards:
    """One split's tokens, read by offset from its shard files."""

    def __init__(self, folder: pathlib.Path, split: str, meta: dict):
        self.paths = [str(folder / f"{split}-{i:05d}.bin") for i in range(len(meta["shards"][split]))]
        self.dtype = np.dtype(meta["dtype"])
        self.shard_tokens = meta["shard_tokens"]

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) as int32, across shard boundaries."""
        parts = []
        while count > 0:
            shard, offset = divmod(start, self.shard_tokens)
            take = min(count, self.shard_tokens - offset)
            parts.append(np.fromfile(self.paths[shard], self.dtype, take, offset=offset * self.dtype.itemsize))
            start, count = start + take, count - take
        return np.concatenate(parts).astype(np.int32)


def _window_counts(shards: dict[str, list[int]], seq_len: int, flag: str) -> dict[str, int]:
    """Windows of seq_len + 1 tokens in each split, given its tokens per shard; every split needs one."""
    counts = {}
    for split in text.SPLITS:
        tokens = sum(shards[split])
        counts[split] = (tokens - 1) // seq_len
        if counts[split] < 1:
            raise UsageError(f"{flag}: the {split} split has {tokens} tokens, too few for one sequence of "
                             f"data.seq_len={seq_len}; add text or lower data.seq_len")
    return counts


def _spec(seq_len: int, vocab_size: int) -> DataSpec:
    return DataSpec(LANGUAGE_MODEL, "tokens", (seq_len,), "int32", vocab_size)


def plan(pattern: str, data_config) -> Plan:
    """The file list and, if the corpus was tokenized before, the cache's window counts (else unknown)."""
    kind, vocab_size = parse_tokenizer(data_config.tokenizer)
    if kind == "pretrained":
        vocab_size = pretrained_tokenizer(data_config.tokenizer).vocab_size
    folder = _cache_folder(data_config, _documents(_paths(pattern, f"data.name=corpus:{pattern}")))
    sizes = {}
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        vocab_size = meta["vocab_size"]
        sizes = _window_counts(meta["shards"], data_config.seq_len, f"data.name=corpus:{pattern}")
    return Plan(_spec(data_config.seq_len, vocab_size), sizes)


def load(pattern: str, data_config) -> Task:
    """The corpus `pattern` matches as a Task, tokenized into the cache on first use (see the module docstring)."""
    flag = f"data.name=corpus:{pattern}"
    parse_tokenizer(data_config.tokenizer)
    documents = _documents(_paths(pattern, flag))
    folder = _cache_folder(data_config, documents)
    if len(documents) < len(text.SPLITS):
        raise UsageError(f"{flag}: the corpus is {len(documents)} line(s) of text; it needs at least three files "
                         "or lines to split into train, validation and test")
    if not (folder / "meta.json").is_file():
        _build(folder, text.split_documents({d: d for d in documents}, data_config.split_seed), data_config, flag)
    meta = json.loads((folder / "meta.json").read_text())
    model = folder / "tokenizer.model"
    if data_config.tokenizer.startswith("pretrained:"):
        tokenizer = pretrained_tokenizer(data_config.tokenizer)
    else:
        tokenizer = PieceTokenizer(model.read_bytes()) if model.is_file() else ByteTokenizer()
    shards = {split: Shards(folder, split, meta) for split in text.SPLITS}
    windows = windows_lib.TokenWindows(read=lambda split, start, count: shards[split].read(start, count),
                                       counts=_window_counts(meta["shards"], data_config.seq_len, flag),
                                       seq_len=data_config.seq_len)
    return Task(
        spec=_spec(data_config.seq_len, tokenizer.vocab_size),
        **_tf_splits(windows),
        num_examples=windows.counts,
        token_bytes=tokenizer.token_bytes(),
        tokenizer=tokenizer,
        windows=windows,
    )


def _tf_splits(windows: windows_lib.TokenWindows) -> dict:
    """tf.data splits of (split number, window number), which `load` reads from the shards after shuffling;
    None off TensorFlow."""
    if not tensorflow_splits():
        return text.NO_TF_SPLITS
    import tensorflow as tf

    seq_len = windows.seq_len

    def window(split, index):
        return windows.read(text.SPLITS[int(split)], int(index) * seq_len, seq_len + 1)

    def load_window(split, index):
        """A stored (split number, window number) -> (inputs, next-token labels)."""
        tokens = tf.ensure_shape(tf.numpy_function(window, [split, index], tf.int32, stateful=False), [seq_len + 1])
        return tokens[:-1], tokens[1:]

    return {**{split: tf.data.Dataset.range(windows.counts[split]).map(lambda index, k=k: (tf.constant(k), index))
               for k, split in enumerate(text.SPLITS)},
            "serving_input": tf.TensorSpec([None, None], tf.int32, name="tokens"), "load": load_window}
