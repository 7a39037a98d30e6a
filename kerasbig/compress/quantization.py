"""Quantization at export: which of Keras's modes kerasbig writes, checked before training.

Keras quantizes the weights of Dense, EinsumDense, Embedding and ReversibleEmbedding layers, so every builder
has quantized layers (convolutions and recurrent cells stay float). `float8` is left out: it keeps float
weights for training and does not shrink a SavedModel.

`gptq` (Keras's GPTQ, 4-bit weights in groups of 128) is calibrated on token batches of the training split: Keras
runs them through the model's pre-block layers, then quantizes its transformer blocks one after another, each on
the outputs of the blocks already quantized (`quantization_layer_structure`). kerasbig describes that structure
for its decoder language models (`gpt`, `llama`: STRUCTURES); only their blocks' Dense layers are quantized, the
embeddings, final norm and tied head stay float. `awq` needs the same structure and is not written yet.

Quantization-aware fine-tuning (`config.compress.quantize_training=int8`) quantizes the model before training.
Keras's int8 layers hold their kernels as non-trainable int8 values and scales, differentiable with respect to
their inputs only: the fine-tuning trains what stays float (biases, normalisations, convolutions and recurrent
cells) around the frozen int8 kernels, and the export writes the int8 model as it was trained and tested.
"""
from __future__ import annotations

import warnings

import keras
import numpy as np

from kerasbig.data.spec import Task
from kerasbig.errors import UsageError
from kerasbig.models.gpt import Block
from kerasbig.models.llama import LlamaBlock

BLOCK_TYPES = (Block, LlamaBlock)

MODES = ("int8", "int4", "gptq")
CALIBRATED = ("gptq",)
TRAINING_MODES = ("int8",)
NOT_WRITTEN = {
    "float8": "float8 keeps float weights (it does not shrink the SavedModel)",
    "awq": "awq is not written by kerasbig yet (gptq is the calibrated mode it writes)",
}
# Decoder language models whose blocks Keras's GPTQ can take, by model name: the layers that turn token ids into
# the first block's input, in order; the blocks are the model's layers of BLOCK_TYPES.
STRUCTURES = {"gpt": ("token_embedding", "position_embedding"), "llama": ("token_embedding",)}
# Training examples GPTQ accumulates each layer's Hessian over: 4,096 tokens at seq_len 128, many more rows than
# a block's widest input. Keras runs them one at a time, eagerly, so more cost minutes at export.
CALIBRATION_EXAMPLES = 32


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
    """Refuses modes for a model with no layer Keras quantizes, and calibrated ones for a model without the
    block structure they need (before training, not at export)."""
    if modes and not any(type(layer).quantize is not keras.layers.Layer.quantize  # the base class refuses
                         for layer in model._flatten_layers(include_self=False)):
        raise UsageError(f"{key}={','.join(modes)}: model {model.name} has no Dense, EinsumDense or Embedding "
                         "layer for Keras to quantize")
    for mode in set(modes) & set(CALIBRATED):
        if model.name not in STRUCTURES:
            raise UsageError(f"{key}={','.join(modes)}: {mode} calibrates the transformer blocks of a decoder "
                             f"language model ({', '.join(STRUCTURES)}), which model {model.name} is not; use "
                             f"{[m for m in MODES if m not in CALIBRATED]}")


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


def quantize(model: keras.Model, mode: str, task: Task | None = None) -> None:
    """Keras's weight quantization of `model` in place (its Dense, EinsumDense and Embedding layers); a
    calibrated mode calibrates on the training split of `task`."""
    with warnings.catch_warnings():  # Keras warns for every layer without weights to quantize (Dropout, ...)
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        if mode == "gptq":
            _gptq(model, task)
        else:
            model.quantize(mode)


class TokenIds:
    """The `tokenizer` Keras's GPTQConfig requires: the calibration data is token ids already (Keras calls
    `tokenize` on strings only), so it hands ids back unchanged and refuses text."""

    def tokenize(self, ids):
        if isinstance(ids, (str, bytes)):
            raise TypeError("kerasbig calibrates on token ids; it has no text to tokenize")
        return np.asarray(ids, "int32")


def calibration_tokens(task: Task, count: int = CALIBRATION_EXAMPLES) -> np.ndarray:
    """[count, seq_len] int32 token ids: the model inputs of the first `count` training examples."""
    batch = next(iter(task.examples("train").batch(count)))[0]
    return np.asarray(task.preprocess(batch), "int32")


def _gptq(model: keras.Model, task: Task) -> None:
    """Keras's GPTQ of a gpt or llama `model`, its blocks calibrated one after another on training tokens."""
    blocks = [layer for layer in model.layers if isinstance(layer, BLOCK_TYPES)]
    inside = {id(layer) for block in blocks for layer in block._flatten_layers()}
    tokens = calibration_tokens(task)
    config = keras.quantizers.GPTQConfig(
        dataset=tokens, tokenizer=TokenIds(), weight_bits=4, num_samples=len(tokens),
        sequence_length=tokens.shape[1], quantization_layer_structure={
            "pre_block_layers": [model.get_layer(name) for name in STRUCTURES[model.name]],
            "sequential_blocks": blocks})
    # Only the blocks' layers: the others would get GPTQ's variables without ever being calibrated.
    model.quantize("gptq", config=config, filters=lambda layer: id(layer) in inside)


def quantize_for_training(model: keras.Model, mode: str) -> None:
    """Quantizes a built `model` before training; raises UsageError if it has no layer Keras quantizes."""
    check_model(model, [mode], key="config.compress.quantize_training")
    quantize(model, mode)
