"""Warmup-then-decay learning rate, keyed to the optimizer's global step.

The schedule is handed to the optimizer itself, so every update inside a compiled multi-step
execution gets its own exact rate and a resumed run picks up where `optimizer.iterations` left off.
"""
from __future__ import annotations

import math

import keras
from keras import ops

from kerasbig.callbacks import global_step
from kerasbig.errors import UsageError
from kerasbig.summaries import SummaryWriter

DECAYS = ("cosine", "linear", "exponential", "step", "constant")


@keras.saving.register_keras_serializable(package="kerasbig")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from `init_learning_rate` to `peak`, then `decay` towards `min_learning_rate`.

    With t = step - warmup_steps (clipped to `decay_steps` when that is given):
    - cosine: floor + (peak - floor) * (1 + cos(pi * t / decay_steps)) / 2
    - linear: peak + (floor - peak) * t / decay_steps
    - exponential: peak * decay_rate ** (t / step_size), a smooth factor of decay_rate per step_size steps
    - step: peak * decay_rate ** floor(t / step_size), the same in stairs
    - constant: peak
    and the result never goes below the floor `min_learning_rate`.

    >>> schedule = WarmupDecay(1.0, warmup_steps=10, decay="linear", decay_steps=10)
    >>> [round(float(schedule(s)), 2) for s in (0, 5, 10, 15, 20, 30)]
    [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """

    def __init__(self, peak: float, *, warmup_steps: int = 0, decay: str = "cosine",
                 decay_steps: int | None = None, min_learning_rate: float = 0.0,
                 init_learning_rate: float = 0.0, decay_rate: float | None = None, step_size: int | None = None):
        self.peak, self.warmup_steps, self.decay, self.decay_steps = peak, warmup_steps, decay, decay_steps
        self.min_learning_rate, self.init_learning_rate = min_learning_rate, init_learning_rate
        self.decay_rate, self.step_size = decay_rate, step_size
        self._check()

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = self.init_learning_rate + (self.peak - self.init_learning_rate) * step / max(self.warmup_steps, 1)
        return ops.where(step < self.warmup_steps, warmup, self._decayed(step - self.warmup_steps))

    def _decayed(self, t):
        if self.decay_steps is not None:
            t = ops.minimum(t, float(self.decay_steps))
        peak, floor = self.peak, self.min_learning_rate
        if self.decay == "cosine":
            rate = floor + (peak - floor) * 0.5 * (1.0 + ops.cos(math.pi * t / self.decay_steps))
        elif self.decay == "linear":
            rate = peak + (floor - peak) * t / self.decay_steps
        elif self.decay == "exponential":
            rate = peak * ops.power(self.decay_rate, t / self.step_size)
        elif self.decay == "step":
            rate = peak * ops.power(self.decay_rate, ops.floor(t / self.step_size))
        else:
            rate = ops.full_like(t, peak)
        return ops.maximum(rate, floor)

    def get_config(self) -> dict:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "decay": self.decay,
                "decay_steps": self.decay_steps, "min_learning_rate": self.min_learning_rate,
                "init_learning_rate": self.init_learning_rate, "decay_rate": self.decay_rate,
                "step_size": self.step_size}

    def _check(self) -> None:
        """Raises UsageError, naming the argument, for values the formulas cannot use."""
        if self.decay not in DECAYS:
            raise UsageError(f"schedule decay={self.decay!r} is unknown; accepted: {', '.join(DECAYS)}")
        peak = self.peak
        if not peak > 0:
            raise UsageError(f"schedule peak learning rate must be > 0, got {peak}")
        for name in ("min_learning_rate", "init_learning_rate"):
            if not 0 <= getattr(self, name) <= peak:
                raise UsageError(f"schedule {name} must be in [0, peak={peak}], got {getattr(self, name)}")
        _check_count("warmup_steps", self.warmup_steps, minimum=0)
        needs = {"cosine": ["decay_steps"], "linear": ["decay_steps"],
                 "exponential": ["decay_rate", "step_size"], "step": ["decay_rate", "step_size"]}
        for name in needs.get(self.decay, []):
            if getattr(self, name) is None:
                raise UsageError(f"schedule decay={self.decay!r} needs {name}")
        for name in ("decay_steps", "step_size"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name), minimum=1)
        if self.decay_rate is not None and not 0 < self.decay_rate <= 1:
            raise UsageError(f"schedule decay_rate must be in (0, 1], got {self.decay_rate}")


def _check_count(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UsageError(f"schedule {name} must be an integer >= {minimum}, got {value!r}")


class LearningRateScheduler(keras.callbacks.Callback):
    """Installs `schedule` as the optimizer's learning rate and reports the rate.

    The rate is added to batch and epoch logs as `learning_rate` (the rate the optimizer applies at
    the current global step) and, with `log_dir`, written there as a TensorBoard scalar against the
    global step (read from the device once per epoch) at most once per `log_every_steps` steps.
    Because the optimizer evaluates the schedule at `optimizer.iterations`, the rate is exact with
    `steps_per_execution > 1` and after a resume.
    Install it before the first train step is traced (`model.fit` does: this runs in on_train_begin).

    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> scheduler = LearningRateScheduler(WarmupDecay(0.1, warmup_steps=4, decay="constant"))
    >>> history = model.fit(np.ones((8, 1)), np.ones((8, 1)), batch_size=2, callbacks=[scheduler], verbose=0)
    >>> round(history.history["learning_rate"][0], 3)
    0.1
    """

    def __init__(self, schedule: keras.optimizers.schedules.LearningRateSchedule, log_dir: str | None = None,
                 log_every_steps: int = 100):
        super().__init__()
        if not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            raise UsageError(f"LearningRateScheduler needs a LearningRateSchedule, got {type(schedule).__name__}")
        if log_every_steps < 1:
            raise UsageError(f"log_every_steps must be >= 1, got {log_every_steps}")
        self.schedule = schedule
        self.log_dir = log_dir
        self.log_every_steps = log_every_steps
        self._writer = None
        self._last_written_step = None
        self._steps = global_step.GlobalStep()

    def on_train_begin(self, logs=None):
        self.model.optimizer.learning_rate = self.schedule
        if getattr(self.model, "train_function", None) is not None:
            # `fit` made its step function before this hook, and one traced in an earlier `fit` would still
            # apply the schedule it was traced with.
            self.model.make_train_function(force=True)
        if self.log_dir:
            self._writer = SummaryWriter(self.log_dir)
        self._last_written_step = None

    def on_epoch_begin(self, epoch, logs=None):
        self._steps.new_epoch()

    def on_train_batch_end(self, batch, logs=None):
        step = self._steps.at_batch_end(self.model, batch)
        if logs is not None and "learning_rate" in logs:  # kerasbig's loop reports the rate its step applied
            rate = float(logs["learning_rate"])
        else:  # evaluating the schedule on the host costs about a millisecond of eager ops
            rate = float(self.schedule(step))
        if logs is not None:
            logs["learning_rate"] = rate
        if self._writer and (self._last_written_step is None
                             or step - self._last_written_step >= self.log_every_steps):
            self._writer.scalar("learning_rate", rate, step)
            self._last_written_step = step

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(self.schedule(global_step.read(self.model)))

    def on_train_end(self, logs=None):
        if self._writer:
            self._writer.close()
            self._writer = None
