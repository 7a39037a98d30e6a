"""`kerasbig.serve --port`: TF Serving's gRPC API, called with `tensorflow-serving-api`'s own stubs.

The Classify and Regress cases are those of TF Serving's http_rest_api_handler_test.cc (half_plus_two:
x=80 regresses to 42, x=20 classifies to ("", 12)); the status codes are TF Serving's.
"""
from __future__ import annotations

import concurrent.futures
import json
import re

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2, input_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_log_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)

from kerasbig import export, predict
from serving_models import export_half_plus_two, export_multi, export_slow
from serving_helpers import MAX_REQUEST_BYTES, call, command, export_digits, images, running_server, run_all

pytestmark = pytest.mark.slow  # a server process


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(REST URL, gRPC host:port, base folder) of one server process."""
    base = tmp_path_factory.mktemp("grpc_models")
    export_half_plus_two(base / "half_plus_two" / "00000123")
    export_multi(base / "multi" / "1")
    export_slow(base / "slow" / "1")
    export_digits(base / "digits" / "1", seed=1)
    (base / "digits" / "1" / "assets.extra").mkdir()
    export._write_warmup(base / "digits" / "1" / "assets.extra" / "tf_serving_warmup_requests", "digits",
                         {"image": images(3, seed=8)})
    (base / "models.config").write_text(
        'model_config_list { config { name: "half_plus_two" base_path: "/models/half_plus_two" '
        'version_labels { key: "stable" value: 123 } } }')
    log = base.parent / "grpc_server.log"
    with running_server(base, log, "--port=0", "--rest_api_num_threads=2") as url:
        address = re.search(r"Serving gRPC at (\S+)", log.read_text())[1]
        yield url, address, base


@pytest.fixture(scope="module")
def stub(servers):
    with grpc.insecure_channel(servers[1]) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def predict_request(model: str, signature: str = "", **inputs) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = model, signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def expanding_request() -> predict_pb2.PredictRequest:
    """A few bytes that TensorFlow would expand into 4 GB: one value, broadcast to a shape of 2^30."""
    request = predict_request("multi", "scalars", x=np.float32([1]))
    request.inputs["x"].tensor_shape.dim[0].size = 1 << 30
    return request


def refusal(call_, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call_(request, timeout=60)
    return error.value


def test_Predict(stub):
    reply = stub.Predict(predict_request("half_plus_two", x=np.float32([[1, 2], [3, 4]])), timeout=60)
    np.testing.assert_array_equal(tf.make_ndarray(reply.outputs["y"]), [[2.5, 3.0], [3.5, 4.0]])
    assert (reply.model_spec.name, reply.model_spec.version.value, reply.model_spec.signature_name) == (
        "half_plus_two", 123, "serving_default")
    request = predict_request("multi", a=np.float32([[1, 2]]), b=np.int64([3]), text=np.array([b"hello"]))
    request.output_filter.append("length")
    reply = stub.Predict(request, timeout=60)
    assert list(reply.outputs) == ["length"] and tf.make_ndarray(reply.outputs["length"]).tolist() == [5]


@pytest.mark.parametrize("request_, code, message", [
    (predict_request("nope", x=np.float32([1])), "NOT_FOUND", "Servable not found for request: Latest(nope)"),
    (predict_request("half_plus_two", "nope", x=np.float32([1])), "FAILED_PRECONDITION",
     'Serving signature key "nope" not found.'),
    (predict_request("half_plus_two", z=np.float32([1])), "INVALID_ARGUMENT",
     "input size does not match signature: 1!=1 len({z}) != len({x}). Sent extra: {z}. Missing but required: {x}."),
    (predict_request("half_plus_two", x=np.float64([1])), "INVALID_ARGUMENT", "has dtype float64"),
    (expanding_request(), "RESOURCE_EXHAUSTED", "A tensor has 1073741824 values; this server takes at most"),
])
def test_Predict_refusals_have_tf_serving_codes(stub, request_, code, message):
    error = refusal(stub.Predict, request_)
    assert error.code() == grpc.StatusCode[code] and message in error.details(), error.details()


def test_unknown_label_and_messages_past_the_size_limit(stub):
    request = predict_request("half_plus_two", x=np.float32([1]))
    request.model_spec.version_label = "canary"
    error = refusal(stub.Predict, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "Unrecognized servable version label" in \
        error.details()
    big = predict_request("half_plus_two", x=np.zeros(MAX_REQUEST_BYTES, "float32"))
    assert refusal(stub.Predict, big).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_GetModelMetadata(stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "half_plus_two"
    reply = stub.GetModelMetadata(request, timeout=60)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    reply.metadata["signature_def"].Unpack(signatures)
    assert (reply.model_spec.version.value, sorted(signatures.signature_def)) == (
        123, ["classify_x_to_y", "regress_x_to_y", "serving_default"])
    del request.metadata_field[:]
    error = refusal(stub.GetModelMetadata, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "at least one metadata_field" in error.details()


def test_GetModelStatus(servers):
    with grpc.insecure_channel(servers[1]) as channel:
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "half_plus_two"
        [status] = models.GetModelStatus(request, timeout=60).model_version_status
        assert (status.version, status.state, status.status.error_code) == (
            123, get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0)
        request.model_spec.version.value = 7
        error = refusal(models.GetModelStatus, request)
        assert error.code() == grpc.StatusCode.NOT_FOUND and "Could not find version 7 of model half_plus_two" in \
            error.details()


def examples(*xs: float) -> input_pb2.Input:
    request_input = input_pb2.Input()
    for x in xs:
        request_input.example_list.examples.add().features.feature["x"].float_list.value.append(x)
    return request_input


def test_Regress(stub):
    request = regression_pb2.RegressionRequest(input=examples(80.0, 10.0))
    request.model_spec.name, request.model_spec.signature_name = "half_plus_two", "regress_x_to_y"
    assert [r.value for r in stub.Regress(request, timeout=60).result.regressions] == [42.0, 7.0]
    request.model_spec.signature_name = "serving_default"
    error = refusal(stub.Regress, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "tensorflow/serving/regress" in error.details()


def test_Classify(stub):
    request = classification_pb2.ClassificationRequest(input=examples(20.0))
    request.model_spec.name, request.model_spec.signature_name = "half_plus_two", "classify_x_to_y"
    [classes] = stub.Classify(request, timeout=60).result.classifications
    assert [(c.label, c.score) for c in classes.classes] == [("", 12.0)]
    request.model_spec.version_label = "stable"
    request.input.CopyFrom(examples(10.0))
    [classes] = stub.Classify(request, timeout=60).result.classifications
    assert [(c.label, c.score) for c in classes.classes] == [("", 7.0)]


def test_deadlines_and_concurrency_limits(stub):
    """A call past its deadline ends DEADLINE_EXCEEDED; past 4 calls per worker, RESOURCE_EXHAUSTED."""
    slow = predict_request("slow", n=np.int32([3000]))
    error = refusal(lambda r, timeout: stub.Predict(r, timeout=0.2), slow)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def ask(_):
        try:
            stub.Predict(slow, timeout=120)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(ask, range(12)))
    assert "RESOURCE_EXHAUSTED" in codes and codes.count("OK") >= 8 - 1, codes


def test_warmup_requests_replay_through_grpc_like_rest(servers, stub):
    """The warmup records kerasbig writes are PredictRequests: gRPC answers them as REST answers their inputs."""
    url, _, base = servers
    path = base / "digits" / "1" / "assets.extra" / "tf_serving_warmup_requests"
    records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    assert records
    for record in records:
        request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
        reply = stub.Predict(request, timeout=60)
        inputs = {name: tf.make_ndarray(proto).tolist() for name, proto in request.inputs.items()}
        status, rest = call(f"{url}/v1/models/digits:predict", {"inputs": inputs})
        assert status == 200
        for name, proto in reply.outputs.items():
            np.testing.assert_allclose(tf.make_ndarray(proto), rest["outputs"][name], rtol=1e-6)


def test_predict_client_over_grpc_answers_as_over_rest(servers):
    url, address, _ = servers
    request = {"instances": [{"a": [1.0, 2.0], "b": 3, "text": "hi"}, {"a": [0.5, 0.0], "b": 1, "text": "é"}]}
    assert predict.predict_grpc(address, "multi", request) == predict.predict(url, "multi", request)
    columns = {"signature_name": "tenth", "inputs": [1.0, 3.0]}
    assert predict.predict_grpc(address, "multi", columns) == predict.predict(url, "multi", columns) == [0.1, 0.3]


def test_predict_command_line_with_protocol_grpc(servers, tmp_path):
    _, address, _ = servers
    (tmp_path / "x.json").write_text(json.dumps({"instances": [1.0, 2.0]}))
    ok, unknown = run_all(
        command("predict", "--protocol=grpc", f"--server={address}", "--model_name=half_plus_two",
                f"--input={tmp_path / 'x.json'}"),
        command("predict", "--protocol=grpc", f"--server={address}", "--model_name=nope",
                f"--input={tmp_path / 'x.json'}"))
    assert (ok.returncode, ok.stdout) == (0, "[2.5,3.0]\n"), ok.stderr
    assert unknown.returncode == 1 and "gRPC NOT_FOUND: Servable not found for request: Latest(nope)" in \
        unknown.stderr
