"""Final metrics: bits per token and bits per byte from the bytes behind each token, accuracy from the sums."""
import dataclasses
import math

import numpy as np
import pytest

from kerasbig import evaluation
from kerasbig.data import text
from kerasbig.trainer import Sums


@pytest.fixture(scope="module")
def lm_task():
    return text.load_text_lm(seq_len=64, seed=0, max_tokens=20_000)


def test_bits_per_byte_counts_the_bytes_behind_the_tokens(lm_task):
    """The same loss sum over the same tokens: with byte tokens bits per byte equals bits per token; when each
    token stands for two bytes of text, bits per byte is half of it."""
    labels = np.array([65, 66, 67, 68], np.int32)
    sums = Sums(loss=4 * 2.0, correct=1.0, count=4.0)
    byte_level = evaluation.metrics(lm_task, sums, labels, labels)
    assert byte_level["bits_per_token"] == pytest.approx(2.0 / math.log(2))
    assert byte_level["bits_per_byte"] == pytest.approx(byte_level["bits_per_token"])
    two_bytes = dataclasses.replace(lm_task, token_bytes=np.full(256, 2, np.int64))
    assert evaluation.metrics(two_bytes, sums, labels, labels)["bits_per_byte"] == pytest.approx(1.0 / math.log(2))
    unknown = dataclasses.replace(lm_task, token_bytes=None)
    assert "bits_per_byte" not in evaluation.metrics(unknown, sums, labels, labels)
    assert byte_level["accuracy"] == 0.25 and byte_level["perplexity"] == pytest.approx(math.exp(2.0))


def test_classifier_accuracy_is_the_evaluation_sums():
    from kerasbig.data.digits import load_digits
    task = load_digits(augment=False)
    labels, predictions = np.array([0, 1, 2, 3]), np.array([0, 1, 2, 0])
    values = evaluation.metrics(task, Sums(loss=1.0, correct=3.0, count=4.0), labels, predictions)
    assert values["accuracy"] == 0.75 and values["examples"] == 4 and values["confusion_matrix"][3][0] == 1
