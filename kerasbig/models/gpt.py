"""GPT-2 style decoder-only language model, written to be read in one sitting (after Karpathy's nanoGPT).

    tokens -> token embedding + position embedding -> depth x Block -> final LayerNorm -> logits
    Block: x + attention(ln_1(x)), then x + mlp(ln_2(x))   (pre-LayerNorm, GPT-2)

The output head is the token embedding matrix transposed (weight tying), so parameter counts match GPT-2:
124,439,808 for width 768, depth 12, heads 12, vocabulary 50257 and context 1024.

`decode` runs the same weights on new positions only, writing their keys and values into a preallocated cache
(`empty_cache`: fixed shapes, so a compiled generation loop never grows a tensor); generation uses it.
"""
from __future__ import annotations

import math

import keras
from keras import ops

from kerasbig.data.spec import LANGUAGE_MODEL, DataSpec
from kerasbig.errors import UsageError
from kerasbig.models.transformer import PositionEmbedding, check_attention_sizes

INIT_STD = 0.02  # GPT-2's initialisation of every weight matrix
ACTIVATIONS = ("gelu", "gelu_tanh")  # exact GELU, or the tanh approximation GPT-2's own weights were trained with


@keras.saving.register_keras_serializable(package="kerasbig")
def gelu_tanh(x):
    """GELU by its tanh approximation (GPT-2's `gelu_new`)."""
    return keras.activations.gelu(x, approximate=True)


def _normal(stddev: float) -> keras.initializers.Initializer:
    return keras.initializers.RandomNormal(stddev=stddev)


@keras.saving.register_keras_serializable(package="kerasbig")
class CausalSelfAttention(keras.layers.Layer):
    """Multi-head self-attention in which each position sees itself and the positions before it.

    One Dense makes queries, keys and values together (GPT-2's `c_attn`), another mixes the heads (`c_proj`).
    `call_with_cache` runs new positions only, attending also to the cached keys and values of earlier ones.
    """

    def __init__(self, width: int, heads: int, *, dropout: float = 0.0, use_bias: bool = True,
                 output_stddev: float = INIT_STD, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads, self.dropout, self.use_bias, self.output_stddev = (
            width, heads, dropout, use_bias, output_stddev)
        self.qkv = keras.layers.Dense(3 * width, use_bias=use_bias, kernel_initializer=_normal(INIT_STD), name="qkv")
        self.out = keras.layers.Dense(width, use_bias=use_bias, kernel_initializer=_normal(output_stddev), name="out")
        self.out_dropout = keras.layers.Dropout(dropout)

    def build(self, input_shape):
        self.qkv.build(input_shape)
        self.out.build(input_shape)

    def _heads(self, x):
        """[batch, length, width] -> queries, keys, values, each [batch, length, heads, head_width]."""
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        return [ops.reshape(t, (batch, length, self.heads, -1)) for t in ops.split(self.qkv(x), 3, axis=-1)]

    def _merge(self, y):
        return self.out(ops.reshape(y, (ops.shape(y)[0], ops.shape(y)[1], self.width)))

    def call(self, x, training=None):
        q, k, v = self._heads(x)
        y = ops.dot_product_attention(q, k, v, is_causal=True)
        return self.out_dropout(self._merge(y), training=training)

    def call_with_cache(self, x, cache, index):
        """Attention for new positions `x` [batch, new, width] at `index`, `index + 1`, ...: their keys and values
        are written into the preallocated `cache` (keys, values), each [batch, length, heads, head_width], and
        each query sees the cached positions up to its own. Returns (output, cache)."""
        q, k, v = self._heads(x)
        keys, values = (write_positions(cached, new, index) for cached, new in zip(cache, (k, v)))
        attended_keys, attended_values, mask = attended_prefix(keys, values, index, ops.shape(q)[1])
        return self._merge(ops.dot_product_attention(q, attended_keys, attended_values, mask=mask)), (keys, values)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads, "dropout": self.dropout,
                "use_bias": self.use_bias, "output_stddev": self.output_stddev}


def write_positions(cache, new, index):
    """`cache` [batch, length, ...] with positions `index`... replaced by `new` [batch, n, ...]: a scatter of the
    new positions only (Keras's `slice_update` is an XLA-only op in TensorFlow, so not servable)."""
    batch, count = ops.shape(new)[0], ops.shape(new)[1]
    rows = ops.broadcast_to(ops.arange(batch)[:, None], (batch, count))
    positions = ops.broadcast_to((index + ops.arange(count))[None, :], (batch, count))
    return ops.scatter_update(cache, ops.stack([rows, positions], axis=-1), ops.cast(new, cache.dtype))


