"""Recurrent models over token ids: stacked LSTM or GRU layers as a classifier or a language model.

    classifier: tokens -> embedding -> layers x (Bidirectional) LSTM/GRU -> last state -> logits
    language model: tokens -> embedding -> layers x LSTM/GRU -> per-position logits over the vocabulary

Classifiers treat token id 0 as padding: the recurrent layers skip it, so the last state is the last real token's.
`decode` steps a built language model one token at a time, carrying the recurrent states, for generation.
"""
from __future__ import annotations

import keras

from kerasbig.data.spec import LANGUAGE_MODEL, DataSpec
from kerasbig.errors import UsageError

CELLS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}


def _check(spec: DataSpec, cell: str, units: int, layers: int, bidirectional: bool, embed_dim: int,
           dropout: float, vocab_size: int) -> None:
    if len(spec.input_shape) != 1:
        raise UsageError(f"rnn reads token sequences; the data has input shape {spec.input_shape}")
    if cell not in CELLS:
        raise UsageError(f"rnn cell={cell!r} is not one of {sorted(CELLS)}")
    if min(units, layers, embed_dim, vocab_size) < 1:
        raise UsageError(f"rnn units, layers, embed_dim and vocab_size must be positive, got "
                         f"{units}, {layers}, {embed_dim}, {vocab_size}")
    if not 0 <= dropout < 1:
        raise UsageError(f"rnn dropout={dropout} must be in [0, 1)")
    if bidirectional and spec.kind == LANGUAGE_MODEL:
        raise UsageError("rnn bidirectional=True would let a language model see the tokens it predicts; "
                         "set bidirectional=False")


def build_rnn(spec: DataSpec, *, cell: str = "lstm", units: int = 128, layers: int = 1, bidirectional: bool = False,
              embed_dim: int = 64, dropout: float = 0.0, vocab_size: int = 256) -> keras.Model:
    """Stacked `cell` layers; `vocab_size` bounds a classifier's token ids (language models use spec.num_classes).

    >>> from kerasbig.data.spec import DataSpec
    >>> spec = DataSpec("classification", "tokens", (20,), "int32", 2)
    >>> build_rnn(spec, cell="gru", units=16, bidirectional=True).output_shape
    (None, 2)
    """
    _check(spec, cell, units, layers, bidirectional, embed_dim, dropout, vocab_size)
    lm = spec.kind == LANGUAGE_MODEL
    vocab = spec.num_classes if lm else vocab_size
    # A language model accepts any length, so that generation can feed it growing prefixes.
    tokens = keras.Input((None,) if lm else spec.input_shape, dtype=spec.input_dtype, name=spec.input_name)
    x = keras.layers.Embedding(vocab, embed_dim, mask_zero=not lm, name="embedding")(tokens)
    for i in range(layers):
        recurrent = CELLS[cell](units, return_sequences=lm or i < layers - 1, name=f"{cell}_{i}")
        if bidirectional:
            recurrent = keras.layers.Bidirectional(recurrent, name=f"bidirectional_{cell}_{i}")
        x = keras.layers.Dropout(dropout)(recurrent(x))
    logits = keras.layers.Dense(spec.num_classes, dtype="float32", name="logits")(x)
    return keras.Model(tokens, logits, name="rnn")


def decode(model: keras.Model, tokens, states: list | None = None):
    """Runs a built language model on `tokens` [batch, new] after the recurrent `states` (None: from scratch).

    Returns the float32 logits after the last token, [batch, vocab], and the states after it.
    """
    cells = [layer.cell for layer in model.layers if isinstance(layer, tuple(CELLS.values()))]
    x = model.get_layer("embedding")(tokens)
    states = list(states) if states else [cell.get_initial_state(x.shape[0]) for cell in cells]
    for t in range(x.shape[1]):
        h = x[:, t]
        for i, cell in enumerate(cells):
            h, states[i] = cell(h, states[i])
    return keras.ops.cast(model.get_layer("logits")(h), "float32"), states
