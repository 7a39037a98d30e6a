"""The TensorBoard dashboard as people see it: event files from a plain `model.fit`, then real training runs
read back through a real TensorBoard server's HTTP API and in headless Chromium."""
from __future__ import annotations

import base64
import contextlib
import doctest
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator

from conftest import REPO, free_port, kerasbig, stop
from kerasbig import generation
from kerasbig.callbacks import dashboard
from kerasbig.callbacks.dashboard import Dashboard, code_block, confusion_image, confusion_matrix, image_grid
from kerasbig.data import text
from kerasbig.data.digits import load_digits
from kerasbig.models.gpt import build_gpt
from kerasbig.models.mlp import build_mlp

ARTIFACTS = REPO / "tests" / "artifacts"  # screenshots of the browser tests (not in git)
TENSORBOARD = Path(sys.executable).with_name("tensorboard")
CHROMIUM = shutil.which("chromium")
# Run name -> (learning rate, CPU replicas): one run on one device, one under MirroredStrategy.
RUNS = {"mlp_lr0.002": (0.002, 1), "mlp_lr0.005_mirrored": (0.005, 2)}
STEPS_PER_EPOCH = 19  # digits_mlp: 1,257 training examples in batches of 64


def tensors(run_dir: Path, tag: str) -> list[tuple[int, np.ndarray]]:
    """(step, value) of every summary `tag` in the event files of `run_dir`."""
    events = EventAccumulator(str(run_dir), size_guidance={TENSORS: 0})
    events.Reload()
    return [(event.step, tf.make_ndarray(event.tensor_proto)) for event in events.Tensors(tag)]


def png_pixels(image_summary: np.ndarray) -> np.ndarray:
    """The pixels of an image summary's first image ([width, height, png, ...])."""
    return tf.io.decode_png(image_summary[2]).numpy()


def split_arrays(task, split: str) -> tuple[np.ndarray, np.ndarray]:
    inputs, labels = next(iter(getattr(task, split).batch(100_000)))
    return np.asarray(task.preprocess(inputs)), labels.numpy()


def test_doctests():
    assert doctest.testmod(dashboard).failed == 0


def test_plain_fit_writes_scalars_config_and_validation_images(tmp_path):
    task = load_digits(augment=False)
    (x, y), (x_val, y_val) = split_arrays(task, "train"), split_arrays(task, "validation")
    model = build_mlp(task.spec, hidden=(32,))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    predictions = lambda: (y_val, model.predict(x_val, verbose=0).argmax(-1))
    board = Dashboard(str(tmp_path), {"model": {"hidden": (32,)}, "optimizer": {"name": "adam"}}, task=task,
                      validation_predictions=predictions, log_every_steps=3)
    history = model.fit(x[:640], y[:640], batch_size=64, epochs=2, validation_data=(x_val, y_val),
                        callbacks=[board], verbose=0)

    assert [step for step, _ in tensors(tmp_path / "train", "batch_loss")] == [1, 4, 7, 10, 13, 16, 19]
    validation = tensors(tmp_path / "validation", "epoch_loss")
    assert [step for step, _ in validation] == [10, 20]
    np.testing.assert_allclose([value for _, value in validation], history.history["val_loss"], rtol=1e-6)
    [(step, config)] = tensors(tmp_path / "train", "config")
    assert step == 0 and "| model.hidden | (32,) |" in config.item().decode()

    labels, predicted = predictions()  # the weights have not changed since the last evaluation
    matrix = tensors(tmp_path / "validation", "confusion_matrix")
    assert [step for step, _ in matrix] == [10, 20]
    expected = confusion_image(confusion_matrix(labels, predicted, 10))[0]
    np.testing.assert_array_equal(png_pixels(matrix[-1][1]), expected)
    wrong = np.flatnonzero(labels != predicted)[:16]
    assert wrong.size, "two epochs of a tiny MLP should leave some digits misclassified"
    np.testing.assert_array_equal(png_pixels(tensors(tmp_path / "validation", "misclassified")[-1][1]),
                                  image_grid(x_val[wrong])[0])
    captions = tensors(tmp_path / "validation", "misclassified_labels")[-1][1].item().decode()
    assert f"| 1 | {labels[wrong[0]]} | {predicted[wrong[0]]} |" in captions


def test_language_model_sample_continues_a_validation_prompt(tmp_path):
    task = text.load_text_lm(seq_len=32, seed=0)
    model = build_gpt(task.spec, width=16, depth=1, heads=2)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    (x, y), validation = next(iter(task.train.batch(64))), next(iter(task.validation.batch(64)))
    board = Dashboard(str(tmp_path), {"model": {"name": "gpt"}}, task=task, sample_tokens=20)
    model.fit(x, y, batch_size=64, validation_data=validation, callbacks=[board], verbose=0)

    [(step, sample)] = tensors(tmp_path / "validation", "sample")
    prompt = validation[0][0, :16].numpy().tolist()  # half of the first 32-token validation window
    continuation = generation.generate(model, prompt, 20, temperature=0.8, top_k=40)
    markdown = sample.item().decode()
    assert step == 1 and code_block(text.decode(prompt)) in markdown
    assert code_block(text.decode(continuation)) in markdown


