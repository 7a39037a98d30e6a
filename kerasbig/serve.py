"""`python -m kerasbig.serve`: a local development server for kerasbig exports that speaks TF Serving's REST API.

A client written against it works unchanged against TF Serving (docs/serving.md has the production setup):

    python -m kerasbig.serve --model_base_path=saved_models --rest_api_port=8501
    curl localhost:8501/v1/models/digits_cnn                     # version status
    curl localhost:8501/v1/models/digits_cnn/metadata            # signature inputs and outputs
    curl -d '{"instances": [[[0, 3, ...], ...]]}' localhost:8501/v1/models/digits_cnn:predict

Every folder under --model_base_path that holds integer version folders (`<name>/<N>/saved_model.pb`, TF
Serving's layout) is a model. A request without `/versions/N` or `/labels/L` gets the newest version; labels
come from `<model_base_path>/models.config`. Folders are rescanned on every request, so a new export is served
without a restart. The newest versions load at start, any other version on its first request, and every
loaded version stays cached; so all versions on disk report AVAILABLE.
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import json
import re
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import tensorflow as tf
from absl import flags
from google.protobuf import json_format, text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2
from tensorflow_serving.config import model_server_config_pb2

from kerasbig import cli, versions
from kerasbig.errors import RunError, UsageError

FLAGS = flags.FLAGS
flags.DEFINE_string("model_base_path", "saved_models", "Folder of models, each a folder of integer versions.")
flags.DEFINE_string("model_name", None, "Serve only this model, a folder under --model_base_path.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on; 0.0.0.0 opens the server to the network.")
flags.DEFINE_integer("rest_api_port", 8501, "HTTP port; 0 picks a free one.", lower_bound=0, upper_bound=65535)
flags.DEFINE_integer("max_request_bytes", 16 << 20, "Larger request bodies are refused with HTTP 413.",
                     lower_bound=1)

DEFAULT_SIGNATURE = "serving_default"
# TF Serving's URL grammar: a model, optionally one of its versions or labels, then a sub-resource or a verb.
_MODEL_URL = r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
STATUS_URL = re.compile(_MODEL_URL + r"(?P<metadata>/metadata)?")
PREDICT_URL = re.compile(_MODEL_URL + r":predict")
# The JSON that TF Serving prints for protos: field names as in the .proto, empty fields included.
_proto_json = functools.partial(json_format.MessageToDict, preserving_proto_field_name=True,
                                always_print_fields_with_no_presence=True)


class ServingError(Exception):
    """A request refused the way TF Serving refuses it: an HTTP status and an `{"error": message}` body."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Servable:
    """One loaded version of a model."""

    name: str
    version: int
    model: Any  # what tf.saved_model.load returns; its signatures run the requests
    signature_defs: get_model_metadata_pb2.SignatureDefMap

    def signature(self, name: str) -> Callable[..., dict[str, tf.Tensor]]:
        if name not in self.model.signatures:
            raise ServingError(HTTPStatus.BAD_REQUEST, f'Serving signature name: "{name}" not found in signature def')
        return self.model.signatures[name]

    def metadata(self) -> dict:
        """GetModelMetadataResponse as TF Serving's REST API prints it."""
        spec = model_pb2.ModelSpec(name=self.name)
        spec.version.value = self.version
        return {"model_spec": _proto_json(spec), "metadata": {"signature_def": _proto_json(self.signature_defs)}}


def load_servable(path: Path, name: str, version: int) -> Servable:
    """Loads the SavedModel at `path`, with its signature protos for the metadata API."""
    try:
        model = tf.saved_model.load(str(path))
        saved_model = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    except Exception as e:  # loading fails in many ways; the request that asked gets the reason
        raise ServingError(HTTPStatus.INTERNAL_SERVER_ERROR, f"Failed to load {path}: {e}") from e
    signature_defs = get_model_metadata_pb2.SignatureDefMap(signature_def=saved_model.meta_graphs[0].signature_def)
    return Servable(name, version, model, signature_defs)


