"""kerasbig's training loop, one design for both backends: this loop drives a per-backend steps object.

The loop (here) owns what a run means: cadences, Keras callbacks, checkpoints and resume, preemption, early
stopping and the run state. The steps object computes: `kerasbig.tf_steps.TensorFlowSteps` (`strategy.run` in
compiled multi-step calls, under any tf.distribute strategy) or `kerasbig.jax_steps.JaxSteps` (a jitted
stateless step with donated state, under a `keras.distribution` data- or model-parallel layout). Both give
`train(iterator, steps, sigterm)` -> [loss sum, correct sum, count, SIGTERM votes, next learning rate],
`evaluate(split, batch_size)`, `step()`, `all_finite()`, and `accelerated` (whether the step runs on GPUs or
TPUs); this module imports no TensorFlow.

Why a loop of our own rather than `model.fit`: Keras 3's `fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585); `BackupAndRestore` only resumes at epoch starts, and we resume at the exact step;
and Keras clips gradients per replica before the all-reduce, so global-norm clipping would see only a part
of the gradient. Any `keras.callbacks.Callback` works in it as in `fit`.

The loop counts optimizer steps. One input stream serves the whole run (built once, resumable at any step),
and cadences are in steps: what callbacks see as an epoch is the `period` of steps between two evaluations
(`train.eval_every_steps`, or one pass over the training data when that is 0), checkpoints come every
`train.checkpoint_every_steps` and at the end of every period, logs every `train.log_every_steps`. So a language
model whose data is a few steps long still evaluates and checkpoints on its own schedule.

Every decision that ends or pauses training is taken identically on every worker, from globally reduced
values: a non-finite loss, early stopping (from the validation logs), preemption (a SIGTERM on any worker is
voted on in the next step's all-reduce) and the step to resume from (checked across workers).
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import signal
import threading

import keras
import numpy as np
from absl import logging

from kerasbig import config as config_lib
from kerasbig.callbacks.nonfinite import StopOnNonFiniteLoss
from kerasbig.checkpoint import Checkpoints
from kerasbig.data.spec import LANGUAGE_MODEL, Task
from kerasbig.errors import RunError, UsageError
from kerasbig.files import remove_temporaries


def make_steps(model: keras.Model, optimizer: keras.optimizers.Optimizer, task: Task, strategy, config, *,
               seed: int, loss_denominator: float, train_loss=None):
    """The steps object of the current Keras backend (imported here: a JAX run never loads TensorFlow's)."""
    if keras.backend.backend() == "jax":
        if train_loss is not None:
            raise UsageError("distillation (config.compress.teacher) trains on the TensorFlow backend; rerun with "
                             "--backend=tensorflow")
        from kerasbig.jax_steps import JaxSteps
        return JaxSteps(model, optimizer, task, strategy, config, seed=seed, loss_denominator=loss_denominator)
    from kerasbig.tf_steps import TensorFlowSteps
    return TensorFlowSteps(model, optimizer, task, strategy, config, seed=seed, loss_denominator=loss_denominator,
                           train_loss=train_loss)


@dataclasses.dataclass
class Sums:
    """Running sums of one phase (train or eval); their ratios are the logged metrics."""
    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    def add(self, values) -> None:
        self.loss += float(values[0])
        self.correct += float(values[1])
        self.count += float(values[2])

    def logs(self, prefix: str = "") -> dict[str, float]:
        if not self.count:
            return {}
        return {prefix + "loss": self.loss / self.count, prefix + "accuracy": self.correct / self.count}


class Trainer:
    """Trains `model` on `task` under `strategy`; checkpoints to `workdir/checkpoints` and resumes from it."""

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, task: Task, strategy, config,
                 workdir: pathlib.Path, *, is_chief: bool = True, seed: int = 0, train_loss=None):
        """`strategy`: a tf.distribute strategy on TensorFlow, a `keras.distribution.Distribution` on JAX.
        `train_loss`: optional `(inputs, logits, per-example label losses) -> per-example training losses`
        (distillation's); evaluation keeps the label loss."""
        self.model, self.optimizer, self.task, self.strategy = model, optimizer, task, strategy
        self.config, self.workdir, self.is_chief, self.seed = config, workdir, is_chief, seed
        self.global_batch = config.data.batch_size
        train = config.train
        steps_per_epoch = task.num_examples["train"] // self.global_batch  # the last partial batch is dropped
        self.total_steps = train.steps or train.epochs * steps_per_epoch
        self.period = min(train.eval_every_steps or steps_per_epoch, self.total_steps)
        self.epochs = math.ceil(self.total_steps / self.period)  # evaluation periods, what callbacks call epochs
        tokens = task.spec.seq_len if task.spec.kind == LANGUAGE_MODEL else 1
        self.steps = make_steps(model, optimizer, task, strategy, config, seed=seed,
                                loss_denominator=float(self.global_batch * tokens), train_loss=train_loss)
        model.optimizer = optimizer  # what callbacks read, as under fit()
        self.checkpoints = Checkpoints(workdir / "checkpoints", model=model, optimizer=optimizer,
                                       keep=train.keep_checkpoints, is_chief=is_chief)
        if is_chief:  # the chief holds the workdir's lock: what a killed save left there is stale
            remove_temporaries(self.checkpoints.directory)
        self._sigterm = False
        self._validation: tuple[np.ndarray, np.ndarray] | None = None

    # ---- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, split: str, callbacks: keras.callbacks.CallbackList | None = None
                 ) -> tuple[Sums, np.ndarray, np.ndarray]:
        """Loss and accuracy sums over every example of `split`, plus labels and predicted classes
        (classifiers; for language models these are per token). `callbacks` get the `on_test_*` hooks, as in
        `fit`'s validation."""
        sums, labels, predictions = Sums(), [], []
        if callbacks is not None:
            callbacks.on_test_begin()
        # No larger than the split (rounded up to the replicas): the last batch is padded to full size.
        replicas = self.steps.replicas
        batch_size = min(self.config.data.eval_batch_size, -(-self.task.num_examples[split] // replicas) * replicas)
        with self.steps.cluster_errors(f"evaluating {split}"):
            for index, (batch_sums, batch_predictions, batch_labels, weights) in enumerate(
                    self.steps.evaluate(split, batch_size)):
                if callbacks is not None:
                    callbacks.on_test_batch_begin(index)
                sums.add(batch_sums)
                keep = weights > 0
                labels.append(batch_labels[keep])
                predictions.append(batch_predictions[keep])
                if callbacks is not None:
                    callbacks.on_test_batch_end(index, sums.logs())
        if callbacks is not None:
            callbacks.on_test_end(sums.logs())
        return sums, np.concatenate(labels), np.concatenate(predictions)

    def latest_validation(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(labels, predicted classes) of the latest validation pass, in the order of `task.validation`, on every
        worker: what `callbacks.Dashboard(validation_predictions=...)` takes, with no evaluation of its own
        (which, run on the chief alone, would wait forever for the other workers)."""
        return self._validation

    # ---- checkpoints --------------------------------------------------------------------------------
    def _save(self, callbacks: list, *, complete: bool = False, background: bool = False) -> None:
        """Checkpoints the current state; weights that are no longer finite are never saved, so the last good
        checkpoint survives a divergence. With `background` the files are written while training goes on: the
        periodic saves do that when the steps run on GPUs or TPUs. On CPUs the step keeps every core busy, and a
        writer thread beside it slowed the next 5-10 steps by more than writing in place costs (2-3 ms for
        digits_mlp or digits_cnn)."""
        step = self.steps.step()
        if not self.steps.all_finite():
            raise RunError(f"the weights are no longer finite at step {step}; training stopped and the last "
                           f"good checkpoint in {self.checkpoints.directory} was kept (lower the learning rate "
                           "or set --config.optimizer.clip_norm)")
        state = {"step": step, "complete": complete, "stopped_early": complete and bool(self.model.stop_training),
                 "config": config_lib.to_dict(self.config), "seed": self.seed, "callbacks": {}}
        arrays = {}
        for callback in callbacks:
            if hasattr(callback, "get_state"):
                name = type(callback).__name__
                state["callbacks"][name] = callback.get_state()
                if getattr(callback, "best_weights", None) is not None:
                    arrays[name + ".best_weights"] = callback.best_weights
        self.checkpoints.save(step, state, arrays, background=background)

    def restore(self, callbacks: list = ()) -> dict | None:
        """Loads the latest checkpoint (and callback states) if there is one; returns its state."""
        restored = self.checkpoints.restore_latest()
        self._check_workers_agree(restored[0]["step"] if restored else 0)
        if restored is None:
            return None
        state, arrays = restored
        for callback in callbacks:
            name = type(callback).__name__
            if name in state["callbacks"]:
                callback.set_state(state["callbacks"][name])
                if name + ".best_weights" in arrays:
                    callback.best_weights = arrays[name + ".best_weights"]
        return state

    def _check_workers_agree(self, step: int) -> None:
        """Every worker must resume from the same step; they do when they share the chief's workdir."""
        steps = self.steps.check_workers_agree(step)
        if len(steps) > 1:
            raise RunError(f"the workers found different checkpoints to resume from (steps {steps}): give every "
                           f"worker the same --workdir on a filesystem they share (this worker's is {self.workdir})")

    # ---- the loop -----------------------------------------------------------------------------------
    def fit(self, callbacks: list[keras.callbacks.Callback], *, verbose: bool = True) -> dict[str, float]:
        """Trains to `total_steps`, resuming from the latest checkpoint; returns the last period's logs."""
        state = self.restore(callbacks)
        if state and state["complete"] and (state.get("stopped_early") or state["step"] >= self.total_steps):
            print(f"Training in {self.workdir} is already complete (step {state['step']}); nothing to resume.")
            return {}
        step = self.steps.step()
        if step:
            print(f"Resuming from step {step} (epoch {step // self.period + 1}, batch {step % self.period}).")
        nonfinite = StopOnNonFiniteLoss()
        callback_list = keras.callbacks.CallbackList(
            [*callbacks, nonfinite], add_history=True, add_progbar=verbose, model=self.model,
            epochs=self.epochs, steps=self.period, verbose=1 if verbose else 0)
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if on_main_thread else None
        try:
            with self.steps.cluster_errors("training"):
                logs = self._run(callback_list, callbacks, nonfinite, step)
        except (Preempted, RunError):
            callback_list.on_train_end()  # flushes the logs of a run that stops early
            self.checkpoints.wait()  # the last good checkpoint is on disk before the run exits
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return logs

    def _run(self, callback_list, callbacks, nonfinite: StopOnNonFiniteLoss, step: int) -> dict[str, float]:
        train = self.config.train
        callback_list.on_train_begin()
        logs: dict[str, float] = {}
        self.model.stop_training = False
        iterator = self.steps.train_iterator(step, self.total_steps)
        # Only the batch hooks that do something are called, one by one, and the step's values are converted at
        # once: this Python runs between compiled calls, on cold caches. Through CallbackList (which converts our
        # float logs again), no-op hooks included, digits_mlp's loop took 1.03-1.05x the bare step's time, and
        # 1.00-1.03x without (six `bench_loop turns` processes each).
        batch_begin_hooks = _overridden(callback_list.callbacks, "on_train_batch_begin")
        batch_end_hooks = _overridden(callback_list.callbacks, "on_train_batch_end")
        for epoch in range(step // self.period, self.epochs):
            start, end = epoch * self.period, min((epoch + 1) * self.period, self.total_steps)
            callback_list.on_epoch_begin(epoch)
            sums = Sums()
            while step < end and not self.model.stop_training:
                n = min(train.steps_per_execution, end - step, self._steps_to_checkpoint(step))
                for hook in batch_begin_hooks:
                    hook(step - start, {})
                values = self.steps.train(iterator, n, self._sigterm).tolist()
                sums.add(values)
                step += n
                logs = {**sums.logs(), "learning_rate": values[4]}
                for hook in batch_end_hooks:
                    hook(step - start - 1, logs)
                if nonfinite.bad_step is not None:
                    raise RunError(f"{nonfinite.message} and the last good checkpoint in {self.checkpoints.directory} "
                                   "was kept (lower the learning rate or set --config.optimizer.clip_norm)")
                # A SIGTERM on any worker is seen by all in the vote, and they all save and stop here.
                if values[3] or (self._sigterm and not self.steps.multi_worker):
                    self._save(callbacks)
                    raise Preempted(step)
                if self._steps_to_checkpoint(step) == train.checkpoint_every_steps and step < end:
                    self._save(callbacks, background=self.steps.accelerated)
            if step == end and ((epoch + 1) % train.eval_every_epochs == 0 or step == self.total_steps):
                val, labels, predictions = self.evaluate("validation", callback_list)
                self._validation = (labels, predictions)
                logs.update(val.logs("val_"))
            callback_list.on_epoch_end(epoch, logs)
            if self.model.stop_training:
                break
            self._save(callbacks, background=self.steps.accelerated)
        callback_list.on_train_end(logs)
        self._save(callbacks, complete=True)
        return logs

    def _steps_to_checkpoint(self, step: int) -> int:
        """Steps from `step` to the next multiple of `train.checkpoint_every_steps` (no limit when that is 0)."""
        every = self.config.train.checkpoint_every_steps
        return every - step % every if every else self.total_steps

    def _on_sigterm(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint after the current step")
        self._sigterm = True


def _overridden(callbacks: list[keras.callbacks.Callback], hook: str) -> list:
    """The callbacks' `hook` methods but Keras's no-op (a LambdaCallback's are attributes of the instance)."""
    default = getattr(keras.callbacks.Callback, hook)
    methods = [getattr(callback, hook) for callback in callbacks]
    return [method for method in methods if getattr(method, "__func__", None) is not default]


class Preempted(Exception):
    """Training was stopped by SIGTERM after saving a checkpoint at `step`."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step
