"""`python -m kerasbig.predict`: sends a file of inputs to a TF Serving REST endpoint and prints the predictions.

It speaks TF Serving's REST API (or, with `--protocol=grpc`, its gRPC API), so it works against TF Serving and
`python -m kerasbig.serve` alike:

    python -m kerasbig.predict --server=http://127.0.0.1:8501 --model_name=digits_cnn --input=digits.npy
    [{"classes":3,"probabilities":[...]},...]

--input is JSON (a TF Serving request body, `{"instances": ...}` or `{"inputs": ...}`, or a bare list of
instances) or `.npy` (an array whose first axis is the instances). The server's reply, `predictions` or
`outputs`, is printed as compact JSON. Exit 2: bad flags, or an input file that is missing or unreadable;
exit 1: the server could not be reached or refused the request (its `error` is shown).
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from absl import flags

from kerasbig import cli
from kerasbig.errors import RunError, UsageError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line; only the `__main__` entry defines it, so the functions below import anywhere."""
    flags.DEFINE_string("server", "http://127.0.0.1:8501", "Base URL of TF Serving's REST API, or host:port of "
                        "its gRPC API with --protocol=grpc.")
    flags.DEFINE_enum("protocol", "rest", ["rest", "grpc"], "TF Serving's REST API, or its gRPC PredictionService.")
    flags.DEFINE_string("model_name", None, "Model to ask.", required=True)
    flags.DEFINE_integer("version", None, "Model version; the newest when unset.", lower_bound=0)
    flags.DEFINE_string("signature_name", None, "Signature to run; serving_default when unset.")
    flags.DEFINE_string("input", None, "A .json request body or list of instances, or a .npy array.", required=True)
    flags.DEFINE_float("timeout", 60.0, "Seconds to wait for the reply.", lower_bound=0.0)
    flags.register_multi_flags_validator(
        ["server", "protocol"], lambda f: f["protocol"] == "grpc" or f["server"].startswith(("http://", "https://")),
        "--server must be an http:// or https:// URL (or host:port with --protocol=grpc)")


def read_request(path: Path) -> dict:
    """The `:predict` request body that `path` holds (see the module docstring for the formats)."""
    try:
        if path.suffix == ".npy":
            return {"instances": np.load(path, allow_pickle=False).tolist()}
        request = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"--input={path}: cannot read it ({e.strerror})") from e
    except (ValueError, EOFError) as e:  # EOFError: an empty .npy
        raise UsageError(f"--input={path}: not valid {'.npy' if path.suffix == '.npy' else 'JSON'} ({e})") from e
    if isinstance(request, list):
        return {"instances": request}
    if isinstance(request, dict) and ("instances" in request or "inputs" in request):
        return request
    raise UsageError(f"--input={path}: expected a list of instances or an object with 'instances' or 'inputs'")


def predict_url(server: str, model_name: str, version: int | None = None) -> str:
    """TF Serving's predict URL, e.g. http://127.0.0.1:8501/v1/models/digits_cnn/versions/2:predict."""
    model = urllib.parse.quote(model_name, safe="")
    return f"{server.rstrip('/')}/v1/models/{model}{'' if version is None else f'/versions/{version}'}:predict"


def post_json(url: str, body: dict, timeout: float) -> dict:
    """POSTs `body` as JSON and returns the JSON reply; a refusal raises RunError with the server's `error`."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as e:
        raise RunError(f"{url}: HTTP {e.code}: {_server_error(e)}") from e
    except OSError as e:  # URLError, refused connections and timeouts
        raise RunError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from e
    except ValueError as e:
        raise RunError(f"{url}: the reply is not JSON ({e})") from e


def _server_error(error: urllib.error.HTTPError) -> str:
    """The `error` of TF Serving's `{"error": ...}` body, else the HTTP reason (a proxy's page, say)."""
    try:
        return json.load(error)["error"]
    except (ValueError, KeyError, TypeError):
        return error.reason


def predict(server: str, model_name: str, request: dict, *, version: int | None = None,
            signature_name: str | None = None, timeout: float = 60.0) -> object:
    """The `predictions` (or `outputs`) that the server at `server` answers to `request`."""
    if signature_name:
        request = {**request, "signature_name": signature_name}
    reply = post_json(predict_url(server, model_name, version), request, timeout)
    return reply["predictions"] if "predictions" in reply else reply["outputs"]


def predict_grpc(server: str, model_name: str, request: dict, *, version: int | None = None,
                 signature_name: str | None = None, timeout: float = 60.0) -> object:
    """`predict` over TF Serving's gRPC API at `server` (host:port), with the same answer: the request's JSON
    is converted to tensors with the signature's dtypes (asked with GetModelMetadata) as TF Serving's REST
    API converts it, and the outputs printed as that API prints them."""
    import grpc  # noqa: PLC0415 - gRPC and TensorFlow load only for --protocol=grpc
    from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2, predict_pb2, prediction_service_pb2_grpc

    from kerasbig.serving import grpc_api, json_tensor  # noqa: PLC0415
    from kerasbig.serving.errors import ServingError  # noqa: PLC0415
    from kerasbig.serving.repository import DEFAULT_SIGNATURE, signature_dtypes  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    signature = signature_name or request.get("signature_name") or ""
    spec = model_pb2.ModelSpec(name=model_name, signature_name=signature)
    if version is not None:
        spec.version.value = version
    with grpc.insecure_channel(server.removeprefix("grpc://")) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            metadata = stub.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=spec, metadata_field=["signature_def"]), timeout=timeout)
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            metadata.metadata["signature_def"].Unpack(signature_map)
            if (signature or DEFAULT_SIGNATURE) not in signature_map.signature_def:
                raise RunError(f"{server}: model {model_name} has no signature {signature or DEFAULT_SIGNATURE!r}")
            dtypes = signature_dtypes(signature_map.signature_def[signature or DEFAULT_SIGNATURE])
            request_format, arrays = json_tensor.predict_inputs(request, dtypes, max_elements=2 ** 62)
            grpc_request = predict_pb2.PredictRequest(model_spec=spec)
            for name, array in arrays.items():
                grpc_request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
            reply = stub.Predict(grpc_request, timeout=timeout)
        except grpc.RpcError as e:
            raise RunError(f"{server}: gRPC {e.code().name}: {e.details()}") from e
        except ServingError as e:
            raise UsageError(f"the request does not fit the signature: {e}") from e
    outputs = {name: grpc_api.to_array(proto, 2 ** 62) for name, proto in reply.outputs.items()}
    answer = json.loads(json_tensor.predict_reply(outputs, request_format))
    return answer["predictions"] if "predictions" in answer else answer["outputs"]


def main() -> None:
    ask = predict_grpc if FLAGS.protocol == "grpc" else predict
    reply = ask(FLAGS.server, FLAGS.model_name, read_request(Path(FLAGS.input)), version=FLAGS.version,
                signature_name=FLAGS.signature_name, timeout=FLAGS.timeout)
    print(json.dumps(reply, separators=(",", ":")))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
