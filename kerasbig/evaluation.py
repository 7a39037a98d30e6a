"""Final metrics of a trained model: what goes into metrics.json and the SavedModel's kerasbig.json."""
from __future__ import annotations

import math

import keras
import numpy as np
import sklearn.metrics
import tensorflow as tf

from kerasbig.data.spec import CLASSIFICATION, Task


def metrics(kind: str, sums, labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    """Classifiers: accuracy, macro precision/recall/F1 and the confusion matrix.
    Language models: loss (nats per token), perplexity and bits per byte (tokens are bytes)."""
    loss = sums.loss / sums.count
    if kind != CLASSIFICATION:
        return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_byte": loss / math.log(2),
                "accuracy": sums.correct / sums.count, "tokens": int(sums.count)}
    classes = list(range(num_classes))
    precision, recall, f1, _ = sklearn.metrics.precision_recall_fscore_support(
        labels, predictions, labels=classes, average="macro", zero_division=0)
    return {
        "loss": loss,
        "accuracy": float(np.mean(labels == predictions)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "examples": int(len(labels)),
        "confusion_matrix": sklearn.metrics.confusion_matrix(labels, predictions, labels=classes).tolist(),
    }


def summary_line(values: dict) -> str:
    keys = ("accuracy", "f1", "loss", "perplexity", "bits_per_byte")
    return ", ".join(f"{k} {values[k]:.4f}" for k in keys if k in values)


def accuracy(model: keras.Model, task: Task, split: str = "test", batch_size: int = 256) -> float:
    """Accuracy (per token for language models) of `model` on the raw examples of `split`, through
    `task.preprocess` on one device: the path a serving request takes. Compares float and int8 exports."""
    correct = total = 0
    for x, y in task.examples(split).batch(batch_size):
        predictions = tf.argmax(model(task.preprocess(x), training=False), -1, output_type=y.dtype)
        correct += int(tf.reduce_sum(tf.cast(predictions == y, tf.int32)))
        total += int(tf.size(y))
    return correct / total
