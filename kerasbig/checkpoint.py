"""Atomic, chief-aware training checkpoints: model, optimizer and a JSON state, the last K kept.

Layout: `<workdir>/checkpoints/step-00001234/{weights.safetensors, state.json, <callback>.npz}`. Each is written
to a temporary folder and renamed, so a reader (or a resume after SIGKILL) never sees half of one. A save in the
background copies the variables to host memory at once and writes the files on a thread while training goes on.
Both backends write the same safetensors file (numpy alone: a JAX run needs no TensorFlow, and `--mode=export`
under TensorFlow reads either run's into the same model); checkpoints of earlier kerasbig versions
(`weights.npz`, or a `tf.train.Checkpoint` in `ckpt.*`) still resume. Weights are saved under their Keras paths
(`model/weights/<path>`, `optimizer/<path>`), so a checkpoint of another architecture is told apart from the
right one instead of being read into the wrong variables; the states of the model's random-number generators
(dropout's) are saved in order (`model/rng/<i>`), since their generated names depend on what else a process built
first. Under multi-worker training only the chief writes (every worker holds the same values); all workers
restore from the chief's folder, so it must be on a filesystem they share.
"""
from __future__ import annotations

import json
import pathlib
import re
import shutil
import tempfile
import threading

import keras
import numpy as np
from absl import logging

from kerasbig.errors import first_line

PREFIX = "step-"
WEIGHTS = "weights.safetensors"
LEGACY_ARRAYS = "weights.npz"  # JAX runs' weights before safetensors: read, never written


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


def flat_state(model, optimizer=None, *, rng: bool = True) -> dict:
    """{key: variable}, a checkpoint's keys: `model/weights/<path>`, `model/rng/<i>` (without `rng`, none) and
    `optimizer/<path>`."""
    state = model_state(model)
    flat = {f"model/weights/{path}": v for path, v in state["weights"].items()}
    if rng:
        flat.update({f"model/rng/{i}": v for i, v in enumerate(state["rng"])})
    if optimizer is not None:
        flat.update({f"optimizer/{path}": v for path, v in by_path(optimizer.variables).items()})
    return flat


class Weights:
    """The variables of `flat_state` as arrays in `<folder>/weights.safetensors`, the format of both backends.

    Safetensors rather than a `tf.train.Checkpoint`: one file that numpy reads (a JAX run needs no TensorFlow,
    `--mode=export` reads either run's), and cheap to write: one compiled read of every variable and one file
    written from those buffers, ~2.5 ms of CPU a save for digits_cnn's 50 variables, where TensorFlow's
    checkpoint, walking its object graph in Python at every save, took 12 ms (on a 2-core machine the next
    steps wait for that CPU, background thread or not)."""

    def __init__(self, variables: dict):
        """`variables`: {key: variable}, `flat_state`'s or a part of it."""
        self._variables = variables
        self._read = _host_reader(list(variables.values()))

    def snapshot(self) -> dict[str, np.ndarray]:
        """Copies of the variables' values now, in host memory (a JAX step donates their buffers)."""
        return dict(zip(self._variables, self._read()))

    @staticmethod
    def write(values: dict[str, np.ndarray], folder: pathlib.Path) -> None:
        from safetensors.numpy import save_file
        save_file(values, str(folder / WEIGHTS))

    def read(self, folder: pathlib.Path) -> None:
        """Assigns every variable from the checkpoint in `folder`; raises ValueError (nothing assigned) for one
        that is missing or of another shape."""
        with StoredArrays(folder) as stored:
            missing = [key for key in self._variables if key not in stored]
            if missing:
                raise ValueError(f"{len(missing)} variables are not in the checkpoint, e.g. {missing[0]}")
            for key, variable in self._variables.items():
                shape = stored.shape(key)
                if shape != tuple(variable.shape):
                    raise ValueError(f"{key} has shape {shape} in the checkpoint, {tuple(variable.shape)} here")
            for key, variable in self._variables.items():
                variable.assign(stored[key])


