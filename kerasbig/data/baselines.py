"""Cheap baselines that a trained model must beat to have learned more than byte statistics.

>>> from kerasbig.data.text import load_text_lm
>>> 2 < byte_bigram_bits_per_byte(load_text_lm(seq_len=128, seed=0)) < 5
True
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kerasbig.data.spec import Task
from kerasbig.data.text import BYTE_VOCAB

BATCH = 4096


def byte_bigram_bits_per_byte(task: Task, smoothing: float = 0.1) -> float:
    """Test bits per token of an add-`smoothing` bigram model fitted on a language-model task's train split.

    A model's loss in nats per token converts as loss / ln 2 for comparison.
    """
    vocab = task.spec.num_classes
    inputs, labels = _arrays(task.train.batch(BATCH))
    counts = np.full((vocab, vocab), smoothing)
    np.add.at(counts, (inputs.ravel(), labels.ravel()), 1)
    log2_probs = np.log2(counts / counts.sum(axis=1, keepdims=True))
    inputs, labels = _arrays(task.test.batch(BATCH))
    return float(-log2_probs[inputs, labels].mean())


def bag_of_bytes_accuracy(task: Task) -> float:
    """Test accuracy of logistic regression on how often each byte occurs, for byte-level classification."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(*_byte_counts(task, task.train))
    return float(model.score(*_byte_counts(task, task.test)))


def _byte_counts(task: Task, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    ids, labels = _arrays(dataset.batch(BATCH).map(lambda x, y: (task.preprocess(x), y)))
    # One bincount over all rows at once: row r's byte b lands in bin r * BYTE_VOCAB + b.
    offsets = BYTE_VOCAB * np.arange(len(ids))[:, None]
    counts = np.bincount((ids + offsets).ravel(), minlength=len(ids) * BYTE_VOCAB)
    return counts.reshape(len(ids), BYTE_VOCAB), labels


def _arrays(batches: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """All of a batched `(input, label)` dataset as two numpy arrays."""
    inputs, labels = zip(*batches.as_numpy_iterator())
    return np.concatenate(inputs), np.concatenate(labels)
