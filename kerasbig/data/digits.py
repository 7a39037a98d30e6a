"""scikit-learn's 1,797 real 8x8 handwritten digits: embedded data that needs no download."""
from __future__ import annotations

import numpy as np
import sklearn.datasets
import sklearn.model_selection
import tensorflow as tf

from kerasbig.data.augment import random_shifts
from kerasbig.data.spec import CLASSIFICATION, DataSpec, Task

MAX_PIXEL = 16.0  # the raw scale of the digits' pixels


def split_indices(labels: np.ndarray, *, test_fraction: float, validation_fraction: float,
                  seed: int) -> dict[str, np.ndarray]:
    """A stratified train/validation/test split; the same seed always gives the same split."""
    everything = np.arange(len(labels))
    rest, test = sklearn.model_selection.train_test_split(
        everything, test_size=test_fraction, stratify=labels, random_state=seed)
    train, validation = sklearn.model_selection.train_test_split(
        rest, test_size=validation_fraction / (1 - test_fraction), stratify=labels[rest], random_state=seed + 1)
    return {"train": np.sort(train), "validation": np.sort(validation), "test": np.sort(test)}


def preprocess(images: tf.Tensor) -> tf.Tensor:
    """Raw 0-16 pixels [batch, 8, 8] -> model input in [0, 1], [batch, 8, 8, 1]."""
    return tf.cast(images, tf.float32)[..., None] / MAX_PIXEL


def shift(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Light augmentation: move each digit of the batch by up to one pixel each way (stateless, so it replays on
    resume)."""
    return random_shifts(images, 1, seed)


def load_digits(*, test_fraction: float = 0.2, validation_fraction: float = 0.1, augment: bool = True,
                seed: int = 0) -> Task:
    """The digits as a Task: raw 0-16 float32 images of shape (8, 8) and int32 labels 0-9."""
    images, labels = sklearn.datasets.load_digits(return_X_y=True)
    images = images.reshape(-1, 8, 8).astype(np.float32)
    labels = labels.astype(np.int32)
    splits = split_indices(labels, test_fraction=test_fraction, validation_fraction=validation_fraction, seed=seed)
    return Task(
        spec=DataSpec(CLASSIFICATION, "image", (8, 8, 1), "float32", 10, tuple(str(d) for d in range(10))),
        **{name: tf.data.Dataset.from_tensor_slices((images[idx], labels[idx])) for name, idx in splits.items()},
        num_examples={name: len(idx) for name, idx in splits.items()},
        serving_input=tf.TensorSpec([None, 8, 8], tf.float32, name="image"),
        preprocess=preprocess,
        augment=shift if augment else None,
    )
