"""Real text that ships with every CPython, so text models train offline: pydoc's English topic pages
(`pydoc_data.topics`) and the standard library's own sources.

Tokens are UTF-8 bytes (ids 0..255). Id 0 (NUL, which text never contains) separates documents in a
language-model stream and pads classification snippets.

>>> decode(encode("héllo"))
'héllo'
"""
from __future__ import annotations

import functools
import os
import sysconfig
from typing import TYPE_CHECKING

import numpy as np

from kerasbig.data import windows as windows_lib
from kerasbig.data.spec import CLASSIFICATION, LANGUAGE_MODEL, DataSpec, Task, tensorflow_splits
from kerasbig.errors import UsageError

if TYPE_CHECKING:
    import tensorflow as tf

PAD = 0
BYTE_VOCAB = 256
SPLITS = ("train", "validation", "test")
NO_TF_SPLITS = {**dict.fromkeys(SPLITS), "serving_input": None}  # a language model's Task off TensorFlow
EVAL_FRACTION = 0.1  # of a corpus' characters, for validation and for test each
LM_SOURCES = ("pydoc_topics", "stdlib", "both")
# Present, as folders of several files, in Python 3.10 to 3.13.
PACKAGES = ("asyncio", "email", "http", "importlib", "json", "logging", "multiprocessing", "unittest", "urllib",
            "xml")
# Test suites are not the package's own code, and site-packages is not the standard library.
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def encode(text: str) -> np.ndarray:
    """Token ids of `text`: its UTF-8 bytes.

    >>> encode("hi").tolist()
    [104, 105]
    """
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(ids) -> str:
    """The text of token ids; byte sequences that are not valid UTF-8 come back as U+FFFD."""
    return np.asarray(ids).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def bytes_to_ids(text: tf.Tensor, seq_len: int) -> tf.Tensor:
    """A batch of strings [batch] -> int32 byte ids [batch, seq_len], truncated or padded with PAD.

    The serving signature runs this, so clients send plain text.
    """
    import tensorflow as tf

    return tf.cast(tf.io.decode_raw(text, tf.uint8, fixed_length=seq_len), tf.int32)


def pydoc_topics() -> dict[str, str]:
    """pydoc's help topics ("assert", "for", ...), each an English document about the language."""
    from pydoc_data.topics import topics

    return {f"pydoc/{name}": text for name, text in topics.items()}


def stdlib_sources(packages: tuple[str, ...] | None = None) -> dict[str, str]:
    """Path relative to the standard library -> text of its `.py` files (tests left out), or of `packages`."""
    root = sysconfig.get_paths()["stdlib"]
    tops = [os.path.join(root, package) for package in packages] if packages else [root]
    for top in tops:
        if not os.path.isdir(top):
            raise UsageError(f"{os.path.basename(top)!r} is not a standard-library package folder in this Python; "
                             f"try some of {PACKAGES}")
    sources = {}
    for top in tops:
        for folder, subfolders, files in os.walk(top):
            subfolders[:] = [name for name in subfolders if name not in _SKIPPED_DIRS]
            for name in files:
                path = os.path.join(folder, name)
                if name.endswith(".py") and os.path.getsize(path):  # empty __init__.py files are no documents
                    with open(path, encoding="utf-8", errors="replace") as f:
                        sources[os.path.relpath(path, root)] = f.read()
    return sources


def split_documents(documents: dict[str, str], seed: int) -> dict[str, list[str]]:
    """Splits document names three ways, whole documents only, so that no text leaks between splits.

    Names are sorted, then shuffled by `seed` (the split is the same on every machine with this Python).
    Test, then validation, take in that order the documents that still fit in EVAL_FRACTION of the
    characters (if none fits, the smallest one); train keeps the rest. Every split gets a document.

    >>> splits = split_documents({f"doc{i}": "text" for i in range(20)}, seed=0)
    >>> {split: len(names) for split, names in splits.items()}
    {'train': 16, 'validation': 2, 'test': 2}
    """
    if len(documents) < len(SPLITS):
        raise UsageError(f"{len(documents)} documents cannot be split three ways: {sorted(documents)}")
    names = sorted(documents)
    rest = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    quota = EVAL_FRACTION * sum(len(text) for text in documents.values())
    splits = {}
    for split, later in (("test", 2), ("validation", 1)):  # later: documents the next splits need
        room, taken = quota, []
        for name in rest:
            if len(documents[name]) <= room and len(rest) - len(taken) > later:
                taken.append(name)
                room -= len(documents[name])
        splits[split] = taken or [min(rest, key=lambda name: len(documents[name]))]
        rest = [name for name in rest if name not in splits[split]]
    return {"train": rest, "validation": splits["validation"], "test": splits["test"]}


