"""Sampling from a trained language model in one compiled loop: what `kerasbig.generate` runs and what the
SavedModel's `generate` signature serves, so both give the same tokens for the same seed.

`generate_tokens` takes a batch of right-padded prompts with their lengths. It runs the padded prompts once
(filling a key/value cache preallocated for every position the request can reach, rounded up to a power of two),
then one position per step in a `tf.while_loop` over fixed-shape tensors (the token buffer, the cache, the last
logits), so the graph never grows a tensor. Each step scatters its own position into the cache and attends over
the filled prefix, cut to a power of two, so its attention costs what the positions so far cost, not the
context. A sequence stops at `end_token`, after `max_new_tokens` or at the model's context, whichever comes
first; sampling is stateless, seeded by `seed` and the position, so the same inputs draw the same tokens in any
process.

Each model family plugs in a `Decoder`: a preallocated cache and a `decode` that runs new positions into it
(`kerasbig.models.gpt`). `RECOMPUTE` runs the whole model on the prefix at every step instead: the slow
reference the cache must agree with, and the decoder of families without a cache of their own (the RNN).

>>> import keras
>>> from kerasbig.data.spec import DataSpec
>>> from kerasbig.models.gpt import build_gpt
>>> model = build_gpt(DataSpec("language_model", "tokens", (32,), "int32", 50), width=16, depth=1, heads=2)
>>> len(generate(model, [1, 2, 3], max_new_tokens=5, temperature=0.8, top_k=10))
5
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from kerasbig.data.text import BYTE_VOCAB
from kerasbig.errors import UsageError
from kerasbig.models import gpt, llama

GENERATE = "generate"  # the SavedModel signature
GENERATE_TEXT = "generate_text"  # the same, strings in and out, for models whose tokens are UTF-8 bytes
NO_END_TOKEN = -1


@dataclasses.dataclass(frozen=True)
class Decoder:
    """How a model family runs new positions after cached ones.

    `empty_cache(model, batch, length)`: the cache for `batch` sequences of `length` positions;
    `decode(model, tokens [batch, new], cache, index)`: float32 logits [batch, new, vocab] of the new positions
    at `index`..., and the cache with them written in; `context(model)`: the most positions (None: unbounded).
    """
    empty_cache: Callable
    decode: Callable
    context: Callable[[keras.Model], int | None]


def _token_buffer(model, batch, length):
    return tf.zeros([batch, length], tf.int32)


def _recompute(model, tokens, buffer, index):
    buffer = gpt.write_positions(buffer, tokens, index)
    end = index + tf.shape(tokens)[1]
    return tf.cast(model(buffer[:, :end], training=False), tf.float32)[:, index:end], buffer


def _no_context(model):
    return None


RECOMPUTE = {"gpt": Decoder(_token_buffer, _recompute, gpt.context_length),
             "llama": Decoder(_token_buffer, _recompute, llama.context_length),
             "rnn": Decoder(_token_buffer, _recompute, _no_context)}
# The decoder each family generates with, by model name: its own cache where it has one.
DECODERS = {**RECOMPUTE, "gpt": Decoder(gpt.empty_cache, gpt.decode, gpt.context_length),
            "llama": Decoder(llama.empty_cache, llama.decode, llama.context_length)}


def decoder_for(model: keras.Model, use_cache: bool = True) -> Decoder:
    """The decoder for `model` (its cached one when it has one and `use_cache`); UsageError if it cannot
    generate."""
    if model.name not in DECODERS or len(model.output_shape) != 3:
        raise UsageError(f"cannot generate from this {model.name!r} model; generation supports the language "
                         f"models {sorted(DECODERS)}")
    return (DECODERS if use_cache else RECOMPUTE)[model.name]


def sample(logits, temperature, top_k, top_p, seed):
    """One token per row of float32 `logits` [batch, vocab]: the most likely at temperature 0; otherwise a
    seeded draw from logits / temperature restricted to the `top_k` most likely (0: all), then to the
    smallest set whose probability reaches `top_p` (1: all)."""
    vocab = tf.shape(logits)[1]
    scaled = logits / tf.maximum(temperature, 1e-6)
    ranked = tf.sort(scaled, direction="DESCENDING")
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
    ranked = tf.where(tf.range(vocab)[None, :] < k, ranked, -np.inf)
    before = tf.math.cumsum(tf.nn.softmax(ranked), axis=-1, exclusive=True)  # probability above each rank
    kept = tf.maximum(tf.reduce_sum(tf.cast(before < top_p, tf.int32), axis=-1), 1)
    threshold = tf.gather(ranked, kept - 1, batch_dims=1)
    drawn = tf.random.stateless_categorical(tf.where(scaled >= threshold[:, None], scaled, -np.inf), 1, seed)
    return tf.where(temperature > 0, tf.cast(drawn[:, 0], tf.int32), tf.argmax(logits, -1, output_type=tf.int32))


def _check_request(model: keras.Model, tokens, lengths, max_new_tokens, temperature, top_k, top_p, context):
    """Graph assertions, so a bad request fails with a named reason (TF Serving answers it with a 400)."""
    vocab = model.output_shape[-1]
    checks = [
        tf.debugging.assert_greater_equal(lengths, 1, message="every prompt needs a length >= 1"),
        tf.debugging.assert_less_equal(lengths, tf.shape(tokens)[1], message="a length exceeds the prompt tokens"),
        tf.debugging.assert_equal(tf.shape(lengths)[0], tf.shape(tokens)[0], message="one length per prompt"),
        tf.debugging.assert_non_negative(tokens, message="token ids must be >= 0"),
        tf.debugging.assert_less(tokens, vocab, message=f"token ids must be < the vocabulary ({vocab})"),
        tf.debugging.assert_non_negative(max_new_tokens, message="max_new_tokens must be >= 0"),
        tf.debugging.assert_non_negative(temperature, message="temperature must be >= 0"),
        tf.debugging.assert_non_negative(top_k, message="top_k must be >= 0 (0: all tokens)"),
        tf.debugging.assert_greater(top_p, 0.0, message="top_p must be in (0, 1]"),
        tf.debugging.assert_less_equal(top_p, 1.0, message="top_p must be in (0, 1]"),
    ]
    if context:
        checks.append(tf.debugging.assert_less_equal(
            tf.shape(tokens)[1], context, message=f"the prompts are longer than the context of the model ({context})"))
    return checks


def generate_tokens(model: keras.Model, decoder: Decoder, tokens, lengths, max_new_tokens, temperature, top_k,
                    top_p, seed, end_token) -> dict[str, tf.Tensor]:
    """The generation loop (see the module docstring) on tensors: `tokens` int32 [batch, prompt] right-padded,
    `lengths` int32 [batch]; scalars `max_new_tokens`, `top_k`, `end_token` (int32; -1: none), `temperature`,
    `top_p` (float32) and `seed` (int64). Returns `tokens` int64 [batch, max_new_tokens] (0 after each row's
    `count`, the tokens it generated, the end token included)."""
    context = decoder.context(model)
    with tf.control_dependencies(_check_request(model, tokens, lengths, max_new_tokens, temperature, top_k,
                                                top_p, context)):
        tokens = tf.identity(tokens)
    batch, prompt = tf.shape(tokens)[0], tf.shape(tokens)[1]
    # The buffer and cache hold every position the request can reach, rounded up to a power of two (few shapes).
    length = gpt.power_of_two_at_least(prompt + tf.maximum(max_new_tokens, 0))
    length = tf.minimum(length, context) if context else length
    buffer = tf.pad(tokens, [[0, 0], [0, length - prompt]])
    stop = tf.minimum(length, tf.reduce_max(lengths) + max_new_tokens)
    # Padding is on the right, so no prompt position sees it; positions past the shortest prompt are rewritten
    # one by one in the loop before any later position reads them.
    logits, cache = decoder.decode(model, tokens, decoder.empty_cache(model, batch, length), 0)
    logits = tf.gather(logits, tf.reduce_min(lengths) - 1, axis=1)
    count = tf.zeros([batch], tf.int32)
    done = tf.fill([batch], max_new_tokens <= 0)

    def step(position, buffer, logits, cache, count, done):
        sampled = sample(logits, temperature, top_k, top_p, tf.stack([seed, tf.cast(position, tf.int64)]))
        in_prompt = position < lengths
        new = ~in_prompt & ~done
        token = tf.where(in_prompt, buffer[:, position], tf.where(new, sampled, 0))
        buffer = tf.where(tf.range(length)[None, :] == position, token[:, None], buffer)
        count += tf.cast(new, tf.int32)
        done |= new & ((sampled == end_token) | (count >= max_new_tokens))
        logits, cache = decoder.decode(model, token[:, None], cache, position)
        return position + 1, buffer, logits[:, 0], cache, count, done

    _, buffer, _, _, count, _ = tf.while_loop(
        lambda position, *state: (position < stop) & ~tf.reduce_all(state[-1]), step,
        (tf.reduce_min(lengths), buffer, logits, cache, count, done))
    offsets = tf.range(max_new_tokens)[None, :]
    generated = tf.gather(buffer, tf.minimum(lengths[:, None] + offsets, length - 1), batch_dims=1)
    generated = tf.where(offsets < count[:, None], generated, 0)
    return {"tokens": tf.cast(generated, tf.int64), "count": tf.cast(count, tf.int64)}


INPUTS = {"tokens": tf.int32, "lengths": tf.int32, "max_new_tokens": tf.int32, "temperature": tf.float32,
          "top_k": tf.int32, "top_p": tf.float32, "seed": tf.int64, "end_token": tf.int32}
SHAPES = {"tokens": [None, None], "lengths": [None]}  # the others are scalars


def input_signature() -> dict[str, tf.TensorSpec]:
    """The `generate` signature's named inputs."""
    return {name: tf.TensorSpec(SHAPES.get(name, []), dtype, name=name) for name, dtype in INPUTS.items()}


