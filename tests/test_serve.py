"""`python -m kerasbig.serve` and `python -m kerasbig.predict` end to end.

A real server process on a free localhost port serves tiny SavedModels exported the way kerasbig exports them
(`keras.export.ExportArchive` with a `serving_default` endpoint returning a dict); its answers are checked
against the same SavedModels loaded directly.
"""
from __future__ import annotations

import base64
import concurrent.futures
import functools
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasbig import predict
from kerasbig.errors import RunError, UsageError
from conftest import free_port
from serving_helpers import export_archive, call, command, export_digits, images, run_all, running_server, until

pytestmark = pytest.mark.slow  # server processes

MODELS_CONFIG = """
model_config_list {
  config {
    name: "digits"
    base_path: "/models/digits"
    model_platform: "tensorflow"
    version_labels { key: "stable" value: 1 }
  }
}
"""
OK_STATUS = {"state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}


def export_text(path: Path) -> None:
    """text string [None] -> logits float32 [None, 2], from the first 16 bytes of each text."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((16,), dtype="int32"), keras.layers.Embedding(256, 4),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])

    def serve(text):
        return {"logits": model(tf.cast(tf.io.decode_raw(text, tf.uint8, fixed_length=16), tf.int32))}

    export_archive(model, serve, tf.TensorSpec([None], tf.string, name="text"), path)


def export_tokens(path: Path) -> None:
    """tokens int32 [None, None] -> logits float32 [None, None, 16], like a language model."""
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(16, 4),
                              keras.layers.Dense(16)])
    export_archive(model, lambda tokens: {"logits": model(tokens)}, tf.TensorSpec([None, None], tf.int32, name="tokens"),
            path)


@pytest.fixture(scope="module")
def base_path(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("saved_models")
    export_digits(base / "digits" / "1", seed=1)
    export_digits(base / "digits" / "2", seed=2)
    shutil.copytree(base / "digits" / "1", base / "digits" / ".tmp-3")  # an export in progress: not a version
    export_text(base / "text" / "1")
    export_tokens(base / "tokens" / "1")
    shutil.copytree(base / "digits", base / "growing")  # the test that adds a version changes only this model
    (base / "models.config").write_text(MODELS_CONFIG)
    return base


@pytest.fixture(scope="module")
def server(base_path, tmp_path_factory) -> str:
    with running_server(base_path, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url


@functools.cache
def load(path: Path):
    return tf.saved_model.load(str(path))


def direct(base: Path, name: str, version: int, **inputs) -> dict[str, np.ndarray]:
    """What the SavedModel itself answers, loaded with TensorFlow and no server."""
    signature = load(base / name / str(version)).signatures["serving_default"]
    return {key: value.numpy() for key, value in signature(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def assert_digits_rows(predictions: list[dict], expected: dict[str, np.ndarray]) -> None:
    assert [sorted(row) for row in predictions] == [["classes", "probabilities"]] * len(predictions)
    np.testing.assert_allclose([row["probabilities"] for row in predictions], expected["probabilities"], rtol=1e-6)
    np.testing.assert_array_equal([row["classes"] for row in predictions], expected["classes"])


def test_status_lists_every_version_and_ignores_exports_in_progress(server):
    # newest first, as TF Serving lists versions (its ServableStateMonitor keeps them in descending order)
    assert call(f"{server}/v1/models/digits") == (
        200, {"model_version_status": [{"version": "2", **OK_STATUS}, {"version": "1", **OK_STATUS}]})
    assert call(f"{server}/v1/models/digits/versions/2") == (
        200, {"model_version_status": [{"version": "2", **OK_STATUS}]})
    assert call(f"{server}/v1/models/digits/labels/stable") == (
        200, {"model_version_status": [{"version": "1", **OK_STATUS}]})


def test_metadata_has_the_signature_defs_in_tf_serving_json(server):
    status, metadata = call(f"{server}/v1/models/digits/metadata")
    assert status == 200
    assert metadata["model_spec"] == {"name": "digits", "version": "2", "signature_name": ""}
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"

    def dims(info):
        return [int(dim["size"]) for dim in info["tensor_shape"]["dim"]]

    assert signature["inputs"]["image"]["dtype"] == "DT_FLOAT" and dims(signature["inputs"]["image"]) == [-1, 8, 8]
    outputs = signature["outputs"]
    assert (outputs["probabilities"]["dtype"], dims(outputs["probabilities"])) == ("DT_FLOAT", [-1, 10])
    assert (outputs["classes"]["dtype"], dims(outputs["classes"])) == ("DT_INT64", [-1])
    assert call(f"{server}/v1/models/digits/versions/1/metadata")[1]["model_spec"]["version"] == "1"
    tokens = call(f"{server}/v1/models/tokens/metadata")[1]["metadata"]["signature_def"]["signature_def"]
    assert tokens["serving_default"]["inputs"]["tokens"]["dtype"] == "DT_INT32"


def test_row_and_columnar_predict_match_the_saved_model(server, base_path):
    batch = images(3)
    expected = direct(base_path, "digits", 2, image=batch)
    status, reply = call(f"{server}/v1/models/digits:predict", {"instances": batch.tolist()})
    assert status == 200
    assert_digits_rows(reply["predictions"], expected)
    named_rows = [{"image": image} for image in batch.tolist()]
    assert call(f"{server}/v1/models/digits:predict", {"instances": named_rows}) == (200, reply)

    status, reply = call(f"{server}/v1/models/digits:predict",
                         {"signature_name": "serving_default", "inputs": {"image": batch.tolist()}})
    assert status == 200 and sorted(reply["outputs"]) == ["classes", "probabilities"]
    np.testing.assert_allclose(reply["outputs"]["probabilities"], expected["probabilities"], rtol=1e-6)
    np.testing.assert_array_equal(reply["outputs"]["classes"], expected["classes"])


def test_versions_and_labels_pick_the_model(server, base_path):
    batch = images(2, seed=1)
    version_1 = direct(base_path, "digits", 1, image=batch)
    assert not np.allclose(version_1["probabilities"], direct(base_path, "digits", 2, image=batch)["probabilities"])
    for path in ("versions/1", "labels/stable"):
        status, reply = call(f"{server}/v1/models/digits/{path}:predict", {"instances": batch.tolist()})
        assert status == 200
        assert_digits_rows(reply["predictions"], version_1)


def test_string_inputs_as_text_or_base64_and_a_single_output_unnamed(server, base_path):
    expected = direct(base_path, "text", 1, text=["hello", "kerasbig"])["logits"]
    b64 = {"b64": base64.b64encode(b"kerasbig").decode()}
    status, reply = call(f"{server}/v1/models/text:predict", {"instances": ["hello", b64]})
    assert status == 200
    np.testing.assert_allclose(reply["predictions"], expected, rtol=1e-6)
    status, reply = call(f"{server}/v1/models/text:predict", {"inputs": ["hello", b64]})
    assert status == 200
    np.testing.assert_allclose(reply["outputs"], expected, rtol=1e-6)


def test_int_tokens_of_any_length(server, base_path):
    for tokens in ([[1, 2, 3]], [[4, 5, 6, 7, 8], [9, 10, 11, 12, 13]]):
        status, reply = call(f"{server}/v1/models/tokens:predict", {"inputs": {"tokens": tokens}})
        assert status == 200
        expected = direct(base_path, "tokens", 1, tokens=np.array(tokens, "int32"))["logits"]
        np.testing.assert_allclose(reply["outputs"], expected, rtol=1e-6)


def test_a_new_version_is_served_without_a_restart(server, base_path):
    model = base_path / "growing"
    export_digits(model / ".tmp-export", seed=3)
    assert [s["version"] for s in call(f"{server}/v1/models/growing")[1]["model_version_status"]] == ["2", "1"]
    (model / ".tmp-export").rename(model / "3")  # what kerasbig's exporter does once a version is complete
    # TF Serving notices new versions at its next look at the folder (--file_system_poll_wait_seconds)
    assert until(lambda: [s["version"] for s in call(f"{server}/v1/models/growing")[1]["model_version_status"]]
                 == ["3", "2", "1"])
    batch = images(2, seed=2)
    status, reply = call(f"{server}/v1/models/growing:predict", {"instances": batch.tolist()})
    assert status == 200
    assert_digits_rows(reply["predictions"], direct(base_path, "growing", 3, image=batch))


IMAGE = images(1).tolist()


@pytest.mark.parametrize("path, body, status, message", [
    ("digits:predict", b'{"instances": [', 400, "JSON Parse error"),
    # TF Serving's own messages (util/json_tensor.cc); an unknown key of 'inputs' is ignored, so the refusal
    # names the missing input
    ("digits:predict", {"instances": IMAGE, "inputs": IMAGE}, 400, "expecting only one of 'inputs' or 'instances'"),
    ("digits:predict", {"instances": [{"pixels": IMAGE[0]}]}, 400, "does not have named input: pixels"),
    ("digits:predict", {"inputs": {"pixels": IMAGE}}, 400, "Missing named input: image in 'inputs' object"),
    ("digits:predict", {"instances": [[1.0, 2.0]]}, 400, "shape [1, 2] but the signature takes [-1, 8, 8]"),
    ("digits:predict", {"instances": [[["a"] * 8] * 8]}, 400, "is not of expected type: float"),
    ("digits:predict", {"signature_name": "nope", "instances": IMAGE}, 400, '"nope" not found'),
    ("tokens:predict", {"inputs": [[1, 99]]}, 400, "99 is not in [0, 16)"),
    ("nope:predict", {"instances": IMAGE}, 404, "Servable not found for request: Latest(nope)"),
    ("digits/versions/9:predict", {"instances": IMAGE}, 404, "Specific(digits, 9)"),
    # TF Serving answers an unknown label with INVALID_ARGUMENT, so 400 (http_rest_api_handler_test.cc)
    ("digits/labels/canary:predict", {"instances": IMAGE}, 400, "Unrecognized servable version label: canary"),
    ("nope", None, 404, "Could not find any versions of model nope"),
    ("digits/versions/9/metadata", None, 404, "Specific(digits, 9)"),
    ("..", None, 404, "versions of model .."),
    ("digits:classify", {"examples": []}, 400, "'examples' value is an empty array"),
    ("digits:classify", {"examples": [{"x": 1.0}]}, 400, "method_name to be tensorflow/serving/classify"),
    ("digits:Predict", {"instances": IMAGE}, 400, "Malformed request"),
])
def test_refusals_have_tf_serving_status_codes_and_an_error(server, path, body, status, message):
    code, reply = call(f"{server}/v1/models/{path}", body)
    assert code == status and message in reply["error"], reply


def test_an_oversized_body_is_refused_with_413(server):
    # 4 MB, more than the sockets buffer: the reply must arrive although the server refuses to store the body
    body = b'{"instances": [' + b"0.5, " * 800_000 + b"0.5]}"
    code, reply = call(f"{server}/v1/models/digits:predict", body)
    assert code == 413 and "--max_request_bytes" in reply["error"]


def test_200_concurrent_requests_all_succeed(server, base_path):
    def ask(i: int) -> None:
        version, batch = 1 + i % 2, images(1 + i % 4, seed=i)
        status, reply = call(f"{server}/v1/models/digits/versions/{version}:predict", {"instances": batch.tolist()})
        assert status == 200, reply
        assert_digits_rows(reply["predictions"], direct(base_path, "digits", version, image=batch))

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(ask, range(200)))  # list() re-raises the first failure


def test_model_name_serves_that_model_only(base_path, tmp_path):
    with running_server(base_path, tmp_path / "server.log", "--model_name=text") as url:
        assert call(f"{url}/v1/models/text")[0] == 200
        assert call(f"{url}/v1/models/digits")[0] == 404


def assert_failed(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    """Exit `code` and exactly one line on stderr, holding `message`, without a traceback."""
    assert (result.returncode, result.stderr.count("\n")) == (code, 1) and message in result.stderr, result.stderr


def test_bad_flags_exit_2_with_one_line(base_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        missing_path, missing_model, port_in_use = run_all(
            command("serve", "--model_base_path=/no/such/folder"),
            command("serve", f"--model_base_path={base_path}", "--model_name=nope"),
            command("serve", f"--model_base_path={base_path}", f"--rest_api_port={busy.getsockname()[1]}"))
    assert_failed(missing_path, 2, "--model_base_path=/no/such/folder is not a readable folder")
    assert_failed(missing_model, 2, "--model_name=nope: no version folders")
    assert_failed(port_in_use, 2, "cannot listen there (Address already in use)")


def test_predict_client_sends_json_and_npy_files(server, base_path, tmp_path):
    batch = images(2, seed=5)
    np.save(tmp_path / "batch.npy", batch)
    (tmp_path / "request.json").write_text(json.dumps({"inputs": {"image": batch.tolist()}}))
    rows, columns = run_all(
        command("predict", f"--server={server}", "--model_name=digits", "--version=1",
                f"--input={tmp_path / 'batch.npy'}"),
        command("predict", f"--server={server}/", "--model_name=digits", "--version=1",
                "--signature_name=serving_default", f"--input={tmp_path / 'request.json'}"))
    expected = direct(base_path, "digits", 1, image=batch)
    assert rows.returncode == 0 and rows.stdout.count("\n") == 1 and " " not in rows.stdout, rows.stderr
    assert_digits_rows(json.loads(rows.stdout), expected)
    assert columns.returncode == 0, columns.stderr
    np.testing.assert_allclose(json.loads(columns.stdout)["probabilities"], expected["probabilities"], rtol=1e-6)


def test_predict_client_failures(server, tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, images(1))
    unreachable, unknown_model, missing_input = run_all(
        command("predict", f"--server=http://127.0.0.1:{free_port()}", "--model_name=digits", f"--input={good}"),
        command("predict", f"--server={server}", "--model_name=nope", f"--input={good}"),
        command("predict", f"--server={server}", "--model_name=digits", f"--input={tmp_path / 'missing.json'}"))
    assert_failed(unreachable, 1, "cannot reach http://127.0.0.1:")
    assert_failed(unknown_model, 1, "HTTP 404: Servable not found for request: Latest(nope)")
    assert_failed(missing_input, 2, "cannot read it (No such file or directory)")


def test_predict_reads_bare_instances_and_request_bodies(tmp_path):
    (tmp_path / "instances.json").write_text("[[1, 2], [3, 4]]")
    (tmp_path / "request.json").write_text('{"signature_name": "s", "inputs": {"x": [1]}}')
    np.save(tmp_path / "batch.npy", np.arange(4, dtype="int32").reshape(2, 2))
    assert predict.read_request(tmp_path / "instances.json") == {"instances": [[1, 2], [3, 4]]}
    assert predict.read_request(tmp_path / "request.json") == {"signature_name": "s", "inputs": {"x": [1]}}
    assert predict.read_request(tmp_path / "batch.npy") == {"instances": [[0, 1], [2, 3]]}
    for name, text, message in [("broken.json", "[[1, 2", "not valid JSON"),
                                ("object.json", '{"x": 1}', "expected a list of instances"),
                                ("broken.npy", "not an array", "not valid .npy")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(UsageError, match=message):
            predict.read_request(tmp_path / name)


def test_predict_shows_the_servers_error(server):
    url = predict.predict_url(server, "digits", version=2)
    assert url == f"{server}/v1/models/digits/versions/2:predict"
    with pytest.raises(RunError, match=re.escape("HTTP 400: Input 'image' has shape [1, 3]")):
        predict.post_json(url, {"instances": [[1, 2, 3]]}, timeout=30)


def test_serve_and_predict_import_into_one_process(base_path, server):
    """Neither module defines absl flags at import (both have --model_name); their functions take arguments."""
    import kerasbig.serve
    from absl import flags
    assert "model_name" not in flags.FLAGS and "rest_api_port" not in flags.FLAGS
    configs = kerasbig.serve.model_configs(base_path, "text", None)()
    assert [(c.name, c.base_path) for c in configs] == [("text", base_path / "text")]
    batch = images(1, seed=7)
    rows = predict.predict(server, "digits", {"instances": batch.tolist()}, version=1)
    assert_digits_rows(rows, direct(base_path, "digits", 1, image=batch))
