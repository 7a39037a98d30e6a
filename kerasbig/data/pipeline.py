"""tf.data input pipelines for training and evaluation under any tf.distribute strategy, and the same training
batches made inside the compiled step for one CPU replica (`StepBatches`).

Sharding is explicit rather than left to tf.data's auto-shard (which would shard in-memory data by FILE and
fail): every input pipeline builds the same globally shuffled stream of *global* batches and keeps only its own
slice of every batch (the DATA policy, batch by batch), then splits that slice into per-replica batches. So each
step trains on the same global batch whatever the number of replicas and workers, which is what makes one
device, MirroredStrategy and MultiWorkerMirroredStrategy agree, and a resumed run replay the same data. The cost
is that every worker reads the whole stream: right for the in-memory datasets here; for a large file-based
dataset, shard its files instead.
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from kerasbig.data.spec import Task
from kerasbig.data.windows import SEED_PAD


def _local_batch(task: Task, global_batch: int, context: tf.distribute.InputContext | None):
    """(prepare, replicas): `prepare(x, *rest)` keeps this input pipeline's slice of a global batch and
    preprocesses it, as one [replicas, per-replica batch, ...] block when this pipeline feeds several local
    replicas. The slice sizes are Python ints, so shapes stay static (as TPUs need)."""
    pipelines = context.num_input_pipelines if context else 1
    here = (context.num_replicas_in_sync if context else 1) // pipelines
    per_pipeline = global_batch // pipelines
    start = (context.input_pipeline_id if context else 0) * per_pipeline

    def per_replica(t):
        return tf.reshape(t, tf.concat([[here, per_pipeline // here], tf.shape(t)[1:]], 0)) if here > 1 else t

    def prepare(x, *rest):
        if pipelines > 1:
            x, *rest = (tf.nest.map_structure(lambda t: t[start:start + per_pipeline], t) for t in (x, *rest))
        return tuple(tf.nest.map_structure(per_replica, t) for t in (task.preprocess(x), *rest))

    return prepare, here


def _replica_elements(batches: tf.data.Dataset, replicas: int) -> tf.data.Dataset:
    """The local batches as one element per local replica, in replica order, prefetched."""
    return (batches.unbatch() if replicas > 1 else batches).prefetch(tf.data.AUTOTUNE)


def train_batches(task: Task, *, global_batch: int, seed: int, start_step: int, total_steps: int,
                  context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """The run's training batches from `start_step` to `total_steps`, one stream across epochs.

    Example k of the run (counting from step 0) is example `index_shuffle(k mod m)` of epoch k // m, a
    permutation seeded by (seed, epoch) of which each epoch uses the first m = steps_per_epoch * global_batch
    (the last partial batch is dropped). So a resumed run computes where it is instead of replaying or skipping
    batches, and stored examples are loaded (decoded) and augmented only for the steps that run. Augmentation
    takes the global batch of step s with the stateless seed (seed, s), so every replica and every resume sees
    the same augmented batch. The stored examples are held in memory, which is why they must be light (see
    `Task.load`).
    """
    shuffled, pick, finish, replicas = _train_stages(task, global_batch=global_batch, seed=seed, context=context)
    steps = tf.data.Dataset.range(start_step, total_steps)
    picked = lambda step: pick(shuffled(step, 1)[0])
    if task.load is None:  # a batch's whole work in one map: each tf.data stage costs tens of us of CPU a batch
        batches = steps.map(lambda step: finish(step, picked(step)), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        loaded = steps.map(picked).unbatch().map(task.load, num_parallel_calls=tf.data.AUTOTUNE).batch(
            global_batch, drop_remainder=True)
        batches = tf.data.Dataset.zip(steps, loaded).map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    return _replica_elements(batches, replicas)


class StepBatches:
    """The batches of `train_batches` (one replica, no `Task.load`) made inside the compiled train step.

    `next()`, traced into the step, advances a step counter and returns the batch of that step, so no tf.data
    element is made per step. On a CPU, tf.data's work for a batch (~150-250 us) runs on the same cores as the
    step and slows it: 5-9% of digits' steps on 2 cores (`bench --suite=cpu`, "input wait"). A compiled call of
    several steps takes its `next` from `execution(steps)`, which draws the example indices of all its steps in
    one index shuffle, off the chain of ops from each step's counter to the model's input. digits_cnn, 4 steps a
    call, alternating in one process: 5.71 and 5.80 ms a step against 6.04 and 6.01 ms with a shuffle per step
    (one batch cached: 5.73 and 5.72 ms); digits_mlp's ~0.77 ms step is level either way. Like a dataset's
    iterator, it can be advanced eagerly too.
    """

    def __init__(self, shuffled: Callable[[tf.Tensor, int | tf.Tensor], tf.Tensor],
                 batch_of: Callable[[tf.Tensor, tf.Tensor], tuple], start_step: int):
        """`shuffled(first_step, steps)`: the example indices of those steps' batches, [steps, global batch];
        `batch_of(step, indices)`: the batch of `step` from its example indices."""
        self._shuffled, self._batch_of = shuffled, batch_of
        self.next_step = tf.Variable(start_step, dtype=tf.int64, trainable=False)

    def __iter__(self) -> StepBatches:
        return self

    def __next__(self) -> tuple:
        return self.execution(1)()

    def execution(self, steps: int | tf.Tensor) -> Callable[[], tuple]:
        """`next` for the following `steps` steps (no more), their example indices drawn at once."""
        first = self.next_step.read_value()
        indices = self._shuffled(first, steps)

        def next_batch() -> tuple:
            step = self.next_step.assign_add(1) - 1
            return self._batch_of(step, tf.gather(indices, step - first))  # one op; a slice takes four
        return next_batch


def step_batches(task: Task, *, global_batch: int, seed: int, start_step: int) -> StepBatches:
    """The run's training batches from `start_step` on, as `train_batches` makes them for one replica,
    computed inside the step (`StepBatches`). Only for stored examples that need no `Task.load`."""
    assert task.load is None, "examples that are loaded (decoded) take the tf.data pipeline, `train_batches`"
    shuffled, pick, finish, _ = _train_stages(task, global_batch=global_batch, seed=seed, context=None)
    return StepBatches(shuffled, lambda step, indices: finish(step, pick(indices)), start_step)


def _train_stages(task: Task, *, global_batch: int, seed: int, context: tf.distribute.InputContext | None):
    """(shuffled, pick, finish, replicas): `shuffled(first_step, steps)` are the indices of the stored examples in
    the global batches of `steps` steps from `first_step`, [steps, global_batch]; `pick(indices)` gathers those
    examples; `finish(step, batch)` augments `step`'s global batch and makes it this pipeline's, for `replicas`
    local replicas (see `train_batches`)."""
    n = task.num_examples["train"]
    used = steps_per_epoch(task, global_batch) * global_batch
    stored = next(iter(task.train.batch(n)))  # every stored example, each field a tensor of n rows
    prepare, replicas = _local_batch(task, global_batch, context)

    def shuffled(first_step, steps):
        """Example k of the run is `index_shuffle(k mod used)` of epoch k // used: a batch never straddles two.
        The raw op, since `index_shuffle` cannot take a seed per index (it pads an [n, 2] seed's first axis)."""
        counters = first_step * global_batch + tf.range(steps * global_batch, dtype=tf.int64)
        fill = lambda value: tf.fill(tf.shape(counters), tf.constant(value, tf.int64))
        indices = tf.raw_ops.RandomIndexShuffle(index=counters % used, seed=tf.stack(
            [fill(SEED_PAD), fill(seed), counters // used], axis=1), max_index=tf.constant(n - 1, tf.int64), rounds=4)
        return tf.reshape(indices, [steps, global_batch])  # a static batch size, as the model's input needs

    def pick(indices):
        return tf.nest.map_structure(lambda t: tf.gather(t, indices), stored)

    def finish(step, batch):
        """Augments a loaded global batch (the whole batch at once, seeded by its step) and makes it local."""
        x, *rest = batch
        if task.augment is not None:
            x = task.augment(x, tf.stack([tf.cast(seed, tf.int64), step]))
        return prepare(x, *rest)

    return shuffled, pick, finish, replicas


def eval_batches(task: Task, split: str, *, global_batch: int,
                 context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """Every example of `split` once, as (x, y, weight); the last batch is filled with weight-0 copies so
    all replicas get equal batches and the weighted metrics are exact."""
    examples = task.examples(split).map(lambda x, y: (x, y, tf.constant(1.0)))
    padding = (-task.num_examples[split]) % global_batch
    filler = examples.take(1).map(lambda x, y, w: (x, y, tf.constant(0.0))).repeat(padding)
    batches = examples.concatenate(filler).batch(global_batch, drop_remainder=True)
    prepare, replicas = _local_batch(task, global_batch, context)
    return _replica_elements(batches.map(prepare, num_parallel_calls=tf.data.AUTOTUNE), replicas)


def steps_per_epoch(task: Task, global_batch: int) -> int:
    return task.num_examples["train"] // global_batch
