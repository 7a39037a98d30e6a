"""The optimizer's global step at the end of a batch, read from the device once per epoch instead of every step."""
from __future__ import annotations

import keras


class GlobalStep:
    """Batch `batch` of an epoch ends at global step `offset + batch`, the offset read from the optimizer's
    counter (a device variable: each read waits for the device) at the epoch's first batch end. In `fit` and
    kerasbig's loop alike, `on_train_batch_end` gets the epoch index of an execution's last step, and the counter
    counts every step, so one read per epoch suffices. Call `new_epoch` from `on_epoch_begin`.

    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse"); model.optimizer.build(model.trainable_variables)
    >>> steps = GlobalStep()
    >>> _ = model.optimizer.iterations.assign(12)  # batch 3 of an epoch that started at step 8 has ended
    >>> steps.at_batch_end(model, 3), steps.at_batch_end(model, 7)
    (12, 16)
    """

    def __init__(self):
        self._offset: int | None = None

    def new_epoch(self) -> None:
        self._offset = None

    def at_batch_end(self, model: keras.Model, batch: int) -> int:
        if self._offset is None:
            self._offset = read(model) - batch
        return self._offset + batch


def read(model: keras.Model) -> int:
    """The optimizer's global step, read from the device."""
    return int(model.optimizer.iterations.numpy())  # numpy(): also for a MirroredVariable
