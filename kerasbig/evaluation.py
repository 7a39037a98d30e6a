"""Final metrics of a trained model: what goes into metrics.json and the SavedModel's kerasbig.json."""
from __future__ import annotations

import math

import keras
import numpy as np
import sklearn.metrics

from kerasbig.data.spec import CLASSIFICATION, Task
from kerasbig.losses import correct_predictions, per_example_loss


def metrics(task: Task, sums, labels: np.ndarray, predictions: np.ndarray) -> dict:
    """Metrics from an evaluation's sums (loss, correct, count) and its labels and predicted classes.

    Classifiers: accuracy, macro precision/recall/F1 and the confusion matrix. Language models: loss (nats per
    token), perplexity, bits per token and, when the task knows the bytes behind each token
    (`task.token_bytes`), bits per byte: the total bits over the total bytes of the predicted text, which
    compares models whatever their tokenizers.
    """
    loss, accuracy = sums.loss / sums.count, sums.correct / sums.count
    if task.spec.kind != CLASSIFICATION:
        values = {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_token": loss / math.log(2),
                  "accuracy": accuracy, "tokens": int(sums.count)}
        if task.token_bytes is not None:
            values["bits_per_byte"] = sums.loss / math.log(2) / int(task.token_bytes[labels].sum())
        return values
    classes = list(range(task.spec.num_classes))
    precision, recall, f1, _ = sklearn.metrics.precision_recall_fscore_support(
        labels, predictions, labels=classes, average="macro", zero_division=0)
    return {
        "loss": loss,
        "accuracy": accuracy,
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "examples": int(len(labels)),
        "confusion_matrix": sklearn.metrics.confusion_matrix(labels, predictions, labels=classes).tolist(),
    }


def summary_line(values: dict) -> str:
    keys = ("accuracy", "f1", "loss", "perplexity", "bits_per_token", "bits_per_byte")
    return ", ".join(f"{k} {values[k]:.4f}" for k in keys if k in values)


def accuracy(model: keras.Model, task: Task, split: str = "test", batch_size: int = 256) -> float:
    """Accuracy (per token for language models) of `model` on the raw examples of `split`, through
    `task.preprocess` on one device: the path a serving request takes. Compares float and int8 exports."""
    return serving_scores(model, task, split, batch_size)["accuracy"]


def serving_scores(model: keras.Model, task: Task, split: str = "test", batch_size: int = 256) -> dict[str, float]:
    """`accuracy` as above and, for language models, `bits_per_token`: what compressed versions are compared by."""
    correct = loss = total = 0.0
    for x, y in task.examples(split).batch(batch_size):
        logits = model(task.preprocess(x), training=False)
        correct += float(np.sum(correct_predictions(y, logits)))
        loss += float(np.sum(per_example_loss(y, logits)))
        total += int(np.size(y))
    scores = {"accuracy": correct / total}
    if task.spec.kind != CLASSIFICATION:
        scores["bits_per_token"] = loss / total / math.log(2)
    return scores
