"""Helpers the serving tests share: a real kerasbig.serve process on a free port, requests to it, and a small
digits SavedModel exported the way kerasbig exports."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from conftest import free_port, stop

ROOT = Path(__file__).resolve().parents[1]


MAX_REQUEST_BYTES = 100_000


POLL_SECONDS = 0.2


def export_archive(model: keras.Model, fn, spec: tf.TensorSpec, path: Path) -> None:
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", fn, input_signature=[spec])
    archive.write_out(str(path), verbose=False)


def export_digits(path: Path, seed: int) -> None:
    """image float32 [None, 8, 8] -> probabilities float32 [None, 10], classes int64 [None]."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8, 8)), keras.layers.Flatten(), keras.layers.Dense(10)])

    def serve(image):
        probabilities = tf.nn.softmax(model(image))
        return {"probabilities": probabilities, "classes": tf.argmax(probabilities, axis=-1)}

    export_archive(model, serve, tf.TensorSpec([None, 8, 8], tf.float32, name="image"), path)


def command(module: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", f"kerasbig.{module}", *flags]


@contextlib.contextmanager
def running_server(base: Path | None, log_path: Path, *flags: str):
    """Starts `kerasbig.serve` (on `--model_base_path=base` unless None), yields its URL once it says it is
    ready, and always stops it."""
    with server_process(base, log_path, *flags) as (url, _):
        yield url


@contextlib.contextmanager
def server_process(base: Path | None, log_path: Path, *flags: str):
    """`running_server`, yielding (URL, the server's Popen)."""
    port = free_port()
    with log_path.open("w") as log:  # a file, not a pipe: a pipe nobody reads would block the server
        models = [] if base is None else [f"--model_base_path={base}"]
        process = subprocess.Popen(command("serve", *models, f"--rest_api_port={port}",
                                           f"--max_request_bytes={MAX_REQUEST_BYTES}",
                                           f"--file_system_poll_wait_seconds={POLL_SECONDS}", *flags),
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while f"at {url}/v1/models/" not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield url, process
    finally:
        stop(process)


def until(condition, timeout: float = 30):
    """Waits for `condition()` to hold, as the server polls its folders; returns its last value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS / 2)
    return value


def call(url: str, body=None) -> tuple[int, dict]:
    """GET `url`, or POST `body` (bytes as they are, anything else as JSON); returns (HTTP status, JSON reply)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data), timeout=60) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (count, 8, 8)).astype("float32")


def run_all(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Runs the commands side by side: each spends seconds importing TensorFlow."""
    with concurrent.futures.ThreadPoolExecutor() as pool:
        return list(pool.map(lambda args: subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=90),
                             commands))
