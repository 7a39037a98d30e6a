"""Llama-family decoder-only language model: the architecture of Llama 2/3, Mistral-style grouped-query attention.

    tokens -> token embedding -> depth x Block -> final RMSNorm -> head (untied, or the embedding transposed)
    Block: x + attention(attn_norm(x)), then x + mlp(mlp_norm(x))
    attention: rotary positions on queries and keys; `kv_heads` key/value heads, each shared by
               heads / kv_heads query heads (grouped-query attention); no biases
    mlp: down(silu(gate(x)) * up(x))   (SwiGLU)

Written with `keras.layers`/`keras.ops` only, with the same stable layer names as `gpt` where the parts agree
(`token_embedding`, `block_{i}`, `ln_f`), so sharding rules address both. It is built to take checkpoints
(`kerasbig.pretrained`); the rotary convention is Hugging Face's (the two halves of each head rotate together).

`decode` runs the same weights on new positions with a preallocated key/value cache, as `gpt.decode` does.
"""
from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from kerasbig.data.spec import DataSpec
from kerasbig.errors import UsageError
from kerasbig.models import gpt

INIT_STD = 0.02


def _dense(units: int, name: str) -> keras.layers.Dense:
    return keras.layers.Dense(units, use_bias=False, kernel_initializer=keras.initializers.RandomNormal(stddev=INIT_STD),
                              name=name)


SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rotary_frequencies(head_width: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """The angle per position of each rotary pair i: theta^(-2i / head_width). Llama 3.1's `scaling`
    (SCALING_KEYS, Hugging Face's `rope_type: llama3`) stretches the context: pairs whose wavelength exceeds
    original_max_position_embeddings / low_freq_factor turn `factor` times slower, those shorter than
    original_max_position_embeddings / high_freq_factor keep their speed, and those between blend the two."""
    half = head_width // 2
    frequencies = 1.0 / theta ** (np.arange(half, dtype=np.float64) / half)
    if scaling:
        factor, low, high, original = (float(scaling[key]) for key in SCALING_KEYS)
        wavelengths = 2 * math.pi / frequencies
        blend = np.clip((original / wavelengths - low) / (high - low), 0.0, 1.0)  # 0 at the long end, 1 short
        frequencies = (1 - blend) * frequencies / factor + blend * frequencies
    return frequencies.astype(np.float32)


def rotate(x, start, frequencies: np.ndarray):
    """Rotary position embedding of [batch, length, heads, head_width] at positions start, start + 1, ...:
    each pair (i, i + head_width / 2) turns by position * frequencies[i] (`rotary_frequencies`)."""
    half = x.shape[-1] // 2
    inverse = ops.convert_to_tensor(frequencies, "float32")
    positions = ops.cast(ops.arange(ops.shape(x)[1]) + start, "float32")
    angles = ops.concatenate([positions[:, None] * inverse[None, :]] * 2, axis=-1)[None, :, None, :]
    cos, sin = ops.cast(ops.cos(angles), x.dtype), ops.cast(ops.sin(angles), x.dtype)
    rotated = ops.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


@keras.saving.register_keras_serializable(package="kerasbig")
class LlamaAttention(keras.layers.Layer):
    """Causal grouped-query self-attention with rotary positions; `call_with_cache` as in `gpt`."""

    def __init__(self, width: int, heads: int, kv_heads: int, *, rope_theta: float = 10000.0,
                 rope_scaling: dict | None = None, context: int = 0, **kwargs):
        """`context`: the most positions the model attends over (rotary positions have no table to bound
        them; generation stops there); `rope_scaling`: Llama 3.1's (see `rotary_frequencies`)."""
        super().__init__(**kwargs)
        self.width, self.heads, self.kv_heads, self.rope_theta = width, heads, kv_heads, rope_theta
        self.rope_scaling, self.context = rope_scaling, context
        self.head_width = width // heads
        self.frequencies = rotary_frequencies(self.head_width, rope_theta, rope_scaling)
        self.query = _dense(width, "query")
        self.key = _dense(kv_heads * self.head_width, "key")
        self.value = _dense(kv_heads * self.head_width, "value")
        self.out = _dense(width, "out")

    def build(self, input_shape):
        for layer in (self.query, self.key, self.value, self.out):
            layer.build(input_shape)

    def _projections(self, x, start):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        q = ops.reshape(self.query(x), (batch, length, self.heads, self.head_width))
        k = ops.reshape(self.key(x), (batch, length, self.kv_heads, self.head_width))
        v = ops.reshape(self.value(x), (batch, length, self.kv_heads, self.head_width))
        return rotate(q, start, self.frequencies), rotate(k, start, self.frequencies), v

    def _attend(self, q, k, v, mask=None, is_causal=False):
        groups = self.heads // self.kv_heads  # key/value head j serves query heads j * groups ... (j + 1) * groups - 1
        k, v = ops.repeat(k, groups, axis=2), ops.repeat(v, groups, axis=2)
        y = ops.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
        return self.out(ops.reshape(y, (ops.shape(y)[0], ops.shape(y)[1], self.width)))

    def call(self, x):
        return self._attend(*self._projections(x, 0), is_causal=True)

    def call_with_cache(self, x, cache, index):
        """`gpt.CausalSelfAttention.call_with_cache` with rotary positions: the cached keys are rotated already."""
        q, k, v = self._projections(x, index)
        keys, values = (gpt.write_positions(cached, new, index) for cached, new in zip(cache, (k, v)))
        attended_keys, attended_values, mask = gpt.attended_prefix(keys, values, index, ops.shape(q)[1])
        return self._attend(q, attended_keys, attended_values, mask=mask), (keys, values)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads, "kv_heads": self.kv_heads,
                "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling, "context": self.context}


@keras.saving.register_keras_serializable(package="kerasbig")
class LlamaBlock(keras.layers.Layer):
    """x + attention(attn_norm(x)), then x + down(silu(gate(h)) * up(h)) with h = mlp_norm(x)."""

    def __init__(self, width: int, heads: int, kv_heads: int, hidden: int, *, norm_epsilon: float = 1e-6,
                 rope_theta: float = 10000.0, rope_scaling: dict | None = None, dropout: float = 0.0,
                 context: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads, self.kv_heads, self.hidden = width, heads, kv_heads, hidden
        self.norm_epsilon, self.rope_theta, self.dropout, self.context = norm_epsilon, rope_theta, dropout, context
        self.rope_scaling = rope_scaling
        self.attn_norm = keras.layers.RMSNormalization(epsilon=norm_epsilon, name="attn_norm")
        self.attn = LlamaAttention(width, heads, kv_heads, rope_theta=rope_theta, rope_scaling=rope_scaling,
                                   context=context, name="attn")
        self.mlp_norm = keras.layers.RMSNormalization(epsilon=norm_epsilon, name="mlp_norm")
        self.gate, self.up, self.down = _dense(hidden, "gate"), _dense(hidden, "up"), _dense(width, "down")
        self.residual_dropout = keras.layers.Dropout(dropout)

    def build(self, input_shape):
        for layer in (self.attn_norm, self.attn, self.mlp_norm, self.gate, self.up):
            layer.build(input_shape)
        self.down.build((*input_shape[:-1], self.hidden))

    def _mlp(self, x, training=None):
        h = self.mlp_norm(x)
        return self.residual_dropout(self.down(ops.silu(self.gate(h)) * self.up(h)), training=training)

    def call(self, x, training=None):
        x = x + self.residual_dropout(self.attn(self.attn_norm(x)), training=training)
        return x + self._mlp(x, training=training)

    def call_with_cache(self, x, cache, index):
        attended, cache = self.attn.call_with_cache(self.attn_norm(x), cache, index)
        x = x + attended
        return x + self._mlp(x), cache

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads, "kv_heads": self.kv_heads,
                "hidden": self.hidden, "norm_epsilon": self.norm_epsilon, "rope_theta": self.rope_theta,
                "rope_scaling": self.rope_scaling, "dropout": self.dropout, "context": self.context}


def build_llama(spec: DataSpec, *, width: int = 4096, depth: int = 32, heads: int = 32, kv_heads: int = 0,
                hidden: int = 11008, vocab_size: int = 0, context: int = 0, norm_epsilon: float = 1e-6,
                rope_theta: float = 10000.0, rope_scaling: dict | None = None, tie_embeddings: bool = False,
                dropout: float = 0.0) -> keras.Model:
    """A Llama over `vocab_size` tokens (0: the data's) attending over up to `context` positions (0: the data's
    seq_len); `kv_heads` key/value heads (0: one per query head), an MLP of `hidden` units; `rope_scaling`
    Llama 3.1's scaled rotary positions (`rotary_frequencies`; None: unscaled). The defaults are Llama 2 7B's
    shape.

    >>> from kerasbig.data.spec import DataSpec
    >>> spec = DataSpec("language_model", "tokens", (16,), "int32", 64)
    >>> build_llama(spec, width=32, depth=2, heads=4, kv_heads=2, hidden=64).output_shape
    (None, None, 64)
    """
    kv_heads = kv_heads or heads
    gpt.check_hyperparameters(spec, width=width, depth=depth, heads=heads, mlp_ratio=1, dropout=dropout)
    if kv_heads < 1 or heads % kv_heads:
        raise UsageError(f"llama kv_heads={kv_heads} must divide heads={heads}")
    if (width // heads) % 2:
        raise UsageError(f"llama width / heads = {width // heads} must be even for rotary positions")
    if context and context < spec.seq_len:
        raise UsageError(f"llama context={context} is shorter than data.seq_len={spec.seq_len}; lower data.seq_len")
    tokens = keras.Input((None,), dtype=spec.input_dtype, name=spec.input_name)
    vocab = gpt.vocabulary(spec, vocab_size)
    embedding = keras.layers.ReversibleEmbedding(vocab, width, tie_weights=tie_embeddings,
                                                 embeddings_initializer=keras.initializers.RandomNormal(stddev=INIT_STD),
                                                 name="token_embedding")
    x = embedding(tokens)
    for i in range(depth):
        x = LlamaBlock(width, heads, kv_heads, hidden, norm_epsilon=norm_epsilon, rope_theta=rope_theta,
                       rope_scaling=rope_scaling, dropout=dropout, context=context or spec.seq_len,
                       name=f"block_{i}")(x)
    x = keras.layers.RMSNormalization(epsilon=norm_epsilon, name="ln_f")(x)
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(embedding(x, reverse=True))
    return keras.Model(tokens, logits, name="llama")


def _blocks(model: keras.Model) -> list[LlamaBlock]:
    return [layer for layer in model.layers if isinstance(layer, LlamaBlock)]


def context_length(model: keras.Model) -> int:
    """The most positions a built Llama attends over."""
    return _blocks(model)[0].context


def empty_cache(model: keras.Model, batch, length) -> list:
    """`gpt.empty_cache` for a built Llama: [batch, length, kv_heads, head_width] keys and values per block."""
    shapes = [(batch, length, b.kv_heads, b.width // b.heads) for b in _blocks(model)]
    return [(ops.zeros(shape, model.compute_dtype), ops.zeros(shape, model.compute_dtype)) for shape in shapes]


def decode(model: keras.Model, tokens, cache: list, index):
    """`gpt.decode` for a built Llama: float32 logits of every new position at `index`... and the cache with
    them written in."""
    x = model.get_layer("token_embedding")(tokens)
    new_cache = []
    for block, block_cache in zip(_blocks(model), cache):
        x, block_cache = block.call_with_cache(x, block_cache, index)
        new_cache.append(block_cache)
    logits = model.get_layer("token_embedding")(model.get_layer("ln_f")(x), reverse=True)
    return ops.cast(logits, "float32"), new_cache
