"""kerasbig's training loop: `strategy.run` steps inside compiled multi-step calls, driving Keras callbacks.

Why a loop of our own rather than `model.fit`: Keras 3's `fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585); `BackupAndRestore` only resumes at epoch starts, and we resume at the exact step;
and Keras clips gradients per replica before the all-reduce, so global-norm clipping would see only a part
of the gradient. The same loop runs on one device, Mirrored, MultiWorkerMirrored and TPU strategies, and
any `keras.callbacks.Callback` works in it as in `fit`.

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

import contextlib
import dataclasses
import math
import pathlib
import signal
import threading

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kerasbig import config as config_lib
from kerasbig import distribute
from kerasbig.callbacks import StopOnNonFiniteLoss
from kerasbig.checkpoint import Checkpoints
from kerasbig.data import pipeline
from kerasbig.data.spec import LANGUAGE_MODEL, Task
from kerasbig.errors import RunError
from kerasbig.files import remove_temporaries
from kerasbig.losses import correct_predictions, per_example_loss


def _already_reduced(grads_and_vars):
    return grads_and_vars


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

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, task: Task,
                 strategy: tf.distribute.Strategy, config, workdir: pathlib.Path, *, is_chief: bool = True,
                 seed: int = 0, train_loss=None):
        """`train_loss`: optional `(inputs, logits, per-example label losses) -> per-example training losses`
        (distillation's); evaluation keeps the label loss."""
        self.model, self.optimizer, self.task, self.strategy = model, optimizer, task, strategy
        self.train_loss = train_loss
        self.config, self.workdir, self.is_chief, self.seed = config, workdir, is_chief, seed
        self.global_batch = config.data.batch_size
        train = config.train
        self.total_steps = train.steps or train.epochs * pipeline.steps_per_epoch(task, self.global_batch)
        self.period = min(train.eval_every_steps or pipeline.steps_per_epoch(task, self.global_batch),
                          self.total_steps)
        self.epochs = math.ceil(self.total_steps / self.period)  # evaluation periods, what callbacks call epochs
        tokens = task.spec.seq_len if task.spec.kind == LANGUAGE_MODEL else 1
        self._loss_denominator = float(self.global_batch * tokens)
        with strategy.scope():
            optimizer.build(model.trainable_variables)
        # We all-reduce gradients ourselves (so clipping sees the global gradient); the optimizer must not
        # sum them a second time.
        getattr(optimizer, "inner_optimizer", optimizer)._all_reduce_sum_gradients = _already_reduced
        model.optimizer = optimizer  # what callbacks read, as under fit()
        # A remote TPU worker would write checkpoints on its own disk: files go through this host instead.
        io_device = "/job:localhost" if isinstance(strategy, tf.distribute.TPUStrategy) else None
        self.checkpoints = Checkpoints(workdir / "checkpoints", model=model, optimizer=optimizer,
                                       keep=train.keep_checkpoints, is_chief=is_chief, io_device=io_device)
        if is_chief:  # the chief holds the workdir's lock: what a killed save left there is stale
            remove_temporaries(self.checkpoints.directory)
        self._train_fn = self._make_train_function()
        self._eval_fn = self._make_eval_function()
        self._all_finite = self._make_finite_check()
        self._eval_inputs: dict[str, tf.distribute.DistributedDataset] = {}
        self._sigterm = False
        self._validation: tuple[np.ndarray, np.ndarray] | None = None

    # ---- compiled functions -------------------------------------------------------------------------
    def _stats(self, labels, logits, weights):
        """(loss sum, correct sum, count) of one replica's batch; weights are per example."""
        loss = per_example_loss(labels, logits, self.config.optimizer.label_smoothing)
        correct = correct_predictions(labels, logits)
        weights = tf.broadcast_to(tf.reshape(weights, [-1] + [1] * (len(loss.shape) - 1)), tf.shape(loss))
        return loss * weights, correct * weights, weights
    def _replica_train_step(self, x, y):
        model, optimizer = self.model, self.optimizer
        variables = model.trainable_variables
        micro_batches = self.config.optimizer.accumulation_steps
        grads, totals = None, [0.0, 0.0, 0.0]
        for xs, ys in zip(tf.split(x, micro_batches), tf.split(y, micro_batches)):
            with tf.GradientTape() as tape:
                logits = model(xs, training=True)
                loss_values, correct, count = self._stats(ys, logits, tf.ones(tf.shape(ys)[:1]))
                if self.train_loss is not None:
                    loss_values = self.train_loss(xs, logits, loss_values)
                loss = tf.reduce_sum(loss_values) / self._loss_denominator
                scaled = optimizer.scale_loss(loss)
            step_grads = tape.gradient(scaled, [v.value for v in variables])
            grads = step_grads if grads is None else [g + s for g, s in zip(grads, step_grads)]
            totals = [t + tf.reduce_sum(v) for t, v in zip(totals, (loss_values, correct, count))]
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        clip_norm = self.config.optimizer.clip_norm
        if clip_norm > 0:
            scale = optimizer.loss_scale_factor if optimizer.loss_scale_factor is not None else 1.0
            grads, _ = tf.clip_by_global_norm(grads, clip_norm * scale)
        optimizer.apply(grads, variables)
        return tf.stack(totals)

    def _make_train_function(self):
        step = self._replica_train_step
        if self.config.train.jit_compile:
            step = tf.function(step, jit_compile=True)

        def step_and_vote(x, y, sigterm):
            return tf.concat([step(x, y), [sigterm]], 0)

        @tf.function
        def train(iterator, steps, sigterm):
            """Runs `steps` steps; returns the summed (loss, correct, count), riding on the same all-reduce the
            number of replicas whose worker got a SIGTERM (`sigterm` is this worker's 0 or 1), and the learning
            rate the optimizer applies next (so callbacks need not evaluate the schedule on the host)."""
            totals = tf.zeros([4])
            for _ in tf.range(steps):
                x, y = next(iterator)
                totals += self.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                               self.strategy.run(step_and_vote, (x, y, sigterm)), None)
            return tf.concat([totals, [tf.cast(self.optimizer.learning_rate, tf.float32)]], 0)
        return train

    def _make_eval_function(self):
        def step(x, y, w):
            logits = self.model(x, training=False)
            loss, correct, count = self._stats(y, logits, w)
            sums = tf.stack([tf.reduce_sum(loss), tf.reduce_sum(correct), tf.reduce_sum(count)])
            predictions = tf.argmax(logits, -1, output_type=tf.int32)
            return sums, predictions, y, w

        @tf.function
        def evaluate(batch):
            sums, predictions, labels, weights = self.strategy.run(step, batch)
            gather = lambda t: self.strategy.gather(t, axis=0)
            return (self.strategy.reduce(tf.distribute.ReduceOp.SUM, sums, None),
                    gather(predictions), gather(labels), gather(weights))
        return evaluate

    def _make_finite_check(self):
        """A compiled check that every floating-point model and optimizer variable is finite."""
        variables = [v.value for v in self.model.variables + self.optimizer.variables
                     if keras.backend.is_float_dtype(v.dtype)]
        return tf.function(lambda: tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables]))

    # ---- data ---------------------------------------------------------------------------------------
    def _train_iterator(self, start_step: int):
        """The run's one training iterator, from `start_step` to the last step."""
        def dataset_fn(context):
            return pipeline.train_batches(self.task, global_batch=self.global_batch, seed=self.seed,
                                          start_step=start_step, total_steps=self.total_steps, context=context)
        return iter(self.strategy.distribute_datasets_from_function(dataset_fn))

    def _eval_input(self, split: str) -> tf.distribute.DistributedDataset:
        """The distributed batches of `split`, built once and iterated at every evaluation."""
        if split not in self._eval_inputs:
            # No larger than the split (rounded up to the replicas): the last batch is padded to full size.
            replicas = self.strategy.num_replicas_in_sync
            batch = min(self.config.data.eval_batch_size, -(-self.task.num_examples[split] // replicas) * replicas)

            def dataset_fn(context):
                return pipeline.eval_batches(self.task, split, global_batch=batch, context=context)
            self._eval_inputs[split] = self.strategy.distribute_datasets_from_function(dataset_fn)
        return self._eval_inputs[split]

    def evaluate(self, split: str, callbacks: keras.callbacks.CallbackList | None = None
                 ) -> tuple[Sums, np.ndarray, np.ndarray]:
        """Loss and accuracy sums over every example of `split`, plus labels and predicted classes
        (classifiers; for language models these are per token). `callbacks` get the `on_test_*` hooks, as in
        `fit`'s validation."""
        sums, labels, predictions = Sums(), [], []
        if callbacks is not None:
            callbacks.on_test_begin()
        with self._cluster_errors(f"evaluating {split}"):
            for index, batch in enumerate(self._eval_input(split)):
                if callbacks is not None:
                    callbacks.on_test_batch_begin(index)
                batch_sums, batch_predictions, batch_labels, weights = self._eval_fn(batch)
                sums.add(batch_sums.numpy())
                keep = weights.numpy() > 0
                labels.append(batch_labels.numpy()[keep])
                predictions.append(batch_predictions.numpy()[keep])
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
    def _save(self, callbacks: list, *, complete: bool = False) -> None:
        """Checkpoints the current state; weights that are no longer finite are never saved, so the last
        good checkpoint survives a divergence."""
        step = int(self.optimizer.iterations.numpy())
        if not self._all_finite():
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
        self.checkpoints.save(step, state, arrays)

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
        if not distribute.is_multi_worker(self.strategy):
            return
        @tf.function
        def every_workers_step():
            return self.strategy.gather(self.strategy.run(lambda: tf.constant([step], tf.int64)), axis=0)

        with self._cluster_errors("starting"):
            steps = sorted(set(every_workers_step().numpy().tolist()))
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
        step = int(self.optimizer.iterations.numpy())
        if step:
            print(f"Resuming from step {step} (epoch {step // self.period + 1}, batch {step % self.period}).")
        nonfinite = StopOnNonFiniteLoss()
        callback_list = keras.callbacks.CallbackList(
            [*callbacks, nonfinite], add_history=True, add_progbar=verbose, model=self.model,
            epochs=self.epochs, steps=self.period, verbose=1 if verbose else 0)
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if on_main_thread else None
        try:
            with self._cluster_errors("training"):
                logs = self._run(callback_list, callbacks, nonfinite, step)
        except (Preempted, RunError):
            callback_list.on_train_end()  # flushes the logs of a run that stops early
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
        iterator = self._train_iterator(step)
        for epoch in range(step // self.period, self.epochs):
            start, end = epoch * self.period, min((epoch + 1) * self.period, self.total_steps)
            callback_list.on_epoch_begin(epoch)
            sums = Sums()
            while step < end and not self.model.stop_training:
                n = min(train.steps_per_execution, end - step, self._steps_to_checkpoint(step))
                callback_list.on_train_batch_begin(step - start)
                values = self._train_fn(iterator, tf.constant(n), tf.constant(float(self._sigterm))).numpy()
                sums.add(values[:3])
                step += n
                logs = {**sums.logs(), "learning_rate": float(values[4])}
                callback_list.on_train_batch_end(step - start - 1, logs)
                if nonfinite.bad_step is not None:
                    raise RunError(f"{nonfinite.message} and the last good checkpoint in {self.checkpoints.directory} "
                                   "was kept (lower the learning rate or set --config.optimizer.clip_norm)")
                # A SIGTERM on any worker is seen by all in the vote, and they all save and stop here.
                if values[3] or (self._sigterm and not distribute.is_multi_worker(self.strategy)):
                    self._save(callbacks)
                    raise Preempted(step)
                if self._steps_to_checkpoint(step) == train.checkpoint_every_steps and step < end:
                    self._save(callbacks)
            if step == end and ((epoch + 1) % train.eval_every_epochs == 0 or step == self.total_steps):
                val, labels, predictions = self.evaluate("validation", callback_list)
                self._validation = (labels, predictions)
                logs.update(val.logs("val_"))
            callback_list.on_epoch_end(epoch, logs)
            if self.model.stop_training:
                break
            self._save(callbacks)
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

    @contextlib.contextmanager
    def _cluster_errors(self, doing: str):
        """Turns the errors of collectives aborted by a lost worker into one clear RunError."""
        try:
            yield
        except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError) as err:
            if not distribute.is_multi_worker(self.strategy):
                raise
            raise RunError(
                f"lost contact with another worker while {doing} at step {int(self.optimizer.iterations.numpy())} "
                f"({type(err).__name__}: a worker died, froze or became unreachable; TensorFlow's log above names "
                f"it); rerun every worker with the same command to resume from the last checkpoint") from None


class Preempted(Exception):
    """Training was stopped by SIGTERM after saving a checkpoint at `step`."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step
