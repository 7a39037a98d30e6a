"""kerasbig.data.text on the real corpora of the Python running the tests."""
import functools

import numpy as np
import pytest
import tensorflow as tf

from kerasbig.data import text
from kerasbig.data.spec import CLASSIFICATION, LANGUAGE_MODEL
from kerasbig.errors import UsageError

LM_SEQ_LEN = 128
CLS_SEQ_LEN = 256


@functools.cache
def lm_task(seed: int = 0, **kwargs):
    return text.load_text_lm(seq_len=LM_SEQ_LEN, seed=seed, **kwargs)


@functools.cache
def cls_task(seed: int = 0):
    return text.load_text_classification(seq_len=CLS_SEQ_LEN, seed=seed)


def arrays(dataset):
    """All of an unbatched (input, label) dataset, as two numpy arrays."""
    return next(dataset.batch(1 << 20).as_numpy_iterator())


def test_tokenizer_round_trips_bytes():
    sample = "def f(x):\n    return x ** 2  # café, ∑, 🐍"
    ids = text.encode(sample)
    assert ids.dtype == np.int32 and ids.min() > text.PAD and ids.max() < text.BYTE_VOCAB
    assert len(ids) == len(sample.encode("utf-8"))
    assert text.decode(ids) == sample
    assert text.decode([0xE2, 0x88]) == "\ufffd"  # a cut multi-byte character does not raise


def test_bytes_to_ids_matches_encode():
    strings = ["", "abc", "héllo wörld", "x" * 40, "日本語のテキスト"]
    ids = text.bytes_to_ids(tf.constant(strings), 16).numpy()
    assert ids.dtype == np.int32 and ids.shape == (len(strings), 16)
    for row, string in zip(ids, strings):
        expected = text.encode(string)[:16]
        np.testing.assert_array_equal(row, np.pad(expected, (0, 16 - len(expected))))


def test_split_documents_is_a_seeded_partition_by_document():
    documents = text.pydoc_topics()
    splits = text.split_documents(documents, seed=0)
    names = [name for split in text.SPLITS for name in splits[split]]
    assert sorted(names) == sorted(documents)  # every document once: no overlap, none lost
    total = sum(map(len, documents.values()))
    for split in ("validation", "test"):
        share = sum(len(documents[name]) for name in splits[split]) / total
        assert 0.05 < share <= text.EVAL_FRACTION
    assert text.split_documents(documents, seed=0) == splits
    assert text.split_documents(documents, seed=1) != splits


def test_split_documents_gives_every_split_a_document():
    splits = text.split_documents({"a": "x" * 90, "b": "x" * 5, "c": "x" * 4}, seed=0)
    assert sorted(map(len, splits.values())) == [1, 1, 1]
    with pytest.raises(UsageError):
        text.split_documents({"a": "x", "b": "y"}, seed=0)


def test_language_model_windows_are_next_byte_pairs():
    task = lm_task()
    assert task.spec.kind == LANGUAGE_MODEL and task.spec.num_classes == 256 and task.spec.seq_len == LM_SEQ_LEN
    assert task.serving_input.name == "tokens" and task.serving_input.dtype == tf.int32
    for split in text.SPLITS:
        inputs, labels = arrays(getattr(task, split))
        assert inputs.dtype == labels.dtype == np.int32
        assert inputs.shape == labels.shape == (task.num_examples[split], LM_SEQ_LEN)
        np.testing.assert_array_equal(inputs[:, 1:], labels[:, :-1])
        np.testing.assert_array_equal(labels[:-1, -1], inputs[1:, 0])  # windows continue one another


def test_language_model_splits_hold_their_own_documents():
    documents = text.pydoc_topics()
    names = text.split_documents(documents, seed=0)
    for split in text.SPLITS:
        inputs, labels = arrays(getattr(lm_task(), split))
        stream = np.append(inputs.ravel(), labels[-1, -1])
        expected = text.encode("\0".join(documents[name] for name in names[split]))
        np.testing.assert_array_equal(stream, expected[:len(stream)])


