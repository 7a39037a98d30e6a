"""The model zoo: every builder builds for its kind of data, trains, runs in mixed precision, and saves."""
import keras
import ml_collections
import numpy as np
import pytest

from kerasbig import models
from kerasbig.data.spec import DataSpec
from kerasbig.errors import UsageError

DIGITS = DataSpec("classification", "image", (8, 8, 1), "float32", 10)
CIFAR = DataSpec("classification", "image", (32, 32, 3), "float32", 10)
TEXT = DataSpec("classification", "tokens", (12,), "int32", 3)
LM = DataSpec("language_model", "tokens", (12,), "int32", 24)

CASES = {  # id: (builder name, data, hyperparameters), all tiny
    "resnet-digits": ("resnet", DIGITS, dict(stage_widths=(8, 16), blocks_per_stage=(1, 1), stem_width=8)),
    "resnet-cifar-bottleneck": ("resnet", CIFAR, dict(stage_widths=(8, 16, 32), blocks_per_stage=(1, 1, 1),
                                                      bottleneck=True, stem_width=8, dropout=0.1)),
    "rnn-lstm-bidirectional": ("rnn", TEXT, dict(units=16, layers=2, bidirectional=True, embed_dim=8,
                                                 vocab_size=24)),
    "rnn-gru-lm": ("rnn", LM, dict(cell="gru", units=16, embed_dim=8)),
    "transformer-mean": ("transformer", TEXT, dict(vocab_size=24, width=16, depth=2, heads=2, dropout=0.0)),
    "transformer-max": ("transformer", TEXT, dict(vocab_size=24, width=16, depth=1, heads=4, pooling="max")),
    "gpt": ("gpt", LM, dict(width=16, depth=2, heads=2)),
    "gpt-no-bias": ("gpt", LM, dict(width=16, depth=1, heads=4, bias=False, dropout=0.1, mlp_ratio=2)),
    "llama": ("llama", LM, dict(width=16, depth=2, heads=4, kv_heads=2, hidden=32)),
}


def _build(case: str) -> tuple[keras.Model, DataSpec]:
    name, spec, hyperparameters = CASES[case]
    return models.build(spec, ml_collections.ConfigDict({"name": name, **hyperparameters})), spec


