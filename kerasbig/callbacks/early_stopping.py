"""Keras early stopping whose counters survive a resume."""
from __future__ import annotations

import keras

from kerasbig.errors import UsageError

MODES = ("auto", "min", "max")


class EarlyStopping(keras.callbacks.EarlyStopping):
    """`keras.callbacks.EarlyStopping`, with its arguments and decisions, plus `get_state`/`set_state` so that a
    resumed run keeps counting.

    `mode="auto"` takes the direction as Keras does, from the compiled metric of that name (`r2_score` and
    `f1_score` go up, `mean_squared_error` down); kerasbig's own loop compiles no metrics, and logs `loss`
    (minimised) and `accuracy` (maximised). The decision depends only on the monitored value in the epoch logs,
    so workers that all-reduce it before `on_epoch_end` all stop at the same epoch. A checkpoint stores
    `get_state()` (JSON) and, with `restore_best_weights`, `best_weights` (a list of arrays); after
    `set_state` the next `on_train_begin` keeps that state instead of starting over as Keras does.

    >>> stopper = EarlyStopping(patience=1)
    >>> stopper.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    >>> for epoch, val_loss in enumerate([1.0, 0.5, 0.7]):
    ...     stopper.on_epoch_end(epoch, {"val_loss": val_loss})
    >>> stopper.model.stop_training, stopper.get_state()
    (True, {'wait': 1, 'best': 0.5, 'best_epoch': 1, 'stopped_epoch': 2})
    """

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0, verbose: int = 0,
                 mode: str = "auto", baseline: float | None = None, restore_best_weights: bool = False,
                 start_from_epoch: int = 0):
        if mode not in MODES:
            raise UsageError(f"early stopping mode={mode!r} is unknown; accepted: {', '.join(MODES)}")
        if patience < 0 or start_from_epoch < 0:
            raise UsageError(f"early stopping patience and start_from_epoch must be >= 0, "
                             f"got {patience} and {start_from_epoch}")
        super().__init__(monitor=monitor, min_delta=min_delta, patience=patience, verbose=verbose, mode=mode,
                         baseline=baseline, restore_best_weights=restore_best_weights,
                         start_from_epoch=start_from_epoch)
        self.best = None
        self.best_epoch = 0
        self._resumed = False

    def _set_monitor_op(self):
        if self.mode == "auto" and self.monitor.removeprefix("val_") == "accuracy" and not self._compiled(self.monitor):
            self.monitor_op = keras.ops.greater  # kerasbig's loop logs accuracy without a compiled metric
            return
        super()._set_monitor_op()

    def _compiled(self, monitor: str) -> bool:
        """Whether the model has a compiled metric named like `monitor`, whose direction Keras then uses."""
        names = {m.name for group in getattr(self.model, "metrics", []) for m in getattr(group, "metrics", [group])}
        return monitor.removeprefix("val_") in names

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
