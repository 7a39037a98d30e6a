"""Keras early stopping whose counters survive a resume."""
from __future__ import annotations

import keras

from kerasbig.errors import UsageError

MODES = ("auto", "min", "max")
MAXIMIZED = ("acc", "auc", "f1", "precision", "recall")  # metric names that `mode="auto"` maximises


class EarlyStopping(keras.callbacks.EarlyStopping):
    """`keras.callbacks.EarlyStopping` plus `get_state`/`set_state`, so a resumed run keeps counting.

    The decision depends only on the monitored value in the epoch logs, so workers that all-reduce
    it before `on_epoch_end` all stop at the same epoch. A checkpoint stores `get_state()` (JSON) and,
    with `restore_best_weights`, `best_weights` (a list of arrays); after `set_state` the next
    `on_train_begin` keeps that state instead of starting over as Keras does.

    >>> stopper = EarlyStopping(patience=1)
    >>> stopper.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    >>> for epoch, val_loss in enumerate([1.0, 0.5, 0.7]):
    ...     stopper.on_epoch_end(epoch, {"val_loss": val_loss})
    >>> stopper.model.stop_training, stopper.get_state()
    (True, {'wait': 1, 'best': 0.5, 'best_epoch': 1, 'stopped_epoch': 2})
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "auto", min_delta: float = 0.0, patience: int = 0,
                 baseline: float | None = None, start_from_epoch: int = 0, restore_best_weights: bool = False,
                 verbose: int = 0):
        if mode not in MODES:
            raise UsageError(f"early stopping mode={mode!r} is unknown; accepted: {', '.join(MODES)}")
        if patience < 0 or start_from_epoch < 0:
            raise UsageError(f"early stopping patience and start_from_epoch must be >= 0, "
                             f"got {patience} and {start_from_epoch}")
        if mode == "auto":  # Keras 3 decides only from compiled metrics; kerasbig's loop logs plain names
            mode = "max" if any(word in monitor for word in MAXIMIZED) else "min"
        super().__init__(monitor=monitor, min_delta=min_delta, patience=patience, verbose=verbose, mode=mode,
                         baseline=baseline, restore_best_weights=restore_best_weights,
                         start_from_epoch=start_from_epoch)
        self.best = None
        self.best_epoch = 0
        self._resumed = False

    def on_train_begin(self, logs=None):
        if not self._resumed:
            super().on_train_begin(logs)
        self._resumed = False

    def get_state(self) -> dict:
        """The counters a checkpoint must keep, as JSON-serialisable values."""
        return {"wait": self.wait, "best": None if self.best is None else float(self.best),
                "best_epoch": self.best_epoch, "stopped_epoch": self.stopped_epoch}

    def set_state(self, state: dict) -> None:
        """Restores `get_state()` output; set `best_weights` separately when restoring best weights."""
        self.wait = state["wait"]
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.stopped_epoch = state["stopped_epoch"]
        self._resumed = True
