"""TF Serving's own REST cases against a `kerasbig.serve` process: http_rest_api_handler_test.cc,
http_rest_api_util_test.cc and the examples of g3doc/api_rest.md (tensorflow/serving). Each test names the case
it ports; where kerasbig deliberately differs, the test says so (docs/serving.md lists the differences).

The server runs with `--model_config_file`, TF Serving's way of naming models, versions and labels, on
SavedModels that are not kerasbig exports: a TF1 half_plus_two in a zero-padded version folder `00000123`
(as TF Serving's test data), and a TF2 module with several inputs of several dtypes, several and scalar
outputs and non-default signatures.
"""
from __future__ import annotations

import json
import shutil
import urllib.request

import pytest

from kerasbig import export
from serving_models import export_half_plus_two, export_multi
from serving_helpers import call, running_server

pytestmark = pytest.mark.slow  # a server process

RESERVED = "!#$%&'()*+,/:;=?@[]"
RESERVED_QUOTED = "%21%23%24%25%26%27%28%29%2A%2B%2C%2F%3A%3B%3D%3F%40%5B%5D"  # as the C++ tests write it
CONFIG = """
model_config_list {
  config {
    name: "half_plus_two"  base_path: "half_plus_two"  model_platform: "tensorflow"
    model_version_policy { specific { versions: 123 } }
    version_labels { key: "stable"  value: 123 }
  }
  config { name: "multi"  base_path: "multi"  model_platform: "tensorflow" }
  config {
    name: "modelname%s"  base_path: "multi"  model_platform: "tensorflow"
    version_labels { key: "latest%s"  value: 1 }
  }
}
""" % (RESERVED, RESERVED)
OK = {"error_code": "OK", "error_message": ""}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    export_half_plus_two(base / "half_plus_two" / "00000123")
    export_multi(base / "multi" / "1")
    (base / "models.config").write_text(CONFIG)
    with running_server(None, base / "server.log", f"--model_config_file={base / 'models.config'}") as url:
        yield url


