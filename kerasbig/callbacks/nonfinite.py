"""Stop on a non-finite loss, leaving every checkpoint alone."""
from __future__ import annotations

import math

import keras


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Sets `model.stop_training` when the batch `loss` is NaN or infinite.

    It records `bad_step`, the global optimizer step at the end of the execution that produced the
    loss, and a one-line `message` for the caller to report (kerasbig's loop exits 1 with it). Unlike
    `keras.callbacks.TerminateOnNaN`, nothing else is done: no checkpoint or backup is deleted, so the
    caller must not save the diverged weights and can resume from the last good checkpoint. In a plain
    `model.fit`, other callbacks still see the epoch end: use `BackupAndRestore(delete_checkpoint=False)`.

    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> stopper = StopOnNonFiniteLoss()
    >>> _ = model.fit(np.full((8, 1), np.inf), np.ones((8, 1)), batch_size=2, callbacks=[stopper], verbose=0)
    >>> stopper.bad_step, int(model.optimizer.iterations)
    (1, 1)
    """

    def __init__(self):
        super().__init__()
        self.bad_step: int | None = None
        self.message: str | None = None

    def on_train_begin(self, logs=None):
        self.bad_step = None
        self.message = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(loss):
            return
        self.bad_step = int(self.model.optimizer.iterations.numpy())
        self.message = f"the training loss became {loss} by step {self.bad_step}; training stopped"
        self.model.stop_training = True
