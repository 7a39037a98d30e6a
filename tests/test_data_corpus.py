"""`corpus:GLOB`: CPython's docs (pydoc topics) and sources written as text files, tokenized by a trained BPE
model or by bytes into a cache of token shards, trained on through the command line, exported and served."""
import json
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from conftest import kerasbig
from data_helpers import assert_bad_data, assert_core_ops, data_config, post, serving, write_corpus
from kerasbig import config as config_lib, data
from kerasbig.data import corpus, text
from kerasbig.errors import UsageError

SEQ_LEN = 64


def corpus_config(root: pathlib.Path, tmp_path: pathlib.Path, **overrides):
    return data_config(f"corpus:{root}/*.txt", seq_len=SEQ_LEN, cache_dir=str(tmp_path / "cache"), **overrides)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


@pytest.fixture(scope="module")
def bpe_task(docs, tmp_path_factory):
    return data.load_task(corpus_config(docs, tmp_path_factory.mktemp("bpe"), tokenizer="bpe:1000"))


def test_bpe_round_trips_text_exactly(bpe_task, docs):
    tokenizer = bpe_task.tokenizer
    assert bpe_task.spec.num_classes == tokenizer.vocab_size == 1000
    samples = [(docs / "0-assert.txt").read_text(), "  two  spaces,\ttabs\r\nand CRLF \n\n", "café ∑ 日本語 🐍",
               "", "\x00 and a NUL", " leading and trailing "]
    for sample in samples:
        ids = tokenizer.encode(sample)
        assert tokenizer.decode(ids) == sample
        assert bpe_task.token_bytes[ids].sum() == len(sample.encode("utf-8"))  # honest bits per byte
    assert len(tokenizer.encode(samples[0])) < len(samples[0].encode()) / 2  # it learnt merges


def test_windows_are_next_token_pairs_of_the_split_stream(bpe_task):
    inputs, labels = next(iter(bpe_task.examples("validation").batch(3)))
    assert inputs.shape == (3, SEQ_LEN) and inputs.dtype == tf.int32
    np.testing.assert_array_equal(inputs.numpy()[:, 1:], labels.numpy()[:, :-1])
    np.testing.assert_array_equal(inputs.numpy()[1:, 0], labels.numpy()[:-1, -1])  # windows overlap by one


def test_shards_are_read_across_boundaries(docs, tmp_path, monkeypatch):
    config = corpus_config(docs, tmp_path)
    whole = data.load_task(config)
    monkeypatch.setattr(corpus, "SHARD_TOKENS", 1000)
    sharded = data.load_task(corpus_config(docs, tmp_path / "small"))
    shards = list((tmp_path / "small" / "cache").glob("*/train-*.bin"))
    assert len(shards) > 10 and all(os.path.getsize(p) <= 2000 for p in shards)
    for split in text.SPLITS:
        a = next(iter(whole.examples(split).batch(1000)))[0].numpy()
        b = next(iter(sharded.examples(split).batch(1000)))[0].numpy()
        np.testing.assert_array_equal(a, b)


def test_byte_tokens_are_the_files_bytes_and_documents_do_not_leak(docs, tmp_path):
    task = data.load_task(corpus_config(docs, tmp_path))
    assert task.spec.num_classes == 256 and task.token_bytes.sum() == 256
    meta = json.loads(next((tmp_path / "cache").glob("*/meta.json")).read_text())
    files = {split: {path for path, _, _ in documents} for split, documents in meta["documents"].items()}
    assert not files["train"] & files["test"] and not files["train"] & files["validation"]
    first, _, _ = meta["documents"]["train"][0]  # the train stream starts with its first document
    start = next(iter(task.examples("train")))[0].numpy()
    assert text.decode(start) == pathlib.Path(first).read_text()[:SEQ_LEN]


