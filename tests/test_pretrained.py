"""`config.model.init_from`: the tiny GPT-2 and Llama checkpoints that `transformers` made
(tests/fixtures/make_pretrained.py) give kerasbig the logits and token ids `transformers` gave; kerasbig's own
files and workdirs load back; bad checkpoints are refused in one line; the GPT-2 fine-tunes through the command
line on CPython's docs."""
import json
import pathlib
import shutil
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, kerasbig
from data_helpers import assert_bad_data, write_corpus
from kerasbig import data, models, pretrained
from kerasbig.data.spec import LANGUAGE_MODEL, DataSpec
from kerasbig.errors import UsageError
from kerasbig.models import llama
from kerasbig.pretrained import tokenizers

FIXTURES = REPO / "tests" / "fixtures"
FAMILIES = ["gpt2_tiny", "llama_tiny"]
TEXT = (FIXTURES / "pretrained_text.txt").read_text(encoding="utf-8")
CONTEXT = 64


def reference(name: str) -> dict:
    with np.load(FIXTURES / name / "reference.npz") as values:
        return dict(values)


def spec(vocab: int = 320, seq_len: int = CONTEXT) -> DataSpec:
    return DataSpec(LANGUAGE_MODEL, "tokens", (seq_len,), "int32", vocab)


def load(init_from, **model_keys) -> keras.Model:
    model_config = {"init_from": str(init_from), **model_keys}
    model = models.build(spec(), model_config)
    pretrained.load_weights(model, model_config)
    return model


@pytest.mark.parametrize("name", [*FAMILIES, "llama31_tiny", "gpt2_keras_hub"])
def test_logits_equal_those_of_transformers_and_keras_hub(name):
    want = reference(name)
    got = load(FIXTURES / name)(want["ids"][None, :CONTEXT]).numpy()[0]
    np.testing.assert_allclose(got, want["logits"], atol=1e-4, rtol=0)


def test_architecture_comes_from_the_checkpoint():
    assert models.hyperparameters({"init_from": str(FIXTURES / "gpt2_tiny")}) == ("gpt", dict(
        width=32, depth=2, heads=4, mlp_ratio=4, bias=True, vocab_size=320, context=CONTEXT, activation="gelu_tanh"))
    name, found = models.hyperparameters({"init_from": str(FIXTURES / "llama_tiny"), "dropout": 0.1})
    assert name == "llama" and found["kv_heads"] == 2 and found["dropout"] == 0.1
    assert not found["tie_embeddings"] and found["hidden"] == 64


@pytest.mark.parametrize("key, value", [("width", 64), ("name", "llama"), ("activation", "gelu")])
def test_a_config_key_that_contradicts_the_checkpoint_is_refused(key, value):
    with pytest.raises(UsageError, match=f"config.model.{key}={value!r} contradicts"):
        models.hyperparameters({"init_from": str(FIXTURES / "gpt2_tiny"), key: value})


@pytest.mark.parametrize("name, files", [("gpt2_tiny", ["vocab.json", "merges.txt"]),
                                         ("gpt2_tiny", ["tokenizer.json"]),
                                         ("llama_tiny", ["tokenizer.model"])])
def test_token_ids_equal_those_of_transformers(name, files, tmp_path):
    for file in files:
        shutil.copy(FIXTURES / name / file, tmp_path / file)
    tokenizer = tokenizers.load(tmp_path)
    ids = tokenizer.encode(TEXT)
    assert ids.tolist() == reference(name)["ids"].tolist()
    assert tokenizer.decode(ids) == TEXT
    assert set(tokenizer.files) == set(files)


def test_llama31_scaled_rotary_positions_are_read_and_written_back(tmp_path):
    from kerasbig.pretrained import hf

    want = reference("llama31_tiny")
    unscaled = broken_copy(tmp_path, "llama31_tiny", edit_config(rope_parameters={"rope_type": "default"}))
    assert np.abs(load(unscaled)(want["ids"][None, :CONTEXT]).numpy()[0] - want["logits"]).max() > 1e-2
    name, hyper = models.hyperparameters({"init_from": str(FIXTURES / "llama31_tiny")})
    written = hf.checkpoint_config(name, hyper, vocab=320, context=4 * CONTEXT, end_token=None)
    assert written["rope_parameters"] == hf.read_config(FIXTURES / "llama31_tiny")["rope_parameters"]


