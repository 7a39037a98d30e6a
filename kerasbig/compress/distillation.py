"""Distillation: a student trains on its labels and on a teacher's logits (`config.compress.teacher=WORKDIR`).

The per-example training loss becomes `(1 - w) * cross-entropy(labels) + w * T^2 * KL(softmax(teacher / T) ||
softmax(student / T))`, Keras's logits distillation (`keras.distillation.LogitsDistillation`: temperature T on
both sides, KL divergence, the T^2 of Hinton et al.) kept per example, so kerasbig's loop sums it over the global
batch and micro-batches as it does the label loss. The teacher is rebuilt from its workdir's `config.json` and
newest checkpoint, runs in inference mode inside the compiled step, and is not part of the student's
checkpoints or export. Validation, test metrics and early stopping still use the label loss.
"""
from __future__ import annotations

import json
import pathlib

import keras
from keras import ops

from kerasbig import checkpoint, models
from kerasbig.data.spec import DataSpec
from kerasbig.errors import UsageError, first_line


# What makes the examples and their split: a teacher trained otherwise has seen other data, or the student's test set.
DATA_KEYS = ("name", "seq_len", "source", "max_tokens", "tokenizer", "split_seed", "test_fraction",
             "validation_fraction", "image_size", "label")


def load_teacher(workdir: str, data_config, spec: DataSpec, student: keras.Model) -> keras.Model:
    """The trained model of a kerasbig `workdir`, checked against the student's data and outputs; raises
    UsageError for a folder that is not a trained run, other data, or other outputs (classes, vocabulary)."""
    folder = pathlib.Path(workdir)
    key = f"config.compress.teacher={workdir}"
    if (folder / "saved_model.pb").is_file() or any(folder.glob("*/saved_model.pb")):
        raise UsageError(f"{key} is a SavedModel, which serves probabilities of the last position only; pass the "
                         "teacher's training workdir (its logits at every position)")
    if not (folder / "config.json").is_file() or not checkpoint.saved_steps(folder / "checkpoints"):
        raise UsageError(f"{key} is not a trained kerasbig workdir (config.json and checkpoints/); train the "
                         "teacher first")
    saved = json.loads((folder / "config.json").read_text())
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
        checkpoint.load_model_weights(folder / "checkpoints", teacher)
    except Exception as err:  # noqa: BLE001 - whatever a checkpoint of another model raises
        raise UsageError(f"{key}: its newest checkpoint does not load ({first_line(err)})") from None
    teacher.trainable = False
    return teacher


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
