"""`python -m kerasbig.bench --suite=compression`: each compression of a model measured on the same test split.

For each model (digits_cnn, text_transformer, gpt_small) every row is a real run of `python -m kerasbig.train`
with the same step budget, exported as users export: float; pruned to 50%, 80% and 90% and 2:4 (the schedule
from 20% to 70% of the steps); the float run's int8 and int4 versions; the 80% run's int8 version; a student of
half the width (about a quarter of the parameters) distilled from the float run. Each run is served and measured
as soon as it is trained, and the caller gets the tables after every row (a partial run keeps its rows). Columns:
parameters (and those not pruned to zero) read back from the SavedModel's variables, its size on disk raw and
gzipped, the test split's accuracy (bits per token for language models) as kerasbig.json records it, and the
median latency of one single-example request to a `kerasbig.serve` on 127.0.0.1 serving every version.
"""
from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from kerasbig.errors import RunError
from kerasbig.files import write_atomically
from kerasbig.serving.bench import server

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
REQUESTS = 20  # per version, one at a time, after 5 warmup requests


@dataclasses.dataclass(frozen=True)
class Model:
    config: str
    steps: int
    overrides: tuple[str, ...] = ()
    student: tuple[str, ...] = ()  # the distilled row's model: half the width, about a quarter of the parameters


MODELS = {
    # 600 steps: 30 epochs of the 1,257 training images, where the config's warmup and cosine decay end.
    "digits_cnn": Model("digits_cnn", 600, (), ("--config.model.filters=(16,32)", "--config.model.dense=64")),
    "text_transformer": Model("text_transformer", 80, ("--config.train.early_stopping.enabled=False",),
                              ("--config.model.width=48",)),
    "gpt_small": Model("gpt_small", 100, ("--config.train.eval_every_steps=100",), ("--config.model.width=64",)),
}
# Row name -> (training overrides, quantized versions that the run also exports).
RUNS = {
    "float": ((), ("int8", "int4")),
    "pruned 50%": (("--config.compress.prune.sparsity=0.5",), ()),
    "pruned 80%": (("--config.compress.prune.sparsity=0.8",), ("int8",)),
    "pruned 90%": (("--config.compress.prune.sparsity=0.9",), ()),
    "pruned 2:4": (("--config.compress.prune.structured=True",), ()),
}


