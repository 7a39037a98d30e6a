"""TF Serving's gRPC API over a `Repository`, with the protos and stubs of `tensorflow-serving-api`:
`PredictionService` (Predict, GetModelMetadata, Classify, Regress) and `ModelService.GetModelStatus`.

The limits are the REST server's: messages up to `max_request_bytes`, tensors up to `max_request_elements`
values, `num_threads` workers and at most `max_in_flight` calls at once (past it gRPC answers
RESOURCE_EXHAUSTED); a call whose deadline has passed is not run.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import math

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, model_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
                                     regression_pb2)

from kerasbig.serving.errors import ServingError, invalid, too_large
from kerasbig.serving.json_tensor import MAX_RANK
from kerasbig.serving.repository import DEFAULT_SIGNATURE, Repository, Servable, serialized_examples
from kerasbig.serving.rest import Limits


@contextlib.contextmanager
def _status(context: grpc.ServicerContext):
    """Turns a ServingError into the call's gRPC status (same code as TF Serving's)."""
    if context.time_remaining() is not None and context.time_remaining() <= 0:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded before the call started")
    try:
        yield
    except ServingError as e:
        context.abort(grpc.StatusCode[e.code], str(e))


def _servable(repository: Repository, spec: model_pb2.ModelSpec) -> Servable:
    if not spec.name:
        raise invalid("Missing ModelSpec")
    version = spec.version.value if spec.HasField("version") else None
    return repository.servable(spec.name, version, spec.version_label or None)


def _response_spec(servable: Servable, signature: str) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=servable.name, signature_name=signature or DEFAULT_SIGNATURE)
    spec.version.value = servable.version
    return spec


def to_array(proto: tf.compat.v1.TensorProto, max_elements: int) -> np.ndarray:
    """A request tensor as an array, refused before conversion when it is deeper or larger than allowed."""
    dims = [d.size for d in proto.tensor_shape.dim]
    if len(dims) > MAX_RANK or any(d < 0 for d in dims):
        raise invalid(f"A tensor has shape {dims}; this server takes at most {MAX_RANK} non-negative dimensions")
    if math.prod(dims) > max_elements:
        raise too_large(f"A tensor has {math.prod(dims)} values; this server takes at most {max_elements} "
                        "(--max_request_elements)")
    try:
        array = tf.make_ndarray(proto)
    except (TypeError, ValueError) as e:
        raise invalid(f"Cannot read a TensorProto: {e}") from e
    return array.astype(object) if array.dtype.kind == "S" else array


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, repository: Repository, max_request_elements: int):
        self.repository = repository
        self.max_request_elements = max_request_elements

    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        with _status(context):
            servable = _servable(self.repository, request.model_spec)
            signature = request.model_spec.signature_name
            if (signature or DEFAULT_SIGNATURE) not in servable.signature_defs:
                raise ServingError("FAILED_PRECONDITION",
                                   f'Serving signature key "{signature or DEFAULT_SIGNATURE}" not found.')
            inputs = {name: to_array(proto, self.max_request_elements) for name, proto in request.inputs.items()}
            outputs = servable.run(signature, inputs, tuple(request.output_filter))
            response = predict_pb2.PredictResponse(model_spec=_response_spec(servable, signature))
            for name, array in outputs.items():
                response.outputs[name].CopyFrom(tf.make_tensor_proto(array))
            return response

    def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest, context):
        with _status(context):
            if not request.metadata_field:
                raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
            for field in request.metadata_field:
                if field != "signature_def":
                    raise invalid(f"Metadata field {field} is not supported")
            return _servable(self.repository, request.model_spec).metadata()

    def Classify(self, request: classification_pb2.ClassificationRequest, context):
        def fill(result: classification_pb2.ClassificationResult, servable: Servable, signature: str,
                 examples: list[bytes]) -> None:
            for classes in servable.classify(signature, examples):
                entry = result.classifications.add()
                for label, score in classes:
                    entry.classes.add(label=label, score=score)
        return self._on_examples(request, context, classification_pb2.ClassificationResponse, fill)

    def Regress(self, request: regression_pb2.RegressionRequest, context):
        def fill(result: regression_pb2.RegressionResult, servable: Servable, signature: str,
                 examples: list[bytes]) -> None:
            for value in servable.regress(signature, examples):
                result.regressions.add(value=value)
        return self._on_examples(request, context, regression_pb2.RegressionResponse, fill)

    def _on_examples(self, request, context, response_type, fill):
        """Classify and Regress: the response's `result` filled from the request's tf.Examples."""
        with _status(context):
            servable = _servable(self.repository, request.model_spec)
            signature = request.model_spec.signature_name
            response = response_type(model_spec=_response_spec(servable, signature))
            fill(response.result, servable, signature, serialized_examples(request.input))
            return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, repository: Repository):
        self.repository = repository

    def GetModelStatus(self, request, context):
        with _status(context):
            spec = request.model_spec
            if not spec.name:
                raise invalid("Missing ModelSpec")
            version = spec.version.value if spec.HasField("version") else None
            return self.repository.status(spec.name, version, spec.version_label or None)


def start(repository: Repository, host: str, port: int, limits: Limits) -> tuple[grpc.Server, int]:
    """Starts the gRPC server on `host:port` (0: a free port); returns it and the port it listens on."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(limits.num_threads, thread_name_prefix="grpc"),
                         maximum_concurrent_rpcs=limits.max_in_flight,
                         options=[("grpc.max_receive_message_length", limits.max_request_bytes),
                                  ("grpc.so_reuseport", 0)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(repository, limits.max_request_elements), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(repository), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:  # grpcio raises where it used to return 0
        raise OSError(f"cannot listen on {host}:{port}") from e
    if not bound:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound
