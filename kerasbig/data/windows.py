"""A language model's token windows as numpy batches: the JAX path's input, which needs no TensorFlow.

A split is one token stream cut into windows of seq_len + 1 tokens that overlap by one (window i is tokens
[i * seq_len, (i + 1) * seq_len]): inputs are its first seq_len tokens, labels its last seq_len. `train_batches`
yields the global batches of `kerasbig.data.pipeline.train_batches` in the same order (example k of the run is
window `index_shuffle(k mod m)` of epoch k // m, with TensorFlow's own permutation reproduced bit for bit), so
a JAX run sees the same data whichever reader feeds it, and resumes at any step by computing where it is.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import numpy as np

# tf.random.experimental.index_shuffle pads a [2] seed to the [3] key of its kernel with this constant.
SEED_PAD = 498247692
_MIN_BLOCK_BITS = 16  # the kernel's smallest Simon block


def index_shuffle(index: np.ndarray, seed: tuple[int, int], max_index: int) -> np.ndarray:
    """The positions of `index` in a pseudorandom permutation of [0, max_index] fixed by `seed`: exactly what
    `tf.random.experimental.index_shuffle(index, seed, max_index)` returns (a 4-round Simon cipher over the
    smallest even block of at least 16 bits that holds max_index, cycle-walked into range).

    >>> index_shuffle(np.arange(4), (5, 9), 3).tolist()
    [2, 0, 1, 3]
    """
    index = np.asarray(index, np.uint64)
    if max_index == 0:
        return np.zeros(index.shape, np.int64)
    bits = math.ceil(math.log2(max_index))
    word = max(bits + bits % 2, _MIN_BLOCK_BITS) // 2
    mask, width = np.uint64((1 << word) - 1), np.uint64(word)

    def rotate_left(x, r):
        return ((x << np.uint64(r)) | (x >> (width - np.uint64(r)))) & mask

    def rotate_right(x, r):
        return ((x >> np.uint64(r)) | (x << (width - np.uint64(r)))) & mask

    def simon(x):
        return (rotate_left(x, 1) & rotate_left(x, 8)) ^ rotate_left(x, 2)

    keys = [np.uint64(k & 0xFFFFFFFF) & mask for k in (SEED_PAD, int(seed[0]), int(seed[1]))]
    constant, z = np.uint64(0xFFFFFFFC) & mask, np.uint64(0x7369F885192C0EF5) & mask
    keys.append(constant ^ (z & np.uint64(1)) ^ keys[0] ^ rotate_right(keys[2], 3) ^ rotate_right(keys[2], 4))
    out, walking = index.copy(), np.ones(index.shape, bool)
    while walking.any():  # cycle walking: encrypt again until the value is in range
        left, right = (out >> width) & mask, out & mask
        for k1, k2 in ((keys[0], keys[1]), (keys[2], keys[3])):
            left = left ^ simon(right) ^ k1
            right = right ^ simon(left) ^ k2
        out = np.where(walking, (left << width) | right, out)
        walking = out > np.uint64(max_index)
    return out.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class TokenWindows:
    """The splits of a language-model task as token streams: `read(split, start, count)` gives tokens
    [start, start + count) of `split` as int32; `counts[split]` is its number of windows."""

    read: Callable[[str, int, int], np.ndarray]
    counts: dict[str, int]
    seq_len: int

    def batch(self, split: str, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) [len(indices), seq_len] of the windows `indices` of `split`."""
        tokens = np.stack([self.read(split, int(i) * self.seq_len, self.seq_len + 1) for i in indices])
        return tokens[:, :-1], tokens[:, 1:]


def in_memory(tokens: dict[str, np.ndarray], seq_len: int) -> TokenWindows:
    """Windows over whole token arrays held in memory, one per split."""
    return TokenWindows(read=lambda split, start, count: tokens[split][start:start + count],
                        counts={split: (len(ids) - 1) // seq_len for split, ids in tokens.items()}, seq_len=seq_len)


def train_batches(windows: TokenWindows, *, global_batch: int, seed: int, start_step: int,
                  total_steps: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The run's global training batches from `start_step` to `total_steps`, in `pipeline.train_batches`'s order
    (the last partial batch of each epoch is dropped)."""
    n = windows.counts["train"]
    used = n // global_batch * global_batch
    for step in range(start_step, total_steps):
        counters = np.arange(step * global_batch, (step + 1) * global_batch, dtype=np.int64)
        epoch = int(counters[0]) // used
        yield windows.batch("train", index_shuffle(counters % used, (seed, epoch), n - 1))


def eval_batches(windows: TokenWindows, split: str, *, global_batch: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every window of `split` once, in order, as (inputs, labels, weights); the last batch is filled with
    weight-0 copies of the first window, as `pipeline.eval_batches` does."""
    n = windows.counts[split]
    for start in range(0, n, global_batch):
        indices = np.arange(start, start + global_batch)
        weights = (indices < n).astype(np.float32)
        yield (*windows.batch(split, np.where(indices < n, indices, 0)), weights)
