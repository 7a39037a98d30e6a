"""Generation: the compiled loop over the preallocated cache agrees with running the whole model, for batches of
padded prompts too; sampling is seeded, stops at the end token; bad prompts fail."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasbig import generation
from kerasbig.data.spec import DataSpec
from kerasbig.errors import UsageError
from kerasbig.generation import generate
from kerasbig.models.gpt import build_gpt, decode, empty_cache
from kerasbig.models.llama import build_llama
from kerasbig.models.rnn import build_rnn
from kerasbig.models.transformer import build_transformer

VOCAB, CONTEXT = 40, 16
LM = DataSpec("language_model", "tokens", (CONTEXT,), "int32", VOCAB)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
TEXT = DataSpec("classification", "tokens", (8,), "int32", 2)


@pytest.fixture(scope="module")
def gpt():
    keras.utils.set_random_seed(0)
    model = build_gpt(LM, width=32, depth=2, heads=4)
    rng = np.random.default_rng(0)  # weights larger than GPT-2's init, so greedy decoding does not repeat one token
    for variable in model.weights:
        variable.assign(variable + rng.normal(0, 1.0, variable.shape).astype("float32"))
    return model


@pytest.fixture(scope="module")
def rnn():
    keras.utils.set_random_seed(0)
    return build_rnn(LM, cell="lstm", units=16, layers=2, embed_dim=8)


def _greedy_by_recomputing(model, prompt, new_tokens, context=None):
    """The slow reference: run the whole model on the last `context` tokens for every new token."""
    tokens = list(prompt)
    for _ in range(new_tokens):
        window = tokens[-context:] if context else tokens
        tokens.append(int(np.argmax(model(np.array([window]))[0, -1])))
    return tokens[len(prompt):]


def test_gpt_decode_matches_the_full_model_at_every_position(gpt):
    tokens = np.array([PROMPT + [7, 8, 9, 10]])
    full = gpt(tokens).numpy()
    logits, cache = decode(gpt, tokens[:, :len(PROMPT)], empty_cache(gpt, 1, CONTEXT), 0)
    np.testing.assert_allclose(logits, full[:, :len(PROMPT)], rtol=1e-5, atol=1e-4)
    for position in range(len(PROMPT), tokens.shape[1]):
        logits, cache = decode(gpt, tokens[:, position:position + 1], cache, position)
        np.testing.assert_allclose(logits[:, 0], full[:, position], rtol=1e-5, atol=1e-4)
    assert [tuple(k.shape) for k, _ in cache] == [(1, CONTEXT, 4, 8)] * 2  # preallocated: it never grew


def test_gpt_greedy_with_cache_equals_recomputing_and_stops_at_the_context(gpt):
    expected = _greedy_by_recomputing(gpt, PROMPT, CONTEXT - len(PROMPT))
    assert len(set(expected)) > 2
    assert generate(gpt, PROMPT, 20, temperature=0) == expected  # 8 + 20 > 16: stops at the context
    assert generate(gpt, PROMPT, 20, temperature=0, use_cache=False) == expected


@pytest.fixture(scope="module")
def signature(gpt):
    """The SavedModel's `generate` function of `gpt`, traced once for every test of this module."""
    return generation.signature(gpt)


def _generate_batch(signature, prompts, max_new_tokens, **settings):
    settings = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0, "end_token": -1, **settings}
    padded = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, :len(prompt)] = prompt
    inputs = {"tokens": padded, "lengths": np.array([len(p) for p in prompts], np.int32),
              "max_new_tokens": max_new_tokens, **settings}
    specs = generation.input_signature()
    out = signature({k: tf.constant(v, specs[k].dtype) for k, v in inputs.items()})
    return [row[:count].tolist() for row, count in zip(out["tokens"].numpy(), out["count"].numpy())]


def test_padded_batches_generate_what_each_prompt_generates_alone(gpt, signature):
    prompts = [PROMPT[:3], PROMPT, PROMPT[2:7]]
    assert _generate_batch(signature, prompts, 6) == [_greedy_by_recomputing(gpt, p, 6) for p in prompts]


def test_end_token_stops_each_row_and_counts_it(gpt, signature):
    prompts = [PROMPT[:3], PROMPT]
    first = [_greedy_by_recomputing(gpt, p, 1)[0] for p in prompts]
    greedy = _generate_batch(signature, prompts, 6)
    stopped = _generate_batch(signature, prompts, 6, end_token=first[0])
    assert stopped[0] == [first[0]]
    cut = greedy[1].index(first[0]) + 1 if first[0] in greedy[1] else 6
    assert stopped[1] == greedy[1][:cut]