def _host_reader(variables: list):
    """A function returning host copies of the variables' values: on TensorFlow one compiled read of them all
    (one by one, eager reads cost ~25 us each)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        read_all = tf.function(lambda: [tf.identity(v.value) for v in variables])
        return lambda: [np.array(t) for t in read_all()]
    return lambda: [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]


class StoredArrays:
    """The arrays of a checkpoint folder by `flat_state` key, read one at a time (`key in`, `shape(key)`,
    `[key]`); a context manager. Checkpoints written before kerasbig stored safetensors read too: `weights.npz`
    (JAX runs) and `ckpt.*` (TensorFlow runs' `tf.train.Checkpoint`, read with TensorFlow)."""

    def __init__(self, folder: pathlib.Path):
        folder, self.close = pathlib.Path(folder), lambda: None
        if (folder / WEIGHTS).is_file():
            from safetensors import safe_open
            handle = safe_open(str(folder / WEIGHTS), framework="np")
            self._keys, self._get = set(handle.keys()), handle.get_tensor
            self._shape = lambda key: tuple(handle.get_slice(key).get_shape())
        elif (folder / LEGACY_ARRAYS).is_file():
            stored = np.load(folder / LEGACY_ARRAYS)
            self._keys, self._get, self.close = set(stored.files), stored.__getitem__, stored.close
            self._shape = lambda key: stored[key].shape
        elif (folder / "ckpt.index").is_file():
            try:
                import tensorflow as tf
            except ImportError:
                raise ValueError("a TensorFlow checkpoint of an earlier kerasbig, which needs TensorFlow to "
                                 "read (pip install tensorflow)") from None
            reader = tf.train.load_checkpoint(str(folder / "ckpt"))
            shapes = reader.get_variable_to_shape_map()
            names = {_unescape(name[:-len(TF_SUFFIX)]): name for name in shapes if name.endswith(TF_SUFFIX)}
            self._keys, self._get = set(names), lambda key: reader.get_tensor(names[key])
            self._shape = lambda key: tuple(shapes[names[key]])
        else:
            raise ValueError(f"no weights in {folder}")

    def __enter__(self) -> StoredArrays:
        return self

    def __exit__(self, *error) -> None:
        self.close()

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __getitem__(self, key: str) -> np.ndarray:
        return self._get(key)

    def shape(self, key: str) -> tuple:
        return self._shape(key)

    def keys(self) -> list[str]:
        return sorted(self._keys)


TF_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def _unescape(name: str) -> str:
    """A `flat_state` key from its name in a `tf.train.Checkpoint` of nested dicts, which writes `/` as `.S`
    and `.` as `..`."""
    return re.sub(r"\.(S|\.)", lambda m: "/" if m.group(1) == "S" else ".", name)


class Checkpoints:
    """Saves and restores `model.variables` + `optimizer.variables` with a state dict and named arrays."""

    def __init__(self, directory: pathlib.Path, *, model, optimizer, keep: int, is_chief: bool = True):
        self.directory = pathlib.Path(directory)
        self.keep = keep
        self.is_chief = is_chief
        self._writer: threading.Thread | None = None
        self._write_error: BaseException | None = None
        # Made now, before a learning-rate schedule replaces the optimizer's rate variable: a checkpoint then
        # holds the same variables whenever it is written or read.
        self._weights = Weights(flat_state(model, optimizer))

    def steps(self) -> list[int]:
        return saved_steps(self.directory)

    def save(self, step: int, state: dict, arrays: dict[str, list[np.ndarray]] | None = None, *,
             background: bool = False) -> None:
        """Writes checkpoint `step`; with `background`, only the copy to host memory happens before this returns
        and the files are written on a thread (`wait` finishes them; the next save and a restore wait too).
        On a worker other than the chief this only waits: the chief's copy is the one kept."""
        self.wait()
        if not self.is_chief:
            return
        values = self._weights.snapshot()
        arrays = {name: [np.array(a) for a in named] for name, named in (arrays or {}).items()}
        finish = lambda: self._write(step, values, state, arrays)
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

    def _write(self, step: int, values: dict[str, np.ndarray], state: dict,
               arrays: dict[str, list[np.ndarray]]) -> None:
        """Writes checkpoint `step` into a temporary folder, renames it into place and drops the oldest beyond
        `keep`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp, target = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.directory)), folder(self.directory, step)
        try:
            Weights.write(values, tmp)
            for name, named in arrays.items():
                np.savez(tmp / f"{name}.npz", *named)
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
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
                for npz in (p for p in path.glob("*.npz") if p.name != LEGACY_ARRAYS):  # the callbacks' arrays
                    with np.load(npz) as data:
                        arrays[npz.stem] = [data[f"arr_{i}"] for i in range(len(data.files))]
                self._weights.read(path)
                return state, arrays
            # Whatever a damaged checkpoint raises (OpError, IndexError for truncated data, ValueError, ...):
            # the previous checkpoint then overwrites every variable this one may have partly restored.
            except Exception as err:  # noqa: BLE001
                logging.warning("checkpoint %s is unreadable (%s); falling back to the previous one",
                                path, first_line(err))
        return None


def load_model_weights(directory: pathlib.Path, model) -> int:
    """Loads only the model's weights from the newest checkpoint under `directory` (for inference or to start
    another run from: no optimizer, and no random-number states, which another config may have more or fewer
    of); returns its step."""
    steps = saved_steps(pathlib.Path(directory))
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    Weights(flat_state(model, rng=False)).read(folder(directory, steps[-1]))
    return steps[-1]
