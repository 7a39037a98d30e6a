"""Generation: the cached decoders agree with running the whole model, sampling is seeded, bad prompts fail."""
import keras
import numpy as np
import pytest

from kerasbig.data.spec import DataSpec
from kerasbig.errors import UsageError
from kerasbig.generation import generate
from kerasbig.models.gpt import build_gpt, decode
from kerasbig.models.rnn import build_rnn
from kerasbig.models.transformer import build_transformer

VOCAB, CONTEXT = 40, 16
LM = DataSpec("language_model", "tokens", (CONTEXT,), "int32", VOCAB)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
TEXT = DataSpec("classification", "tokens", (8,), "int32", 2)


@pytest.fixture(scope="module")
def gpt():
    keras.utils.set_random_seed(0)
    return build_gpt(LM, width=32, depth=2, heads=4)


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
    logits, cache = decode(gpt, tokens[:, :len(PROMPT)])
    np.testing.assert_allclose(logits, full[:, len(PROMPT) - 1], atol=1e-5)
    for position in range(len(PROMPT), tokens.shape[1]):
        logits, cache = decode(gpt, tokens[:, position:position + 1], cache)
        np.testing.assert_allclose(logits, full[:, position], atol=1e-5)


def test_gpt_greedy_with_cache_equals_recomputing(gpt):
    # 8 prompt tokens + 20 new ones run past the 16-token context, so the window slides too.
    expected = _greedy_by_recomputing(gpt, PROMPT, 20, context=CONTEXT)
    assert generate(gpt, PROMPT, 20, temperature=0) == expected
    assert generate(gpt, PROMPT, 20, temperature=0, use_cache=False) == expected


def test_rnn_greedy_with_states_equals_recomputing(rnn):
    expected = _greedy_by_recomputing(rnn, PROMPT, 20)
    assert generate(rnn, PROMPT, 20, temperature=0) == expected
    assert generate(rnn, PROMPT, 20, temperature=0, use_cache=False) == expected


def test_sampling_is_seeded_and_top_k_1_is_greedy(gpt):
    sampled = generate(gpt, PROMPT, 12, temperature=1.5, seed=1)
    assert sampled == generate(gpt, PROMPT, 12, temperature=1.5, seed=1)
    assert sampled != generate(gpt, PROMPT, 12, temperature=1.5, seed=2)
    assert all(0 <= token < VOCAB for token in sampled)
    assert generate(gpt, PROMPT, 12, top_k=1, seed=3) == generate(gpt, PROMPT, 12, temperature=0)


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
    args = [f"--workdir={workdir}", "--prompt=The for statement", "--max_new_tokens=24", "--temperature=0"]
    first, again = kerasbig("generate", *args), kerasbig("generate", *args)
    assert first.stdout == again.stdout  # greedy: the same text every time
    header, text = first.stdout.split("\n", 1)
    assert header == "[gpt at step 5]" and text.startswith("The for statement") and len(text) > len("The for statement")
    missing = kerasbig("generate", f"--workdir={tmp_path / 'nothing'}", check=False)
    assert missing.returncode == 2 and "holds no config.json" in missing.stderr
