"""`kerasbig.serve` under hostile and careless requests (issue 9, items 1-7): every request gets a status and
a JSON `error`, memory and threads stay bounded, slow clients cost nothing but a socket, and the folders on disk
are what is served (replaced, removed and broken versions)."""
from __future__ import annotations

import concurrent.futures
import json
import shutil
import socket
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from kerasbig import predict
from serving_models import export_slow
from serving_helpers import call, export_digits, images, server_process, until

pytestmark = pytest.mark.slow  # server processes

TIMEOUT_MS = 2000
MAX_ELEMENTS = 10_000
MAX_BYTES = 100_000  # test_serve's --max_request_bytes


def expected_probabilities(path: Path, batch: np.ndarray) -> np.ndarray:
    """What the SavedModel at `path` answers, loaded directly (fresh each time: the folder may be replaced)."""
    return tf.saved_model.load(str(path)).signatures["serving_default"](image=tf.constant(batch))[
        "probabilities"].numpy()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("hostile")
    export_digits(base / "digits" / "1", seed=1)
    for name in ("my model", "modèle", "swap", "broken"):
        shutil.copytree(base / "digits", base / name)
    (base / "broken" / "2").mkdir()
    (base / "broken" / "2" / "saved_model.pb").write_bytes(b"copied in half")  # newest version, unloadable
    for seed in (5, 6, 7):
        export_digits(base / ".exports" / str(seed), seed=seed)
    return base


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    with server_process(models, tmp_path_factory.mktemp("log") / "server.log",
                        f"--rest_api_timeout_in_ms={TIMEOUT_MS}", f"--max_request_elements={MAX_ELEMENTS}",
                        "--rest_api_num_threads=2") as (url, process):
        yield url, process


@pytest.fixture
def server(served) -> str:
    return served[0]


def raw(url: str, data: bytes, timeout: float = 30) -> tuple[int, dict]:
    """Sends `data` as it is on a fresh connection; returns the status and JSON body of the reply."""
    host, port = urllib.parse.urlsplit(url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(1 << 16):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head, head
    return int(head.split()[1]), json.loads(body)


def assert_alive(url: str) -> None:
    status, reply = call(f"{url}/v1/models/digits:predict", {"instances": images(1).tolist()})
    assert status == 200 and len(reply["predictions"]) == 1, reply


def test_deep_json_gets_a_400_and_the_server_lives(server):
    """Item 1: 526 bytes nested 255 deep aborted the process in TensorFlow's dimension check."""
    for depth in (255, 40_000):  # the second past what Python's parser takes, under --max_request_bytes
        body = b'{"instances": ' + b"[" * depth + b"1" + b"]" * depth + b"}"
        status, reply = call(f"{server}/v1/models/digits:predict", body)
        assert status == 400 and ("dimensions" in reply["error"] or "nested too deeply" in reply["error"]), reply
        assert_alive(server)


def test_more_values_than_max_request_elements_get_413(server):
    """Item 2: a small body may expand into many values; the limit counts values, not bytes."""
    body = b'{"instances": [' + b"0," * (MAX_ELEMENTS + 1) + b"0]}"
    assert len(body) < MAX_BYTES
    status, reply = call(f"{server}/v1/models/digits:predict", body)
    assert status == 413 and "--max_request_elements" in reply["error"], reply


def thread_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def test_slow_clients_hold_no_thread_and_are_dropped_after_the_read_timeout(served):
    """Item 3: 300 connections that never finish their request neither block others nor grow threads."""
    url, process = served
    host, port = urllib.parse.urlsplit(url).netloc.split(":")
    threads = thread_count(process.pid)
    slow = [socket.create_connection((host, int(port))) for _ in range(300)]
    try:
        for sock in slow:
            sock.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nContent-Len")
        started = time.monotonic()
        assert_alive(url)
        assert time.monotonic() - started < TIMEOUT_MS / 1000, "an ordinary request waited for the slow ones"
        assert thread_count(process.pid) <= threads + 2
        time.sleep(TIMEOUT_MS / 1000 + 1)
        for sock in slow[:10]:
            sock.settimeout(5)
            assert sock.recv(1000).startswith(b"HTTP/1.1 408 "), "a connection outlived --rest_api_timeout_in_ms"
    finally:
        for sock in slow:
            sock.close()


def test_bodies_beyond_the_buffer_budget_get_503(server):
    """Item 2: clients that announce large bodies and send them slowly hold at most 2 bodies' worth of memory."""
    host, port = urllib.parse.urlsplit(server).netloc.split(":")
    head = (f"POST /v1/models/digits:predict HTTP/1.1\r\nContent-Length: {MAX_BYTES}\r\n\r\n").encode()
    holders = [socket.create_connection((host, int(port))) for _ in range(2)]
    try:
        for sock in holders:
            sock.sendall(head + b"[" * 1000)
        time.sleep(0.5)
        closing = head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        status, reply = raw(server, closing + b" " * MAX_BYTES)
        assert status == 503 and "too many large request bodies" in reply["error"], reply
    finally:
        for sock in holders:
            sock.close()
    assert until(lambda: raw(server, closing + b" " * MAX_BYTES)[0] == 400)  # budget back once they are gone


def test_requests_past_the_worker_pool_and_its_queue_get_503(models, tmp_path):
    """Item 2/3: a pool of 1 worker takes 4 requests in flight (running or queued); more get 503 at once."""
    export_slow(models / ".slow" / "slow" / "1")
    with server_process(models / ".slow", tmp_path / "server.log", "--rest_api_num_threads=1") as (url, _):
        def ask(_):
            return call(f"{url}/v1/models/slow:predict", {"instances": [3000]})

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(ask, range(8)))
    codes = sorted(status for status, _ in replies)
    assert codes.count(200) >= 4 and 503 in codes and set(codes) == {200, 503}, replies
    assert all("busy" in reply["error"] for status, reply in replies if status == 503)


