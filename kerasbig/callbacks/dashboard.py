"""What a run shows in TensorBoard besides the learning rate and throughput: metrics, HParams, the config,
the model graph, a confusion matrix, misclassified examples and generated text.

Images are drawn with numpy alone (no plotting library): exact numbers go next to them as text tables.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import keras
import numpy as np
from tensorboard.plugins.hparams import summary_v2 as hp  # the api module imports TensorFlow

from kerasbig.callbacks import global_step
from kerasbig.data import text
from kerasbig.data.spec import CLASSIFICATION, LANGUAGE_MODEL, Task
from kerasbig.errors import UsageError
from kerasbig.summaries import SummaryWriter

# The HParams table's metric columns: (scalar tag, run under the session, column name).
HPARAMS_METRICS = (("epoch_loss", "train", "loss"), ("epoch_accuracy", "train", "accuracy"),
                   ("epoch_loss", "validation", "val_loss"), ("epoch_accuracy", "validation", "val_accuracy"))
BATCH_METRICS = ("loss", "accuracy")  # batch logs written as batch_<name>; other callbacks write the rest
IMAGE_POOL = 512  # first validation examples kept in memory to picture the misclassified ones
MAX_TABLE_CLASSES = 20  # a confusion-count table wider than this is unreadable
PROMPT_TOKENS = 32

WHITE, BLUE, RED, GRID = (np.array(c, np.float32) for c in ([255, 255, 255], [8, 69, 148], [203, 24, 29],
                                                             [190, 190, 190]))

# (labels, predicted classes) of the latest validation pass, in the order of `task.validation`.
ValidationPredictions = Callable[[], tuple[np.ndarray, np.ndarray] | None]


class Dashboard(keras.callbacks.Callback):
    """Writes a run's TensorBoard dashboard under `log_dir`, against the optimizer's global step.

    - `train/`: `batch_loss` and `batch_accuracy` (the epoch's running mean, as in the progress bar) at
      most once per `log_every_steps` steps, from the logs the loop already has: steps add no device reads
      (the step counter is read once per epoch); `epoch_<name>` for every number of the epoch logs.
      `validation/`: `epoch_<name>` of the `val_` logs.
    - At the start of a fresh run: an HParams session of the flattened `hparams` in `log_dir` itself (so
      its `train/` and `validation/` scalars are the session's metrics and runs line up in the HParams
      table), the same values as a markdown table (text `config`), and the graph of one inference
      forward pass (traced, never run).
    - After each evaluation (epochs whose logs have `val_` entries), in `validation/`: for classifiers,
      from `validation_predictions()`, the `confusion_matrix` image with `confusion_counts` text and, for
      image inputs, a grid of `misclassified` examples with `misclassified_labels`; for language models
      `kerasbig.generation` can sample from, a generated `sample`.

    >>> import numpy as np, tempfile
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    >>> dashboard = Dashboard(tempfile.mkdtemp(), {"optimizer": {"name": "sgd"}}, log_every_steps=1)
    >>> history = model.fit(np.ones((8, 3)), np.ones(8), batch_size=4, callbacks=[dashboard], verbose=0)
    >>> sorted(name for name in os.listdir(dashboard.log_dir) if not name.startswith("events"))
    ['train', 'validation']
    """

    def __init__(self, log_dir: str, hparams: Mapping[str, Any], *, task: Task | None = None,
                 validation_predictions: ValidationPredictions | None = None, log_every_steps: int = 100,
                 max_examples: int = 16, sample_tokens: int = 64):
        super().__init__()
        if log_every_steps < 1 or max_examples < 1 or sample_tokens < 1:
            raise UsageError(f"Dashboard log_every_steps, max_examples and sample_tokens must be >= 1, got "
                             f"{log_every_steps}, {max_examples} and {sample_tokens}")
        self.log_dir = log_dir
        self.hparams = flatten(hparams)
        self.task = task
        self.validation_predictions = validation_predictions
        self.log_every_steps = log_every_steps
        self.max_examples = max_examples
        self.sample_tokens = sample_tokens
        self._images = _image_inputs(task) if task and task.spec.kind == CLASSIFICATION else None
        self._prompt = _prompt(task) if task and task.spec.kind == LANGUAGE_MODEL else None
        self._writers: dict[str, SummaryWriter] = {}
        self._last_written_step: int | None = None
        self._steps = global_step.GlobalStep()

    # ---- callback hooks -----------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._writers = {run: SummaryWriter(os.path.join(self.log_dir, run)) for run in ("train", "validation")}
        self._last_written_step = None
        if global_step.read(self.model) == 0:  # a resumed run keeps what its start wrote
            self._write_start()

    def on_epoch_begin(self, epoch, logs=None):
        self._steps.new_epoch()

    def on_train_batch_end(self, batch, logs=None):
        step = self._steps.at_batch_end(self.model, batch)
        if self._last_written_step is not None and step - self._last_written_step < self.log_every_steps:
            return
        for name in BATCH_METRICS:
            if name in (logs or {}):
                self._writers["train"].scalar(f"batch_{name}", logs[name], step)
        self._last_written_step = step

    def on_epoch_end(self, epoch, logs=None):
        step, logs = global_step.read(self.model), logs or {}
        for name, value in logs.items():
            run, name = ("validation", name[len("val_"):]) if name.startswith("val_") else ("train", name)
            self._writers[run].scalar(f"epoch_{name}", value, step)
        if self.task is not None and any(name.startswith("val_") for name in logs):
            self._write_evaluation(self._writers["validation"], step)
        for writer in self._writers.values():
            writer.flush()  # one epoch's worth shows up at once in a dashboard that is watching

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    # ---- what is written ----------------------------------------------------------------------------
    def _write_start(self) -> None:
        with SummaryWriter(self.log_dir) as root:  # the HParams session: its runs are train/, validation/
            root.summary(hp.hparams_config_pb(hparams=[hp.HParam(name) for name in self.hparams],
                                              metrics=[hp.Metric(tag, group=group, display_name=column)
                                                       for tag, group, column in HPARAMS_METRICS]), step=0)
            trial = os.path.basename(os.path.normpath(self.log_dir))  # rows named by run
            root.summary(hp.hparams_pb(self.hparams, trial_id=trial), step=0)
        self._writers["train"].text("config", markdown_table(["key", "value"], self.hparams.items()), step=0)
        self._writers["train"].flush()
        if keras.backend.backend() == "tensorflow":  # TensorBoard's graph is a TensorFlow op graph
            self._write_graph()

    def _write_graph(self) -> None:
        """The op graph of `model(x, training=False)` for the model's (single) input, in `train/`: only traced,
        so it costs no device time."""
        import tensorflow as tf

        inputs = self.model.inputs[0]
        forward = tf.function(lambda x: self.model(x, training=False))
        writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        with writer.as_default(step=0):
            tf.summary.graph(forward.get_concrete_function(tf.TensorSpec(inputs.shape, inputs.dtype)).graph)
        writer.close()

    def _write_evaluation(self, writer: SummaryWriter, step: int) -> None:
        spec = self.task.spec
        # JAX compiles every op anew for each new shape, and today's decoding grows its inputs token by token
        # (minutes for one sample): samples wait for generation with a preallocated cache there.
        if spec.kind == LANGUAGE_MODEL and keras.backend.backend() == "tensorflow":
            from kerasbig import generation  # TensorFlow's decoding loop

            if self.model.name in generation.DECODERS:
                writer.text("sample", self._sample(), step)
        if spec.kind != CLASSIFICATION or self.validation_predictions is None:
            return
        results = self.validation_predictions()
        if results is None:
            return
        labels, predictions = results
        names = spec.class_names or tuple(str(i) for i in range(spec.num_classes))
        matrix = confusion_matrix(labels, predictions, spec.num_classes)
        writer.image("confusion_matrix", confusion_image(matrix), step,
                     description="Rows: true class, columns: predicted class. Shade: share of the row "
                                 "(square-root scale); blue: correct, red: mistakes.")
        if spec.num_classes <= MAX_TABLE_CLASSES:
            header = ["true \\ predicted", *names]
            writer.text("confusion_counts", markdown_table(header, ([n, *row] for n, row in zip(names, matrix))), step)
        if self._images is not None:
            seen = min(len(self._images), len(labels))
            wrong = np.flatnonzero(labels[:seen] != predictions[:seen])[:self.max_examples]
            if wrong.size:
                writer.image("misclassified", image_grid(self._images[wrong]), step)
                writer.text("misclassified_labels", markdown_table(
                    ["tile", "true", "predicted"],
                    ((tile, names[labels[i]], names[predictions[i]]) for tile, i in enumerate(wrong, 1))), step)

    def _sample(self) -> str:
        """Markdown: the start of the first validation window, and what the model writes after it."""
        from kerasbig import generation

        continuation = generation.generate(self.model, self._prompt, self.sample_tokens, temperature=0.8, top_k=40)
        decode = self.task.tokenizer.decode if self.task.tokenizer else text.decode
        return (f"**Prompt** ({len(self._prompt)} tokens of the validation set)\n\n"
                f"{code_block(decode(self._prompt))}\n\n"
                f"**Continuation** ({self.sample_tokens} tokens, temperature 0.8, top-k 40)\n\n"
                f"{code_block(decode(continuation))}")


def _image_inputs(task: Task) -> np.ndarray | None:
    """The first validation examples as model inputs [n, height, width, channels]; None unless images."""
    shape = task.spec.input_shape
    if len(shape) != 3 or shape[-1] not in (1, 3):
        return None
    raw = next(iter(task.examples("validation").batch(IMAGE_POOL)))[0]
    return np.asarray(task.preprocess(raw), np.float32)


def _prompt(task: Task) -> list[int]:
    """The start of the first validation window: what generated samples continue."""
    if task.windows is not None:
        tokens = task.windows.batch("validation", [0])[0][0]
    else:
        tokens = np.asarray(next(iter(task.examples("validation")))[0])
    return tokens[:min(PROMPT_TOKENS, len(tokens) // 2)].tolist()


# ---- helpers (numpy and strings only) -----------------------------------------------------------------
def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested mappings to dotted keys; values the HParams plugin cannot take (lists, None) as strings.

    >>> flatten({"model": {"name": "mlp", "hidden": [256, 128]}, "seed": 0})
    {'model.name': 'mlp', 'model.hidden': '[256, 128]', 'seed': 0}
    """
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def markdown_table(header: list, rows) -> str:
    """A markdown table, as TensorBoard's Text dashboard renders it.

    >>> print(markdown_table(["key", "value"], [("a|b", 1), ("c", "")]))
    | key | value |
    | --- | --- |
    | a\\|b | 1 |
    | c | '' |
    """
    def line(cells) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") or "''" for cell in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def code_block(source: str) -> str:
    """Markdown that shows `source` verbatim (an indented block: no text can close it early)."""
    return "\n".join("    " + line for line in source.splitlines() or [""])


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted].

    >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 0, 1]), 2).tolist()
    [[1, 0], [1, 1]]
    """
    pairs = labels.astype(np.int64) * num_classes + predictions
    return np.bincount(pairs, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def confusion_image(matrix: np.ndarray, cell: int | None = None) -> np.ndarray:
    """A [1, height, width, 3] uint8 heat map of `matrix` (rows: true class, columns: predicted).

    Cells are shaded by their share of the row, on a square-root scale so that rare mistakes still show:
    blue on the diagonal (correct), red elsewhere, white for none; grey lines between cells.

    >>> image = confusion_image(np.array([[4, 0], [1, 3]]), cell=4)
    >>> image.shape, image[0, 2, 2].tolist(), image[0, 2, 6].tolist(), image[0, 6, 2].tolist()
    ((1, 9, 9, 3), [8, 69, 148], [255, 255, 255], [229, 140, 142])
    """
    k = len(matrix)
    cell = cell or max(2, min(32, 512 // k))
    share = np.sqrt(matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1))[..., None]
    colour = np.where(np.eye(k, dtype=bool)[..., None], BLUE, RED)
    pixels = np.repeat(np.repeat(WHITE + share * (colour - WHITE), cell, 0), cell, 1)
    pixels = np.pad(pixels, ((0, 1), (0, 1), (0, 0)))
    pixels[::cell], pixels[:, ::cell] = GRID, GRID
    return np.round(pixels)[None].astype(np.uint8)


def image_grid(images: np.ndarray, columns: int = 4, tile: int = 64) -> np.ndarray:
    """A [1, height, width, 3] uint8 grid of `images` [n, h, w, 1 or 3], left to right in rows of `columns`.

    Each image is stretched to its own value range (model inputs may be normalised any way) and enlarged by
    whole pixels to about `tile` pixels, with a white border.

    >>> image_grid(np.random.rand(5, 8, 8, 1), columns=4, tile=32).shape
    (1, 68, 136, 3)
    """
    low = images.min(axis=(1, 2, 3), keepdims=True)
    high = images.max(axis=(1, 2, 3), keepdims=True)
    images = 255 * (images - low) / np.maximum(high - low, 1e-12)
    scale = max(1, tile // max(images.shape[1:3]))
    images = np.repeat(np.repeat(images, scale, 1), scale, 2)
    images = np.broadcast_to(images, images.shape[:3] + (3,))
    blank = (-len(images)) % columns
    images = np.pad(images, ((0, blank), (1, 1), (1, 1), (0, 0)), constant_values=255)
    n, h, w, _ = images.shape
    grid = images.reshape(n // columns, columns, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(n // columns * h, -1, 3)
    return np.round(grid)[None].astype(np.uint8)