def _data(spec: DataSpec, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs and labels; token ids start at 1 so that classifiers see no padding."""
    rng = np.random.default_rng(0)
    if spec.input_dtype == "int32":
        x = rng.integers(1, 24, size=(n, *spec.input_shape)).astype("int32")
    else:
        x = rng.random((n, *spec.input_shape), dtype="float32")
    label_shape = (n, spec.seq_len) if spec.kind == "language_model" else (n,)
    return x, rng.integers(0, spec.num_classes, size=label_shape)


def _expected_shape(spec: DataSpec, batch: int) -> tuple[int, ...]:
    return (batch, spec.seq_len, spec.num_classes) if spec.kind == "language_model" else (batch, spec.num_classes)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


@pytest.fixture
def mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("case", CASES)
def test_output_shape_and_float32_logits(case):
    model, spec = _build(case)
    x, _ = _data(spec, n=3)
    logits = model(x)
    assert tuple(logits.shape) == _expected_shape(spec, 3)
    assert logits.dtype == "float32"


@pytest.mark.parametrize("case", CASES)
def test_fit_reduces_loss(case):
    model, spec = _build(case)
    x, y = _data(spec)
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    losses = model.fit(x, y, batch_size=8, epochs=6, verbose=0).history["loss"]
    assert losses[-1] < losses[0]


def test_gpt_trains_under_xla():
    """GPUs and TPUs compile the training step with XLA, so GPT's attention must compile too."""
    model, spec = _build("gpt")
    x, y = _data(spec, n=8)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    assert np.isfinite(model.train_on_batch(x, y))


@pytest.mark.parametrize("case", ["resnet-digits", "rnn-lstm-bidirectional", "transformer-max", "gpt"])
def test_mixed_bfloat16_trains_with_float32_logits(case, mixed_bfloat16):
    model, spec = _build(case)
    x, y = _data(spec, n=8)
    assert model.get_layer(index=-1).compute_dtype == "float32"
    assert any(layer.compute_dtype == "bfloat16" for layer in model.layers)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert model(x).dtype == "float32"


@pytest.mark.parametrize("case", CASES)
def test_saved_and_loaded_model_predicts_the_same(case, tmp_path):
    model, spec = _build(case)
    x, _ = _data(spec, n=4)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
    assert keras.Model.from_config(model.get_config()).count_params() == model.count_params()


@pytest.mark.parametrize("case", ["transformer-mean", "transformer-max", "rnn-lstm-bidirectional"])
def test_classifiers_ignore_padding(case):
    """Token 0 is padding: whatever its embedding is, padded inputs classify the same."""
    model, spec = _build(case)
    x, _ = _data(spec, n=4)
    x[:, 7:] = 0
    before = model.predict(x, verbose=0)
    embedding = next(layer for layer in model.layers if isinstance(layer, keras.layers.Embedding))
    table = embedding.embeddings.numpy()
    table[0] = 100.0
    embedding.embeddings.assign(table)
    np.testing.assert_allclose(model.predict(x, verbose=0), before, rtol=1e-5, atol=1e-5)


def test_gpt_is_causal():
    model, spec = _build("gpt")
    x, _ = _data(spec, n=2)
    changed = x.copy()
    changed[:, 8:] = (changed[:, 8:] + 1) % spec.num_classes
    before, after = model.predict(x, verbose=0), model.predict(changed, verbose=0)
    np.testing.assert_allclose(after[:, :8], before[:, :8], rtol=1e-5, atol=1e-6)
    assert not np.allclose(after[:, 8:], before[:, 8:])


def test_gpt_output_head_is_the_token_embedding():
    model, spec = _build("gpt")
    vocab_sized = [w.path for w in model.weights if spec.num_classes in w.shape]
    assert vocab_sized == ["token_embedding/embeddings"]


def test_gpt_accepts_prompts_shorter_than_its_context():
    model, spec = _build("gpt")
    assert tuple(model(np.ones((1, 5), "int32")).shape) == (1, 5, spec.num_classes)


@pytest.mark.parametrize("name, spec, hyperparameters, message", [
    ("gpt", LM, dict(width=30, heads=4), "width=30 must be divisible by heads=4"),
    ("gpt", TEXT, dict(width=16, heads=2), "language model"),
    ("gpt", LM, dict(depth=0), "positive"),
    ("rnn", LM, dict(bidirectional=True), "bidirectional"),
    ("rnn", TEXT, dict(cell="rnn"), "cell='rnn'"),
    ("rnn", DIGITS, dict(), "token sequences"),
    ("transformer", TEXT, dict(width=16, heads=3), "width=16 must be divisible by heads=3"),
    ("transformer", TEXT, dict(pooling="cls"), "pooling='cls'"),
    ("transformer", LM, dict(), "gpt"),
    ("resnet", DIGITS, dict(stage_widths=(8, 16), blocks_per_stage=(1,)), "equal length"),
    ("resnet", DIGITS, dict(bottleneck=True, stage_widths=(6,), blocks_per_stage=(1,)), "divisible by 4"),
    ("resnet", DIGITS, dict(dropout=1.5), "dropout"),
    ("resnet", TEXT, dict(), "images"),
])
def test_bad_hyperparameters_raise_usage_error(name, spec, hyperparameters, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        models.BUILDERS[name](spec, **hyperparameters)


def test_builders_are_registered():
    assert sorted(models.BUILDERS) == ["cnn", "gpt", "llama", "mlp", "resnet", "rnn", "transformer"]


def test_transformer_patches_group_tokens_and_ignore_padding_patches():
    spec = DataSpec("classification", "text", (16,), "int32", 3)
    model = models.build(spec, ml_collections.ConfigDict(
        {"name": "transformer", "width": 16, "depth": 1, "heads": 2, "patch_size": 4, "dropout": 0.0}))
    assert model.get_layer("position_embedding").max_length == 4
    tokens = np.array([[5, 6, 7, 8, 9, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], "int32")
    # Whole patches of padding are neither attended to nor pooled: changing the pad embedding changes nothing.
    before = model.predict(tokens, verbose=0)
    embedding = model.get_layer("token_embedding")
    table = embedding.embeddings.numpy()
    table[0] += 1.0
    embedding.embeddings.assign(table)
    with pytest.raises(AssertionError):  # the partly padded patch 2 does see its padding bytes
        np.testing.assert_allclose(model.predict(tokens, verbose=0), before, atol=1e-6)
    fully_padded = np.array([[5, 6, 7, 8] + [0] * 12], "int32")
    first = model.predict(fully_padded, verbose=0)
    table[0] -= 5.0
    embedding.embeddings.assign(table)
    np.testing.assert_allclose(model.predict(fully_padded, verbose=0), first, atol=1e-5)
    with pytest.raises(UsageError, match="patch_size=5"):
        models.build(spec, ml_collections.ConfigDict({"name": "transformer", "patch_size": 5}))


@pytest.mark.parametrize("case", CASES)
def test_weight_paths_are_the_same_in_every_build(case):
    """Checkpoints are keyed by weight path, so a builder's paths must not depend on what the process built
    before (Keras numbers unnamed layers per process)."""
    first, _ = _build(case)
    models.build(DIGITS, ml_collections.ConfigDict({"name": "mlp", "hidden": (4,)}))  # takes Keras' next names
    second, _ = _build(case)
    assert [w.path for w in first.weights] == [w.path for w in second.weights]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_sequential_weight_paths_are_stable(name):
    paths = [[w.path for w in models.build(DIGITS, ml_collections.ConfigDict({"name": name})).weights]
             for _ in range(2)]
    assert paths[0] == paths[1]