def test_a_keras_hub_presets_own_tokenizer_gives_the_ids_of_transformers():
    tokenizer = tokenizers.load(FIXTURES / "gpt2_keras_hub")  # its assets/tokenizer/vocabulary.json + merges.txt
    assert tokenizer.encode(TEXT).tolist() == reference("gpt2_tiny")["ids"].tolist()
    # keras-hub's own tokenizer splits runs of spaces otherwise (202 ids, not 205): other ids, the same text.
    assert tokenizer.decode(reference("gpt2_keras_hub")["text_ids"]) == TEXT
    assert set(tokenizer.files) == {"vocab.json", "merges.txt"}  # kept under Hugging Face's names


def test_llama_decode_with_a_cache_equals_the_whole_forward_pass():
    model = load(FIXTURES / "llama_tiny")
    ids = reference("llama_tiny")["ids"][None, :12]
    cache = llama.empty_cache(model, 1, llama.context_length(model))
    logits, cache = llama.decode(model, ids[:, :8], cache, 0)
    steps = [logits]
    for i in range(8, 12):
        logits, cache = llama.decode(model, ids[:, i:i + 1], cache, i)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), model(ids).numpy(), atol=1e-5)


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_kerasbig_files_load_back(suffix, tmp_path):
    source = load(FIXTURES / "llama_tiny")
    path = tmp_path / f"model{suffix}"
    (source.save if suffix == ".keras" else source.save_weights)(str(path))
    # A weights file holds no architecture: the config gives it.
    keys = {} if suffix == ".keras" else {"name": "llama", **models.hyperparameters(
        {"init_from": str(FIXTURES / "llama_tiny")})[1]}
    ids = reference("llama_tiny")["ids"][None, :CONTEXT]
    np.testing.assert_allclose(load(path, **keys)(ids).numpy(), source(ids).numpy(), atol=1e-6)


def broken_copy(tmp_path: pathlib.Path, name: str, change) -> pathlib.Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    change(folder)
    return folder


def edit_config(**values):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **values}))
    return change


def truncate(folder, name="model.safetensors"):
    weights = folder / name
    weights.write_bytes(weights.read_bytes()[:5000])


def drop_tensor(folder):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors")