def power_of_two_at_least(n):
    """The smallest power of two >= `n` (an int32 tensor >= 1): the sizes generation buckets its shapes into,
    so a compiled graph sees few distinct ones."""
    powers = ops.convert_to_tensor([2 ** i for i in range(31)], "int32")
    return ops.take(powers, ops.searchsorted(powers, ops.reshape(ops.cast(n, "int32"), (1,)), side="left")[0])


def attended_prefix(keys, values, index, new):
    """The cached keys and values that queries at `index`...`index + new - 1` can see, cut to the power of two
    above the last of them (so a step attends over the filled part of the cache, not its whole preallocated
    length), and the causal mask over that prefix."""
    span = ops.minimum(power_of_two_at_least(index + new), ops.shape(keys)[1])
    mask = ops.arange(span)[None, :] <= (index + ops.arange(new))[:, None]
    return keys[:, :span], values[:, :span], mask


@keras.saving.register_keras_serializable(package="kerasbig")
class Block(keras.layers.Layer):
    """One transformer block: x + attention(ln_1(x)), then x + mlp(ln_2(x)) with a GELU MLP."""

    def __init__(self, width: int, heads: int, *, mlp_ratio: int = 4, dropout: float = 0.0, use_bias: bool = True,
                 output_stddev: float = INIT_STD, activation: str = "gelu", remat: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads, self.mlp_ratio, self.dropout, self.use_bias, self.output_stddev = (
            width, heads, mlp_ratio, dropout, use_bias, output_stddev)
        self.activation, self.remat = activation, remat
        # GPT-2 LayerNorms have biases too; nanoGPT's bias=False drops them along with the Dense biases.
        self.ln_1 = keras.layers.LayerNormalization(epsilon=1e-5, center=use_bias, name="ln_1")
        self.attn = CausalSelfAttention(width, heads, dropout=dropout, use_bias=use_bias,
                                        output_stddev=output_stddev, name="attn")
        self.ln_2 = keras.layers.LayerNormalization(epsilon=1e-5, center=use_bias, name="ln_2")
        self.mlp_fc = keras.layers.Dense(mlp_ratio * width, activation=gelu_tanh if activation == "gelu_tanh" else "gelu",
                                         use_bias=use_bias,
                                         kernel_initializer=_normal(INIT_STD), name="mlp_fc")
        self.mlp_proj = keras.layers.Dense(width, use_bias=use_bias, kernel_initializer=_normal(output_stddev),
                                           name="mlp_proj")
        self.mlp_dropout = keras.layers.Dropout(dropout)

    def build(self, input_shape):
        for layer in (self.ln_1, self.attn, self.ln_2, self.mlp_fc):
            layer.build(input_shape)
        self.mlp_proj.build((*input_shape[:-1], self.mlp_ratio * self.width))

    def _mlp(self, x, training=None):
        return self.mlp_dropout(self.mlp_proj(self.mlp_fc(self.ln_2(x))), training=training)

    def call(self, x, training=None):
        def forward(x):
            x = x + self.attn(self.ln_1(x), training=training)
            return x + self._mlp(x, training=training)
        # `training` stays a Python value in the closure: keras.RematScope would trace it with the inputs (under
        # jax.checkpoint), and dropout cannot branch on a traced flag.
        return keras.remat(forward)(x) if self.remat else forward(x)

    def call_with_cache(self, x, cache, index):
        """The block on new positions at `index`... given the attention cache; returns (output, cache)."""
        attended, cache = self.attn.call_with_cache(self.ln_1(x), cache, index)
        x = x + attended
        return x + self._mlp(x), cache

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads, "mlp_ratio": self.mlp_ratio,
                "dropout": self.dropout, "use_bias": self.use_bias, "output_stddev": self.output_stddev,
                "activation": self.activation, "remat": self.remat}


def vocabulary(spec: DataSpec, vocab_size: int) -> int:
    """The embedding's vocabulary: the data's, or a larger `vocab_size` (e.g. GPT-2's 50257 on byte data)."""
    if vocab_size and vocab_size < spec.num_classes:
        raise UsageError(f"gpt vocab_size={vocab_size} is smaller than the data's vocabulary ({spec.num_classes}); "
                         "use 0 for the data's own or a larger size")
    return vocab_size or spec.num_classes


def check_hyperparameters(spec: DataSpec, *, width: int, depth: int, heads: int, mlp_ratio: int,
                          dropout: float) -> None:
    """Raises UsageError for a GPT that cannot be built; `kerasbig.models.sizing` checks with it too."""
    if spec.kind != LANGUAGE_MODEL:
        raise UsageError(f"gpt is a language model; the data is {spec.kind!r}, choose a classifier model instead")
    check_attention_sizes("gpt", width=width, heads=heads, dropout=dropout, depth=depth, mlp_ratio=mlp_ratio)


