"""TensorBoard scalars of compression: the sparsity of every weight matrix while it is pruned."""
from __future__ import annotations

import math

import keras
import tensorflow as tf  # tf.summary only: Keras has no TensorBoard writer API

from kerasbig.compress.pruning import sparsities


class SparsityLogger(keras.callbacks.Callback):
    """Writes `sparsity/<kernel path>` and `sparsity/all` (zeros over all weight matrices) to `log_dir` against the
    global step, at most once per `log_every_steps` steps and at the end of training."""

    def __init__(self, log_dir: str, log_every_steps: int = 100):
        super().__init__()
        self.log_dir, self.log_every_steps = log_dir, log_every_steps
        self._writer, self._last_step = None, None

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if self._last_step is None or step - self._last_step >= self.log_every_steps:
            self._write(step)

    def on_train_end(self, logs=None):
        self._write(int(self.model.optimizer.iterations.numpy()))
        self._writer.close()

    def _write(self, step: int) -> None:
        values = sparsities(self.model)
        sizes = {kernel.path: math.prod(kernel.shape) for kernel in self.model.trainable_weights if kernel.path in values}
        total = sum(sizes.values())
        with self._writer.as_default():
            for path, value in values.items():
                tf.summary.scalar(f"sparsity/{path}", value, step=step)
            tf.summary.scalar("sparsity/all", sum(values[p] * sizes[p] for p in values) / total, step=step)
        self._last_step = step
