"""Profiles a range of global steps with the backend's profiler (TensorFlow's or JAX's), for TensorBoard's
Profile tab."""
from __future__ import annotations

import keras

from kerasbig.errors import UsageError


class ProfileSteps(keras.callbacks.Callback):
    """Traces global steps `start` to `stop` (inclusive) into `log_dir` (view with the `[profile]` extra:
    tensorboard-plugin-profile). Steps are counted by `optimizer.iterations`, so a resumed run profiles the
    same steps, and a multi-step execution is traced whole.

    >>> ProfileSteps("/tmp/logs", 10, 5)
    Traceback (most recent call last):
    ...
    kerasbig.errors.UsageError: profile steps 10,5: the first must be >= 1 and not after the last
    """

    def __init__(self, log_dir: str, start: int, stop: int):
        super().__init__()
        if not 1 <= start <= stop:
            raise UsageError(f"profile steps {start},{stop}: the first must be >= 1 and not after the last")
        self.log_dir, self.start, self.stop = log_dir, start, stop
        self._tracing = False

    def on_train_batch_begin(self, batch, logs=None):
        next_step = int(self.model.optimizer.iterations.numpy()) + 1
        if not self._tracing and self.start <= next_step <= self.stop:
            _start_trace(self.log_dir)
            self._tracing = True

    def on_train_batch_end(self, batch, logs=None):
        if self._tracing and int(self.model.optimizer.iterations.numpy()) >= self.stop:
            self._finish()

    def on_train_end(self, logs=None):
        if self._tracing:
            self._finish()

    def _finish(self) -> None:
        _stop_trace()
        self._tracing = False



def _start_trace(log_dir: str) -> None:
    """`jax.profiler` on JAX (the same trace format, under log_dir/plugins/profile), else TensorFlow's profiler."""
    if keras.backend.backend() == "jax":
        import jax

        jax.profiler.start_trace(log_dir)
    else:
        import tensorflow as tf

        tf.profiler.experimental.start(log_dir)


def _stop_trace() -> None:
    if keras.backend.backend() == "jax":
        import jax

        jax.profiler.stop_trace()
    else:
        import tensorflow as tf

        tf.profiler.experimental.stop()
