"""`images:PATH`: a folder of images, one subfolder per class (layouts in `kerasbig.data.folders`).

JPEG, PNG, BMP and GIF files of any size are decoded and resized to `data.image_size` (square) with the channels
of the data (1 if every image is grayscale, else 3; alpha is dropped). Splits hold file paths; images are read
and decoded after shuffling, so memory does not grow with the number of files. Every file is decoded once when
the task loads, to name a corrupt file before anything is written (`data.skip_bad_files` skips and lists them).

`data.cache_images=True` keeps the decoded images in memory after their first read instead (faster epochs,
memory that grows with the files).

Raw inputs are float32 pixels 0-255 of shape (size, size, channels). The SavedModel's `serving_default` takes
`image_bytes` (encoded image files; `{"b64": ...}` over REST) and decodes them inside the graph with core ops
(DecodeImage, ResizeBilinear); the `pixels` signature takes the decoded pixels.
"""
from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from kerasbig.data.augment import random_flips_left_right, random_shifts
from kerasbig.data.folders import Files, list_files
from kerasbig.data.spec import CLASSIFICATION, DataSpec, EncodedInput, Plan, Task
from kerasbig.errors import UsageError

MAX_PIXEL = 255.0
SHIFT_FRACTION = 8  # augmentation shifts an image by up to 1/8 of its side


def _decode(contents: tf.Tensor, *, size: int, channels: int) -> tf.Tensor:
    """Encoded image bytes -> float32 pixels 0-255 [size, size, channels]."""
    image = tf.io.decode_image(contents, expand_animations=False)[..., :3]  # the first frame; no alpha
    image = tf.broadcast_to(image, tf.concat([tf.shape(image)[:2], [channels]], 0))  # grayscale -> RGB if needed
    return tf.image.resize(tf.cast(image, tf.float32), [size, size])


def _decode_batch(contents: tf.Tensor, *, size: int, channels: int) -> tf.Tensor:
    """A batch of encoded images [batch] -> pixels [batch, size, size, channels], as the signature runs it."""
    return tf.map_fn(functools.partial(_decode, size=size, channels=channels), contents,
                     fn_output_signature=tf.TensorSpec([size, size, channels], tf.float32))


def _scale(pixels: tf.Tensor) -> tf.Tensor:
    return pixels / MAX_PIXEL


def augment(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Each image of the batch flipped horizontally at random and shifted by up to 1/8 of the side each way
    (edges mirrored), stateless so that it replays exactly on resume."""
    flip_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    pad = max(1, images.shape[1] // SHIFT_FRACTION)
    return random_shifts(random_flips_left_right(images, flip_seed), pad, shift_seed, mode="REFLECT")


def _channels(path: str) -> int | None:
    """The image's channel count, or None when the file is not an image TensorFlow decodes."""
    try:
        return int(tf.io.decode_image(tf.io.read_file(path), expand_animations=False).shape[-1])
    except (tf.errors.InvalidArgumentError, tf.errors.OpError):
        return None


def _check_files(files: Files, flag: str, skip_bad_files: bool) -> tuple[Files, int]:
    """Decodes every file once; returns the readable files and their channels (1 or 3). A bad file stops the run
    with its name, unless `skip_bad_files`, which lists the skipped files in the log."""
    channels, bad = {}, []
    for paths, _ in files.splits.values():
        for path in paths:
            found = _channels(path)
            if found is None and not skip_bad_files:
                raise UsageError(f"{flag}: {path} is not a readable JPEG, PNG, BMP or GIF image; remove or replace "
                                 "it, or set --config.data.skip_bad_files=True to skip such files")
            if found is None:
                bad.append(path)
            else:
                channels[path] = found
    if bad:
        print(f"Skipped {len(bad)} unreadable file(s) (data.skip_bad_files=True):\n  " + "\n  ".join(bad))
        files = files.without(set(bad))
        for split, count in files.num_examples.items():
            if count == 0:
                raise UsageError(f"{flag}: no readable images are left in the {split} split; fix the files")
    return files, 1 if max(channels.values()) == 1 else 3


def _spec(files: Files, size: int, channels: int) -> DataSpec:
    return DataSpec(CLASSIFICATION, "pixels", (size, size, channels), "float32", len(files.class_names),
                    files.class_names)


def _files(path: str, data_config) -> Files:
    return list_files(path, flag=f"data.name=images:{path}", seed=data_config.split_seed,
                      test_fraction=data_config.test_fraction, validation_fraction=data_config.validation_fraction)


def plan(path: str, data_config) -> Plan:
    """The spec from file names and one decoded image per class (their channels): no pass over the files."""
    files = _files(path, data_config)
    train_paths, train_labels = files.splits["train"]
    firsts = [train_paths[np.argmax(train_labels == label)] for label in np.unique(train_labels)]
    channels = [c for c in map(_channels, firsts) if c is not None] or [3]
    return Plan(_spec(files, data_config.image_size, 1 if max(channels) == 1 else 3), files.num_examples)


def load(path: str, data_config) -> Task:
    """The image folder at `path` as a Task (see the module docstring)."""
    flag = f"data.name=images:{path}"
    files, channels = _check_files(_files(path, data_config), flag, data_config.skip_bad_files)
    size = data_config.image_size
    decode = functools.partial(_decode, size=size, channels=channels)
    files_of = {split: tf.data.Dataset.from_tensor_slices((paths.astype(str), labels))
                for split, (paths, labels) in files.splits.items()}

    def read(path, label):
        return decode(tf.io.read_file(path)), label
    if data_config.cache_images:  # decoded once, then kept in memory
        stored = {split: d.map(read, num_parallel_calls=tf.data.AUTOTUNE).cache() for split, d in files_of.items()}
        load = None
    else:
        stored, load = files_of, read
    return Task(
        spec=_spec(files, size, channels),
        **stored,
        num_examples=files.num_examples,
        serving_input=tf.TensorSpec([None, size, size, channels], tf.float32, name="pixels"),
        preprocess=_scale,
        augment=augment if data_config.augment else None,
        load=load,
        encoded=EncodedInput(
            spec=tf.TensorSpec([None], tf.string, name="image_bytes"),
            decode=functools.partial(_decode_batch, size=size, channels=channels),
            examples=lambda split: files_of[split].map(lambda path, label: (tf.io.read_file(path), label))),
    )
