"""The models a server serves, their versions on disk, and each version's load result.

A `ModelConfig` says where a model's versions are and which to serve (TF Serving's version policies: the
latest N, all, or specific versions) and names its labels. `Repository.poll` looks at the folders, loads the
versions the policy asks for, reloads a version whose files changed and drops one that is gone. A version
that fails to load stays in the status with its error (state END) until its files change; a policy asking for
the latest N takes the next older versions instead. Requests see one consistent snapshot of loaded versions.
"""
from __future__ import annotations

import dataclasses
import pathlib
import threading
from typing import Callable

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, input_pb2, status_pb2
from tensorflow_serving.config import model_server_config_pb2

from kerasbig import versions
from kerasbig.serving.errors import HTTP_STATUS, ServingError, invalid, not_found

DEFAULT_SIGNATURE = "serving_default"
# tf.errors codes by canonical name, so a TensorFlow failure keeps its code on the way to the client.
_TF_CODES = {getattr(tf.errors, name): name for name in HTTP_STATUS}
Fingerprint = tuple


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One model: `base_path` holds its version folders; `latest` (serve the newest N), or `specific` versions,
    or, when both are None, every version on disk."""

    name: str
    base_path: pathlib.Path
    latest: int | None = 1
    specific: frozenset[int] | None = None
    labels: dict[str, int] = dataclasses.field(default_factory=dict)

    def candidates(self, on_disk: list[int]) -> tuple[list[int], float]:
        """(versions to try, newest first; how many of them to load)."""
        newest_first = sorted(on_disk, reverse=True)
        if self.specific is not None:
            return [v for v in newest_first if v in self.specific], float("inf")
        return newest_first, float("inf") if self.latest is None else self.latest


def read_model_config_file(path: pathlib.Path) -> list[ModelConfig]:
    """The models of a TF Serving `--model_config_file` (text ModelServerConfig), such as kerasbig's models.config.

    A base path that does not exist but names a folder next to the file is read there: kerasbig writes
    `/models/<name>`, the path inside TF Serving's container, and the dev server runs outside it."""
    try:
        config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as e:
        raise ValueError(f"cannot read {path} as a ModelServerConfig: {e}") from e
    models = []
    for entry in config.model_config_list.config:
        if entry.model_platform not in ("", "tensorflow"):
            raise ValueError(f"{path}: model {entry.name!r} has model_platform {entry.model_platform!r}; "
                             "this server loads TensorFlow SavedModels only")
        base = pathlib.Path(entry.base_path)
        if not base.is_absolute():
            base = path.parent / base
        if not base.exists() and (path.parent / base.name).exists():
            base = path.parent / base.name
        policy = entry.model_version_policy.WhichOneof("policy_choice")
        models.append(ModelConfig(
            entry.name, base,
            latest=None if policy in ("all", "specific") else max(entry.model_version_policy.latest.num_versions, 1),
            specific=frozenset(entry.model_version_policy.specific.versions) if policy == "specific" else None,
            labels=dict(entry.version_labels)))
    return models


def _tensor_spec(info: meta_graph_pb2.TensorInfo) -> tf.TensorSpec:
    shape = None if info.tensor_shape.unknown_rank else [d.size if d.size >= 0 else None
                                                          for d in info.tensor_shape.dim]
    return tf.TensorSpec(shape, tf.as_dtype(info.dtype))


def _dtype_name(spec: tf.TensorSpec) -> str:
    return "string" if spec.dtype == tf.string else spec.dtype.name


def signature_dtypes(signature_def: meta_graph_pb2.SignatureDef) -> dict[str, str]:
    """{input: dtype name} ("string" for tf.string), the type information JSON requests need."""
    return {key: _dtype_name(_tensor_spec(info)) for key, info in signature_def.inputs.items()}


