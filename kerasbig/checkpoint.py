"""Atomic, chief-aware training checkpoints: model, optimizer and a JSON state, the last K kept.

Layout: `<workdir>/checkpoints/step-00001234/{ckpt.index, ckpt.data-*, state.json, arrays.npz}`. Each is
written to a temporary folder and renamed, so a reader (or a resume after SIGKILL) never sees half of one.
Variables are saved by position, which is stable for the same config in any process.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl import logging

PREFIX = "step-"


def saved_steps(directory: pathlib.Path) -> list[int]:
    """The steps of the complete checkpoints under `directory`, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name[len(PREFIX):]) for p in directory.glob(PREFIX + "*") if p.name[len(PREFIX):].isdigit())


class Checkpoints:
    """Saves and restores `model.variables` + `optimizer.variables` with a state dict and named arrays."""

    def __init__(self, directory: pathlib.Path, *, model, optimizer, keep: int, is_chief: bool = True):
        self.directory = pathlib.Path(directory)
        self.keep = keep
        self.is_chief = is_chief
        self._checkpoint = tf.train.Checkpoint(
            model=[v.value for v in model.variables], optimizer=[v.value for v in optimizer.variables])

    def steps(self) -> list[int]:
        return saved_steps(self.directory)

    def save(self, step: int, state: dict, arrays: dict[str, list[np.ndarray]] | None = None) -> None:
        """Writes checkpoint `step`. Every worker must call this (saving may need collectives); only the
        chief's copy is kept, the others write to a temporary folder that is removed."""
        target = self.directory / f"{PREFIX}{step:08d}"
        parent = self.directory if self.is_chief else pathlib.Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
        try:
            self._checkpoint.write(str(tmp / "ckpt"))
            for name, values in (arrays or {}).items():
                np.savez(tmp / f"{name}.npz", *values)
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            if not self.is_chief:
                return
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in self.steps()[:-self.keep]:
            shutil.rmtree(self.directory / f"{PREFIX}{old:08d}", ignore_errors=True)

    def restore_latest(self) -> tuple[dict, dict[str, list[np.ndarray]]] | None:
        """Restores the newest readable checkpoint; a corrupt one is skipped with a warning."""
        for step in reversed(self.steps()):
            path = self.directory / f"{PREFIX}{step:08d}"
            try:
                state = json.loads((path / "state.json").read_text())
                arrays = {}
                for npz in path.glob("*.npz"):
                    with np.load(npz) as data:
                        arrays[npz.stem] = [data[f"arr_{i}"] for i in range(len(data.files))]
                self._checkpoint.read(str(path / "ckpt")).assert_existing_objects_matched().expect_partial()
                return state, arrays
            except (OSError, ValueError, KeyError, AssertionError, tf.errors.OpError) as err:
                logging.warning("checkpoint %s is unreadable (%s); falling back to the previous one",
                                path, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None


def load_model_weights(directory: pathlib.Path, model) -> int:
    """Loads only the model's variables from the newest checkpoint under `directory` (for inference, with no
    optimizer); returns its step."""
    steps = saved_steps(pathlib.Path(directory))
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    tf.train.Checkpoint(model=[v.value for v in model.variables]).read(
        str(pathlib.Path(directory) / f"{PREFIX}{steps[-1]:08d}" / "ckpt")).expect_partial().assert_existing_objects_matched()
    return steps[-1]
