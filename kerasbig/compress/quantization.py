"""Quantization at export: which of Keras's modes kerasbig writes, checked before training.

Keras quantizes the weights of Dense, EinsumDense, Embedding and ReversibleEmbedding layers, so every builder
has quantized layers (convolutions and recurrent cells stay float). `float8` is left out: it keeps float
weights for training and does not shrink a SavedModel. Calibrated modes (`gptq`, `awq`) need the model's
transformer blocks described to Keras (`quantization_layer_structure`), which kerasbig's builders do not do yet.

Quantization-aware fine-tuning (`config.compress.quantize_training=int8`) quantizes the model before training.
Keras's int8 layers hold their kernels as non-trainable int8 values and scales, differentiable with respect to
their inputs only: the fine-tuning trains what stays float (biases, normalisations, convolutions and recurrent
cells) around the frozen int8 kernels, and the export writes the int8 model as it was trained and tested.
"""
from __future__ import annotations

import warnings

import keras

from kerasbig.errors import UsageError

MODES = ("int8", "int4")
TRAINING_MODES = ("int8",)
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
    if modes and not any(type(layer).quantize is not keras.layers.Layer.quantize  # the base class refuses
                         for layer in model._flatten_layers(include_self=False)):
        raise UsageError(f"{key}={','.join(modes)}: model {model.name} has no Dense, EinsumDense or Embedding "
                         "layer for Keras to quantize")


def check_training(config) -> None:
    """Refuses a `config.compress.quantize_training` that kerasbig cannot fine-tune (a config check, before the
    model is built)."""
    mode, key = config.compress.quantize_training, "config.compress.quantize_training"
    if not mode:
        return
    if mode not in TRAINING_MODES:
        raise UsageError(f"{key}={mode!r} is not a mode kerasbig fine-tunes; use one of {list(TRAINING_MODES)} "
                         "or '' (train in float)")
    prune = config.compress.prune
    if prune.sparsity or prune.structured:
        raise UsageError(f"{key}={mode} freezes the kernels that config.compress.prune would prune; prune in float "
                         f"and export with config.export.quantize={mode} instead")
    if config.export.quantize:
        raise UsageError(f"{key}={mode} exports the {mode} model itself; leave "
                         f"config.export.quantize={config.export.quantize!r} empty")
    if config.model.get("lora_rank"):
        raise UsageError(f"{key}={mode} and config.model.lora_rank={config.model.lora_rank}: the adapters would be "
                         "merged into float kernels at export; use one or the other")


def quantize(model: keras.Model, mode: str) -> None:
    """Keras's weight quantization of `model` in place (its Dense, EinsumDense and Embedding layers)."""
    with warnings.catch_warnings():  # Keras warns for every layer without weights to quantize (Dropout, ...)
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        model.quantize(mode)


def quantize_for_training(model: keras.Model, mode: str) -> None:
    """Quantizes a built `model` before training; raises UsageError if it has no layer Keras quantizes."""
    check_model(model, [mode], key="config.compress.quantize_training")
    quantize(model, mode)
