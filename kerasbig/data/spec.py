"""What a dataset hands to the rest of kerasbig: its shape (`DataSpec`) and its splits (`Task`)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

    from kerasbig.data.windows import TokenWindows

CLASSIFICATION = "classification"
LANGUAGE_MODEL = "language_model"


def tensorflow_splits() -> bool:
    """Whether the loaders build a task's tf.data splits: on the TensorFlow backend (a JAX run reads the language
    models' `Task.windows`, and imports TensorFlow only for datasets that need it)."""
    import keras

    return keras.backend.backend() == "tensorflow"


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The shape of one task, all a model builder needs to know about its data.

    kind: CLASSIFICATION (one label per example) or LANGUAGE_MODEL (one next-token label per position).
    input_name: the serving signature's input name, e.g. "image", "tokens", "text".
    input_shape: one model input example after `Task.preprocess`, e.g. (8, 8, 1) or (seq_len,).
    input_dtype: the model input dtype, "float32" or "int32".
    num_classes: classes for classifiers, vocabulary size for language models.
    class_names: optional human-readable class names (len == num_classes).
    """

    kind: str
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    num_classes: int
    class_names: tuple[str, ...] | None = None

    @property
    def seq_len(self) -> int:
        return self.input_shape[0]


class Tokenizer(Protocol):
    """Text <-> token ids for a language model whose tokens are not plain UTF-8 bytes (`kerasbig.data.text`)."""

    model: bytes | None  # a SentencePiece model, or None
    files: dict[str, bytes]  # the tokenizer's files by name, kept in the workdir and assets.extra/

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `--mode=dry_run` needs of a dataset, found without reading its examples: the spec and the split sizes
    (empty where they are not known without the data, e.g. a TFDS dataset not prepared here)."""

    spec: DataSpec
    num_examples: dict[str, int]


@dataclasses.dataclass(frozen=True)
class EncodedInput:
    """The form clients send when it is not the raw input itself (images: the encoded file bytes).

    The SavedModel's `serving_default` takes `spec` and `decode`s a batch of it into raw inputs, and the raw input
    keeps a signature of its own, named after `Task.serving_input`. `examples(split)` gives a split's
    `(encoded input, label)` pairs in its stored order (for warmup requests, checks and tests).
    """

    spec: tf.TensorSpec
    decode: Callable[[tf.Tensor], tf.Tensor]
    examples: Callable[[str], tf.data.Dataset]


@dataclasses.dataclass
class Task:
    """A dataset split three ways, as unbatched stored examples that `load` turns into raw `(input, label)`.

    Raw inputs are what a serving client sends (digits: 0-16 pixels, shape (8, 8)); an input may be a dict of
    named features. `preprocess` maps a *batch* of raw inputs to model inputs; the training pipeline and the
    SavedModel signature both apply it, so clients never repeat it. `augment(raw_batch, seed)` (training only)
    changes a batch of raw inputs with a stateless seed of shape [2], so that augmentation replays exactly after
    a resume.
    `load(stored) -> (input, label)` runs after shuffling and skipping, so that shuffle buffers hold light
    stored examples (a file path and its label, an offset into token shards) and skipped ones are never
    decoded; None when the splits hold the raw examples themselves. Read splits through `examples(split)`.
    `token_bytes[id]` (language models) is how many bytes of text token `id` stands for, so that evaluation
    reports bits per byte honestly whatever the tokenizer. `encoded` (optional) is the form clients send when
    that is not the raw input (see `EncodedInput`). `tokenizer` (language models) turns text into token ids and
    back; None means UTF-8 bytes. `windows` (language models) reads the token windows as numpy: a JAX run's
    input, for which the loaders leave the TensorFlow parts (the splits, `serving_input`, `load`) None.
    """

    spec: DataSpec
    train: tf.data.Dataset | None
    validation: tf.data.Dataset | None
    test: tf.data.Dataset | None
    num_examples: dict[str, int]
    # A batch of raw inputs, e.g. TensorSpec([None, 8, 8], tf.float32, "image"), or a dict of them by name.
    serving_input: tf.TensorSpec | dict[str, tf.TensorSpec] | None
    preprocess: Callable[[tf.Tensor], tf.Tensor] = lambda x: x
    augment: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None
    load: Callable[..., tuple] | None = None
    token_bytes: np.ndarray | None = None  # language models: UTF-8 bytes each token id stands for (bits per byte)
    encoded: EncodedInput | None = None
    tokenizer: Tokenizer | None = None
    windows: TokenWindows | None = None

    def examples(self, split: str) -> tf.data.Dataset:
        """The raw `(input, label)` examples of `split`, in its stored order."""
        import tensorflow as tf  # only the TensorFlow path reads tf.data splits

        stored = getattr(self, split)
        return stored if self.load is None else stored.map(self.load, num_parallel_calls=tf.data.AUTOTUNE)