@dataclasses.dataclass(frozen=True)
class Servable:
    """One loaded version of a model."""

    name: str
    version: int
    model: object  # what tf.saved_model.load returns; its signatures run the requests
    signature_defs: dict[str, meta_graph_pb2.SignatureDef]

    def signature_def(self, name: str) -> meta_graph_pb2.SignatureDef:
        name = name or DEFAULT_SIGNATURE
        if name not in self.signature_defs:
            raise invalid(f'Serving signature name: "{name}" not found in signature def')
        return self.signature_defs[name]

    def input_specs(self, signature: str) -> dict[str, tf.TensorSpec]:
        return {key: _tensor_spec(info) for key, info in self.signature_def(signature).inputs.items()}

    def input_dtypes(self, signature: str) -> dict[str, str]:
        return signature_dtypes(self.signature_def(signature))

    def run(self, signature: str, inputs: dict[str, np.ndarray], output_filter: tuple[str, ...] = ()
            ) -> dict[str, np.ndarray]:
        """Runs `signature` on exactly its inputs; returns its outputs (those in `output_filter`, if given)."""
        specs = self.input_specs(signature)
        if set(inputs) != set(specs):  # TF Serving's message (servables/tensorflow/predict_util.cc)
            sent, wanted = sorted(inputs), sorted(specs)
            raise invalid(f"input size does not match signature: {len(sent)}!={len(wanted)} len({{{','.join(sent)}}})"
                          f" != len({{{','.join(wanted)}}}). Sent extra: {{{','.join(sorted(set(sent) - set(wanted)))}}}."
                          f" Missing but required: {{{','.join(sorted(set(wanted) - set(sent)))}}}.")
        tensors = {key: _input_tensor(key, inputs[key], spec) for key, spec in specs.items()}
        outputs = self.signature_def(signature).outputs
        unknown = [key for key in output_filter if key not in outputs]
        if unknown:
            raise invalid(f"output tensor alias not found in signature: {unknown[0]} Outputs expected to be in the "
                          f"set {{{','.join(sorted(outputs))}}}.")
        results = self._call(signature, tensors)
        return {key: results[key] for key in output_filter or tuple(results)}

    def _call(self, signature: str, tensors: dict[str, tf.Tensor]) -> dict[str, np.ndarray]:
        try:
            results = self.model.signatures[signature or DEFAULT_SIGNATURE](**tensors)
        except tf.errors.OpError as e:
            raise ServingError(_TF_CODES.get(e.error_code, "UNKNOWN"), e.message) from e
        return {key: _to_numpy(value) for key, value in results.items()}

    def _run_examples(self, signature: str, method: str, examples: list[bytes]) -> dict[str, np.ndarray]:
        """Runs a classify or regress signature, whose one input takes serialized tf.Examples."""
        signature_def = self.signature_def(signature)
        if signature_def.method_name != f"tensorflow/serving/{method}":
            raise invalid(f"Expected {method} signature method_name to be tensorflow/serving/{method}. "
                          f"Was: {signature_def.method_name}")
        [input_key] = signature_def.inputs
        outputs = self._call(signature, {input_key: tf.constant(examples, tf.string)})
        return {key: value.reshape(len(examples), -1) for key, value in outputs.items()}

    def classify(self, signature: str, examples: list[bytes]) -> list[list[tuple[str, float]]]:
        """[(label, score), ...] per example, from the `classes` and/or `scores` outputs (label "" or score 0
        where the signature has only the other, as in TF Serving)."""
        outputs = self._run_examples(signature, "classify", examples)
        classes, scores = outputs.get("classes"), outputs.get("scores")
        if classes is None and scores is None:
            raise invalid("Classification signature must have a classes or a scores output")
        count = (classes if classes is not None else scores).shape[1]
        return [[(classes[i, j].decode() if classes is not None else "",
                  float(scores[i, j]) if scores is not None else 0.0) for j in range(count)]
                for i in range(len(examples))]

    def regress(self, signature: str, examples: list[bytes]) -> list[float]:
        """One value per example, from the `outputs` output of shape [batch] or [batch, 1]."""
        values = self._run_examples(signature, "regress", examples).get("outputs")
        if values is None or values.shape[1] != 1:
            raise invalid("Expected output Tensor shape to be either [batch_size] or [batch_size, 1]")
        return values[:, 0].astype(float).tolist()

    def metadata(self) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """GetModelMetadataResponse with the `signature_def` metadata, as TF Serving answers it."""
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.name
        response.model_spec.version.value = self.version
        signature_map = get_model_metadata_pb2.SignatureDefMap(signature_def=self.signature_defs)
        response.metadata["signature_def"].Pack(signature_map)
        return response


def _input_tensor(name: str, value: np.ndarray, spec: tf.TensorSpec) -> tf.Tensor:
    dtype = tf.string if value.dtype == object else tf.as_dtype(value.dtype)
    if dtype != spec.dtype:
        raise invalid(f"Input '{name}' has dtype {dtype.name} but the signature takes {spec.dtype.name}")
    if not spec.shape.is_compatible_with(value.shape):
        expected = "any" if spec.shape.rank is None else [-1 if d is None else d for d in spec.shape.as_list()]
        raise invalid(f"Input '{name}' has shape {list(value.shape)} but the signature takes {expected} "
                      "(-1: any size)")
    return tf.constant(value, spec.dtype)