def test_replaced_and_removed_versions_are_reloaded(models, server):
    """Item 4: the same version number with other weights is what gets served after the next poll."""
    batch = images(2, seed=3)
    model = models / "swap"

    def serves(path: Path) -> bool:
        status, reply = call(f"{server}/v1/models/swap:predict", {"instances": batch.tolist()})
        return status == 200 and np.allclose([row["probabilities"] for row in reply["predictions"]],
                                             expected_probabilities(path, batch), rtol=1e-5)

    assert serves(model / "1")
    shutil.copytree(models / ".exports" / "5", model / ".tmp-1")
    shutil.rmtree(model / "1")
    (model / ".tmp-1").rename(model / "1")
    assert until(lambda: serves(models / ".exports" / "5"))
    shutil.rmtree(model)  # the whole model folder removed, then copied in again (not atomically: the poll may
    # see half a copy, fail to load it, and load it once its files stop changing)
    assert until(lambda: call(f"{server}/v1/models/swap")[0] == 404)
    shutil.copytree(models / ".exports" / "6", model / "1")
    assert until(lambda: serves(models / ".exports" / "6"))


def test_a_broken_version_shows_its_error_while_the_newest_loadable_serves(models, server):
    """Item 5: as in TF Serving, the broken version's status has state END and its load error."""
    status, reply = call(f"{server}/v1/models/broken")
    assert status == 200, reply
    second, first = reply["model_version_status"]  # newest first
    assert (first["version"], first["state"], first["status"]["error_code"]) == ("1", "AVAILABLE", "OK")
    assert (second["version"], second["state"]) == ("2", "END")
    assert second["status"]["error_code"] != "OK" and "Failed to load broken version 2" in \
        second["status"]["error_message"]
    batch = images(1, seed=4)
    status, reply = call(f"{server}/v1/models/broken:predict", {"instances": batch.tolist()})
    assert status == 200
    np.testing.assert_allclose(reply["predictions"][0]["probabilities"],
                               expected_probabilities(models / "broken" / "1", batch)[0], rtol=1e-5)
    assert call(f"{server}/v1/models/broken/versions/2:predict", {"instances": batch.tolist()})[0] == 404
    shutil.rmtree(models / "broken" / "2")  # the copy completes: the version loads at the next poll
    shutil.copytree(models / ".exports" / "7", models / "broken" / "2")
    assert until(lambda: call(f"{server}/v1/models/broken/versions/2")[1]["model_version_status"][0]["state"]
                 == "AVAILABLE")


@pytest.mark.parametrize("request_bytes, status, message", [
    (b"GET /v1/models/digits/versions/" + b"9" * 5000 + b" HTTP/1.1\r\n\r\n", 400, "Failed to convert version"),
    (b"GET /v1/models/dig%00its HTTP/1.1\r\n\r\n", 404, "Could not find any versions of model dig\x00its"),
    (b"GET /v1/models/dig\x00its HTTP/1.1\r\n\r\n", 404, "Could not find any versions"),
    (b'POST /v1/models/digits:predict HTTP/1.1\r\nContent-Length: 15\r\n\r\n{"instances": [', 400,
     "JSON Parse error"),
    (b"GET /v1/models/digits HTTP/1.1\r\nHost: incompl", 408, "did not arrive within"),
    (b"POST /v1/models/digits:predict HTTP/1.1\r\nContent-Length: 41\r\n\r\n"
     b'{"signature_name": ["x"], "instances":[]}', 400, "'signature_name' key must be a string value"),
    (b"PUT /v1/models/digits HTTP/1.1\r\n\r\n", 400, "Malformed request: PUT /v1/models/digits"),
    (b"BREW /v1/models/digits HTTP/1.1\r\n\r\n", 400, "Malformed request: BREW"),
    (b"HELLO\r\n\r\n", 400, "Malformed HTTP request"),
    (b"GET /v1/models/digits HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "headers exceed"),
    (b"POST /v1/models/digits:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, "Content-Length"),
    (b"POST /v1/models/digits:predict HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400, "Content-Length"),
])
def test_bad_requests_get_4xx_and_a_json_error(server, request_bytes, status, message):
    """Item 6: never 500 or an HTML page for the client's mistakes."""
    request_bytes = request_bytes.replace(b" HTTP/1.1\r\n", b" HTTP/1.1\r\nConnection: close\r\n", 1)
    code, reply = raw(server, request_bytes)
    assert code == status and message in reply["error"], reply


def test_names_with_spaces_and_non_ascii_are_reachable(models, server):
    """Item 7: percent-encoded model names are decoded, so kerasbig.predict reaches its own server."""
    batch = images(2, seed=6)
    for name in ("my model", "modèle"):
        assert call(f"{server}/v1/models/{urllib.parse.quote(name)}")[0] == 200
        reply = predict.post_json(predict.predict_url(server, name), {"instances": batch.tolist()}, timeout=30)
        np.testing.assert_allclose([row["probabilities"] for row in reply["predictions"]],
                                   expected_probabilities(models / name / "1", batch), rtol=1e-5)
