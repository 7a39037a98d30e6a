"""TensorBoard event files written without TensorFlow, for both backends.

Keras has no TensorBoard writer API and `tf.summary` needs TensorFlow, which a JAX machine may not have. The
summaries are TensorBoard's own protos (`tensorboard.compat.proto`) as its plugins' `*_pb` functions make them,
appended as records by its `RecordWriter` to a plain file: the same event files `tf.summary` writes, read by
TensorBoard and its `EventAccumulator` alike.

>>> import tempfile
>>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
>>> log_dir = tempfile.mkdtemp()
>>> with SummaryWriter(log_dir) as writer:
...     writer.scalar("loss", 0.5, step=3)
>>> events = EventAccumulator(log_dir); _ = events.Reload()
>>> [(event.step, float(event.tensor_proto.float_val[0])) for event in events.Tensors("loss")]
[(3, 0.5)]
"""
from __future__ import annotations

import itertools
import os
import pathlib
import socket
import struct
import time
import zlib

import numpy as np
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

_FILE_NUMBERS = itertools.count()  # several writers of one process may share a folder in the same second
# tf.summary names its files events.out.tfevents.<time>.<host>.<pid>.<n>.v2 with its own counter: another suffix
# keeps a TensorFlow writer in the same folder (the op graph's) from opening the same file.
SUFFIX = ".kerasbig"


class SummaryWriter:
    """Appends summaries to a new event file in `log_dir` (created if needed), each against a global step."""

    def __init__(self, log_dir: str | os.PathLike):
        os.makedirs(log_dir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{next(_FILE_NUMBERS)}{SUFFIX}"
        self.path = os.path.join(log_dir, name)
        self._file = open(self.path, "wb")
        self._records = RecordWriter(self._file)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def __enter__(self) -> "SummaryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self, summary: summary_pb2.Summary, step: int) -> None:
        """Appends a Summary proto made elsewhere (e.g. by `tensorboard.plugins.hparams.api.hparams_pb`)."""
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.summary(scalar_pb(tag, float(value)), step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.summary(text_pb(tag, markdown), step)

    def image(self, tag: str, images: np.ndarray, step: int, description: str | None = None) -> None:
        """`images`: uint8 [n, height, width, 3], as `tf.summary.image` writes them (PNG-encoded)."""
        height, width = images.shape[1:3]
        tensor = tensor_util.make_tensor_proto(
            np.array([str(width).encode(), str(height).encode(), *map(encode_png, images)], dtype=object))
        summary = summary_pb2.Summary()
        summary.value.add(tag=tag, tensor=tensor, metadata=image_metadata.create_summary_metadata(
            display_name=None, description=description or ""))
        self.summary(summary, step)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())


def last_scalars(log_dir: str | os.PathLike) -> dict[str, float]:
    """{tag: last value} of the scalars in a run folder's event files (any writer's), read without TensorFlow.

    >>> import tempfile
    >>> log_dir = tempfile.mkdtemp()
    >>> with SummaryWriter(log_dir) as writer:
    ...     writer.scalar("loss", 0.5, step=3); writer.scalar("loss", 0.25, step=4); writer.text("note", "hi", step=4)
    >>> last_scalars(log_dir)
    {'loss': 0.25}
    """
    values = {}
    for path in sorted(pathlib.Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    values[value.tag] = float(tensor_util.make_ndarray(value.tensor).reshape(-1)[0])
    return values


def encode_png(image: np.ndarray) -> bytes:
    """An uint8 [height, width, 3] array as PNG bytes (zlib only, no imaging library).

    >>> encode_png(np.zeros((2, 3, 3), np.uint8))[:8]
    b'\\x89PNG\\r\\n\\x1a\\n'
    """
    height, width = image.shape[:2]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes())) + chunk(
        b"IEND", b"")