def serialized_examples(request_input: input_pb2.Input) -> list[bytes]:
    """The tf.Examples of a Classify or Regress input, each merged with the context when there is one."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        return [e.SerializeToString() for e in request_input.example_list.examples]
    if kind == "example_list_with_context":
        listed = request_input.example_list_with_context
        context = listed.context.SerializeToString()
        return [context + e.SerializeToString() for e in listed.examples]  # concatenated protos merge
    raise invalid("Input is empty")


def _to_numpy(tensor: tf.Tensor) -> np.ndarray:
    """An output as an array, scalars included; strings as an object array of bytes, as inputs are."""
    return np.array(tensor.numpy(), dtype=object) if tensor.dtype == tf.string else np.asarray(tensor.numpy())


def load_servable(path: pathlib.Path, name: str, version: int) -> Servable:
    """Loads the SavedModel at `path` with its `serve` meta graph, as TF Serving loads it."""
    saved_model = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    graphs = [g for g in saved_model.meta_graphs if "serve" in g.meta_info_def.tags]
    if not graphs:
        raise ValueError(f"{path} has no meta graph tagged 'serve'")
    model = tf.saved_model.load(str(path), tags=["serve"])
    return Servable(name, version, model, dict(graphs[0].signature_def))


def fingerprint(path: pathlib.Path) -> Fingerprint:
    """What changes when a version folder is replaced or its files are rewritten (a copy still in progress)."""
    files = [path / "saved_model.pb", *sorted((path / "variables").glob("*"))]
    stats = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            continue
        stats.append((file.name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
    try:
        folder = path.stat().st_ino
    except OSError:
        folder = None
    return folder, tuple(stats)


@dataclasses.dataclass(frozen=True)
class VersionState:
    """The load result of one version: a servable, or the error that stopped it (TF Serving's state END)."""

    version: int
    fingerprint: Fingerprint
    servable: Servable | None = None
    error_code: str = "OK"
    error: str = ""

    def status(self) -> get_model_status_pb2.ModelVersionStatus:
        state = get_model_status_pb2.ModelVersionStatus
        status = state(version=self.version, state=state.AVAILABLE if self.servable else state.END)
        status.status.error_code = _ERROR_CODES.values_by_name[self.error_code].number
        status.status.error_message = self.error
        return status


_ERROR_CODES = status_pb2.StatusProto.DESCRIPTOR.fields_by_name["error_code"].enum_type  # tensorflow.error.Code


class Repository:
    """The served models; `poll()` brings them in line with the folders, requests read `servable()`."""

    def __init__(self, configs: Callable[[], list[ModelConfig]], log: Callable[[str], None] = print):
        self._configs = configs
        self._log = log
        self._models: dict[str, tuple[ModelConfig, dict[int, VersionState]]] = {}
        self._poll_lock = threading.Lock()

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def poll(self) -> None:
        """Loads new and changed versions the policies ask for and drops the others; requests keep the old
        snapshot until the new one is complete."""
        with self._poll_lock:
            models = {}
            for config in self._configs():
                old = self._models.get(config.name, (config, {}))[1]
                models[config.name] = (config, self._poll_model(config, old))
            self._models = models

    def _poll_model(self, config: ModelConfig, old: dict[int, VersionState]) -> dict[int, VersionState]:
        on_disk = versions.folders(config.base_path)
        candidates, wanted = config.candidates(list(on_disk))
        states: dict[int, VersionState] = {}
        for version in candidates:
            if sum(s.servable is not None for s in states.values()) >= wanted:
                break
            current = fingerprint(on_disk[version])
            previous = old.get(version)
            if previous is None or previous.fingerprint != current:
                previous = self._load(config.name, version, on_disk[version], current)
            states[version] = previous
        return dict(sorted(states.items()))

    def _load(self, name: str, version: int, path: pathlib.Path, current: Fingerprint) -> VersionState:
        try:
            servable = load_servable(path, name, version)
        except Exception as e:  # a SavedModel fails to load in many ways; the status shows which
            code = _TF_CODES.get(getattr(e, "error_code", None), "UNKNOWN")
            message = f"Failed to load {name} version {version} from {path}: {type(e).__name__}: {e}"
            self._log(message.splitlines()[0])
            return VersionState(version, current, error_code=code, error=message)
        self._log(f"Loaded {name} version {version} from {path}")
        return VersionState(version, current, servable)

    def unloadable(self) -> list[str]:
        """The newest load error of each model that has versions on disk but none loaded."""
        return [list(states.values())[-1].error for _, states in self._models.values()
                if states and not any(s.servable for s in states.values())]

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> int | None:
        """The version a request names by number or label; None for the latest. Unknown labels are refused."""
        if label is None:
            return version
        model = self._models.get(name)
        if model is None or label not in model[0].labels:
            raise invalid(f"Unrecognized servable version label: {label}")
        return model[0].labels[label]

    def servable(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The loaded version a request asks for: by number, by label, or else the newest loaded one."""
        version = self.resolve(name, version, label)
        _, states = self._models.get(name, (None, {}))
        if version is None:
            loaded = [s.servable for s in states.values() if s.servable is not None]
            if not loaded:
                raise not_found(f"Servable not found for request: Latest({name})")
            return loaded[-1]
        state = states.get(version)
        if state is None or state.servable is None:
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        return state.servable

    def status(self, name: str, version: int | None = None, label: str | None = None
               ) -> get_model_status_pb2.GetModelStatusResponse:
        """GetModelStatusResponse: every version of `name` the policy asks for, newest first as TF Serving lists
        them (ServableStateMonitor's VersionMap), or the one requested."""
        version = self.resolve(name, version, label)
        if name not in self._models or not self._models[name][1]:
            raise not_found(f"Could not find any versions of model {name}")
        states = self._models[name][1]
        if version is not None and version not in states:
            raise not_found(f"Could not find version {version} of model {name}")
        chosen = reversed(states.values()) if version is None else [states[version]]
        return get_model_status_pb2.GetModelStatusResponse(model_version_status=[s.status() for s in chosen])
