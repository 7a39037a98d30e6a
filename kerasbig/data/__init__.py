"""Datasets by name: `load_task(config.data)` returns a `Task` (see `kerasbig.data.spec`).

- `digits`: scikit-learn's embedded 8x8 handwritten digits (classification);
- `text_lm`: byte-level language modelling on text shipped with CPython (`data.source`);
- `text_classification`: standard-library source snippets labelled by their package;
- `tfds:<name>`: a TensorFlow Datasets dataset already prepared under `data.data_dir` / TFDS_DATA_DIR.
"""
from __future__ import annotations

from kerasbig.data import text
from kerasbig.data.digits import load_digits
from kerasbig.data.spec import Task
from kerasbig.errors import UsageError

NAMES = ("digits", "text_lm", "text_classification", "tfds:<name>")


def load_task(data_config) -> Task:
    """Loads the dataset `data_config.name` names, split three ways (fixed by `data_config.split_seed`)."""
    name, seed = data_config.name, data_config.split_seed
    if name == "digits":
        return load_digits(test_fraction=data_config.test_fraction,
                           validation_fraction=data_config.validation_fraction,
                           augment=data_config.augment, seed=seed)
    if name == "text_lm":
        return text.load_text_lm(seq_len=data_config.seq_len, source=data_config.source, seed=seed,
                                 max_tokens=data_config.max_tokens)
    if name == "text_classification":
        return text.load_text_classification(seq_len=data_config.seq_len, seed=seed)
    if name.startswith("tfds:"):
        from kerasbig.data.tfds import load_tfds  # imports tensorflow_datasets, slow: only when asked for
        return load_tfds(name[len("tfds:"):], data_dir=data_config.data_dir or None, seed=seed,
                         seq_len=data_config.seq_len)
    raise UsageError(f"config.data.name={name!r} is not a dataset; choose one of {list(NAMES)}")
