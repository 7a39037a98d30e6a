"""The TensorFlow half of kerasbig's loop: `strategy.run` steps inside compiled multi-step calls.

`kerasbig.trainer.Trainer` drives these steps (cadences, callbacks, checkpoints, preemption); this module only
computes them. Why `strategy.run` and our own gradient all-reduce rather than Keras's: Keras clips gradients per
replica before the all-reduce, so global-norm clipping would see only a part of the gradient. The same steps run
on one device, Mirrored, MultiWorkerMirrored and TPU strategies.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import keras
import numpy as np
import tensorflow as tf

from kerasbig import distribute
from kerasbig.data import pipeline
from kerasbig.data.spec import Task
from kerasbig.errors import RunError
from kerasbig.losses import correct_predictions, per_example_loss


def _already_reduced(grads_and_vars):
    return grads_and_vars


class TensorFlowSteps:
    """Compiled train and eval steps of `model` under a tf.distribute `strategy`."""

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, task: Task,
                 strategy: tf.distribute.Strategy, config, *, seed: int, loss_denominator: float, train_loss=None):
        self.model, self.optimizer, self.task, self.strategy = model, optimizer, task, strategy
        self.config, self.seed, self._loss_denominator, self.train_loss = config, seed, loss_denominator, train_loss
        self.replicas = strategy.num_replicas_in_sync
        self.multi_worker = distribute.is_multi_worker(strategy)
        self.accelerated = (isinstance(strategy, tf.distribute.TPUStrategy)
                            or bool(tf.config.list_logical_devices("GPU")))  # strategies take GPUs when there are
        self._one_cpu_replica = self.replicas == 1 and not self.accelerated
        with strategy.scope():
            optimizer.build(model.trainable_variables)
        # We all-reduce gradients ourselves (so clipping sees the global gradient); the optimizer must not
        # sum them a second time.
        getattr(optimizer, "inner_optimizer", optimizer)._all_reduce_sum_gradients = _already_reduced
        self._train_fn = self._make_train_function()
        self._train_trace: tuple[object, tf.types.experimental.ConcreteFunction] | None = None
        self._eval_fn = self._make_eval_function()
        self._all_finite = self._make_finite_check()
        self._eval_iterators: dict[tuple[str, int], Iterator] = {}
        self._argument_tensors: dict[tuple[int, bool], tuple[tf.Tensor, tf.Tensor]] = {}

    # ---- what the loop calls ------------------------------------------------------------------------
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def train_iterator(self, start_step: int, total_steps: int):
        """The run's one training iterator, from `start_step` to `total_steps`. One CPU replica computes its
        batches inside the step (`pipeline.StepBatches`) unless its examples must be loaded."""
        batches = dict(global_batch=self.config.data.batch_size, seed=self.seed)
        if self._one_cpu_replica and self.task.load is None:
            return pipeline.step_batches(self.task, start_step=start_step, **batches)

        def dataset_fn(context):
            return pipeline.train_batches(self.task, start_step=start_step, total_steps=total_steps,
                                          context=context, **batches)
        return self.iterator(dataset_fn)

    def iterator(self, dataset_fn):
        """An iterator over the datasets `dataset_fn(input context)` makes, in the form the steps take."""
        return iter(self.datasets(dataset_fn))

    def datasets(self, dataset_fn):
        """The datasets `dataset_fn(input context)` makes, in the form the steps take. One CPU replica reads its
        dataset directly: the distributed iterator of one replica cost ~0.3 ms a step on this 2-core machine
        (1.60 against 1.31 ms for digits_mlp's step)."""
        if self._one_cpu_replica:
            return dataset_fn(None)
        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def train(self, iterator, steps: int, sigterm: bool) -> np.ndarray:
        """Runs `steps` steps: summed (loss, correct, count), replicas voting SIGTERM, the next learning rate."""
        return self._trace_for(iterator)(iterator, *self._arguments(steps, sigterm)).numpy()

    def _trace_for(self, iterator) -> tf.types.experimental.ConcreteFunction:
        """The train function's trace for `iterator` (the run's one), called directly: tf.function's own
        dispatch, which matches the arguments to a trace on every call, cost ~0.3 ms a call on this 2-core
        machine (digits_mlp's 4-step call: 2.96 ms against 3.27 ms, alternating in one process)."""
        if self._train_trace is None or self._train_trace[0] is not iterator:
            self._train_trace = iterator, self._train_fn.get_concrete_function(iterator, *self._arguments(1, False))
        return self._train_trace[1]

    def train_traces(self) -> int:
        """How many times the train function was traced: once per iterator of batches made in the step."""
        return self._train_fn.experimental_get_tracing_count()

    def _arguments(self, steps: int, sigterm: bool) -> tuple[tf.Tensor, tf.Tensor]:
        """The train function's tensor arguments, made once each: making two costs ~17 us, 1% of a 2 ms step."""
        if (steps, sigterm) not in self._argument_tensors:
            self._argument_tensors[steps, sigterm] = tf.constant(steps), tf.constant(float(sigterm))
        return self._argument_tensors[steps, sigterm]

    def evaluate(self, split: str, batch_size: int):
        """Yields (sums, predictions, labels, weights) as numpy for every global batch of `split`."""
        iterator, complete = self._eval_iterator(split, batch_size), False
        try:
            for _ in range(-(-self.task.num_examples[split] // batch_size)):  # one pass: the last batch padded
                yield tuple(t.numpy() for t in self._eval_fn(next(iterator)))
            complete = True
        finally:
            if not complete:  # a pass cut short would start the next one mid-split
                del self._eval_iterators[split, batch_size]

    def all_finite(self) -> bool:
        return bool(self._all_finite())

    def check_workers_agree(self, step: int) -> list[int]:
        """The distinct steps the workers would resume from (one element when they agree)."""
        if not self.multi_worker:
            return [step]

        @tf.function
        def every_workers_step():
            return self.strategy.gather(self.strategy.run(lambda: tf.constant([step], tf.int64)), axis=0)
        with self.cluster_errors("starting"):
            return sorted(set(every_workers_step().numpy().tolist()))

    @contextlib.contextmanager
    def cluster_errors(self, doing: str):
        """Turns the errors of collectives aborted by a lost worker into one clear RunError."""
        try:
            yield
        except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError) as err:
            if not self.multi_worker:
                raise
            raise RunError(
                f"lost contact with another worker while {doing} at step {self.step()} "
                f"({type(err).__name__}: a worker died, froze or became unreachable; TensorFlow's log above names "
                f"it); rerun every worker with the same command to resume from the last checkpoint") from None

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
        @tf.function
        def train(iterator, steps, sigterm):
            """Runs `steps` steps; returns the summed (loss, correct, count), riding on the same all-reduce the
            number of replicas whose worker got a SIGTERM (`sigterm` is this worker's 0 or 1), and the learning
            rate the optimizer applies next (so callbacks need not evaluate the schedule on the host)."""
            # A compiled step of its own for each trace (one per iterator of `StepBatches`): it captures the rate
            # `_rate_evaluated_once` makes in this trace's graph, which another trace's graph cannot read.
            step = self._replica_train_step
            if self.config.train.jit_compile:
                step = tf.function(step, jit_compile=True)

            def step_and_vote(x, y, sigterm):
                return tf.concat([step(x, y), [sigterm]], 0)

            # One CPU replica's batches are made here: their example indices for all `steps` at once.
            next_batch = (iterator.execution(steps) if isinstance(iterator, pipeline.StepBatches)
                          else functools.partial(next, iterator))
            totals = tf.zeros([4])
            for _ in tf.range(steps):
                x, y = next_batch()
                with self._rate_evaluated_once():
                    totals += self.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                                   self.strategy.run(step_and_vote, (x, y, sigterm)), None)
            return tf.concat([totals, [tf.cast(self.optimizer.learning_rate, tf.float32)]], 0)
        return train

    @contextlib.contextmanager
    def _rate_evaluated_once(self):
        """While one step is traced, the optimizer's learning-rate schedule is evaluated once, here, for the
        whole step: Keras evaluates it again for every weight-decayed variable and for the update, ~20 ops
        each, which a step outside XLA runs one by one (5-10% of digits_mlp's step). On TPU, whose step XLA
        compiles and simplifies itself, the rate is left to Keras rather than captured into the TPU computation
        from outside it."""
        # The private attribute, read and written: Keras has no getter for an installed schedule, and its
        # setter evaluates the schedule (its attribute tracking reads the old value).
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        schedule = optimizer._learning_rate
        if (not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule)
                or isinstance(self.strategy, tf.distribute.TPUStrategy)):
            yield
            return
        rate = schedule(optimizer.iterations)
        optimizer._learning_rate = lambda: rate  # a callable rate: Keras calls it with no argument
        try:
            yield
        finally:
            optimizer._learning_rate = schedule

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

    def _eval_iterator(self, split: str, batch_size: int):
        """One iterator over the distributed batches of `split`, repeated, for every evaluation: making an iterator
        of a distributed dataset takes ~85 ms, most of a validation pass on digits."""
        if (split, batch_size) not in self._eval_iterators:
            def dataset_fn(context):
                return pipeline.eval_batches(self.task, split, global_batch=batch_size, context=context).repeat()
            self._eval_iterators[split, batch_size] = self.iterator(dataset_fn)
        return self._eval_iterators[split, batch_size]

