"""tf.data input pipelines for training and evaluation under any tf.distribute strategy.

Sharding is explicit rather than left to tf.data's auto-shard: each input pipeline builds the same globally
shuffled stream of *global* batches and keeps only its own slice of every batch, then splits that slice into
per-replica batches. So replica r of any strategy sees exactly the examples it would see with any other
replica count, which is what makes one device, MirroredStrategy and MultiWorkerMirroredStrategy agree.
"""
from __future__ import annotations

import tensorflow as tf

from kerasbig.data.spec import Task


def _split_for_pipeline(batch, context: tf.distribute.InputContext | None):
    """Keeps this pipeline's slice of a global batch and reshapes it to [replicas_here, per_replica, ...]."""
    pipelines = context.num_input_pipelines if context else 1
    replicas = context.num_replicas_in_sync if context else 1
    here = replicas // pipelines
    pipeline_id = context.input_pipeline_id if context else 0

    def split(t):
        per_pipeline = tf.shape(t)[0] // pipelines
        mine = t[pipeline_id * per_pipeline:(pipeline_id + 1) * per_pipeline]
        return tf.reshape(mine, tf.concat([[here, per_pipeline // here], tf.shape(t)[1:]], 0))

    return tf.nest.map_structure(split, batch)


def _distribute(batches: tf.data.Dataset, task: Task, context) -> tf.data.Dataset:
    def prepare(x, *rest):
        return (task.preprocess(x), *rest)

    batches = batches.map(lambda *b: _split_for_pipeline(prepare(*b), context), num_parallel_calls=tf.data.AUTOTUNE)
    return batches.unbatch().prefetch(tf.data.AUTOTUNE)  # one element per local replica, in replica order


def train_batches(task: Task, *, global_batch: int, epoch: int, seed: int, skip_batches: int = 0,
                  context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """One epoch of training batches, shuffled by (seed, epoch): rebuilding it replays the epoch exactly,
    so a resumed run skips the batches it has done and continues with the same data."""
    n = task.num_examples["train"]
    examples = task.train.enumerate().shuffle(n, seed=seed * 100_003 + epoch, reshuffle_each_iteration=False)
    if task.augment is not None:
        def augment(index, example):
            x, y = example
            return task.augment(x, tf.stack([tf.cast(seed, tf.int64), epoch * n + index])), y
        examples = examples.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        examples = examples.map(lambda index, example: example)
    batches = examples.batch(global_batch, drop_remainder=True).skip(skip_batches)
    return _distribute(batches, task, context)


def eval_batches(task: Task, split: str, *, global_batch: int,
                 context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """Every example of `split` once, as (x, y, weight); the last batch is filled with weight-0 copies so
    all replicas get equal batches and the weighted metrics are exact."""
    examples = getattr(task, split).map(lambda x, y: (x, y, tf.constant(1.0)))
    padding = (-task.num_examples[split]) % global_batch
    filler = examples.take(1).map(lambda x, y, w: (x, y, tf.constant(0.0))).repeat(padding)
    batches = examples.concatenate(filler).batch(global_batch, drop_remainder=True)
    return _distribute(batches, task, context)


def steps_per_epoch(task: Task, global_batch: int) -> int:
    return task.num_examples["train"] // global_batch