def test_cache_is_reused_until_a_file_changes(docs, tmp_path):
    copy = write_corpus(tmp_path / "docs")
    config = corpus_config(copy, tmp_path)
    data.load_task(config)
    (folder,) = (tmp_path / "cache").iterdir()
    built = (folder / "meta.json").stat().st_mtime_ns
    data.load_task(config)
    assert (folder / "meta.json").stat().st_mtime_ns == built and len(list((tmp_path / "cache").iterdir())) == 1
    (copy / "0-assert.txt").write_text("changed")
    data.load_task(config)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_single_file_is_cut_into_documents(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("".join(f"line {i} of the only book\n" for i in range(2000)))
    task = data.load_task(data_config(f"corpus:{book}", seq_len=SEQ_LEN, cache_dir=str(tmp_path / "cache")))
    assert all(task.num_examples[split] > 0 for split in text.SPLITS)


@pytest.mark.parametrize("case", ["no_files", "too_small", "not_utf8", "bad_tokenizer", "too_many_pieces"])
def test_bad_corpora_are_named(tmp_path, case):
    root = tmp_path / "docs"
    root.mkdir()
    overrides = {}
    if case in ("too_small", "not_utf8", "bad_tokenizer", "too_many_pieces"):
        for i in range(3):
            (root / f"{i}.txt").write_text("a few words\n" * (100 if case != "too_small" else 1))
    if case == "not_utf8":
        (root / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    if case == "bad_tokenizer":
        overrides["tokenizer"] = "wordpiece:100"
    if case == "too_many_pieces":
        overrides["tokenizer"] = "bpe:50000"
    expected = {"no_files": "no files match", "too_small": "too few for one sequence",
                "not_utf8": "latin1.txt is not UTF-8", "bad_tokenizer": "must be bytes, bpe:N or unigram:N",
                "too_many_pieces": "smaller N"}[case]
    config = corpus_config(root, tmp_path, **overrides)
    with pytest.raises(UsageError, match=expected) as error:
        data.load_task(config)
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "cache").glob("corpus-*"))  # nothing half-written


def test_the_tokenizer_key_is_checked_with_the_config():
    config = config_lib.base()
    config.data.tokenizer = "bpe:ten"
    with pytest.raises(UsageError, match="config.data.tokenizer='bpe:ten'"):
        config_lib.validate(config)


@pytest.mark.slow
def test_gpt_trains_on_a_bpe_corpus_exports_serves_and_generates_text(docs, tmp_path):
    run, models = tmp_path / "run", tmp_path / "models"
    kerasbig("train", "--config=configs/gpt_small.py", f"--config.data.name=corpus:{docs}/*.txt",
             "--config.data.tokenizer=bpe:1000", f"--config.data.cache_dir={tmp_path / 'cache'}",
             f"--config.data.seq_len={SEQ_LEN}", "--config.model.width=32", "--config.model.depth=1",
             "--config.model.heads=2", "--config.train.steps=10", "--config.train.steps_per_execution=5",
             "--config.train.jit_compile=False", "--config.schedule.warmup_steps=0", f"--workdir={run}",
             f"--export_dir={models / 'docs'}")
    version = models / "docs" / "1"
    assert_core_ops(version)
    task = data.load_task(corpus_config(docs, tmp_path, tokenizer="bpe:1000"))
    assert (version / "assets.extra" / "tokenizer.model").read_bytes() == task.tokenizer.model
    assert (run / "tokenizer.model").read_bytes() == task.tokenizer.model  # the run keeps its own tokenizer
    tokens = task.tokenizer.encode("The assert statement")[None]
    direct = tf.saved_model.load(str(version)).signatures["serving_default"](tokens=tf.constant(tokens))
    with serving(models) as url:
        served = post(f"{url}/v1/models/docs:predict", {"instances": tokens.tolist()})["predictions"]
    np.testing.assert_allclose(served, direct["logits"].numpy(), rtol=1e-5, atol=1e-5)
    generated = kerasbig("generate", f"--workdir={run}", "--prompt=The assert statement", "--max_new_tokens=8",
                         "--temperature=0").stdout
    assert "The assert statement" in generated


@pytest.mark.slow
def test_bad_corpus_exits_2_and_writes_nothing(tmp_path):
    assert_bad_data("--config=configs/gpt_small.py", f"--config.data.name=corpus:{tmp_path}/none/*.txt",
                    workdir=tmp_path / "run", names="no files match")
