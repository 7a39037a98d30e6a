"""Sampling from a trained language model (kerasbig's `gpt` or `rnn`), one token at a time.

With the cache each new token costs one position: the family's `decode` keeps what earlier positions computed
(GPT: attention keys and values; RNN: recurrent states) and runs only the new token. `use_cache=False` calls
the Keras model on the whole window at every step instead, the slow reference the cache must agree with.

>>> import keras
>>> from kerasbig.data.spec import DataSpec
>>> from kerasbig.models.gpt import build_gpt
>>> model = build_gpt(DataSpec("language_model", "tokens", (32,), "int32", 50), width=16, depth=1, heads=2)
>>> len(generate(model, [1, 2, 3], max_new_tokens=5, temperature=0.8, top_k=10))
5
"""
from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from kerasbig.errors import UsageError
from kerasbig.models import gpt, rnn


def _graph(function):
    """`function` compiled to a graph on the TensorFlow backend: eagerly, the Python overhead of calling each
    layer outweighs the arithmetic of one new position. `reduce_retracing` keeps a cache that grows every
    step from retracing every step."""
    return tf.function(function, reduce_retracing=True) if keras.backend.backend() == "tensorflow" else function


def _recompute(model: keras.Model, tokens):
    """Logits after the last of `tokens` [batch, length] from the whole model: what `decode` must agree with."""
    return model(tokens, training=False)[:, -1]


# The RNN steps eagerly: its step costs the same at any length, and it loops over tokens in Python.
DECODERS = {"gpt": _graph(gpt.decode), "rnn": rnn.decode}
RECOMPUTE = _graph(_recompute)


def _context(model: keras.Model) -> int | None:
    """How many positions the model can see at once; None for unbounded (recurrent)."""
    return gpt.context_length(model) if model.name == "gpt" else None


def _check(model: keras.Model, prompt: list[int], max_new_tokens: int, temperature: float,
           top_k: int | None) -> None:
    if model.name not in DECODERS or len(model.output_shape) != 3:
        raise UsageError(f"cannot generate from this {model.name!r} model; generation supports the language "
                         f"models {sorted(DECODERS)}")
    vocab, context = model.output_shape[-1], _context(model)
    if not prompt:
        raise UsageError("the prompt is empty; give at least one token")
    if context is not None and len(prompt) > context:
        raise UsageError(f"the prompt has {len(prompt)} tokens, more than the model's context of {context}")
    if not all(0 <= token < vocab for token in prompt):
        raise UsageError(f"prompt token ids must be in [0, {vocab}), got {min(prompt)}..{max(prompt)}")
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise UsageError(f"need max_new_tokens >= 0, temperature >= 0 and top_k >= 1 or None; got "
                         f"{max_new_tokens}, {temperature}, {top_k}")


def _sample(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """One token id from float32 logits [vocab]: the most likely at temperature 0, else a draw."""
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64) / temperature
    if top_k is not None:
        logits[logits < np.sort(logits)[-min(top_k, len(logits))]] = -np.inf
    probabilities = np.exp(logits - logits.max())
    return int(rng.choice(len(logits), p=probabilities / probabilities.sum()))


def generate(model: keras.Model, prompt_tokens: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, use_cache: bool = True) -> list[int]:
    """Returns `max_new_tokens` tokens continuing `prompt_tokens` (the prompt itself is not repeated).

    temperature 0 is greedy; otherwise logits are divided by `temperature` and, with `top_k`, all but the k
    most likely tokens are dropped before drawing. The same `seed` draws the same tokens. Past the model's
    context, tokens are predicted from the last `context` tokens.
    """
    tokens = [int(token) for token in prompt_tokens]
    _check(model, tokens, max_new_tokens, temperature, top_k)
    decode, context = DECODERS[model.name], _context(model)
    rng = np.random.default_rng(seed)
    cache, cached = None, 0  # cached: positions the cache holds
    for _ in range(max_new_tokens):
        window = tokens[-context:] if context else tokens
        if not use_cache:
            logits = RECOMPUTE(model, np.array([window]))
        elif cache is None or cached == context:
            # Learned positions cannot shift inside a cache, so a full context is encoded afresh.
            logits, cache = decode(model, np.array([window]))
            cached = len(window)
        else:
            logits, cache = decode(model, np.array([tokens[-1:]]), cache)
            cached += 1
        tokens.append(_sample(np.asarray(logits).reshape(-1), temperature, top_k, rng))
    return tokens[len(prompt_tokens):]