def signature(model: keras.Model) -> tf.types.experimental.GenericFunction:
    """The SavedModel's `generate` function: `input_signature()` in, `tokens` and `count` out."""
    chosen = decoder_for(model)
    return tf.function(lambda inputs: generate_tokens(model, chosen, **inputs), input_signature=[input_signature()],
                       autograph=False)


def text_signature(model: keras.Model) -> tf.types.experimental.GenericFunction:
    """The `generate_text` function of a byte-level model: `text` (prompts as strings [batch]) and the settings
    of `generate` in; `text` (each row's generated continuation, invalid UTF-8 replaced by U+FFFD), `tokens` and
    `count` out. Core TensorFlow ops only, so TF Serving runs it."""
    chosen = decoder_for(model)
    spec = {**{k: v for k, v in input_signature().items() if k not in SHAPES},
            "text": tf.TensorSpec([None], tf.string, name="text")}
    byte_strings = tf.constant([bytes([i]) for i in range(BYTE_VOCAB)])

    def generate_text(inputs):
        settings = {k: v for k, v in inputs.items() if k != "text"}
        pieces = tf.strings.bytes_split(inputs["text"])
        prompts = pieces.with_flat_values(tf.cast(tf.reshape(tf.io.decode_raw(pieces.flat_values, tf.uint8), [-1]),
                                                  tf.int32))
        out = generate_tokens(model, chosen, tokens=prompts.to_tensor(),
                              lengths=tf.cast(prompts.row_lengths(), tf.int32), **settings)
        tokens = out["tokens"]
        kept = tf.sequence_mask(out["count"], tf.shape(tokens)[1]) & (tokens < BYTE_VOCAB)
        generated = tf.strings.reduce_join(
            tf.where(kept, tf.gather(byte_strings, tf.clip_by_value(tokens, 0, BYTE_VOCAB - 1)), ""), axis=1)
        return {**out, "text": tf.strings.unicode_transcode(generated, "UTF-8", "UTF-8", errors="replace")}
    return tf.function(generate_text, input_signature=[spec], autograph=False)


