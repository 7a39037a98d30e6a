"""Supervised classification datasets from TensorFlow Datasets, by name: "mnist", "cifar10", "imdb_reviews", ...

kerasbig only reads data already prepared on this machine (by `tfds build NAME`, or copied in); it never
downloads during a run. Images must be fixed-size uint8 (clients send their pixel values, 0-255, as
float32 and the signature scales them); text is tokenized to bytes inside the signature, as in
`kerasbig.data.text`.
"""
from __future__ import annotations

import contextlib
import functools

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from kerasbig.data.spec import CLASSIFICATION, DataSpec, Plan, Task
from kerasbig.data.text import SPLITS, bytes_to_ids
from kerasbig.errors import RunError, UsageError, first_line

CATALOG = "https://www.tensorflow.org/datasets/catalog"


def _load_tfds(name: str, *, data_dir: str | None, seed: int, seq_len: int) -> Task:
    """Train, validation and test splits of the TFDS dataset `name`, prepared under `data_dir`.

    data_dir: None means TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets.
    seed: the order in which training files are read.
    seq_len: bytes per example for text datasets.
    Without a validation split, the last 10% of train becomes one (TFDS slices are deterministic).
    """
    builder = _builder(name, data_dir)
    spec, serving_input, preprocess = _describe(builder, name, seq_len)
    if not builder.is_prepared():
        raise RunError(f"dataset {name!r} is not on this machine: nothing prepared under {builder.data_dir_root}; "
                       f"download it with `tfds build {name}` where there is internet and copy it here, or point "
                       f"--config.data.data_dir / TFDS_DATA_DIR at a folder that holds it")
    splits = _split_names(builder)
    read_config = tfds.ReadConfig(shuffle_seed=seed)
    datasets = {
        split: builder.as_dataset(split=tfds_split, as_supervised=True, shuffle_files=split == "train",
                                  read_config=read_config).map(functools.partial(_as_raw, serving_input.dtype))
        for split, tfds_split in splits.items()
    }
    return Task(
        spec=spec,
        **datasets,
        num_examples={split: builder.info.splits[tfds_split].num_examples for split, tfds_split in splits.items()},
        serving_input=serving_input,
        preprocess=preprocess,
    )


def _describe(builder: tfds.core.DatasetBuilder, name: str, seq_len: int):
    """The spec, serving input and preprocessing of a dataset, from its registered features alone."""
    input_key, label_key = _supervised_keys(builder)
    feature, label = builder.info.features[input_key], builder.info.features[label_key]
    if isinstance(feature, tfds.features.Image):
        if None in feature.shape or feature.dtype != tf.uint8:
            raise UsageError(f"data.name={name!r} has images of shape {feature.shape} and dtype {feature.dtype}; "
                             f"kerasbig reads fixed-size uint8 images")
        spec = DataSpec(CLASSIFICATION, "image", tuple(feature.shape), "float32", label.num_classes, tuple(label.names))
        return spec, tf.TensorSpec([None, *feature.shape], tf.float32, name="image"), _scale_pixels
    if isinstance(feature, tfds.features.Text):
        spec = DataSpec(CLASSIFICATION, "text", (seq_len,), "int32", label.num_classes, tuple(label.names))
        return spec, tf.TensorSpec([None], tf.string, name="text"), functools.partial(bytes_to_ids, seq_len=seq_len)
    raise UsageError(f"data.name={name!r} has {type(feature).__name__} inputs; kerasbig reads image or text")


def load(name: str, data_config) -> Task:
    """`tfds:NAME`, as `load_tfds` reads it."""
    return load_tfds(name, data_dir=data_config.data_dir or None, seed=data_config.split_seed,
                     seq_len=data_config.seq_len)


def plan(name: str, data_config) -> Plan:
    """The spec from the dataset's registered metadata, whether or not its data is prepared here; split sizes
    only when it is (TFDS learns them when it prepares the data)."""
    with _quiet_tfds():
        builder = _builder(name, data_config.data_dir or None)
        spec, _, _ = _describe(builder, name, data_config.seq_len)
        sizes = {}
        if builder.is_prepared():
            sizes = {split: builder.info.splits[tfds_split].num_examples
                     for split, tfds_split in _split_names(builder).items()}
    return Plan(spec, sizes)


@contextlib.contextmanager
def _quiet_tfds():
    """Mutes TFDS's own warnings (about each empty folder it looks in, deprecations): a missing dataset is
    reported in one line."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def load_tfds(name: str, *, data_dir: str | None = None, seed: int, seq_len: int = 512) -> Task:
    """The TFDS dataset `name` as a Task; see the module docstring."""
    with _quiet_tfds():
        return _load_tfds(name, data_dir=data_dir, seed=seed, seq_len=seq_len)


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(name, data_dir=data_dir)
    except (ValueError, AssertionError) as error:  # unknown name, config or version
        reason = first_line(error)
        raise UsageError(f"data.name={name!r} is not a TFDS dataset here ({reason}); names are listed by "
                         f"tfds.list_builders() and at {CATALOG}") from None


def _supervised_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
    keys = builder.info.supervised_keys
    if not (keys and len(keys) == 2 and isinstance(builder.info.features[keys[1]], tfds.features.ClassLabel)):
        raise UsageError(f"data.name={builder.name!r} is not an (input, class label) dataset; kerasbig reads "
                         f"supervised classification datasets such as mnist, cifar10 or imdb_reviews")
    return keys


def _split_names(builder: tfds.core.DatasetBuilder) -> dict[str, str]:
    """Our split -> TFDS split, carving validation from the end of train where the dataset has none."""
    available = set(builder.info.splits)
    if not {"train", "test"} <= available:
        raise UsageError(f"data.name={builder.name!r} has splits {sorted(available)}; kerasbig needs train and test")
    if "validation" in available:
        return dict(zip(SPLITS, ("train", "validation", "test")))
    return dict(zip(SPLITS, ("train[:90%]", "train[90%:]", "test")))


def _as_raw(dtype: tf.DType, inputs: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Examples as clients send them, in the serving input's dtype (images: float32 0-255); int32 labels."""
    return tf.cast(inputs, dtype), tf.cast(label, tf.int32)


def _scale_pixels(images: tf.Tensor) -> tf.Tensor:
    return images / 255.0