class Repository:
    """The models under `base_path` (or only `model_name`), read from disk on every call; loaded versions cached."""

    def __init__(self, base_path: Path, model_name: str | None = None):
        self.base_path = base_path
        self.model_name = model_name
        self._servables: dict[tuple[str, int], Servable] = {}
        self._lock = threading.Lock()

    def model_names(self) -> list[str]:
        candidates = [self.model_name] if self.model_name else sorted(p.name for p in self.base_path.iterdir())
        return [name for name in candidates if self.versions(name)]

    def versions(self, name: str) -> list[int]:
        """Version folders holding a saved_model.pb, oldest first; exports in progress (`.tmp-*`) are not versions."""
        if name.startswith(".") or (self.model_name and name != self.model_name):  # ".." would leave base_path
            return []
        return [v for v, folder in versions.folders(self.base_path / name).items() if (folder / "saved_model.pb").is_file()]

    def labels(self, name: str) -> dict[str, int]:
        """`version_labels` of `name` in `<base_path>/models.config` (the file for TF Serving's --model_config_file)."""
        path = self.base_path / "models.config"
        if not path.is_file():
            return {}
        try:
            config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
        except (OSError, text_format.ParseError) as e:
            raise ServingError(HTTPStatus.INTERNAL_SERVER_ERROR, f"Cannot read {path}: {e}") from e
        return next((dict(c.version_labels) for c in config.model_config_list.config if c.name == name), {})

    def resolve(self, name: str, version: str | None = None, label: str | None = None) -> int:
        """The version a request names: explicitly, by label, or else the newest (TF Serving's `Latest`)."""
        versions = self.versions(name)
        if version is None and label is None:
            if not versions:
                raise ServingError(HTTPStatus.NOT_FOUND, f"Servable not found for request: Latest({name})")
            return versions[-1]
        if label is not None:
            labels = self.labels(name)
            if label not in labels:
                raise ServingError(HTTPStatus.NOT_FOUND, f"Unrecognized servable version label: {label}")
            version = labels[label]
        if int(version) not in versions:
            raise ServingError(HTTPStatus.NOT_FOUND,
                               f"Servable not found for request: Specific({name}, {int(version)})")
        return int(version)

    def servable(self, name: str, version: int) -> Servable:
        key = (name, version)
        if key not in self._servables:
            with self._lock:  # requests arriving together for a new version load it once
                if key not in self._servables:
                    path = self.base_path / name / str(version)
                    self._servables[key] = load_servable(path, name, version)
                    print(f"Loaded {name} version {version} from {path}", flush=True)
        return self._servables[key]

    def status(self, name: str, version: str | None = None, label: str | None = None) -> dict:
        """GetModelStatusResponse as JSON, for all versions of `name` or the one requested."""
        versions = self.versions(name) if version is None and label is None else [self.resolve(name, version, label)]
        if not versions:
            raise ServingError(HTTPStatus.NOT_FOUND, f"Could not find any versions of model {name}")
        ok = {"error_code": "OK", "error_message": ""}
        return {"model_version_status": [{"version": str(v), "state": "AVAILABLE", "status": ok} for v in versions]}


def predict(servable: Servable, request: Any) -> dict:
    """Answers a `:predict` body: row format (`instances` -> `predictions`) or columnar (`inputs` -> `outputs`)."""
    if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
        raise ServingError(HTTPStatus.BAD_REQUEST,
                           "The request must be a JSON object with either 'instances' (row format) or 'inputs' "
                           "(columnar format)")
    signature = servable.signature(request.get("signature_name") or DEFAULT_SIGNATURE)
    specs = signature.structured_input_signature[1]
    if "instances" in request:
        columns = _columns(request["instances"], list(specs))
    else:
        columns = _by_name(request["inputs"], list(specs), "'inputs'")
    tensors = {name: _tensor(columns[name], spec, name) for name, spec in specs.items()}
    try:
        outputs = {name: tensor.numpy() for name, tensor in signature(**tensors).items()}
    except tf.errors.InvalidArgumentError as e:
        raise ServingError(HTTPStatus.BAD_REQUEST, e.message) from e
    if "instances" in request:
        return {"predictions": _rows(outputs, len(request["instances"]))}
    values = {name: _json_value(array, name) for name, array in outputs.items()}
    return {"outputs": values if len(values) > 1 else next(iter(values.values()))}


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and list(value) == ["b64"]


