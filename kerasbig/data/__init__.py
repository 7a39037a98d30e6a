"""Datasets by name: `load_task(config.data)` returns a `Task` (see `kerasbig.data.spec`), and `load_plan` the
`Plan` that `--mode=dry_run` needs, without reading the examples.

Embedded data, by name:
- `digits`: scikit-learn's embedded 8x8 handwritten digits (classification);
- `text_lm`: byte-level language modelling on text shipped with CPython (`data.source`);
- `text_classification`: standard-library source snippets labelled by their package.

Kinds that take an argument after their prefix, each in its own module with `load(argument, data_config)` and
`plan(argument, data_config)` (see docs/data.md):
- `tfds:NAME`: a TensorFlow Datasets dataset already prepared under `data.data_dir` / TFDS_DATA_DIR;
- `images:DIR`, `text:DIR`: folders with one subfolder per class;
- `csv:FILE`: a table with a `data.label` column;
- `corpus:GLOB`: plain-text files for language models, with a tokenizer trained on them.
"""
from __future__ import annotations

import importlib

import kerasbig
from kerasbig.data import text
from kerasbig.data.spec import Plan, Task
from kerasbig.errors import UsageError

EMBEDDED = {
    "digits": lambda c: importlib.import_module("kerasbig.data.digits").load_digits(test_fraction=c.test_fraction, validation_fraction=c.validation_fraction,
                                    augment=c.augment, seed=c.split_seed),
    "text_lm": lambda c: text.load_text_lm(seq_len=c.seq_len, source=c.source, seed=c.split_seed,
                                           max_tokens=c.max_tokens),
    "text_classification": lambda c: text.load_text_classification(seq_len=c.seq_len, seed=c.split_seed),
}
# Imported when asked for: tensorflow_datasets and sentencepiece are slow to import.
KINDS = {"tfds": "tfds", "images": "images", "text": "text_folders", "csv": "table", "corpus": "corpus"}
NAMES = (*EMBEDDED, *(f"{kind}:..." for kind in KINDS))
WITHOUT_TENSORFLOW = ("text_lm", "corpus")  # language models, read as numpy token windows (Task.windows)


def _kind(name: str):
    """The module of the kind that `name` ("images:photos/") starts with, and the argument after its prefix."""
    kind, _, argument = name.partition(":")
    if kind not in KINDS or not argument:
        raise UsageError(f"config.data.name={name!r} is not a dataset; choose one of {list(NAMES)}")
    return importlib.import_module(f"kerasbig.data.{KINDS[kind]}"), argument


def load_task(data_config) -> Task:
    """Loads the dataset `data_config.name` names, split three ways (fixed by `data_config.split_seed`)."""
    _check_tensorflow(data_config.name)
    if data_config.name in EMBEDDED:
        return EMBEDDED[data_config.name](data_config)
    module, argument = _kind(data_config.name)
    return module.load(argument, data_config)


def load_plan(data_config) -> Plan:
    """The spec and split sizes of `data_config.name`, reading only what they need (embedded data is in memory,
    so it simply loads)."""
    _check_tensorflow(data_config.name)
    if data_config.name in EMBEDDED:
        task = EMBEDDED[data_config.name](data_config)
        return Plan(task.spec, task.num_examples)
    module, argument = _kind(data_config.name)
    return module.plan(argument, data_config)


def _check_tensorflow(name: str) -> None:
    """Every dataset but the language models' is read through tf.data: one line where TensorFlow is missing."""
    if name.partition(":")[0] not in WITHOUT_TENSORFLOW:
        kerasbig.require_tensorflow(f"config.data.name={name!r}")