BAD_CHECKPOINTS = {
    "no config.json": ("gpt2_tiny", lambda f: (f / "config.json").unlink(), "cannot read config.json"),
    "no weights": ("gpt2_tiny", lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    "truncated weights": ("llama_tiny", truncate, "cannot read model.safetensors"),
    "a tensor missing": ("llama_tiny", drop_tensor, "lack 'model.norm.weight'"),
    "unknown model_type": ("gpt2_tiny", edit_config(model_type="bert"), "model_type 'bert'"),
    "unknown rotary scaling": ("llama31_tiny", edit_config(rope_parameters={"rope_type": "yarn"}),
                               "rope_type='yarn' is not supported"),
    "partial Llama 3.1 scaling": ("llama31_tiny", edit_config(rope_parameters={"rope_type": "llama3", "factor": 8.0}),
                                  r"rope_type 'llama3' needs \['low_freq_factor'"),
    "vocabulary not the weights'": ("gpt2_tiny", edit_config(vocab_size=400), "in config.json"),
    "context not the weights'": ("gpt2_tiny", edit_config(n_positions=128), r"\(64, 32\) in the weights"),
    "depth not the weights'": ("llama_tiny", edit_config(num_hidden_layers=3), "lack 'model.layers.2"),
    "another keras-hub backbone": ("gpt2_keras_hub", edit_config(registered_name="keras_hub>BertBackbone"),
                                   "'keras_hub>BertBackbone' is not one kerasbig reads"),
    "truncated keras-hub weights": ("gpt2_keras_hub", lambda f: truncate(f, "model.weights.h5"),
                                    "cannot read model.weights.h5"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoints_are_named(case, tmp_path):
    name, change, message = BAD_CHECKPOINTS[case]
    with pytest.raises(UsageError, match=message):
        load(broken_copy(tmp_path, name, change))


@pytest.mark.parametrize("name", FAMILIES)
def test_a_sequence_longer_than_the_checkpoints_context_is_refused(name):
    with pytest.raises(UsageError, match="context=64 is shorter than data.seq_len=65"):
        models.build(spec(seq_len=65), {"init_from": str(FIXTURES / name)})


def test_a_tokenizer_that_does_not_match_the_checkpoint_is_refused(tmp_path):
    folder = broken_copy(tmp_path, "gpt2_tiny", edit_config(vocab_size=200))
    with pytest.raises(UsageError, match="vocab_size=200 is smaller than the data's vocabulary"):
        models.build(spec(vocab=tokenizers.load(folder).vocab_size), {"init_from": str(folder)})


def finetune_config(tmp_path: pathlib.Path, init_from: pathlib.Path, docs: pathlib.Path, **model_keys) -> pathlib.Path:
    path = tmp_path / "finetune.py"
    path.write_text(f"""from kerasbig.config import base


def get_config():
    config = base()
    config.data.name = "corpus:{docs}/*.txt"
    config.data.cache_dir = "{tmp_path / 'cache'}"
    config.data.seq_len = 32
    config.data.batch_size = 16
    config.data.eval_batch_size = 64
    config.model = dict(init_from="{init_from}", **{model_keys!r})
    config.optimizer.learning_rate = 3e-3
    config.schedule.warmup_steps = 5
    config.train.steps = 80
    config.train.steps_per_execution = 10
    config.train.eval_every_steps = 80
    config.export.name = "finetuned"
    return config.lock()
""")
    return path


def pretrained_data_config(saved: dict):
    """The data config a run saved, as a ConfigDict."""
    from kerasbig.config import base
    config = base().data
    config.update(saved)
    return config


def mean_test_loss(model: keras.Model, task) -> float:
    losses = [keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True).numpy().mean()
              for x, y in task.examples("test").batch(64)]
    return float(np.mean(losses))


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank, drop", [(0, 1.5), (8, 0.6)])
def test_gpt2_fine_tunes_on_cpython_docs_and_exports_with_its_tokenizer(lora_rank, drop, tmp_path):
    docs = write_corpus(tmp_path / "docs")
    config = finetune_config(tmp_path, FIXTURES / "gpt2_tiny", docs, lora_rank=lora_rank)
    run, models_dir = tmp_path / "run", tmp_path / "models"
    kerasbig("train", f"--config={config}", f"--workdir={run}", f"--export_dir={models_dir / 'finetuned'}")
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["tokenizer"] == f"pretrained:{FIXTURES / 'gpt2_tiny'}"
    task = data.load_task(pretrained_data_config(saved["data"]))
    start = mean_test_loss(load(FIXTURES / "gpt2_tiny"), task)
    end = json.loads((run / "metrics.json").read_text())["loss"]
    # Nats per token: 6.23 -> 3.98 with full fine-tuning here, 6.23 -> 5.32 with rank-8 adapters alone.
    assert end < start - drop, (start, end)
    version = models_dir / "finetuned" / "1"
    for file in ("vocab.json", "merges.txt"):
        assert (version / "assets.extra" / file).read_bytes() == (FIXTURES / "gpt2_tiny" / file).read_bytes()
        assert (run / file).is_file()
    if not lora_rank:  # test_hf_export_round_trips writes full models; here the adapters must be merged in
        return
    tokens = tokenizers.load(FIXTURES / "gpt2_tiny").encode("The for statement")[None]
    served = tf.saved_model.load(str(version)).signatures["serving_default"](tokens=tf.constant(tokens))
    kerasbig("train", f"--config={config}", f"--workdir={run}", "--mode=export", "--export_format=hf",
             f"--export_dir={tmp_path / 'hf'}")
    back = load(tmp_path / "hf")(tokens).numpy()[:, -1]
    np.testing.assert_allclose(back, served["logits"].numpy(), atol=1e-5)
    assert (tmp_path / "hf" / "vocab.json").read_bytes() == (FIXTURES / "gpt2_tiny" / "vocab.json").read_bytes()


@pytest.mark.slow
def test_a_checkpoint_with_a_contradicting_key_exits_2_and_writes_nothing(tmp_path):
    docs = write_corpus(tmp_path / "docs")
    config = finetune_config(tmp_path, FIXTURES / "gpt2_tiny", docs, width=64)
    assert_bad_data(f"--config={config}", workdir=tmp_path / "run", names="config.model.width=64 contradicts")


TORCH_PYTHON = pathlib.Path("/work/torchvenv/bin/python")  # a venv with torch + transformers, where there is one
TORCH_LOGITS = """import sys, numpy as np, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    np.save(sys.argv[3], model(torch.tensor(np.load(sys.argv[2]))).logits.numpy())
"""


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_export_round_trips(name, tmp_path):
    model = load(FIXTURES / name)
    # As if fine-tuned: every weight moves, so a weight written to the wrong tensor shows.
    for variable in model.weights:
        variable.assign(variable + np.random.default_rng(0).normal(0, 0.05, variable.shape).astype("float32"))
    folder = pretrained.export_hf(model, {"init_from": str(FIXTURES / name)}, tmp_path / "hf",
                                  tokenizer=tokenizers.load(FIXTURES / name), seq_len=CONTEXT)
    ids = reference(name)["ids"][None, :CONTEXT]
    want = model(ids).numpy()
    np.testing.assert_allclose(load(folder)(ids).numpy(), want, atol=1e-5)
    assert tokenizers.load(folder).encode(TEXT).tolist() == reference(name)["ids"].tolist()
    if not TORCH_PYTHON.exists():
        pytest.skip("no torch venv: transformers' own reading of the folder is not checked here")
    np.save(tmp_path / "ids.npy", ids.astype(np.int64))
    subprocess.run([str(TORCH_PYTHON), "-c", TORCH_LOGITS, str(folder), str(tmp_path / "ids.npy"),
                    str(tmp_path / "logits.npy")], check=True, capture_output=True, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), want, atol=1e-4)


def test_a_kerasbig_workdir_continues_with_a_new_config(tmp_path):
    from kerasbig.checkpoint import Checkpoints

    source = load(FIXTURES / "gpt2_tiny")
    for variable in source.weights:  # the run's own weights, not the checkpoint it started from
        variable.assign(variable * 1.5)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"model": {"init_from": str(FIXTURES / "gpt2_tiny")},
                                                     "data": {"seq_len": 32}}))
    optimizer = keras.optimizers.AdamW()
    optimizer.build(source.trainable_variables)
    Checkpoints(workdir / "checkpoints", model=source, optimizer=optimizer, keep=1).save(7, {"step": 7})
    ids = reference("gpt2_tiny")["ids"][None, :CONTEXT]
    np.testing.assert_allclose(load(workdir, dropout=0.1)(ids).numpy(), source(ids).numpy(), atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_dry_run_sizes_the_checkpoints_architecture(name):
    from kerasbig.models import sizing

    estimate = sizing.estimate(spec(seq_len=32), {"init_from": str(FIXTURES / name)}, batch_per_replica=2)
    assert estimate.total_params == load(FIXTURES / name).count_params()


@pytest.mark.parametrize("data_name, tokenizer, message", [
    ("text_lm", "bytes", "only corpus: data takes"),
    ("corpus:docs/*.txt", "bpe:1000", "config.data.tokenizer='bpe:1000' contradicts"),
])
def test_data_the_checkpoints_tokenizer_cannot_read_is_refused(data_name, tokenizer, message):
    from kerasbig.config import base

    config = base()
    config.data.name, config.data.tokenizer = data_name, tokenizer
    config.model = {"init_from": str(FIXTURES / "llama_tiny")}
    with pytest.raises(UsageError, match=message):
        pretrained.adopt_tokenizer(config)


@pytest.mark.parametrize("name, files", [("llama_tiny", {"tokenizer.model"}),
                                         ("gpt2_keras_hub", {"vocab.json", "merges.txt"})])
def test_corpus_data_takes_the_checkpoints_tokenizer(name, files, tmp_path):
    from kerasbig.config import base

    config = base()
    config.data.name = f"corpus:{write_corpus(tmp_path / 'docs')}/*.txt"
    config.data.cache_dir = str(tmp_path / "cache")
    config.model = {"init_from": str(FIXTURES / name)}
    pretrained.adopt_tokenizer(config)
    assert config.data.tokenizer == f"pretrained:{FIXTURES / name}"
    task = data.load_task(config.data)
    assert task.spec.num_classes == 320 and set(task.tokenizer.files) == files
    inputs, _ = next(iter(task.examples("train")))
    document = task.tokenizer.decode(inputs.numpy())
    assert task.tokenizer.encode(document)[:16].tolist() == inputs.numpy()[:16].tolist()


@pytest.mark.parametrize("model_config, message", [
    ({"name": "cnn"}, "writes gpt and llama models"),
    ({"name": "gpt", "bias": False}, "GPT-2 has biases"),
])
def test_a_model_without_a_hugging_face_form_is_refused_before_training(model_config, message):
    with pytest.raises(UsageError, match=message):
        pretrained.check_hf_export(model_config)


def test_a_workdir_keeps_the_context_it_was_trained_with(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "gpt", "width": 16, "depth": 1, "heads": 2},
                                                      "data": {"seq_len": 48}}))
    assert models.hyperparameters({"init_from": str(tmp_path)})[1]["context"] == 48