# ---- real runs, a real TensorBoard, a real browser --------------------------------------------------------


def get(url: str, body: dict | None = None):
    """GET `url` (or POST `body` as JSON); returns the decoded JSON reply, or the bytes of anything else."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", "X-XSRF-Protected": "1"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        content = reply.read()
        return json.loads(content) if reply.headers.get_content_type() == "application/json" else content


def query(**params) -> str:
    return urllib.parse.urlencode(params)


def wait_for(condition, timeout: float = 120, what: str = "condition"):
    """Polls `condition()` until it returns something truthy, which it returns."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return result


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    """Two real 2-epoch runs of digits_mlp that differ in learning rate and replicas, as a user compares them."""
    logs = tmp_path_factory.mktemp("logs")
    for name, (rate, replicas) in RUNS.items():
        mirrored = ["--strategy=mirrored", f"--num_cpu_replicas={replicas}"] if replicas > 1 else []
        kerasbig("train", "--config=configs/digits_mlp.py", "--config.train.epochs=2", "--mode=train",
                 "--config.train.log_every_steps=5", f"--config.optimizer.learning_rate={rate}",
                 f"--workdir={logs / name}", *mirrored)
    return logs


@pytest.fixture(scope="module")
def board(logdir, tmp_path_factory) -> str:
    """`tensorboard --logdir` on the runs; yields its URL once it has loaded them, and always stops it."""
    port, log_path = free_port(), tmp_path_factory.mktemp("tensorboard") / "tensorboard.log"
    with log_path.open("w") as log:  # a file, not a pipe: a pipe nobody reads would block the server
        process = subprocess.Popen([str(TENSORBOARD), f"--logdir={logdir}", "--host=127.0.0.1", f"--port={port}",
                                    "--reload_interval=1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def loaded() -> bool:
        assert process.poll() is None, log_path.read_text()
        try:
            return {f"{name}/validation" for name in RUNS} <= set(get(f"{url}/data/plugin/images/tags"))
        except urllib.error.URLError:  # not listening yet
            return False

    try:
        wait_for(loaded, what="TensorBoard to load the runs")
        yield url
    finally:
        stop(process)


@pytest.mark.slow
def test_scalars_of_every_run(board):
    tags = get(f"{board}/data/plugin/scalars/tags")
    for name in RUNS:
        assert {"batch_loss", "batch_accuracy", "epoch_loss", "epoch_accuracy", "learning_rate",
                "examples_per_sec"} <= set(tags[f"{name}/train"])
        assert {"epoch_loss", "epoch_accuracy"} <= set(tags[f"{name}/validation"])
        points = get(f"{board}/data/plugin/scalars/scalars?{query(run=f'{name}/validation', tag='epoch_loss')}")
        assert [step for _, step, _ in points] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


@pytest.mark.slow
def test_hparams_table_compares_the_runs(board):
    experiment = get(f"{board}/data/plugin/hparams/experiment", {"experimentName": ""})
    assert [metric["displayName"] for metric in experiment["metricInfos"]] == ["loss", "accuracy", "val_loss",
                                                                              "val_accuracy"]
    assert {"optimizer.learning_rate", "model.hidden", "run.seed"} <= {h["name"] for h in experiment["hparamInfos"]}
    statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
    groups = get(f"{board}/data/plugin/hparams/session_groups",
                 {"experimentName": "", "allowedStatuses": statuses, "startIndex": 0, "sliceSize": 10})
    rows = {group["name"]: group for group in groups["sessionGroups"]}
    assert set(rows) == set(RUNS)
    for name, (rate, replicas) in RUNS.items():
        assert rows[name]["hparams"]["optimizer.learning_rate"] == rate
        assert rows[name]["hparams"]["run.replicas"] == replicas
        metrics = {(m["name"]["group"], m["name"]["tag"]): m for m in rows[name]["metricValues"]}
        [*_, (_, step, accuracy)] = get(f"{board}/data/plugin/scalars/scalars?"
                                        f"{query(run=f'{name}/validation', tag='epoch_accuracy')}")
        assert metrics["validation", "epoch_accuracy"]["trainingStep"] == step == 2 * STEPS_PER_EPOCH
        assert metrics["validation", "epoch_accuracy"]["value"] == pytest.approx(accuracy)
        assert {("train", "epoch_loss"), ("train", "epoch_accuracy"), ("validation", "epoch_loss")} <= set(metrics)


@pytest.mark.slow
def test_config_text(board):
    tags = get(f"{board}/data/plugin/text/tags")
    for name, (rate, _) in RUNS.items():
        assert "config" in tags[f"{name}/train"]
        [config] = get(f"{board}/data/plugin/text/text?{query(run=f'{name}/train', tag='config')}")
        assert config["step"] == 0
        assert f"<td>optimizer.learning_rate</td>\n<td>{rate}</td>" in config["text"]


def latest_png(board: str, run: str, tag: str) -> bytes:
    """The last image of `tag`, after checking there is one per evaluation (epoch)."""
    images = get(f"{board}/data/plugin/images/images?{query(run=run, tag=tag, sample=0)}")
    assert [image["step"] for image in images] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    return get(f"{board}/data/plugin/images/individualImage?{images[-1]['query']}")


@pytest.mark.slow
def test_confusion_matrix_image_matches_its_counts(board):
    run = "mlp_lr0.005_mirrored/validation"  # labels and predictions gathered from two replicas
    assert {"confusion_matrix", "misclassified"} <= set(get(f"{board}/data/plugin/images/tags")[run])
    confusion, misclassified = (latest_png(board, run, tag) for tag in ("confusion_matrix", "misclassified"))
    assert confusion.startswith(b"\x89PNG\r\n\x1a\n") and misclassified.startswith(b"\x89PNG\r\n\x1a\n")
    [*_, counts] = get(f"{board}/data/plugin/text/text?{query(run=run, tag='confusion_counts')}")
    rows = np.array(re.findall(r"<td>(\d+)</td>", counts["text"]), int).reshape(10, 11)  # class name, 10 counts
    matrix = rows[:, 1:]
    assert matrix.sum() == 180  # every validation digit once
    np.testing.assert_array_equal(tf.io.decode_png(confusion).numpy(), confusion_image(matrix)[0])


@pytest.mark.slow
def test_model_graph(board):
    for name in RUNS:
        assert get(f"{board}/data/plugin/graphs/info")[f"{name}/train"]["run_graph"]
        graph = get(f"{board}/data/plugin/graphs/graph?{query(run=f'{name}/train', conceptual='false')}").decode()
        assert graph.count('op: "MatMul"') == 3  # the MLP's two hidden layers and its output layer


class Chromium:
    """Headless Chromium driven through the DevTools protocol over a pipe (--remote-debugging-pipe: the
    browser reads NUL-terminated JSON commands on fd 3 and answers on fd 4), so a test can wait until the
    page has really drawn something instead of guessing a delay."""

    def __init__(self, profile: Path):
        commands, self._commands = os.pipe()
        self._answers, answers = os.pipe()

        def as_fds_3_and_4():  # via fds >= 10 first, so neither dup2 overwrites the other pipe end
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands, answers)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), preexec_fn=as_fds_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands)
        os.close(answers)
        self._buffer, self._id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", page=True, width=1400, height=1000, deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, page: bool = False, **params) -> dict:
        """Sends one command (to the page with `page`) and returns its result, skipping events."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if page:
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._answers, 1 << 20)
                assert chunk, "chromium exited"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                assert "error" not in answer, answer["error"]
                return answer["result"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page."""
        answer = self.call("Runtime.evaluate", page=True, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in answer, answer["result"].get("description")
        return answer["result"].get("value")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", page=True, format="png")["data"]))

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        os.close(self._commands)
        os.close(self._answers)


@contextlib.contextmanager
def chromium(tmp_path: Path):
    browser = Chromium(tmp_path / "chromium-profile")
    try:
        yield browser
    finally:
        browser.close()


# Text of the page including shadow DOM (TensorBoard's HParams dashboard is Polymer).
DEEP_TEXT = """(function text(node) {
  let all = node.shadowRoot ? text(node.shadowRoot) : "";
  for (const child of node.childNodes) all += child.nodeType === Node.TEXT_NODE ? child.textContent : text(child);
  return all;
})(document)"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_browser_draws_the_loss_chart(board, tmp_path):
    # forceSVG: lines as <path> elements rather than WebGL pixels, so the page itself says what it drew.
    chart_lines = "document.querySelectorAll('scalar-card line-chart path[style*=stroke]').length"
    with chromium(tmp_path) as browser:
        browser.call("Page.navigate", page=True, url=f"{board}/?forceSVG=true&tagFilter=epoch_loss#timeseries")
        # Train and validation of each run (each drawn twice: raw and smoothed).
        wait_for(lambda: browser.evaluate(chart_lines) >= 2 * len(RUNS), timeout=60, what="the epoch_loss chart")
        page = browser.evaluate("document.body.innerText")
        browser.screenshot(ARTIFACTS / "tensorboard_scalars.png")
    assert "epoch_loss" in page and all(f"{name}/validation" in page for name in RUNS)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_browser_shows_the_hparams_table(board, tmp_path):
    with chromium(tmp_path) as browser:
        browser.call("Page.navigate", page=True, url=f"{board}/#hparams")
        wait_for(lambda: all(word in browser.evaluate(DEEP_TEXT) for word in [*RUNS, "val_loss"]), timeout=60,
                 what="the HParams table with a row per run")
        page = browser.evaluate(DEEP_TEXT)
        browser.screenshot(ARTIFACTS / "tensorboard_hparams.png")
    assert "optimizer.learning_rate" in page