def test_the_loop_is_traced_once_for_any_settings_and_cache_size(signature):
    # 3 to 19 positions: cache buckets of 4 to 16 (the context), each in the one graph.
    for prompts, new_tokens, seed in (([PROMPT[:2]], 1, 0), ([PROMPT], 7, 1), ([PROMPT, PROMPT[:3]], 11, 2)):
        _generate_batch(signature, prompts, new_tokens, seed=seed, temperature=0.7)
    assert _generate_batch(signature, [PROMPT], 0) == [[]]
    assert signature.experimental_get_tracing_count() == 1


def test_llama_greedy_with_cache_equals_recomputing_and_stops_at_the_context():
    keras.utils.set_random_seed(0)
    model = build_llama(LM, width=32, depth=2, heads=4, kv_heads=2, hidden=48)
    rng = np.random.default_rng(0)  # large weights, as for gpt; RMSNorm's unit scales need them larger still
    for variable in model.weights:
        variable.assign(variable + rng.normal(0, 3.0, variable.shape).astype("float32"))
    expected = _greedy_by_recomputing(model, PROMPT, CONTEXT - len(PROMPT))
    assert len(set(expected)) > 2
    assert generate(model, PROMPT, 20, temperature=0) == expected
    assert generate(model, PROMPT, 20, temperature=0, use_cache=False) == expected


def test_rnn_greedy_with_states_equals_recomputing(rnn):
    expected = _greedy_by_recomputing(rnn, PROMPT, 20)
    assert generate(rnn, PROMPT, 20, temperature=0) == expected
    assert generate(rnn, PROMPT, 20, temperature=0, use_cache=False) == expected


def test_sampling_is_seeded_and_top_k_1_or_tiny_top_p_is_greedy(gpt):
    sampled = generate(gpt, PROMPT, 8, temperature=1.5, seed=1)
    assert sampled == generate(gpt, PROMPT, 8, temperature=1.5, seed=1)
    assert sampled != generate(gpt, PROMPT, 8, temperature=1.5, seed=2)
    assert all(0 <= token < VOCAB for token in sampled)
    greedy = generate(gpt, PROMPT, 8, temperature=0)
    assert generate(gpt, PROMPT, 8, top_k=1, seed=3) == greedy
    assert generate(gpt, PROMPT, 8, top_p=1e-6, seed=3) == greedy


def test_top_p_draws_only_from_the_nucleus(gpt):
    probabilities = tf.nn.softmax(gpt(np.array([PROMPT]))[0, -1]).numpy()
    order = np.argsort(probabilities)[::-1]
    nucleus = set(order[:np.searchsorted(np.cumsum(probabilities[order]), 0.6) + 1].tolist())
    draws = {generate(gpt, PROMPT, 1, top_p=0.6, seed=seed)[0] for seed in range(30)}
    assert draws <= nucleus and len(nucleus) < VOCAB


def test_top_k_draws_only_from_the_k_most_likely(gpt):
    logits = gpt(np.array([PROMPT]))[0, -1].numpy()
    top_3 = set(np.argsort(logits)[-3:].tolist())
    draws = {generate(gpt, PROMPT, 1, temperature=5.0, top_k=3, seed=seed)[0] for seed in range(30)}
    assert draws <= top_3


@pytest.mark.parametrize("prompt, message", [
    (list(range(1, CONTEXT + 2)), "more than the model's context of 16"),
    ([1, 2, VOCAB], r"in \[0, 40\)"),
    ([-1, 2], r"in \[0, 40\)"),
    ([], "empty"),
])
def test_bad_prompts_raise_usage_error(gpt, prompt, message):
    with pytest.raises(UsageError, match=message):
        generate(gpt, prompt, 4)


@pytest.mark.parametrize("build_classifier", [
    lambda: build_transformer(TEXT, width=8, heads=2),
    lambda: build_rnn(TEXT, units=8),
], ids=["transformer", "rnn"])
def test_classifiers_cannot_generate(build_classifier):
    with pytest.raises(UsageError, match="generation supports"):
        generate(build_classifier(), [1, 2], 4)


@pytest.mark.slow
def test_generate_command_samples_from_a_trained_workdir(tmp_path):
    from conftest import kerasbig
    workdir = tmp_path / "gpt"
    kerasbig("train", "--config=configs/gpt_small.py", "--config.train.steps=5", "--config.model.width=32",
             "--config.model.depth=1", "--config.train.jit_compile=False", "--mode=train", f"--workdir={workdir}")
    printed = kerasbig("generate", f"--workdir={workdir}", "--prompt=The for statement", "--max_new_tokens=24",
                       "--temperature=0")
    header, text = printed.stdout.split("\n", 1)
    assert header == "[gpt at step 5]" and text.startswith("The for statement") and len(text) > len("The for statement")
    missing = kerasbig("generate", f"--workdir={tmp_path / 'nothing'}", check=False)
    assert missing.returncode == 2 and "holds no config.json" in missing.stderr
