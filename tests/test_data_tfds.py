"""kerasbig.data.tfds on real TFDS builders and metadata; only the examples come from `tfds.testing.mock_data`,
since the data itself cannot be downloaded here."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import prepare_metadata
from kerasbig.data import text
from kerasbig.data.tfds import load_tfds
from kerasbig.errors import RunError, UsageError

SEQ_LEN = 64


def mocked_examples(data_dir):
    return tfds.testing.mock_data(num_examples=6, data_dir=str(data_dir), policy=tfds.testing.MockPolicy.USE_FILES)


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_image_dataset(tmp_path, name, shape):
    prepare_metadata(name, tmp_path, {"train": 100, "test": 20})
    with mocked_examples(tmp_path):
        task = load_tfds(name, data_dir=str(tmp_path), seed=0)
        images, labels = next(task.train.batch(6).as_numpy_iterator())
    assert task.spec.input_name == "image" and task.spec.input_shape == shape and task.spec.num_classes == 10
    assert task.num_examples == {"train": 90, "validation": 10, "test": 20}  # validation carved from train
    assert task.serving_input == tf.TensorSpec([None, *shape], tf.float32, name="image")
    for split in text.SPLITS:
        assert getattr(task, split).element_spec == (tf.TensorSpec(shape, tf.float32), tf.TensorSpec([], tf.int32))
    assert images.shape == (6, *shape) and images.max() > 1 and np.all(images == np.round(images))  # 0-255
    pixels = task.preprocess(tf.constant(images)).numpy()
    assert pixels.dtype == np.float32 and 0 <= pixels.min() and pixels.max() <= 1
    np.testing.assert_allclose(pixels, images / 255, rtol=1e-6)


def test_text_dataset_uses_its_own_validation_split(tmp_path):
    prepare_metadata("imdb_reviews", tmp_path, {"train": 100, "validation": 30, "test": 20})
    with mocked_examples(tmp_path):
        task = load_tfds("imdb_reviews", data_dir=str(tmp_path), seed=0, seq_len=SEQ_LEN)
        reviews, labels = next(task.test.batch(6).as_numpy_iterator())
    assert task.spec.input_name == "text" and task.spec.input_shape == (SEQ_LEN,) and task.spec.num_classes == 2
    assert task.num_examples == {"train": 100, "validation": 30, "test": 20}
    assert task.serving_input == tf.TensorSpec([None], tf.string, name="text")
    assert labels.dtype == np.int32 and set(labels) <= {0, 1}
    ids = task.preprocess(tf.constant(reviews)).numpy()
    assert ids.dtype == np.int32 and ids.shape == (6, SEQ_LEN)
    for row, review in zip(ids, reviews):
        np.testing.assert_array_equal(row[:len(review)], np.frombuffer(review, np.uint8))
        assert not row[len(review):].any()  # padded with PAD


def test_missing_data_is_a_run_error_that_says_what_to_do(tmp_path):
    with pytest.raises(RunError, match=r"'mnist' is not on this machine.*tfds build mnist.*TFDS_DATA_DIR"):
        load_tfds("mnist", data_dir=str(tmp_path), seed=0)
    assert not list(tmp_path.iterdir())  # nothing written, nothing downloaded


@pytest.mark.parametrize("name", ["no_such_dataset", "mnist:99.0.0", "not a name"])
def test_unknown_dataset_is_a_usage_error_that_says_where_names_are(tmp_path, name):
    with pytest.raises(UsageError, match="tfds.list_builders"):
        load_tfds(name, data_dir=str(tmp_path), seed=0)


def test_dataset_without_class_labels_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="supervised classification"):
        load_tfds("glue/cola", data_dir=str(tmp_path), seed=0)