def test_language_model_is_deterministic_per_seed():
    same = text.load_text_lm(seq_len=LM_SEQ_LEN, seed=0)
    np.testing.assert_array_equal(arrays(same.test)[0], arrays(lm_task().test)[0])
    assert not np.array_equal(arrays(lm_task(seed=1).test.take(1))[0], arrays(lm_task().test.take(1))[0])


def test_language_model_caps_the_corpus_and_knows_its_bytes():
    capped = text.load_text_lm(seq_len=LM_SEQ_LEN, seed=0, max_tokens=10_000)
    assert capped.num_examples == {"train": 62, "validation": 7, "test": 7}  # 8000 and 1000 tokens
    inputs, _ = arrays(capped.train.take(2))
    first_document = text.pydoc_topics()[text.split_documents(text.pydoc_topics(), seed=0)["train"][0]]
    assert first_document.startswith(text.decode(inputs[0]))
    assert capped.token_bytes.tolist() == [1] * text.BYTE_VOCAB  # a byte token is one byte of text


@pytest.mark.parametrize("kwargs", [{"source": "wikipedia"}, {"seq_len": 10**7}])
def test_language_model_rejects_bad_arguments(kwargs):
    with pytest.raises(UsageError):
        text.load_text_lm(**{"seq_len": LM_SEQ_LEN, "seed": 0, **kwargs})


def test_classification_examples_are_text_with_every_class_in_every_split():
    task = cls_task()
    spec = task.spec
    assert spec.kind == CLASSIFICATION and spec.input_shape == (CLS_SEQ_LEN,) and spec.input_dtype == "int32"
    assert spec.num_classes >= 8 and spec.class_names == text.PACKAGES
    assert task.serving_input.name == "text" and task.serving_input.dtype == tf.string
    for split in text.SPLITS:
        snippets, labels = arrays(getattr(task, split))
        assert labels.dtype == np.int32 and len(labels) == task.num_examples[split]
        assert set(labels) == set(range(spec.num_classes))
        assert all(len(snippet) == CLS_SEQ_LEN for snippet in snippets)
        assert np.bincount(labels).max() <= (2400 if split == "train" else 75)


def test_classification_preprocess_gives_the_bytes_of_each_snippet():
    snippets, _ = arrays(cls_task().test.take(8))
    ids = cls_task().preprocess(tf.constant(list(snippets) + [b"short"])).numpy()
    assert ids.dtype == np.int32 and ids.shape == (9, CLS_SEQ_LEN)
    for row, snippet in zip(ids, snippets):
        np.testing.assert_array_equal(row, np.frombuffer(snippet, np.uint8))
    assert text.decode(ids[-1][ids[-1] != text.PAD]) == "short"


def test_classification_snippets_come_from_their_split_files():
    examples = {split: arrays(getattr(cls_task(), split)) for split in text.SPLITS}
    for label, package in enumerate(text.PACKAGES):
        sources = text.stdlib_sources((package,))
        for split, names in text.split_documents(sources, seed=0).items():
            files = [sources[name].encode("utf-8") for name in names]
            snippets, labels = examples[split]
            for snippet in snippets[labels == label]:
                assert any(snippet in data for data in files), (package, split)


def test_classification_is_deterministic_per_seed():
    again = text.load_text_classification(seq_len=CLS_SEQ_LEN, seed=0)
    for split in text.SPLITS:
        np.testing.assert_array_equal(arrays(getattr(again, split))[0], arrays(getattr(cls_task(), split))[0])
    assert not np.array_equal(arrays(cls_task(seed=1).test)[0], arrays(cls_task().test)[0])


def test_classification_rejects_a_missing_package():
    with pytest.raises(UsageError, match="no_such_package"):
        text.load_text_classification(seq_len=CLS_SEQ_LEN, packages=("json", "no_such_package"), seed=0)
