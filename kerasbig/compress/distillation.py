"""Distillation: a student trains on its labels and on a teacher's logits (`config.compress.teacher=WORKDIR` or a
kerasbig SavedModel).

The per-example training loss becomes `(1 - w) * cross-entropy(labels) + w * T^2 * KL(softmax(teacher / T) ||
softmax(student / T))`, Keras's logits distillation (`keras.distillation.LogitsDistillation`: temperature T on
both sides, KL divergence, the T^2 of Hinton et al.) kept per example, so kerasbig's loop sums it over the global
batch and micro-batches as it does the label loss. The teacher is rebuilt from its workdir's `config.json` and
newest checkpoint, runs in inference mode inside the compiled step, and is not part of the student's
checkpoints or export. Validation, test metrics and early stopping still use the label loss.

A SavedModel teacher (a version folder `saved_models/<name>/<N>`, or the model folder, whose newest version is
taken) is rebuilt the same way rather than called: its signatures take raw inputs and a language model's serve
the last position only. Its `assets.extra/kerasbig.json` holds the run's config, and its `variables/variables`
checkpoint the exported model's variables as `variables/<i>` in `model.variables` order (Keras's ExportArchive
tracks them so), which load into the rebuilt model by index. An int8 or int4 version is rebuilt quantized to
its mode first; a gptq version is refused (its calibrated layers cannot be rebuilt without calibrating again).
"""
from __future__ import annotations

import json
import pathlib

import keras
from keras import ops

from kerasbig import checkpoint, lora, models, versions
from kerasbig.compress import quantization
from kerasbig.data.spec import DataSpec
from kerasbig.errors import UsageError, first_line


# What makes the examples and their split: a teacher trained otherwise has seen other data, or the student's test set.
DATA_KEYS = ("name", "seq_len", "source", "max_tokens", "tokenizer", "split_seed", "test_fraction",
             "validation_fraction", "image_size", "label")


def load_teacher(source: str, data_config, spec: DataSpec, student: keras.Model) -> keras.Model:
    """The trained model of a kerasbig workdir or SavedModel export `source`, checked against the student's
    data and outputs; raises UsageError for a folder that is neither, other data, other outputs (classes,
    vocabulary) or weights that do not load."""
    folder, key = pathlib.Path(source), f"config.compress.teacher={source}"
    version = saved_model_version(folder)
    if version is not None:
        saved, load = _saved_model_teacher(version, key)
    elif (folder / "config.json").is_file() and checkpoint.saved_steps(folder / "checkpoints"):
        saved = json.loads((folder / "config.json").read_text())

        def load(model: keras.Model) -> None:
            checkpoint.load_model_weights(folder / "checkpoints", model)
    else:
        raise UsageError(f"{key} is neither a trained kerasbig workdir (config.json and checkpoints/) nor a kerasbig "
                         "SavedModel export (saved_models/<name>[/<N>]); train or export the teacher first")
    differ = [f"data.{k}: {saved['data'].get(k)!r} (student: {data_config[k]!r})" for k in DATA_KEYS
              if saved["data"].get(k) != data_config[k]]
    if differ:
        raise UsageError(f"{key} was trained on other data ({'; '.join(differ)}); distil from a teacher of the "
                         "same data and split")
    teacher = models.build(spec, saved["model"])
    if teacher.output_shape != student.output_shape:
        raise UsageError(f"{key}: the teacher's outputs {teacher.output_shape} differ from the student's "
                         f"{student.output_shape} (another number of classes or vocabulary); distil from a teacher "
                         "of the same task")
    try:
        load(teacher)
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever a checkpoint of another model raises
        raise UsageError(f"{key}: its weights do not load ({first_line(err)})") from None
    teacher.trainable = False
    return teacher


def saved_model_version(folder: pathlib.Path) -> pathlib.Path | None:
    """The version folder of a kerasbig export `folder` (itself, or the newest version of a model folder), or
    None when it is neither."""
    if (folder / "saved_model.pb").is_file():
        return folder
    found = versions.folders(folder)
    return found[max(found)] if found and (found[max(found)] / "saved_model.pb").is_file() else None


def _saved_model_teacher(version: pathlib.Path, key: str):
    """(the run config of the export `version`, a function loading its variables into the rebuilt model)."""
    try:
        record = json.loads((version / "assets.extra" / "kerasbig.json").read_text())
        saved = {"data": record["config"]["data"], "model": lora.split(record["config"]["model"])[0]}
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{key}: {version} has no kerasbig.json with its run's config (assets.extra/); export "
                         "the teacher with kerasbig") from None
    mode = record.get("quantization")
    if mode and mode not in ("int8", "int4"):
        other = record.get("comparison", {}).get("float", {}).get("version")
        raise UsageError(f"{key}: {version} is quantized with {mode}, which cannot be rebuilt without calibrating "
                         f"again; distil from the float version{f' {version.parent / str(other)}' if other else ''}")

    def load(model: keras.Model) -> None:
        if mode:  # the variables of the quantized layers, as the export had them (adapters were merged)
            quantization.quantize(model, mode)
        _assign_by_index(model, version / "variables" / "variables", key)
    return saved, load


def _assign_by_index(model: keras.Model, path: pathlib.Path, key: str) -> None:
    """Assigns `variables/<i>` of the SavedModel checkpoint `path` to the weights among `model.variables[i]`,
    each checked for count, shape and dtype first (so a mismatch changes nothing). Dropout's seed generator
    states are left as they are: the teacher runs in inference mode, and their dtype is the backend's."""
    try:
        import tensorflow as tf
    except ImportError:
        raise UsageError(f"{key} is a SavedModel, which needs TensorFlow installed to read; install it or pass "
                         "the teacher's workdir") from None
    reader = tf.train.load_checkpoint(str(path))
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    saved_count = sum(1 for name in shapes if name.startswith("variables/") and name.count("/") == 3)
    weights = {id(weight) for weight in model.weights}
    pairs = [(variable, f"variables/{i}/.ATTRIBUTES/VARIABLE_VALUE") for i, variable in enumerate(model.variables)
             if id(variable) in weights]
    problems = ([] if saved_count == len(model.variables) else
                [f"{saved_count} variables saved, {len(model.variables)} in the rebuilt model"])
    problems += [f"{variable.path}: saved {tuple(shapes[name])} {dtypes[name].name}, rebuilt {tuple(variable.shape)} "
                 f"{variable.dtype}" for variable, name in pairs
                 if name in shapes and (tuple(shapes[name]) != tuple(variable.shape)
                                        or dtypes[name].name != keras.backend.standardize_dtype(variable.dtype))]
    if problems:
        raise UsageError(f"{key}: its variables do not match the model its config builds ({problems[0]}); pass an "
                         "unmodified kerasbig export or the teacher's workdir")
    for variable, name in pairs:
        variable.assign(reader.get_tensor(name))


class DistillationLoss:
    """The training loss hook of kerasbig's loop: `(inputs, student logits, label losses) -> per-example losses`."""

    def __init__(self, teacher: keras.Model, *, temperature: float, teacher_weight: float):
        self.teacher, self.temperature, self.teacher_weight = teacher, temperature, teacher_weight
        self._kl = keras.losses.KLDivergence(reduction=None)

    def __call__(self, inputs, logits, label_loss):
        teacher = ops.cast(self.teacher(inputs, training=False), "float32")
        student = ops.cast(logits, "float32")
        soft = self._kl(ops.softmax(teacher / self.temperature), ops.softmax(student / self.temperature))
        return (1 - self.teacher_weight) * label_loss + self.teacher_weight * self.temperature ** 2 * soft
