"""`text:PATH`: a folder of text files, one subfolder per class (layouts in `kerasbig.data.folders`), the
convention of `keras.utils.text_dataset_from_directory`.

Each file is one example: its first `data.seq_len` UTF-8 bytes become byte ids, inside the SavedModel too, so
clients send the raw string (as for `text_classification`). Files must be UTF-8: one that is not stops the run
with its name, unless `data.decode_errors=replace` turns its bad bytes into U+FFFD. Splits hold file paths;
files are read after shuffling.
"""
from __future__ import annotations

import functools

import tensorflow as tf

from kerasbig.data.folders import Files, list_files
from kerasbig.data.spec import CLASSIFICATION, DataSpec, Plan, Task
from kerasbig.data.text import bytes_to_ids
from kerasbig.errors import UsageError

def _files(path: str, data_config) -> Files:
    return list_files(path, flag=f"data.name=text:{path}", seed=data_config.split_seed,
                      test_fraction=data_config.test_fraction, validation_fraction=data_config.validation_fraction)


def _spec(files: Files, seq_len: int) -> DataSpec:
    return DataSpec(CLASSIFICATION, "text", (seq_len,), "int32", len(files.class_names), files.class_names)


def _check_utf8(files: Files, flag: str) -> None:
    for paths, _ in files.splits.values():
        for path in paths:
            try:
                with open(path, encoding="utf-8") as f:
                    while f.read(1 << 20):
                        pass
            except UnicodeDecodeError as error:
                raise UsageError(f"{flag}: {path} is not UTF-8 text (byte {error.start}); convert it to UTF-8, "
                                 "or set --config.data.decode_errors=replace to read bad bytes as U+FFFD") from None
            except OSError as error:
                raise UsageError(f"{flag}: {path} cannot be read ({error.strerror})") from None


def _read(path: tf.Tensor, label: tf.Tensor, *, replace: bool) -> tuple[tf.Tensor, tf.Tensor]:
    contents = tf.io.read_file(path)
    if replace:
        contents = tf.strings.unicode_transcode(contents, "UTF-8", "UTF-8", errors="replace")
    return contents, label


def plan(path: str, data_config) -> Plan:
    files = _files(path, data_config)
    return Plan(_spec(files, data_config.seq_len), files.num_examples)


def load(path: str, data_config) -> Task:
    """The text folder at `path` as a Task (see the module docstring)."""
    files = _files(path, data_config)
    replace = data_config.decode_errors == "replace"
    if not replace:
        _check_utf8(files, f"data.name=text:{path}")
    return Task(
        spec=_spec(files, data_config.seq_len),
        **{split: tf.data.Dataset.from_tensor_slices((paths.astype(str), labels))
           for split, (paths, labels) in files.splits.items()},
        num_examples=files.num_examples,
        serving_input=tf.TensorSpec([None], tf.string, name="text"),
        preprocess=functools.partial(bytes_to_ids, seq_len=data_config.seq_len),
        load=functools.partial(_read, replace=replace),
    )
