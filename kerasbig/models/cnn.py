"""Small convolutional classifier, a `keras.Sequential` of conv blocks and a dense head."""
from __future__ import annotations

import keras

from kerasbig.data.spec import DataSpec


def build_cnn(spec: DataSpec, *, filters: tuple[int, ...] = (32, 64), kernel_size: int = 3, dense: int = 128,
              dropout: float = 0.3, batch_norm: bool = True) -> keras.Model:
    """[Conv -> (BatchNorm) -> ReLU -> Conv -> ReLU -> MaxPool] per entry of `filters`, then Dense -> logits.

    Pooling halves the image per block, so `len(filters)` is bounded by log2 of the image side.

    >>> from kerasbig.data.spec import DataSpec
    >>> spec = DataSpec("classification", "image", (8, 8, 1), "float32", 10)
    >>> build_cnn(spec, filters=(8, 16)).output_shape
    (None, 10)
    """
    layers = [keras.Input(spec.input_shape, dtype=spec.input_dtype)]
    for i, width in enumerate(filters):  # named layers: stable variable paths, the checkpoint's keys
        layers.append(keras.layers.Conv2D(width, kernel_size, padding="same", use_bias=not batch_norm,
                                          name=f"block_{i}_conv_1"))
        if batch_norm:
            layers.append(keras.layers.BatchNormalization(name=f"block_{i}_bn"))
        layers += [
            keras.layers.Activation("relu"),
            keras.layers.Conv2D(width, kernel_size, padding="same", activation="relu", name=f"block_{i}_conv_2"),
            keras.layers.MaxPooling2D(),
        ]
    layers += [
        keras.layers.Flatten(),
        keras.layers.Dropout(dropout),
        keras.layers.Dense(dense, activation="relu", name="dense"),
        keras.layers.Dropout(dropout),
        keras.layers.Dense(spec.num_classes, dtype="float32", name="logits"),
    ]
    return keras.Sequential(layers, name="cnn")