def _by_name(value: Any, names: list[str], where: str) -> dict[str, Any]:
    """`{input name: value}`: `value` is an object naming every input, or, for a one-input signature, the value."""
    if not isinstance(value, dict) or _is_b64(value):
        if len(names) > 1:
            raise ServingError(HTTPStatus.BAD_REQUEST,
                               f"{where} must be an object naming each of the signature's inputs {names}")
        return {names[0]: value}
    if set(value) != set(names):
        raise ServingError(HTTPStatus.BAD_REQUEST,
                           f"{where} names inputs {sorted(value)} but the signature's inputs are {names}")
    return value


def _columns(instances: Any, names: list[str]) -> dict[str, list]:
    """Row format to columns: the instances stacked, per input."""
    if not isinstance(instances, list):
        raise ServingError(HTTPStatus.BAD_REQUEST, "'instances' must be a list, one entry per example")
    rows = [_by_name(instance, names, "An instance") for instance in instances]
    return {name: [row[name] for row in rows] for name in names}


def _tensor(value: Any, spec: tf.TensorSpec, name: str) -> tf.Tensor:
    """The JSON `value` of input `name` as a tensor that `spec` accepts; `{"b64": ...}` holds binary strings."""
    try:
        tensor = tf.constant(_decode_b64(value) if spec.dtype == tf.string else value, spec.dtype)
    except (TypeError, ValueError) as e:
        raise ServingError(HTTPStatus.BAD_REQUEST, f"Input '{name}' is not a {spec.dtype.name} tensor: {e}") from e
    if not spec.shape.is_compatible_with(tensor.shape):
        expected = [-1 if size is None else size for size in spec.shape.as_list()]
        raise ServingError(HTTPStatus.BAD_REQUEST,
                           f"Input '{name}' has shape {tensor.shape.as_list()} but the signature takes {expected} "
                           "(-1: any size)")
    return tensor


def _decode_b64(value: Any) -> Any:
    if _is_b64(value):
        return base64.b64decode(value["b64"], validate=True)
    return [_decode_b64(v) for v in value] if isinstance(value, list) else value


def _json_value(array: Any, name: str) -> Any:
    """An output tensor as TF Serving writes it: nested lists; strings as text, or base64 if the name ends `_bytes`."""
    values = array.tolist()
    return _encode_strings(values, name.endswith("_bytes")) if array.dtype == object else values


def _encode_strings(value: Any, binary: bool) -> Any:
    if isinstance(value, list):
        return [_encode_strings(v, binary) for v in value]
    return {"b64": base64.b64encode(value).decode()} if binary else value.decode("utf-8", "replace")


def _rows(outputs: dict[str, Any], batch: int) -> list:
    """Row-format `predictions`: one entry per instance, a bare value when there is a single output."""
    for name, array in outputs.items():
        if array.ndim == 0 or len(array) != batch:
            raise ServingError(HTTPStatus.BAD_REQUEST,
                               f"Output '{name}' has shape {list(array.shape)}, not one row per instance ({batch}); "
                               "use the columnar 'inputs' format")
    values = {name: _json_value(array, name) for name, array in outputs.items()}
    if len(values) == 1:
        return next(iter(values.values()))
    return [{name: rows[i] for name, rows in values.items()} for i in range(batch)]


