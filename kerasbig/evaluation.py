"""Final metrics of a trained model: what goes into metrics.json and the SavedModel's kerasbig.json."""
from __future__ import annotations

import math

import numpy as np
import sklearn.metrics

from kerasbig.data.spec import CLASSIFICATION


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
