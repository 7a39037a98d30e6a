"""Batched, stateless augmentations: one seed per global batch draws each example's own change in a few
vectorized ops. A map per example costs more input CPU than a small model's whole step."""
from __future__ import annotations

import tensorflow as tf


def random_shifts(images: tf.Tensor, pad: int, seed: tf.Tensor, *, mode: str = "CONSTANT") -> tf.Tensor:
    """Each image of the batch `[batch, height, width, ...]` moved by up to `pad` pixels each way, the uncovered
    edge filled as `tf.pad`'s `mode` fills it."""
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad]] + [[0, 0]] * (images.shape.rank - 3), mode=mode)
    corners = tf.random.stateless_uniform([tf.shape(images)[0], 2], seed, maxval=2 * pad + 1, dtype=tf.int32)
    rows = tf.gather(padded, corners[:, :1] + tf.range(height), axis=1, batch_dims=1)
    return tf.gather(rows, corners[:, 1:] + tf.range(width), axis=2, batch_dims=1)


def random_flips_left_right(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Each image of the batch `[batch, height, width, ...]` mirrored with probability 1/2."""
    flip = tf.random.stateless_uniform(tf.shape(images)[:1], seed) < 0.5
    flip = tf.reshape(flip, [-1] + [1] * (images.shape.rank - 1))
    return tf.where(flip, tf.reverse(images, [2]), images)