def build_gpt(spec: DataSpec, *, width: int = 768, depth: int = 12, heads: int = 12, mlp_ratio: int = 4,
              dropout: float = 0.0, bias: bool = True, vocab_size: int = 0, context: int = 0,
              activation: str = "gelu", remat: bool = False) -> keras.Model:
    """A GPT over `vocab_size` tokens (0: the data's `spec.num_classes`) with a context of `context` positions
    (0: the data's `spec.seq_len`); the defaults are GPT-2 124M's shape. `activation` is one of ACTIVATIONS.
    `remat`: rematerialize each block (`keras.remat`): its activations are recomputed in the backward pass
    instead of held, so training holds each block's input and one block's activations at a time.

    Inputs may be shorter than the context (generation feeds growing prefixes).

    >>> from kerasbig.data.spec import DataSpec
    >>> spec = DataSpec("language_model", "tokens", (16,), "int32", 64)
    >>> build_gpt(spec, width=32, depth=2, heads=4).output_shape
    (None, None, 64)
    """
    check_hyperparameters(spec, width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout)
    if activation not in ACTIVATIONS:
        raise UsageError(f"gpt activation={activation!r} is not one of {list(ACTIVATIONS)}")
    if context and context < spec.seq_len:
        raise UsageError(f"gpt context={context} is shorter than data.seq_len={spec.seq_len}; lower data.seq_len")
    # GPT-2 scales the projections that write into the residual stream by 1/sqrt(number of them).
    output_stddev = INIT_STD / math.sqrt(2 * depth)
    tokens = keras.Input((None,), dtype=spec.input_dtype, name=spec.input_name)
    embedding = keras.layers.ReversibleEmbedding(vocabulary(spec, vocab_size), width, tie_weights=True,
                                                 embeddings_initializer=_normal(INIT_STD), name="token_embedding")
    x = PositionEmbedding(context or spec.seq_len, initializer=_normal(INIT_STD), name="position_embedding")(embedding(tokens))
    x = keras.layers.Dropout(dropout)(x)
    for i in range(depth):
        x = Block(width, heads, mlp_ratio=mlp_ratio, dropout=dropout, use_bias=bias, output_stddev=output_stddev,
                  activation=activation, remat=remat, name=f"block_{i}")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, center=bias, name="ln_f")(x)
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(embedding(x, reverse=True))
    return keras.Model(tokens, logits, name="gpt")


def gpt_layout_map(mesh: keras.distribution.DeviceMesh) -> keras.distribution.LayoutMap:
    """Megatron-style sharding over the mesh's `model` axis: the embeddings along the width, the QKV and the
    first MLP kernels by output column, the attention output and second MLP kernels by input row (so each
    block needs one all-reduce after attention and one after the MLP). LayerNorms and the other biases are
    replicated; the optimizer's slots follow their variables."""
    layout = keras.distribution.LayoutMap(mesh)  # keys are regular expressions matching whole variable paths
    for path, axes in (("token_embedding/embeddings", (None, "model")),
                       ("position_embedding/embeddings", (None, "model")),
                       ("attn/qkv/kernel", (None, "model")), ("attn/qkv/bias", ("model",)),
                       ("attn/out/kernel", ("model", None)),
                       ("mlp_fc/kernel", (None, "model")), ("mlp_fc/bias", ("model",)),
                       ("mlp_proj/kernel", ("model", None))):
        layout[f"(.*/)?{path}"] = axes
    return layout


def context_length(model: keras.Model) -> int:
    """The most positions a built GPT can attend over (its position table)."""
    return model.get_layer("position_embedding").max_length


def _blocks(model: keras.Model) -> list[Block]:
    return [layer for layer in model.layers if isinstance(layer, Block)]


def empty_cache(model: keras.Model, batch, length) -> list:
    """A zero key/value cache for `batch` sequences of up to `length` positions (at most the context): one
    (keys, values) pair per block, each [batch, length, heads, head_width] in the model's compute dtype."""
    shapes = [(batch, length, block.heads, block.width // block.heads) for block in _blocks(model)]
    return [(ops.zeros(shape, model.compute_dtype), ops.zeros(shape, model.compute_dtype)) for shape in shapes]


def decode(model: keras.Model, tokens, cache: list, index):
    """Runs a built GPT on `tokens` [batch, new] at positions `index`, `index + 1`, ... after the positions
    already in `cache` (from `empty_cache`; `index` may be a tensor).

    Returns the float32 logits of every new position, [batch, new, vocab], and the cache with the new positions
    written in. Dropout is off, as at inference.
    """
    embedding = model.get_layer("token_embedding")
    x = model.get_layer("position_embedding")(embedding(tokens), start=index)
    new_cache = []
    for block, block_cache in zip(_blocks(model), cache):
        x, block_cache = block.call_with_cache(x, block_cache, index)
        new_cache.append(block_cache)
    logits = embedding(model.get_layer("ln_f")(x), reverse=True)
    return ops.cast(logits, "float32"), new_cache