def sample_request(task) -> dict[str, np.ndarray]:
    """A `generate` request from the task's test data (two prompts of different lengths, sampled), for the
    export's warmup and its check in a fresh process."""
    text = next(iter(task.examples("test")))[0].numpy()
    tokens = np.stack([text[:4], text[1:5]])
    values = {"tokens": tokens, "lengths": [4, 3], "max_new_tokens": 4, "temperature": 1.0, "top_k": 8, "top_p": 0.9,
              "seed": 7, "end_token": NO_END_TOKEN}
    return {name: np.asarray(value, INPUTS[name].as_numpy_dtype) for name, value in values.items()}


def sample_text_request(task) -> dict[str, np.ndarray]:
    """`sample_request` for the `generate_text` signature: the same prompts as strings."""
    request = sample_request(task)
    tokens, lengths = request.pop("tokens"), request.pop("lengths")
    return {**request, "text": np.array([row[:n].astype(np.uint8).tobytes() for row, n in zip(tokens, lengths)],
                                        dtype=object)}


SAMPLE_REQUESTS = {GENERATE: sample_request, GENERATE_TEXT: sample_text_request}  # for the export's own check


# One graph per model and decoder, traced again only for new shapes (reduce_retracing: after the second one,
# any prompt length); generation eagerly would pay Python's overhead for every layer of every step.
_compiled = tf.function(generate_tokens, reduce_retracing=True, autograph=False)


