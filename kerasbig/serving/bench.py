"""`python -m kerasbig.serving.bench`: the dev server's speed, REST against gRPC, and a bounded local attack.

Everything runs on 127.0.0.1 against a `kerasbig.serve` process serving a small digits classifier (`image`
float32 [-1, 8, 8] -> `probabilities`, `classes`):

- speed: requests/s and p50/p99 latency for REST and gRPC, batch 1 and 32, 20 client threads (keep-alive
  HTTP connections, one gRPC channel), `--requests` each;
- attack (issue 9): at once, 1,000 connections that never finish their headers, deep JSON (255 and 40,000
  levels), 8 concurrent maximal bodies (just under --max_request_bytes, as many values as fit), and 20,000
  ordinary requests over 20 threads, whose throughput, latency, failures and longest wait are reported with
  the server's peak resident memory.

    python -m kerasbig.serving.bench                        # JSON on stdout, a markdown table on stderr
    python -m kerasbig.serving.bench --before=/tmp/old      # also the server of another checkout, REST only
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from absl import flags

from kerasbig import cli

FLAGS = flags.FLAGS
THREADS = 20
MAX_REQUEST_BYTES = 16 << 20  # kerasbig.serve's default


def define_flags() -> None:
    flags.DEFINE_integer("requests", 2000, "Requests per speed measurement, over 20 threads.", lower_bound=20)
    flags.DEFINE_integer("ordinary_requests", 20_000, "Ordinary requests during the attack.", lower_bound=20)
    flags.DEFINE_string("before", None, "A checkout whose kerasbig.serve to measure too (REST speed and the attack "
                        "without the parts that crash it or exhaust memory).")


def export_model(path: pathlib.Path) -> None:
    import keras  # noqa: PLC0415 - only the parent exports; the load generators need no TensorFlow
    import tensorflow as tf  # noqa: PLC0415

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8)), keras.layers.Flatten(), keras.layers.Dense(64, "relu"),
                              keras.layers.Dense(10)])

    def serve(image):
        probabilities = tf.nn.softmax(model(image))
        return {"probabilities": probabilities, "classes": tf.argmax(probabilities, axis=-1)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve, input_signature=[tf.TensorSpec([None, 8, 8], tf.float32,
                                                                                  name="image")])
    archive.write_out(str(path), verbose=False)


@contextlib.contextmanager
def server(base: pathlib.Path, checkout: pathlib.Path, *extra: str):
    """A `kerasbig.serve` of `checkout`; yields (pid, REST host:port, gRPC host:port or None)."""
    log = base / f"server-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "kerasbig.serve", f"--model_base_path={base}",
                                    "--rest_api_port=0", *extra], cwd=checkout, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(checkout)})
    try:
        while not (match := re.search(r"at http://(\S+?)/v1/models/", log.read_text())):
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        grpc_match = re.search(r"Serving gRPC at (\S+)", log.read_text())
        yield process, match[1], grpc_match[1] if grpc_match else None
    finally:
        process.terminate()
        process.wait(timeout=30)


def _percentiles(latencies: list[float], seconds: float, failures: int) -> dict:
    ms = np.array(latencies) * 1000
    return {"requests_per_s": round(len(latencies) / seconds, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "failures": failures}


def _rest_client(address: str, body: bytes):
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)

    def ask() -> bool:
        try:
            connection.request("POST", "/v1/models/digits:predict", body, {"Content-Type": "application/json"})
            reply = connection.getresponse()
            reply.read()
            return reply.status == 200
        except (OSError, http.client.HTTPException):
            connection.close()
            return False
    return ask


def _grpc_client(stub, request):
    import grpc  # noqa: PLC0415

    def ask() -> bool:
        try:
            stub.Predict(request, timeout=120)
            return True
        except grpc.RpcError:
            return False
    return ask


def measure(make_client, total: int) -> dict:
    """`total` requests over THREADS threads, each with its own client from `make_client()`."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def worker(count: int) -> None:
        ask = make_client()
        for _ in range(count):
            started = time.perf_counter()
            ok = ask()
            with lock:
                latencies.append(time.perf_counter() - started)
                failures[0] += not ok
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(worker, [total // THREADS] * THREADS))
    return _percentiles(latencies, time.perf_counter() - started, failures[0])


def batch(size: int) -> np.ndarray:
    return np.random.default_rng(size).uniform(0, 16, (size, 8, 8)).astype("float32")


def speed(rest: str, grpc_address: str | None, total: int) -> dict:
    results = {}
    for size in (1, 32):
        body = json.dumps({"instances": batch(size).tolist()}).encode()
        results[f"REST batch {size}"] = measure(lambda: _rest_client(rest, body), total)
    if grpc_address:
        import grpc  # noqa: PLC0415
        import tensorflow as tf  # noqa: PLC0415
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: PLC0415

        with grpc.insecure_channel(grpc_address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for size in (1, 32):
                request = predict_pb2.PredictRequest()
                request.model_spec.name = "digits"
                request.inputs["image"].CopyFrom(tf.make_tensor_proto(batch(size)))
                results[f"gRPC batch {size}"] = measure(lambda: _grpc_client(stub, request), total)
    return results


def _peak_rss_mb(pid: int) -> float:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


def _post_raw(address: str, body: bytes) -> None:
    host, port = address.split(":")
    with contextlib.suppress(OSError, http.client.HTTPException):
        connection = http.client.HTTPConnection(host, int(port), timeout=300)
        connection.request("POST", "/v1/models/digits:predict", body)
        connection.getresponse().read()
        connection.close()


def attack(process: subprocess.Popen, rest: str, ordinary: int, *, hostile: bool) -> dict:
    """The issue's bounded attack; with `hostile` False, only the slow connections (for a server they crash)."""
    host, port = rest.split(":")
    slow = []
    for _ in range(1000):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nContent-Len")
        slow.append(sock)
    stop = threading.Event()
    background = []

    def repeat(send) -> None:
        while not stop.is_set():
            send()
    if hostile:
        deep = [b'{"instances": ' + b"[" * d + b"1" + b"]" * d + b"}" for d in (255, 40_000)]
        maximal = b'{"instances": [' + b"0.5, " * ((MAX_REQUEST_BYTES - 40) // 5) + b"0.5]}"
        background = [threading.Thread(target=repeat, args=(lambda: [_post_raw(rest, b) for b in deep],))]
        background += [threading.Thread(target=repeat, args=(lambda: _post_raw(rest, maximal),)) for _ in range(8)]
    for thread in background:
        thread.start()
    body = json.dumps({"instances": batch(1).tolist()}).encode()
    try:
        result = measure(lambda: _rest_client(rest, body), ordinary)
    finally:
        stop.set()
        for thread in background:
            thread.join()
        for sock in slow:
            sock.close()
    result["server_alive"] = process.poll() is None
    result["peak_rss_mb"] = round(_peak_rss_mb(process.pid), 1) if result["server_alive"] else None
    return result


def run() -> dict:
    repo = pathlib.Path(__file__).resolve().parents[2]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp)
        export_model(base / "digits" / "1")
        with server(base, repo, "--port=0") as (process, rest, grpc_address):
            results["speed"] = speed(rest, grpc_address, FLAGS.requests)
        with server(base, repo) as (process, rest, _):
            results["attack"] = attack(process, rest, FLAGS.ordinary_requests, hostile=True)
        if FLAGS.before:
            with server(base, pathlib.Path(FLAGS.before)) as (process, rest, _):
                results["before_speed"] = speed(rest, None, FLAGS.requests)
            with server(base, pathlib.Path(FLAGS.before)) as (process, rest, _):
                results["before_attack"] = attack(process, rest, FLAGS.ordinary_requests, hostile=False)
    return results


def main() -> None:
    results = run()
    print(json.dumps(results, indent=2))
    for name, rows in (("speed", results["speed"]), ("before speed", results.get("before_speed", {}))):
        for case, row in rows.items():
            print(f"| {name} | {case} | {row['requests_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
                  f"{row['failures']} |", file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