def _train(model: Model, overrides: tuple[str, ...], modes: tuple[str, ...], workdir: pathlib.Path,
           export_dir: pathlib.Path) -> None:
    schedule = (f"--config.compress.prune.start_step={model.steps // 5}",
                f"--config.compress.prune.end_step={model.steps * 7 // 10}",
                f"--config.compress.prune.frequency={max(1, model.steps // 30)}")
    pruned = any(o.startswith("--config.compress.prune.") for o in overrides)
    command = [sys.executable, "-m", "kerasbig.train", f"--config=configs/{model.config}.py", *model.overrides,
               *overrides, *(schedule if pruned else ()), f"--config.train.steps={model.steps}",
               f"--config.export.quantize={','.join(modes)}", f"--workdir={workdir}", f"--export_dir={export_dir}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise RunError(f"{model.config} {' '.join(overrides)}: training failed: "
                       f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")


def parameters(version: pathlib.Path) -> tuple[int, int]:
    """(values, nonzero values) of the SavedModel's variables (each stored once, under `variables/N`)."""
    reader = tf.train.load_checkpoint(str(version / "variables" / "variables"))
    values = [reader.get_tensor(key) for key in reader.get_variable_to_shape_map() if key.startswith("variables/")]
    values = [v for v in values if isinstance(v, np.ndarray) and v.dtype != object]
    return sum(v.size for v in values), sum(int(np.count_nonzero(v)) for v in values)


def _score(record: dict) -> float:
    compared = "comparison" in record  # a version quantized at export; else the run's own test scores
    scores = (record["comparison"][record["quantization"]] if compared
              else {f"test_{k}": v for k, v in record["metrics"].items()})
    return scores.get("test_bits_per_token", scores["test_accuracy"])


def _request_body(version: pathlib.Path) -> bytes:
    """One example of the version's warmup request, as REST JSON (bytes as TF Serving's {"b64": ...})."""
    record = next(iter(tf.data.TFRecordDataset(str(version / "assets.extra" / "tf_serving_warmup_requests"))))
    request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request

    def first(proto):
        value = tf.make_ndarray(proto)[:1]
        return [{"b64": base64.b64encode(v).decode()} for v in value] if value.dtype == object else value.tolist()
    return json.dumps({"inputs": {name: first(proto) for name, proto in request.inputs.items()}}).encode()


def p50_ms(address: str, path: str, body: bytes) -> float:
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    latencies = []
    for index in range(REQUESTS + 5):
        started = time.perf_counter()
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        reply = connection.getresponse()
        text = reply.read()
        if reply.status != 200:
            raise RunError(f"{path}: HTTP {reply.status} {text[:200]!r}")
        if index >= 5:
            latencies.append(time.perf_counter() - started)
    connection.close()
    return float(np.median(latencies) * 1e3)


def _runs(name: str, root: pathlib.Path) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """RUNS, and the distilled student (after the float run, its teacher)."""
    teacher = f"--config.compress.teacher={root / 'runs' / 'float'}"
    return {**RUNS, "distilled student": ((*MODELS[name].student, teacher), ())}


def model_rows(name: str, root: pathlib.Path, on_row: Callable[[list[dict]], None]) -> list[dict]:
    """Trains, exports, serves and measures every row of `name` under `root`, one run at a time; calls
    `on_row(rows so far)` after each row."""
    model, rows = MODELS[name], []
    for row, (overrides, modes) in _runs(name, root).items():
        print(f"  {name}: {row} ...", flush=True)
        folder = row.replace(" ", "_").replace("%", "").replace(":", "of")
        _train(model, overrides, modes, root / "runs" / folder, root / "models" / folder)
        versions = [(row, 1)] + [(f"{row} + {mode}" if overrides else mode, n) for n, mode in enumerate(modes, 2)]
        with server(root / "models", REPO) as (_, address, _grpc):
            for version_name, number in versions:
                rows.append(_measure(name, version_name, root / "models" / folder / str(number), address))
                on_row(rows)
    return rows


def _measure(name: str, row: str, version: pathlib.Path, address: str) -> dict:
    record = json.loads((version / "assets.extra" / "kerasbig.json").read_text())
    values, nonzero = parameters(version)
    return {"version": row, "parameters": values, "nonzero": nonzero,
            "size (KB)": record["size_bytes"] / 1e3, "gzip (KB)": record["size_gzip_bytes"] / 1e3,
            ("bits/token" if name == "gpt_small" else "accuracy"): f"{_score(record):.4f}",
            "p50 (ms)": p50_ms(address, f"/v1/models/{version.parent.name}/versions/{version.name}:predict",
                               _request_body(version))}


def suite(names: list[str], on_row: Callable[[dict[str, list[dict]]], None] = lambda tables: None
          ) -> dict[str, list[dict]]:
    """{model name: rows} for each of `names` (keys of MODELS); `on_row(tables so far)` after every row."""
    tables: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            tables[name] = model_rows(name, pathlib.Path(tmp) / name,
                                      lambda rows, name=name: on_row({**tables, name: rows}))
    return tables


RESULTS_MARK = "<!-- python -m kerasbig.bench --suite=compression writes below this line -->"


def write_results(path: pathlib.Path, text: str) -> None:
    """Replaces what follows RESULTS_MARK in `path` (a document's hand-written part stays), or writes `text`."""
    document = path.read_text() if path.exists() else ""
    head = document.split(RESULTS_MARK)[0].rstrip() + "\n\n" if RESULTS_MARK in document else ""
    write_atomically(path, f"{head}{RESULTS_MARK}\n\n{text}")