def request(url: str, method: str, body: bytes | None = None) -> tuple[int, dict, dict]:
    """Any HTTP method; returns (status, JSON reply, headers)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, method=method), timeout=60) as reply:
            return reply.status, json.load(reply), dict(reply.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error), dict(error.headers)


@pytest.mark.parametrize("method, path, message", [
    ("GET", "/v1/foo", "Malformed request"),
    ("POST", "/v1/foo", "Malformed request"),
    ("GET", "/v1/models", "Missing model name"),
    ("GET", "/v1/models/debug/model_name", "Malformed request"),
    ("POST", "/v1/models", "Malformed request"),
    ("GET", "/v1/models/foo:predict", "Malformed request"),
    ("GET", "/v1/models/foo/version/50:predict", "Malformed request"),
    ("POST", "/v1/models/foo/version/50:regress", "Malformed request"),
    ("POST", "/v1/models/foo/versions/HELLO:regress", "Malformed request"),
    ("POST", f"/v1/models/foo/versions/{2 ** 64 - 1}:regress", "Failed to convert version"),
    ("POST", "/v1/models/foo/metadata", "Malformed request"),
    ("POST", "/v1/models/foo/label/some_label:regress", "Malformed request"),
    ("POST", "/v1/models/foo/versions/50/labels/some_label:regress", "Malformed request"),
    ("POST", "/v1/models/foo/versions/some_label:regress", "Malformed request"),
    ("POST", "/v1/models/foo/versions/string:predict", "Malformed request"),  # http_rest_api_util_test.cc
])
def test_UnsupportedApiCalls(server, method, path, message):
    status, reply, headers = request(server + path, method, b"" if method == "POST" else None)
    assert (status, headers["Content-Type"]) == (400, "application/json") and message in reply["error"], reply


def test_kPathRegex_paths_outside_v1_differ(server):
    """TF Serving leaves paths outside /v1/ to its HTTP library (404 with no JSON); kerasbig answers 404 with
    a JSON error, as it does for every refusal."""
    for path in ("/statuspage", "/index"):
        status, reply, _ = request(server + path, "GET")
        assert status == 404 and "Malformed request" in reply["error"]


def test_PredictModelNameVersionErrors(server):
    for path in ("foo:predict", "foo/versions/50:predict", "half_plus_two99:predict",
                 "half_plus_two/versions/99:predict"):
        status, reply = call(f"{server}/v1/models/{path}", {"instances": [1]})
        assert status == 404 and "Servable not found for request" in reply["error"], (path, reply)


@pytest.mark.parametrize("path, body, message", [
    (":predict", b"", "JSON Parse error: The document is empty"),
    # rapidjson says "Invalid value", Python's parser "Expecting value": the same refusal, other words
    (":predict", b"instances = [1, 2]", "JSON Parse error: Expecting value"),
    (":predict", b'{ "instances": ["x", "y"] }', "not of expected type: float"),
    ("/labels/nonexistent:predict", b'{ "instances": ["x", "y"] }', "Unrecognized servable version label"),
    (":predict", b'{ "signature_name": 100 }', "'signature_name' key must be a string value."),
    (":predict", b'{ "signature_name": null, "instances": [1.0] }', "'signature_name' key must be a string value."),
    (":predict", b'{ "instances": [true] }', "Type: True is not of expected type: float"),
])
def test_PredictRequestErrors(server, path, body, message):
    status, reply = call(f"{server}/v1/models/half_plus_two{path}", body)
    assert status == 400 and message in reply["error"], reply


def test_Predict(server):
    model = f"{server}/v1/models/half_plus_two"
    for url, body, expected in [
        (f"{model}:predict", {"instances": [[1.0, 2.0], [3.0, 4.0]]}, {"predictions": [[2.5, 3.0], [3.5, 4.0]]}),
        (f"{model}/versions/123:predict", {"instances": [1.0, 2.0]}, {"predictions": [2.5, 3.0]}),
        (f"{model}/labels/stable:predict", {"instances": [1.0, 2.0]}, {"predictions": [2.5, 3.0]}),
        (f"{model}/versions/123:predict", {"signature_name": "serving_default", "instances": [3.0, 4.0]},
         {"predictions": [3.5, 4.0]}),
        (f"{model}/versions/123:predict", {"signature_name": "serving_default", "inputs": [3.0, 4.0]},
         {"outputs": [3.5, 4.0]}),
    ]:
        status, reply, headers = request(url, "POST", json.dumps(body).encode())
        assert (status, reply, headers["Content-Type"]) == (200, expected, "application/json")


def test_Regress(server):
    for path in (":regress", "/versions/123:regress", "/labels/stable:regress"):
        assert call(f"{server}/v1/models/half_plus_two{path}",
                    {"signature_name": "regress_x_to_y", "examples": [{"x": 80.0}]}) == (200, {"results": [42.0]})


def test_Classify(server):
    assert call(f"{server}/v1/models/half_plus_two:classify",
                {"signature_name": "classify_x_to_y", "examples": [{"x": 20.0}]}) == (200, {"results": [[["", 12.0]]]})
    assert call(f"{server}/v1/models/half_plus_two/labels/stable:classify",
                {"signature_name": "classify_x_to_y", "examples": [{"x": 10.0}]}) == (200, {"results": [[["", 7.0]]]})
    status, reply = call(f"{server}/v1/models/half_plus_two:classify", {"examples": [{"x": 10.0}]})
    assert status == 400 and "method_name to be tensorflow/serving/classify" in reply["error"], reply


def test_GetStatus(server):
    """Version 123 lives in the folder `00000123`, as in TF Serving's test data."""
    expected = {"model_version_status": [{"version": "123", "state": "AVAILABLE", "status": OK}]}
    for path in ("", "/versions/123", "/labels/stable"):
        assert call(f"{server}/v1/models/half_plus_two{path}") == (200, expected)