class Handler(BaseHTTPRequestHandler):
    """Routes TF Serving's REST URLs to the server's `Repository`; every reply is JSON."""

    server: Server

    def do_GET(self) -> None:
        self._reply(self._get)

    def do_POST(self) -> None:
        self._reply(self._post)

    def _get(self) -> dict:
        match = STATUS_URL.fullmatch(self.path)
        if not match:
            raise self._malformed()
        repository, name = self.server.repository, match["name"]
        if match["metadata"]:
            return repository.servable(name, repository.resolve(name, match["version"], match["label"])).metadata()
        return repository.status(name, match["version"], match["label"])

    def _post(self) -> dict:
        length = self.headers.get("Content-Length", "0")
        if not length.isdecimal():
            raise ServingError(HTTPStatus.LENGTH_REQUIRED, "The request needs a Content-Length header, in bytes")
        if int(length) > self.server.max_request_bytes:
            self._discard(int(length))
            raise ServingError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"The request body has {length} bytes; this server takes at most "
                               f"{self.server.max_request_bytes} (--max_request_bytes)")
        body = self.rfile.read(int(length))
        match = PREDICT_URL.fullmatch(self.path)
        if not match:
            raise self._malformed()
        try:
            request = json.loads(body)
        except ValueError as e:
            raise ServingError(HTTPStatus.BAD_REQUEST, f"JSON Parse error: {e}") from e
        repository, name = self.server.repository, match["name"]
        servable = repository.servable(name, repository.resolve(name, match["version"], match["label"]))
        return predict(servable, request)

    def _discard(self, length: int) -> None:
        """Reads a refused body: closing on unread data resets the connection, which can destroy the reply."""
        while length > 0 and (chunk := self.rfile.read(min(length, 1 << 16))):
            length -= len(chunk)

    def _malformed(self) -> ServingError:
        status = HTTPStatus.BAD_REQUEST if self.path.startswith("/v1/") else HTTPStatus.NOT_FOUND
        return ServingError(status, f"Malformed request: {self.command} {self.path}")

    def _reply(self, answer: Callable[[], dict]) -> None:
        try:
            status, payload = HTTPStatus.OK, answer()
        except ServingError as e:
            status, payload = e.status, {"error": str(e)}
        except Exception as e:  # a bug or a TensorFlow failure: the client still gets JSON, the console the trace
            self.log_error("%s", traceback.format_exc())
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"}
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    """A thread per request; TF runs a loaded signature from many threads at once."""

    request_queue_size = 128  # a burst of clients waits in the listen backlog instead of being refused

    def __init__(self, address: tuple[str, int], repository: Repository, max_request_bytes: int):
        super().__init__(address, Handler)
        self.repository = repository
        self.max_request_bytes = max_request_bytes


def open_repository(base_path: Path, model_name: str | None) -> Repository:
    """The repository the flags name, or a UsageError saying why they name none."""
    try:
        list(base_path.iterdir())
    except OSError as e:
        raise UsageError(f"--model_base_path={base_path} is not a readable folder ({e.strerror})") from e
    repository = Repository(base_path, model_name)
    if model_name and not repository.versions(model_name):
        raise UsageError(f"--model_name={model_name}: no version folders <N>/saved_model.pb under "
                         f"{base_path / model_name}")
    return repository


def serve(repository: Repository, host: str, port: int, max_request_bytes: int) -> None:
    """Loads the newest version of every model, then answers requests until interrupted."""
    try:
        server = Server((host, port), repository, max_request_bytes)
    except OSError as e:
        raise UsageError(f"--host={host} --rest_api_port={port}: cannot listen there ({e.strerror})") from e
    with server:
        names = repository.model_names()
        for name in names:  # load now, so that a broken export shows at start rather than on a first request
            try:
                repository.servable(name, repository.resolve(name))
            except ServingError as e:
                raise RunError(str(e)) from e
        host, port = server.server_address[:2]
        print(f"Serving {', '.join(names) or 'no models yet'} at http://{host}:{port}/v1/models/<name>", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


def main() -> None:
    repository = open_repository(Path(FLAGS.model_base_path), FLAGS.model_name)
    serve(repository, FLAGS.host, FLAGS.rest_api_port, FLAGS.max_request_bytes)


if __name__ == "__main__":
    cli.run(main)
