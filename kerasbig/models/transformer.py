"""Transformer encoder classifier over token ids, and the learned position embedding GPT shares.

    tokens -> token embeddings [-> patches of `patch_size` tokens] + position embeddings
           -> depth x pre-LayerNorm encoder block -> LayerNorm -> pool -> logits

Token id 0 is padding: padded positions are neither attended to nor pooled. With `patch_size` p > 1, each run
of p token embeddings is concatenated and projected to one position (byte n-grams as units): attention
then costs p^2 less and the rest p less, which is what makes byte-level classification affordable on a CPU.
"""
from __future__ import annotations

import keras
from keras import ops

from kerasbig.data.spec import CLASSIFICATION, DataSpec
from kerasbig.errors import UsageError

POOLINGS = ("mean", "max")


@keras.saving.register_keras_serializable(package="kerasbig")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per position to [batch, length, width] inputs; `start` offsets the positions.

    >>> tuple(PositionEmbedding(8)(keras.ops.zeros((2, 5, 4))).shape)
    (2, 5, 4)
    """

    def __init__(self, max_length: int, *, initializer="uniform", **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        self.embeddings = self.add_weight(shape=(self.max_length, input_shape[-1]), initializer=self.initializer,
                                          name="embeddings")

    def call(self, x, start=0):
        length, width = ops.shape(x)[1], ops.shape(x)[2]
        table = ops.convert_to_tensor(self.embeddings)  # a variable is no array inside JAX shape inference
        return x + ops.cast(ops.slice(table, (start, 0), (length, width)), x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape  # JAX cannot infer it through a slice of unknown length

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length,
                "initializer": keras.initializers.serialize(self.initializer)}


def _encoder_block(x, attention_mask, *, heads: int, mlp_ratio: int, dropout: float, name: str):
    """x + attention(ln_1(x)), then x + mlp(ln_2(x)) with a GELU MLP."""
    width = x.shape[-1]
    h = keras.layers.LayerNormalization(name=f"{name}_ln_1")(x)
    h = keras.layers.MultiHeadAttention(heads, width // heads, dropout=dropout, name=f"{name}_attn")(
        h, h, attention_mask=attention_mask)
    x = x + keras.layers.Dropout(dropout)(h)
    h = keras.layers.LayerNormalization(name=f"{name}_ln_2")(x)
    h = keras.layers.Dense(mlp_ratio * width, activation="gelu", name=f"{name}_mlp_fc")(h)
    h = keras.layers.Dense(width, name=f"{name}_mlp_proj")(h)
    return x + keras.layers.Dropout(dropout)(h)


def check_attention_sizes(family: str, *, width: int, heads: int, dropout: float, **sizes: int) -> None:
    """What every attention model needs: positive sizes, a width that divides into heads, dropout in [0, 1)."""
    sizes = {"width": width, "heads": heads, **sizes}
    if min(sizes.values()) < 1:
        raise UsageError(f"{family} {', '.join(sizes)} must be positive, got {', '.join(map(str, sizes.values()))}")
    if width % heads:
        raise UsageError(f"{family} width={width} must be divisible by heads={heads}")
    if not 0 <= dropout < 1:
        raise UsageError(f"{family} dropout={dropout} must be in [0, 1)")


def _check(spec: DataSpec, vocab_size: int, width: int, depth: int, heads: int, mlp_ratio: int,
           dropout: float, pooling: str, patch_size: int) -> None:
    if spec.kind != CLASSIFICATION or len(spec.input_shape) != 1:
        raise UsageError(f"transformer classifies token sequences; the data is {spec.kind!r} with input shape "
                         f"{spec.input_shape} (use gpt for language models)")
    check_attention_sizes("transformer", width=width, heads=heads, dropout=dropout, vocab_size=vocab_size,
                          depth=depth, mlp_ratio=mlp_ratio)
    if pooling not in POOLINGS:
        raise UsageError(f"transformer pooling={pooling!r} is not one of {POOLINGS}")
    if patch_size < 1 or spec.seq_len % patch_size:
        raise UsageError(f"transformer patch_size={patch_size} must be positive and divide the sequence length "
                         f"{spec.seq_len}")


def build_transformer(spec: DataSpec, *, vocab_size: int = 256, width: int = 128, depth: int = 2, heads: int = 4,
                      mlp_ratio: int = 4, dropout: float = 0.1, pooling: str = "mean",
                      patch_size: int = 1) -> keras.Model:
    """A pre-LayerNorm transformer encoder classifying sequences of token ids below `vocab_size`.

    >>> from kerasbig.data.spec import DataSpec
    >>> spec = DataSpec("classification", "tokens", (16,), "int32", 2)
    >>> build_transformer(spec, width=32, heads=2).output_shape
    (None, 2)
    """
    _check(spec, vocab_size, width, depth, heads, mlp_ratio, dropout, pooling, patch_size)
    tokens = keras.Input(spec.input_shape, dtype=spec.input_dtype, name=spec.input_name)
    keep = ops.not_equal(tokens, 0)  # [batch, length]: False at padding
    x = keras.layers.Embedding(vocab_size, width, name="token_embedding")(tokens)
    if patch_size > 1:
        length = spec.seq_len // patch_size
        x = keras.layers.Reshape((length, patch_size * width), name="patches")(x)
        x = keras.layers.Dense(width, name="patch_projection")(x)
        keep = ops.any(ops.reshape(keep, (-1, length, patch_size)), axis=-1)  # a patch counts if any token does
    x = PositionEmbedding(x.shape[1], name="position_embedding")(x)
    x = keras.layers.Dropout(dropout)(x)
    for i in range(depth):
        x = _encoder_block(x, keep[:, None, :], heads=heads, mlp_ratio=mlp_ratio, dropout=dropout,
                           name=f"block_{i}")
    x = keras.layers.LayerNormalization(name="ln_f")(x)
    if pooling == "mean":
        x = keras.layers.GlobalAveragePooling1D(name="pool")(x, mask=keep)
    else:
        x = ops.max(ops.where(keep[:, :, None], x, ops.cast(-1e9, x.dtype)), axis=1)
    logits = keras.layers.Dense(spec.num_classes, dtype="float32", name="logits")(x)
    return keras.Model(tokens, logits, name="transformer")