def _check(model: keras.Model, prompt: list[int], max_new_tokens: int, temperature: float, top_k: int,
           top_p: float) -> None:
    vocab, context = model.output_shape[-1], decoder_for(model).context(model)
    if not prompt:
        raise UsageError("the prompt is empty; give at least one token")
    if context is not None and len(prompt) > context:
        raise UsageError(f"the prompt has {len(prompt)} tokens, more than the model's context of {context}")
    if not all(0 <= token < vocab for token in prompt):
        raise UsageError(f"prompt token ids must be in [0, {vocab}), got {min(prompt)}..{max(prompt)}")
    if max_new_tokens < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise UsageError(f"need max_new_tokens >= 0, temperature >= 0, top_k >= 0 (0: all) and top_p in (0, 1]; "
                         f"got {max_new_tokens}, {temperature}, {top_k}, {top_p}")


def generate(model: keras.Model, prompt_tokens: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, end_token: int | None = None,
             use_cache: bool = True) -> list[int]:
    """Returns up to `max_new_tokens` tokens continuing `prompt_tokens` (the prompt itself is not repeated),
    as the SavedModel's `generate` signature does for a batch of one.

    temperature 0 is greedy; otherwise logits are divided by `temperature` and restricted by `top_k` and
    `top_p` before drawing. The same `seed` draws the same tokens. Generation stops after `end_token` and at
    the model's context.
    """
    tokens = [int(token) for token in prompt_tokens]
    _check(model, tokens, max_new_tokens, temperature, top_k, top_p)
    result = _compiled(model, decoder_for(model, use_cache), tf.constant([tokens], tf.int32),
                       tf.constant([len(tokens)], tf.int32), tf.constant(max_new_tokens, tf.int32),
                       tf.constant(temperature, tf.float32), tf.constant(top_k, tf.int32),
                       tf.constant(top_p, tf.float32), tf.constant(seed, tf.int64),
                       tf.constant(NO_END_TOKEN if end_token is None else end_token, tf.int32))
    return result["tokens"][0, :int(result["count"][0])].numpy().tolist()
