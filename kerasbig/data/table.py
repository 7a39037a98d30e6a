"""`csv:FILE` with `data.label=COLUMN`: a table with a header row, one example per row, classified by its label.

Columns are numeric when every value present parses as a number, categorical otherwise (`data.numeric` and
`data.categorical` list columns to force either). An empty cell, `NA`, `NaN`, `null` or `?` is a missing value.
Statistics are learnt on the training split only and kept inside the SavedModel as constants: numeric columns
are standardised (a missing value becomes the mean, plus a 0/1 "was missing" feature for columns with gaps in
training); categorical ones are one-hot over their `MAX_CATEGORIES` most frequent training values (others and
missing ones are all zeros). The model input is the concatenated float vector, named `features`.

Raw inputs are a dict of columns: float32 for numeric ones (NaN when missing), strings for categorical ones.
The serving signature takes one named input per column. Signature names allow only `[A-Za-z0-9_.-/]`, so
other characters in a column's name become `_` (`mean radius` -> `mean_radius`).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import math
import re

import numpy as np
import tensorflow as tf

from kerasbig.data.digits import split_indices
from kerasbig.data.spec import CLASSIFICATION, DataSpec, Plan, Task
from kerasbig.errors import UsageError

MISSING = frozenset({"", "na", "nan", "null", "none", "?"})
MAX_CATEGORIES = 1000


@dataclasses.dataclass(frozen=True)
class Table:
    """The columns of a CSV file, by (sanitised) name, as strings, and the label of every row."""

    columns: dict[str, np.ndarray]
    labels: np.ndarray  # int32 class index per row
    class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Statistics:
    """What preprocessing learnt on the training split."""

    numeric: dict[str, tuple[float, float, bool]]  # column -> (mean, standard deviation, had missing values)
    categorical: dict[str, tuple[str, ...]]  # column -> its values, most frequent first

    @property
    def width(self) -> int:
        return (sum(1 + missing for _, _, missing in self.numeric.values())
                + sum(len(values) for values in self.categorical.values()))


def _signature_name(column: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", column.strip())
    return name if re.match(r"[A-Za-z0-9.]", name) else f"column{name}"


def _read(path: str, label: str, flag: str) -> Table:
    if not label:
        raise UsageError(f"{flag} needs the label column: add --config.data.label=COLUMN")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise UsageError(f"{flag}: {path} does not exist; point data.name at a CSV file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{flag}: {path} cannot be read as UTF-8 CSV ({error}); save it as UTF-8 CSV") from None
    if len(rows) < 2 or not any(rows[1:]):
        raise UsageError(f"{flag}: {path} needs a header row and at least one data row")
    header = rows[0]
    lines, rows = zip(*[(line, row) for line, row in enumerate(rows[1:], 2) if row])
    if label not in header:
        raise UsageError(f"{flag}: {path} has no column {label!r} for data.label; its columns are {header}")
    for line, row in zip(lines, rows):
        if len(row) != len(header):
            raise UsageError(f"{flag}: {path} line {line} has {len(row)} fields but the header has {len(header)}; "
                             "fix the row (quote fields that contain commas)")
    cells = np.array(rows, dtype=object).reshape(len(rows), len(header))
    label_values = cells[:, header.index(label)]
    for line, value in zip(lines, label_values):
        if value.strip().lower() in MISSING:
            raise UsageError(f"{flag}: {path} line {line} has no value in the label column {label!r}; fill it or "
                             "drop the row")
    class_names = tuple(sorted(set(label_values), key=_number_first))
    if len(class_names) < 2:
        raise UsageError(f"{flag}: the label column {label!r} of {path} has a single value ({class_names[0]!r}); "
                         "a classifier needs at least two classes")
    index = {name: i for i, name in enumerate(class_names)}
    columns = {}
    for i, column in enumerate(header):
        if column == label:
            continue
        name = _signature_name(column)
        if name in columns:
            raise UsageError(f"{flag}: {path} has two columns named {name!r} once made valid signature names; "
                             "rename one")
        columns[name] = cells[:, i]
    return Table(columns, np.array([index[v] for v in label_values], np.int32), class_names)


def _number_first(value: str) -> tuple:
    """Sort key: numbers numerically ("2" before "10"), then other strings."""
    number = _float(value)
    return (0, number, "") if number is not None else (1, 0.0, value)


def _float(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _listed(value: str, table: Table, key: str, flag: str) -> set[str]:
    names = {_signature_name(name) for name in value.split(",") if name.strip()}
    unknown = names - set(table.columns)
    if unknown:
        raise UsageError(f"config.data.{key}: {flag} has no columns {sorted(unknown)}; its columns are "
                         f"{sorted(table.columns)}")
    return names


def _column_kinds(table: Table, data_config, flag: str) -> dict[str, str]:
    """Column -> "numeric" or "categorical": listed in config, else inferred from the values."""
    numeric = _listed(data_config.numeric, table, "numeric", flag)
    categorical = _listed(data_config.categorical, table, "categorical", flag)
    if numeric & categorical:
        raise UsageError(f"columns {sorted(numeric & categorical)} are listed in both config.data.numeric and "
                         "config.data.categorical; list each in one")
    kinds = {}
    for name, values in table.columns.items():
        present = [v for v in values if v.strip().lower() not in MISSING]
        inferred = "numeric" if all(_float(v) is not None for v in present) else "categorical"
        kinds[name] = "numeric" if name in numeric else "categorical" if name in categorical else inferred
        if kinds[name] == "numeric" and name in numeric:
            bad = next((v for v in present if _float(v) is None), None)
            if bad is not None:
                raise UsageError(f"config.data.numeric: column {name!r} of {flag} has the value {bad!r}, which is "
                                 "not a number; list it in config.data.categorical instead")
    return kinds


def _raw_columns(table: Table, kinds: dict[str, str]) -> dict[str, np.ndarray]:
    """The columns as raw inputs: float32 with NaN for missing numbers, stripped strings ('' when missing)."""
    raw = {}
    for name, values in table.columns.items():
        missing = np.array([v.strip().lower() in MISSING for v in values])
        if kinds[name] == "numeric":
            raw[name] = np.array([np.nan if m else float(v) for v, m in zip(values, missing)], np.float32)
        else:
            raw[name] = np.array(["" if m else v.strip() for v, m in zip(values, missing)], dtype=object)
    return raw


def _statistics(raw: dict[str, np.ndarray], kinds: dict[str, str], train: np.ndarray, flag: str) -> Statistics:
    numeric, categorical = {}, {}
    for name, values in raw.items():
        values = values[train]
        if kinds[name] == "numeric":
            present = values[~np.isnan(values)]
            if not len(present):
                raise UsageError(f"{flag}: column {name!r} has no values in the training split; fill it or drop it")
            std = float(present.std())
            numeric[name] = (float(present.mean()), std if std > 0 else 1.0, len(present) < len(values))
        else:
            found, counts = np.unique(values[values != ""].astype(str), return_counts=True)
            order = sorted(range(len(found)), key=lambda i: (-counts[i], found[i]))[:MAX_CATEGORIES]
            categorical[name] = tuple(str(found[i]) for i in order)
    return Statistics(numeric, categorical)


def features(columns: dict[str, tf.Tensor], statistics: Statistics) -> tf.Tensor:
    """A batch of raw columns ({name: [batch]}) -> float32 features [batch, statistics.width]."""
    parts = []
    for name, (mean, std, with_missing) in statistics.numeric.items():
        values = tf.cast(columns[name], tf.float32)
        missing = tf.math.is_nan(values)
        parts.append(tf.where(missing, 0.0, (values - mean) / std)[:, None])
        if with_missing:
            parts.append(tf.cast(missing, tf.float32)[:, None])
    for name, vocabulary in statistics.categorical.items():
        parts.append(tf.cast(tf.equal(columns[name][:, None], tf.constant(vocabulary)[None, :]), tf.float32))
    return tf.concat(parts, -1)


def _prepare(path: str, data_config):
    flag = f"data.name=csv:{path}"
    table = _read(path, data_config.label, flag)
    kinds = _column_kinds(table, data_config, flag)
    raw = _raw_columns(table, kinds)
    try:
        splits = split_indices(table.labels, test_fraction=data_config.test_fraction,
                               validation_fraction=data_config.validation_fraction, seed=data_config.split_seed)
    except ValueError as error:  # a class too rare for a stratified split
        raise UsageError(f"{flag}: cannot split its {len(table.labels)} rows into train, validation and test "
                         f"stratified by {data_config.label!r} ({error}); add rows of the rare classes") from None
    statistics = _statistics(raw, kinds, splits["train"], flag)
    spec = DataSpec(CLASSIFICATION, "features", (statistics.width,), "float32", len(table.class_names),
                    table.class_names)
    return table, kinds, raw, splits, statistics, spec


def plan(path: str, data_config) -> Plan:
    """Reads the file: the input width depends on each categorical column's values."""
    _, _, _, splits, _, spec = _prepare(path, data_config)
    return Plan(spec, {split: len(index) for split, index in splits.items()})


def load(path: str, data_config) -> Task:
    """The CSV file at `path` as a Task (see the module docstring)."""
    table, kinds, raw, splits, statistics, spec = _prepare(path, data_config)
    dtypes = {name: tf.float32 if kind == "numeric" else tf.string for name, kind in kinds.items()}
    return Task(
        spec=spec,
        **{split: tf.data.Dataset.from_tensor_slices(
            ({name: tf.constant(values[index], dtypes[name]) for name, values in raw.items()}, table.labels[index]))
           for split, index in splits.items()},
        num_examples={split: len(index) for split, index in splits.items()},
        serving_input={name: tf.TensorSpec([None], dtype, name=name) for name, dtype in dtypes.items()},
        preprocess=functools.partial(features, statistics=statistics),
    )
