"""Datasets by name: `load_task(config.data)` returns a `Task` (see `kerasbig.data.spec`)."""
from __future__ import annotations

from kerasbig.data.digits import load_digits
from kerasbig.data.spec import Task
from kerasbig.errors import UsageError

NAMES = ("digits",)


def load_task(data_config) -> Task:
    """Loads the dataset `data_config.name` names, split three ways."""
    name = data_config.name
    if name == "digits":
        return load_digits(test_fraction=data_config.test_fraction,
                           validation_fraction=data_config.validation_fraction,
                           augment=data_config.augment, seed=data_config.split_seed)
    raise UsageError(f"config.data.name={name!r} is not a dataset; choose one of {list(NAMES)} or 'tfds:<name>'")
