"""Multi-layer perceptron classifier, a `keras.Sequential` stack of Dense layers."""
from __future__ import annotations

import keras

from kerasbig.data.spec import DataSpec


def build_mlp(spec: DataSpec, *, hidden: tuple[int, ...] = (256, 128), dropout: float = 0.2,
              activation: str = "relu") -> keras.Model:
    """Flatten -> [Dense -> Dropout] * len(hidden) -> Dense logits.

    >>> from kerasbig.data.spec import DataSpec
    >>> spec = DataSpec("classification", "image", (8, 8, 1), "float32", 10)
    >>> build_mlp(spec, hidden=(32,)).output_shape
    (None, 10)
    """
    layers = [keras.Input(spec.input_shape, dtype=spec.input_dtype), keras.layers.Flatten()]
    for i, width in enumerate(hidden):  # named layers: stable variable paths, the checkpoint's keys
        layers += [keras.layers.Dense(width, activation=activation, name=f"dense_{i}"), keras.layers.Dropout(dropout)]
    layers.append(keras.layers.Dense(spec.num_classes, dtype="float32", name="logits"))
    return keras.Sequential(layers, name="mlp")
