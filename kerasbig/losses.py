"""The loss and accuracy of integer labels against logits, the one definition training, evaluation and export
comparisons share, on either backend (keras.ops only)."""
from __future__ import annotations

from keras import ops


def per_example_loss(labels, logits, label_smoothing: float = 0.0):
    """Cross-entropy per example (or per token) from integer labels, with optional label smoothing,
    without materialising one-hot labels (vocabularies can be large)."""
    logits = ops.cast(logits, "float32")
    log_normaliser = ops.logsumexp(logits, axis=-1)
    label_logits = ops.squeeze(ops.take_along_axis(logits, ops.expand_dims(ops.cast(labels, "int32"), -1), -1), -1)
    loss = log_normaliser - label_logits
    if label_smoothing:
        uniform = log_normaliser - ops.mean(logits, axis=-1)
        loss = (1 - label_smoothing) * loss + label_smoothing * uniform
    return loss


def correct_predictions(labels, logits):
    """1.0 where the most likely class (or next token) is the label, else 0.0."""
    return ops.cast(ops.equal(ops.cast(ops.argmax(logits, axis=-1), labels.dtype), labels), "float32")