def test_GetModelMetadata(server):
    status, metadata = call(f"{server}/v1/models/half_plus_two/metadata")
    assert status == 200
    assert metadata["model_spec"] == {"name": "half_plus_two", "signature_name": "", "version": "123"}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    assert sorted(signatures) == ["classify_x_to_y", "regress_x_to_y", "serving_default"]

    def dims(*sizes):
        return {"dim": [{"size": str(size), "name": ""} for size in sizes], "unknown_rank": False}

    assert signatures["regress_x_to_y"] == {
        "inputs": {"inputs": {"dtype": "DT_STRING", "tensor_shape": dims(-1), "name": "tf_example:0"}},
        "outputs": {"outputs": {"dtype": "DT_FLOAT", "tensor_shape": dims(-1, 1), "name": "y_of_example:0"}},
        "method_name": "tensorflow/serving/regress", "defaults": {}}
    assert signatures["serving_default"]["inputs"]["x"] == {
        "dtype": "DT_FLOAT", "tensor_shape": {"dim": [], "unknown_rank": True}, "name": "x:0"}


def test_TestParseModelInfoForGet(server):
    expected = {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": OK}]}
    for path in (f"modelname{RESERVED_QUOTED}", f"modelname{RESERVED_QUOTED}/labels/latest{RESERVED_QUOTED}",
                 "multi/versions/1", "multi/versions/00001"):
        assert call(f"{server}/v1/models/{path}") == (200, expected), path
    status, metadata = call(f"{server}/v1/models/modelname{RESERVED_QUOTED}/labels/latest{RESERVED_QUOTED}/metadata")
    assert status == 200 and metadata["model_spec"]["name"] == f"modelname{RESERVED}"


def test_TestParseModelInfoForPost(server):
    body = {"instances": [{"a": [1.0, 2.0], "b": 3, "text": "abc"}]}
    for path in (f"modelname{RESERVED_QUOTED}", f"modelname{RESERVED_QUOTED}/labels/latest{RESERVED_QUOTED}",
                 "multi/versions/1"):
        status, reply = call(f"{server}/v1/models/{path}:predict", body)
        assert status == 200 and reply["predictions"][0]["sum"] == 6.0, (path, reply)


def test_url_grammar_is_case_insensitive_as_in_tf_serving(server):
    """kPredictionApiGegex and kModelStatusApiRegex are `(?i)`: path words match in any case."""
    assert call(f"{server}/V1/MODELS/multi/VERSIONS/1")[0] == 200
    assert call(f"{server}/v1/Models/half_plus_two:predict", {"instances": [1.0]}) == (200, {"predictions": [2.5]})


# g3doc/api_rest.md: request and response formats.

def test_api_rest_row_format_with_named_inputs_and_several_outputs(server):
    body = {"instances": [{"a": [1.0, 2.0], "b": 3, "text": "hello"}, {"a": [0.5, 0.25], "b": -1, "text": "é"}]}
    assert call(f"{server}/v1/models/multi:predict", body) == (200, {"predictions": [
        {"length": 5, "sum": 6.0, "text_bytes": {"b64": "aGVsbG8="}},
        {"length": 2, "sum": -0.25, "text_bytes": {"b64": "w6k="}}]})


def test_api_rest_columnar_format(server):
    body = {"inputs": {"a": [[1.0, 2.0]], "b": [3], "text": [{"b64": "aGk="}]}, "unused": "ignored"}
    assert call(f"{server}/v1/models/multi:predict", body) == (200, {"outputs": {
        "length": [2], "sum": [6.0], "text_bytes": [{"b64": "aGk="}]}})


def test_api_rest_scalar_outputs_need_the_columnar_format(server):
    """Row format needs a batch dimension on every output (TF Serving: "has no shape information")."""
    status, reply = call(f"{server}/v1/models/multi:predict", {"signature_name": "scalars", "instances": [1.0, 2.0]})
    assert status == 400 and "has no shape information" in reply["error"]
    assert call(f"{server}/v1/models/multi:predict", {"signature_name": "scalars", "inputs": [1.0, 2.0]}) == (
        200, {"outputs": {"label": "tf", "total": 3.0}})


def test_api_rest_floating_point_output_as_tf_serving_prints_it(server):
    raw = urllib.request.urlopen(urllib.request.Request(
        f"{server}/v1/models/multi:predict", b'{"signature_name": "tenth", "inputs": [1, 3, NaN, Infinity]}'),
        timeout=60).read().decode()
    assert raw == '{"outputs": [0.1,0.3,NaN,Infinity]}'


def test_api_rest_json_mapping_of_each_dtype(server):
    body = {"signature_name": "dtypes", "instances": [
        {"i32": 2147483647, "i64": 2 ** 63 - 1, "f64": 0.1, "flag": True, "u8": 255, "i8": -128},
        {"i32": -2147483648, "i64": 2 ** 53 + 1, "f64": 1e300, "flag": False, "u8": 0, "i8": 127}]}
    assert call(f"{server}/v1/models/multi:predict", body) == (200, {"predictions": [
        {"f64": 0.1, "flag": True, "i32": 2147483647, "i64": 2 ** 63 - 1, "i8": -128, "u8": 255},
        {"f64": 1e300, "flag": False, "i32": -2147483648, "i64": 2 ** 53 + 1, "i8": 127, "u8": 0}]})
    for name, value in (("i32", 2 ** 31), ("i64", 2 ** 63), ("f64", True), ("flag", 1), ("u8", "1")):
        bad = {"signature_name": "dtypes", "instances": [{**body["instances"][0], name: value}]}
        status, reply = call(f"{server}/v1/models/multi:predict", bad)
        assert status == 400 and "is not of expected type" in reply["error"], (name, reply)


def test_api_rest_unknown_model_error(server):
    assert call(f"{server}/v1/models/half:predict", {"instances": [1.0]}) == (
        404, {"error": "Servable not found for request: Latest(half)"})


# Versions as TF Serving serves them: its flags, its default version policy, the models.config kerasbig writes.

def test_model_name_and_model_base_path_serve_the_latest_version_as_in_tf_serving(tmp_path):
    """`--model_name=x --model_base_path=<versions>`: TF Serving's one-model command line, unchanged; its
    default policy serves the latest version only."""
    base = tmp_path / "half"
    export_half_plus_two(base / "7")
    shutil.copytree(base / "7", base / "00000123")
    with running_server(None, tmp_path / "server.log", "--model_name=half", f"--model_base_path={base}") as url:
        assert call(f"{url}/v1/models/half") == (
            200, {"model_version_status": [{"version": "123", "state": "AVAILABLE", "status": OK}]})
        assert call(f"{url}/v1/models/half/versions/7:predict", {"instances": [1.0]})[0] == 404
        assert call(f"{url}/v1/models/half:predict", {"instances": [1.0]}) == (200, {"predictions": [2.5]})


def test_the_models_config_kerasbig_writes_decides_versions_and_labels(tmp_path):
    """kerasbig's models.config names `/models/<name>` (TF Serving's container path), the newest version as a
    `specific` policy and the label `stable`; the dev server reads those folders next to the file."""
    base = tmp_path / "saved_models"
    for version in (1, 2):
        export_half_plus_two(base / "half" / str(version))
    config = export.write_models_config(base)
    assert 'base_path: "/models/half"' in config.read_text()
    with running_server(None, tmp_path / "server.log", f"--model_config_file={config}") as url:
        assert [s["version"] for s in call(f"{url}/v1/models/half")[1]["model_version_status"]] == ["2"]
        assert call(f"{url}/v1/models/half/labels/stable")[1]["model_version_status"][0]["version"] == "2"
        assert call(f"{url}/v1/models/half/versions/1:predict", {"instances": [1.0]})[0] == 404