def load_text_lm(*, seq_len: int, source: str = "pydoc_topics", seed: int, max_tokens: int = 4_000_000) -> Task:
    """Next-token prediction on pydoc's English topics, the standard library's sources, or both.

    Each split's documents are joined with PAD between them and cut into windows of seq_len + 1 tokens
    that overlap by one, so every token is a label exactly once: (window[:-1], window[1:]).
    `max_tokens` caps the corpus, shared among the splits in their 80/10/10 proportion.

    >>> task = load_text_lm(seq_len=128, seed=0)
    >>> task.spec.num_classes, task.train.element_spec[0].shape
    (256, TensorShape([128]))
    """
    if source not in LM_SOURCES:
        raise UsageError(f"data.source={source!r} is not a text source; choose one of {LM_SOURCES}")
    documents = {}
    if source in ("pydoc_topics", "both"):
        documents.update(pydoc_topics())
    if source in ("stdlib", "both"):
        documents.update(stdlib_sources())
    names = split_documents(documents, seed)
    texts = {split: chr(PAD).join(documents[name] for name in names[split]) for split in SPLITS}
    shares = {"train": 1 - 2 * EVAL_FRACTION, "validation": EVAL_FRACTION, "test": EVAL_FRACTION}
    tokens = {split: encode(texts[split])[:int(max_tokens * shares[split])] for split in SPLITS}
    windows = {split: _windows(tokens[split], seq_len) for split in SPLITS}
    return Task(
        spec=DataSpec(LANGUAGE_MODEL, "tokens", (seq_len,), "int32", BYTE_VOCAB),
        **_tf_windows(windows),
        num_examples={split: len(windows[split][0]) for split in SPLITS},
        token_bytes=np.ones(BYTE_VOCAB, np.int64),
        windows=windows_lib.in_memory(tokens, seq_len),
    )


def _tf_windows(windows: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """The tf.data splits and serving input of in-memory (inputs, labels) windows; None off TensorFlow."""
    if not tensorflow_splits():
        return NO_TF_SPLITS
    import tensorflow as tf

    return {**{split: tf.data.Dataset.from_tensor_slices(windows[split]) for split in SPLITS},
            "serving_input": tf.TensorSpec([None, None], tf.int32, name="tokens")}


def _windows(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    n = (len(ids) - 1) // seq_len
    if n == 0:
        raise UsageError(f"data.seq_len={seq_len} is longer than a whole split ({len(ids)} tokens)")
    return ids[:n * seq_len].reshape(n, seq_len), ids[1:n * seq_len + 1].reshape(n, seq_len)


def load_text_classification(*, seq_len: int, packages: tuple[str, ...] = PACKAGES, seed: int,
                             max_per_class: int = 2400, eval_per_class: int = 75) -> Task:
    """Which standard-library package a snippet of source comes from.

    Each package's files are split with `split_documents`, so all snippets of a file share a split.
    Snippets are seq_len-byte chunks (a file's shorter tail is dropped, so each carries a full window of
    evidence): non-overlapping for validation and test, and overlapping by three quarters for training, which
    gives the models four times the views of the same training files. For balance, each class keeps at most
    `max_per_class` training snippets and `eval_per_class` for validation and for test, sampled by `seed`. Examples are
    (raw text, label); `preprocess` turns a batch of text into byte ids, in training and in serving.

    >>> import tensorflow as tf
    >>> task = load_text_classification(seq_len=256, seed=0)
    >>> task.spec.class_names[:3], task.preprocess(tf.constant(["import json"])).shape
    (('asyncio', 'email', 'http'), TensorShape([1, 256]))
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    caps = {"train": max_per_class, "validation": eval_per_class, "test": eval_per_class}
    examples = {split: ([], []) for split in SPLITS}
    for label, package in enumerate(packages):
        sources = stdlib_sources((package,))
        for split, names in split_documents(sources, seed).items():
            stride = seq_len // 4 if split == "train" else seq_len
            snippets = [chunk for name in names for chunk in _chunks(sources[name].encode("utf-8"), seq_len, stride)]
            if not snippets:
                raise UsageError(f"package {package!r} has no {seq_len}-byte snippets for {split}; "
                                 f"lower data.seq_len or choose other packages")
            kept = [snippets[i] for i in rng.permutation(len(snippets))[:caps[split]]]
            examples[split][0].extend(kept)
            examples[split][1].extend([label] * len(kept))
    datasets = {}
    for split, (texts, labels) in examples.items():
        order = rng.permutation(len(texts))  # interleave the classes for readers that do not shuffle
        datasets[split] = tf.data.Dataset.from_tensor_slices(
            (np.array(texts, dtype=object)[order], np.array(labels, np.int32)[order]))
    return Task(
        spec=DataSpec(CLASSIFICATION, "text", (seq_len,), "int32", len(packages), tuple(packages)),
        **datasets,
        num_examples={split: len(texts) for split, (texts, _) in examples.items()},
        serving_input=tf.TensorSpec([None], tf.string, name="text"),
        preprocess=functools.partial(bytes_to_ids, seq_len=seq_len),
    )


def _chunks(data: bytes, size: int, stride: int) -> list[bytes]:
    return [data[start:start + size] for start in range(0, len(data) - size + 1, stride)]
