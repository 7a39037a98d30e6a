"""The loss and accuracy of integer labels against logits, the one definition training, evaluation and export
comparisons share."""
from __future__ import annotations

import tensorflow as tf


def per_example_loss(labels: tf.Tensor, logits: tf.Tensor, label_smoothing: float = 0.0) -> tf.Tensor:
    """Cross-entropy per example (or per token) from integer labels, with optional label smoothing,
    without materialising one-hot labels (vocabularies can be large)."""
    logits = tf.cast(logits, tf.float32)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    if label_smoothing:
        uniform = tf.reduce_logsumexp(logits, -1) - tf.reduce_mean(logits, -1)
        loss = (1 - label_smoothing) * loss + label_smoothing * uniform
    return loss


def correct_predictions(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """1.0 where the most likely class (or next token) is the label, else 0.0."""
    return tf.cast(tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels), tf.float32)
