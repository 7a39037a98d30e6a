"""Atomic, chief-aware training checkpoints: model, optimizer and a JSON state, the last K kept.

Layout: `<workdir>/checkpoints/step-00001234/{weights, state.json, arrays.npz}`. Each is written to a temporary
folder and renamed, so a reader (or a resume after SIGKILL) never sees half of one. A save in the background
copies the variables to host memory at once and writes the files on a thread while training goes on. The weights
are in one of two formats, read whichever backend wrote them: a TensorFlow run writes a `tf.train.Checkpoint`
(`ckpt.index`, `ckpt.data-*`: saved by every worker, through a TPU's host), a JAX run `weights.npz` (numpy alone:
no TensorFlow needed to train, and `--mode=export` under TensorFlow reads it into the same model). Weights are
saved under their Keras paths (`model/weights/<path>`, `optimizer/<path>`), so a checkpoint of another
architecture is told apart from the right one instead of being read into the wrong variables; the states of the
model's random-number generators (dropout's) are saved in order (`model/rng/<i>`), since their generated names
depend on what else a process built first. Under multi-worker training every worker saves (saving may need
collectives) and only the chief's copy is kept; all workers restore from the chief's folder, so it must be on a
filesystem they share.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
import threading

import keras
import numpy as np
from absl import logging

from kerasbig.errors import first_line

PREFIX = "step-"
ARRAYS = "weights.npz"  # the TF-free format


def folder(directory: pathlib.Path, step: int) -> pathlib.Path:
    """Where checkpoint `step` lives: `directory/step-00001234`."""
    return pathlib.Path(directory) / f"{PREFIX}{step:08d}"


def saved_steps(directory: pathlib.Path) -> list[int]:
    """The steps of the complete checkpoints under `directory` (state.json is written last), oldest first."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    names = (p.name[len(PREFIX):] for p in directory.glob(PREFIX + "*") if (p / "state.json").is_file())
    return sorted(int(name) for name in names if name.isdigit())


def latest_state(directory: pathlib.Path) -> dict | None:
    """The state of the newest checkpoint under `directory` whose state.json reads, without touching variables."""
    for step in reversed(saved_steps(directory)):
        try:
            return json.loads((folder(directory, step) / "state.json").read_text())
        except (OSError, ValueError):
            continue
    return None


def by_path(variables) -> dict:
    """{Keras path: variable}, what a checkpoint stores; raises if two variables share a path."""
    paths = {v.path: v for v in variables}
    if len(paths) != len(variables):
        raise ValueError("variables with the same path cannot be checkpointed by path")
    return paths


def model_state(model) -> dict:
    """What a checkpoint keeps of a model: its weights by path and its random-number generators' states."""
    weights = {id(v) for v in model.weights}
    return {"weights": by_path(model.weights), "rng": [v for v in model.variables if id(v) not in weights]}


def flat_state(model, optimizer=None) -> dict:
    """{key: variable}: `model/weights/<path>`, `model/rng/<i>` and `optimizer/<path>`, the keys of both formats."""
    state = model_state(model)
    flat = {f"model/weights/{path}": v for path, v in state["weights"].items()}
    flat.update({f"model/rng/{i}": v for i, v in enumerate(state["rng"])})
    if optimizer is not None:
        flat.update({f"optimizer/{path}": v for path, v in by_path(optimizer.variables).items()})
    return flat


class TensorFlowFormat:
    """The variables as a `tf.train.Checkpoint` under `<folder>/ckpt`."""

    def __init__(self, model, optimizer=None, io_device: str | None = None):
        import tensorflow as tf  # only a TensorFlow run writes (or a TensorFlow checkpoint is read with) this format
        values = lambda variables: {key: v.value for key, v in variables.items()}
        state = model_state(model)
        objects = {"model": {"weights": values(state["weights"]), "rng": [v.value for v in state["rng"]]}}
        if optimizer is not None:
            objects["optimizer"] = values(by_path(optimizer.variables))
        self._options = tf.train.CheckpointOptions(experimental_io_device=io_device)
        # TensorFlow's asynchronous writer copies the variables to host memory before write() returns.
        self._async_options = tf.train.CheckpointOptions(experimental_io_device=io_device, enable_async=True)
        self._checkpoint = tf.train.Checkpoint(**objects)

    def snapshot(self, folder: pathlib.Path, *, background: bool):
        """Starts writing the variables as they are now; the returned function finishes the write."""
        self._checkpoint.write(str(folder / "ckpt"), options=self._async_options if background else self._options)
        return self._checkpoint.sync

    def read(self, folder: pathlib.Path) -> None:
        status = self._checkpoint.read(str(folder / "ckpt"), options=self._options)
        status.assert_existing_objects_matched().expect_partial()


class ArrayFormat:
    """The variables as numpy arrays in `<folder>/weights.npz`, keyed by `flat_state`; needs no TensorFlow."""

    def __init__(self, model, optimizer=None):
        self._variables = flat_state(model, optimizer)

    def snapshot(self, folder: pathlib.Path, *, background: bool):
        """Copies the variables to host memory now (a JAX step donates their buffers); the returned function
        writes them."""
        values = {key: np.array(keras.ops.convert_to_numpy(v.value)) for key, v in self._variables.items()}

        def write():
            with open(folder / ARRAYS, "wb") as file:  # a file object: np.savez would append .npz to a name
                np.savez(file, **values)
        return write

    def read(self, folder: pathlib.Path) -> None:
        with np.load(folder / ARRAYS) as stored:
            missing = [key for key in self._variables if key not in stored.files]
            if missing:
                raise ValueError(f"{len(missing)} variables are not in the checkpoint, e.g. {missing[0]}")
            for key, variable in self._variables.items():
                value = stored[key]
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(f"{key} has shape {value.shape} in the checkpoint, {variable.shape} here")
                variable.assign(value)


