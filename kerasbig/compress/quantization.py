"""Quantization at export: which of Keras's modes kerasbig writes, checked before training.

Keras quantizes the weights of Dense, EinsumDense, Embedding and ReversibleEmbedding layers, so every builder
has quantized layers (convolutions and recurrent cells stay float). `float8` is left out: it keeps float
weights for training and does not shrink a SavedModel. Calibrated modes (`gptq`, `awq`) need the model's
transformer blocks described to Keras (`quantization_layer_structure`), which kerasbig's builders do not do yet.
"""
from __future__ import annotations

import keras

from kerasbig.errors import UsageError

MODES = ("int8", "int4")
NOT_WRITTEN = {
    "float8": "float8 keeps float weights (it does not shrink the SavedModel)",
    "gptq": "gptq needs the model's blocks described to Keras (quantization_layer_structure), which kerasbig's "
            "builders do not do yet",
    "awq": "awq needs the model's blocks described to Keras (quantization_layer_structure), which kerasbig's "
           "builders do not do yet",
}


def parse_modes(value: str, key: str = "config.export.quantize") -> list[str]:
    """The modes of a comma-separated `value` ('' = none), each one Keras (the installed version) and kerasbig
    can write; raises UsageError naming the first that is not."""
    from keras.src.dtype_policies.dtype_policy import QUANTIZATION_MODES  # what the installed Keras knows

    modes = [mode.strip() for mode in value.split(",") if mode.strip()]
    for mode in modes:
        if mode in NOT_WRITTEN and mode in QUANTIZATION_MODES:
            raise UsageError(f"{key}={value!r}: {NOT_WRITTEN[mode]}; use one of {list(MODES)}")
        if mode not in MODES or mode not in QUANTIZATION_MODES:
            raise UsageError(f"{key}={value!r}: {mode!r} is not a mode Keras {keras.__version__} quantizes to "
                             f"here; use a comma-separated list of {[m for m in MODES if m in QUANTIZATION_MODES]}")
    if len(set(modes)) != len(modes):
        raise UsageError(f"{key}={value!r} names a mode twice")
    return modes


def check_model(model: keras.Model, modes: list[str], key: str = "config.export.quantize") -> None:
    """Refuses modes for a model with no layer Keras quantizes (before training, not at export)."""
    if modes and not any(hasattr(layer, "quantize") and len(list(layer._flatten_layers())) == 1
                         and getattr(layer, "kernel", getattr(layer, "embeddings", None)) is not None
                         for layer in model._flatten_layers(include_self=False)):
        raise UsageError(f"{key}={','.join(modes)}: model {model.name} has no Dense, EinsumDense or Embedding "
                         "layer for Keras to quantize")