def format_of(folder: pathlib.Path) -> type:
    """The format of the checkpoint in `folder`, or for a new one the current backend's."""
    if (folder / ARRAYS).is_file():
        return ArrayFormat
    if (folder / "ckpt.index").is_file() or keras.backend.backend() == "tensorflow":
        return TensorFlowFormat
    return ArrayFormat


class Checkpoints:
    """Saves and restores `model.variables` + `optimizer.variables` with a state dict and named arrays."""

    def __init__(self, directory: pathlib.Path, *, model, optimizer, keep: int, is_chief: bool = True,
                 io_device: str | None = None):
        """`io_device`: the device whose host reads and writes the files (a remote TPU worker would
        otherwise write them on its own disk); None for the variables' own host."""
        self.directory = pathlib.Path(directory)
        self.keep = keep
        self.is_chief = is_chief
        self._writer: threading.Thread | None = None
        self._write_error: BaseException | None = None
        # Made now, before a learning-rate schedule replaces the optimizer's rate variable: a checkpoint then
        # holds the same variables whenever it is written or read.
        self._formats = {ArrayFormat: ArrayFormat(model, optimizer)}
        if keras.backend.backend() == "tensorflow":
            self._formats[TensorFlowFormat] = TensorFlowFormat(model, optimizer, io_device)

    def _format(self, folder: pathlib.Path):
        """The format to read `folder` with (the current backend's for a new folder)."""
        kind = format_of(folder)
        if kind not in self._formats:
            raise ValueError("written by TensorFlow; resume it with --backend=tensorflow")
        return self._formats[kind]

    def steps(self) -> list[int]:
        return saved_steps(self.directory)

    def save(self, step: int, state: dict, arrays: dict[str, list[np.ndarray]] | None = None, *,
             background: bool = False) -> None:
        """Writes checkpoint `step`; with `background`, only the copy to host memory happens before this returns
        and the files are written on a thread (`wait` finishes them; the next save and a restore wait too).
        Every worker must call this (saving may need collectives); only the chief's copy is kept, the others
        write to a temporary folder that is removed."""
        self.wait()
        parent = self.directory if self.is_chief else pathlib.Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
        try:
            finish_weights = self._format(tmp).snapshot(tmp, background=background)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        arrays = {name: [np.array(v) for v in values] for name, values in (arrays or {}).items()}
        finish = lambda: self._finish(step, tmp, finish_weights, state, arrays)
        if not background:
            return finish()
        self._writer = threading.Thread(target=self._record_error(finish), name=f"checkpoint-{step}", daemon=True)
        self._writer.start()

    def wait(self) -> None:
        """Waits for a background save to be on disk; raises what it failed with."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        error, self._write_error = self._write_error, None
        if error is not None:
            raise error

    def _record_error(self, write):
        def run():
            try:
                write()
            except BaseException as err:  # noqa: BLE001 - raised again by wait(), on the training thread
                self._write_error = err
        return run

    def _finish(self, step: int, tmp: pathlib.Path, finish_weights, state: dict,
                arrays: dict[str, list[np.ndarray]]) -> None:
        """Completes the files of checkpoint `step` in `tmp`, renames it into place (state.json last) and drops
        the oldest beyond `keep`."""
        target = folder(self.directory, step)
        try:
            finish_weights()
            for name, values in arrays.items():
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
            shutil.rmtree(folder(self.directory, old), ignore_errors=True)

    def restore_latest(self) -> tuple[dict, dict[str, list[np.ndarray]]] | None:
        """Restores the newest readable checkpoint; a corrupt one is skipped with a warning."""
        self.wait()
        for step in reversed(self.steps()):
            path = folder(self.directory, step)
            try:
                state = json.loads((path / "state.json").read_text())
                if not (isinstance(state, dict) and state.get("step") == step and "complete" in state):
                    raise ValueError("state.json does not describe this checkpoint")
                arrays = {}
                for npz in (p for p in path.glob("*.npz") if p.name != ARRAYS):  # the callbacks' arrays
                    with np.load(npz) as data:
                        arrays[npz.stem] = [data[f"arr_{i}"] for i in range(len(data.files))]
                self._format(path).read(path)
                return state, arrays
            # Whatever a damaged checkpoint raises (OpError, IndexError for truncated data, ValueError, ...):
            # the previous checkpoint then overwrites every variable this one may have partly restored.
            except Exception as err:  # noqa: BLE001
                logging.warning("checkpoint %s is unreadable (%s); falling back to the previous one",
                                path, first_line(err))
        return None


def load_model_weights(directory: pathlib.Path, model) -> int:
    """Loads only the model's variables from the newest checkpoint under `directory` (for inference, with no
    optimizer); returns its step."""
    steps = saved_steps(pathlib.Path(directory))
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    path = folder(directory, steps[-1])
    format_of(path)(model).read(path)
    return steps[-1]
