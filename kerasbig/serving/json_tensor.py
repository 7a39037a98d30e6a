"""TF Serving's JSON <-> tensor rules (tensorflow_serving/util/json_tensor.cc), on numpy arrays.

Requests: `{"signature_name": s, "instances": [...]}` (row format: one entry per example, each a value, or an
object naming every input) or `{"inputs": value or {name: value}}` (columnar). A tensor's shape is read from
the first element at each level and every other list must match it; a leaf must be of the input's dtype as
TF Serving judges it (a float takes any number but not `true`, an int32 only integers within int32, a string
a JSON string or `{"b64": ...}`). Replies print floats as TF Serving does (6 significant digits when they read
back exactly, else 9; `NaN`, `Infinity`), strings as text or, for outputs named `*_bytes`, as `{"b64": ...}`.

kerasbig adds limits that TF Serving does not have, so that no body can exhaust the process: `max_elements`
values per request and `MAX_RANK` dimensions per tensor.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow_serving.apis import input_pb2

from kerasbig.serving.errors import ServingError, invalid, too_large

ROW, COLUMNAR = "row", "columnar"
MAX_RANK = 32  # deeper JSON is refused: TensorFlow aborts the process on tensors past 254 dimensions
_DEBUG_CHARS = 256  # TF Serving's kMaxJsonDebugStringBytes
# rapidjson's Is*() checks per dtype, as value ranges; bool is its own JSON type, never a number.
_INT_RANGES = {name: (int(np.iinfo(name).min), int(np.iinfo(name).max))
               for name in ("int8", "int16", "int32", "int64", "uint8", "uint32", "uint64")}


def _debug(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= _DEBUG_CHARS else text[:_DEBUG_CHARS] + "..."


def _json_type(value: Any) -> str:
    names = {bool: "True" if value is True else "False", type(None): "Null", dict: "Object", list: "Array",
             str: "String", int: "Number", float: "Number"}
    return names[type(value)]


def parse(body: bytes) -> dict:
    """The request object of a body, refused with TF Serving's messages when it is not a JSON object."""
    if not body:
        raise invalid("JSON Parse error: The document is empty")
    try:
        document = json.loads(body)
    except RecursionError as e:  # TF Serving parses iteratively; Python's parser recurses
        raise invalid("JSON Parse error: nested too deeply for this server") from e
    except ValueError as e:  # includes UnicodeDecodeError
        raise invalid(f"JSON Parse error: {e}") from e
    if not isinstance(document, dict):
        raise invalid(f"JSON Value: {_debug(document)} Is not object")
    return document


def signature_name(request: dict) -> str:
    """The optional `signature_name`; "" when absent (the caller's default)."""
    name = request.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid(f"JSON Value: {_debug(request)} not formatted correctly. "
                      "'signature_name' key must be a string value.")
    return name


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _is_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _shape(value: Any) -> list[int]:
    """TF Serving's GetDenseTensorShape: the length of the first list at each level."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if len(shape) > MAX_RANK:
            raise invalid(f"A tensor has more than {MAX_RANK} dimensions; this server takes at most {MAX_RANK}")
        if not value:
            break
        value = value[0]
    return shape


def _leaves(value: Any, shape: list[int], level: int, out: list) -> None:
    """Appends the leaves of `value` to `out`, checking that every list has the size `shape` says."""
    if not isinstance(value, list):
        if level != len(shape):
            raise invalid(f"JSON Value: {_debug(value)} found at incorrect level: {level + 1} in the JSON DOM. "
                          f"Expected at level: {len(shape)}")
        out.append(value)
        return
    if level >= len(shape):
        raise invalid(f"Encountered list at unexpected level: {level} expected < {len(shape)}")
    if len(value) != shape[level]:
        raise invalid(f"Encountered list at unexpected size: {len(value)} at level: {level} "
                      f"expected size: {shape[level]}")
    if level == len(shape) - 1:
        if list in map(type, value):  # C-speed scan of the innermost lists, which hold nearly all values
            raise invalid(f"Encountered list at unexpected level: {level + 1} expected < {len(shape)}")
        out.extend(value)
    else:
        for item in value:
            _leaves(item, shape, level + 1, out)


def _type_error(value: Any, dtype: str) -> ServingError:
    tf_name = {"float32": "float", "float64": "double"}.get(dtype, dtype)  # TensorFlow's DataTypeString
    return invalid(f"JSON Value: {_debug(value)} Type: {_json_type(value)} is not of expected type: {tf_name}")


def _array(values: list, shape: list[int], dtype: str) -> np.ndarray:
    """The leaves as an array of `dtype` (a numpy dtype name, or "string"), each leaf checked as TF Serving does."""
    if dtype == "string":
        return np.array([_string(v) for v in values], dtype=object).reshape(shape)
    if dtype in ("float32", "float64"):
        allowed = {int, float}
    elif dtype == "bool":
        allowed = {bool}
    elif dtype in _INT_RANGES:
        allowed = {int}
    else:
        raise ServingError("UNIMPLEMENTED", f"Conversion of JSON Value: {_debug(values[:1])} to type: {dtype}")
    if not set(map(type, values)) <= allowed:  # `type`, not isinstance: True is an int to Python, not to JSON
        raise _type_error(next(v for v in values if type(v) not in allowed), dtype)
    if dtype in _INT_RANGES and values:
        low, high = _INT_RANGES[dtype]
        if min(values) < low or max(values) > high:
            raise _type_error(next(v for v in values if not low <= v <= high), dtype)
    try:
        with np.errstate(over="ignore"):  # TF Serving: a double past float32's range becomes +-inf
            return np.array(values, dtype=np.float64 if dtype == "float32" else dtype).astype(dtype).reshape(shape)
    except OverflowError as e:  # an integer past float64's range
        raise invalid(f"A value is out of range for {dtype}: {e}") from e


def _string(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict):
        if not _is_b64(value):
            raise invalid(f"JSON Value: {_debug(value)} not formatted correctly for base64 data")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise invalid("Unable to base64 decode") from e
    raise _type_error(value, "string")


class _Budget:
    """Counts the values a request expands into, against `max_elements`."""

    def __init__(self, max_elements: int):
        self.left = max_elements
        self.max_elements = max_elements

    def take(self, shape: list[int]) -> None:
        self.left -= math.prod(shape)
        if self.left < 0:
            raise too_large(f"The request has more than {self.max_elements} values; this server takes at most "
                            f"{self.max_elements} (--max_request_elements)")


def _tensor(value: Any, dtype: str, budget: _Budget) -> np.ndarray:
    shape = _shape(value)
    budget.take(shape)
    leaves: list = []
    _leaves(value, shape, 0, leaves)
    return _array(leaves, shape, dtype)


def predict_inputs(request: dict, dtypes: dict[str, str], max_elements: int) -> tuple[str, dict[str, np.ndarray]]:
    """(ROW or COLUMNAR, {input name: array}) of a predict request, for a signature with inputs `dtypes`."""
    if not dtypes:
        raise invalid("Failed to get input map for signature")
    if "instances" in request and "inputs" in request:
        raise invalid(f"JSON Value: {_debug(request)} Not formatted correctly expecting only one of 'inputs' or "
                      "'instances' keys to exist ")
    budget = _Budget(max_elements)
    if "instances" in request:
        instances = request["instances"]
        if not isinstance(instances, list):
            raise invalid(f"JSON Value: {_debug(request)} Expecting 'instances' to be an list/array")
        if not instances:
            raise invalid(f"JSON Value: {_debug(request)} No values in 'instances' array")
        return ROW, _from_instances(instances, dtypes, budget)
    if "inputs" in request:
        return COLUMNAR, _from_inputs(request["inputs"], dtypes, budget)
    raise invalid("Missing 'inputs' or 'instances' key")


def _from_instances(instances: list, dtypes: dict[str, str], budget: _Budget) -> dict[str, np.ndarray]:
    """TF Serving's FillTensorMapFromInstancesList: instances stacked along a new batch axis, per input. The
    values of all instances are gathered into one list per input and converted once."""
    if not isinstance(instances[0], dict) and len(dtypes) > 1:
        raise invalid("instances is a plain list, but expecting list of objects as multiple input tensors "
                      "required as per tensorinfo_map")
    named = _is_object(instances[0])
    if not named and not {list, dict} & set(map(type, instances)):  # scalars: no walk needed
        budget.take([len(instances)])
        name = next(iter(dtypes))
        return {name: _array(instances, [len(instances)], dtypes[name])}
    columns = {name: _Column() for name in dtypes}
    for index, instance in enumerate(instances):
        if named != _is_object(instance):
            got = "object but got list" if named else "value/list but got object"
            raise invalid(f"Expecting {got} at item {index} of input list")
        items = instance.items() if named else [(next(iter(dtypes)), instance)]
        for name, value in items:
            if name not in dtypes:
                raise invalid(f"Failed to process element: {index} key: {name} of 'instances' list. Error: "
                              f"INVALID_ARGUMENT: JSON object: does not have named input: {name}")
            try:
                columns[name].add(value, budget)
            except ServingError as e:
                raise ServingError(e.code, f"Failed to process element: {index} of 'instances' list. "
                                           f"Error: {e}", e.http_status) from e
        if named and set(instance) != set(dtypes):
            raise invalid(f"Failed to process element: {index} of 'instances' list. JSON object: "
                          f"{_debug(instance)} keys must be equal to: {','.join(sorted(dtypes))}")
    return {name: _array(column.leaves, [len(instances), *column.shape], dtypes[name])
            for name, column in columns.items()}


class _Column:
    """The values of one input over the instances, which must all have the first instance's shape."""

    def __init__(self):
        self.shape: list[int] | None = None
        self.leaves: list = []

    def add(self, value: Any, budget: _Budget) -> None:
        shape = _shape(value)
        budget.take(shape)
        count = len(self.leaves)
        _leaves(value, shape, 0, self.leaves)
        if self.shape is None:
            self.shape = shape
        elif math.prod(shape) != math.prod(self.shape):
            raise invalid(f"Expecting tensor size: {math.prod(self.shape)} but got: {len(self.leaves) - count}")
        elif shape != self.shape:
            raise invalid(f"Expecting shape {_shape_text(self.shape)} but got: {_shape_text(shape)}")


def _shape_text(shape: list[int]) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def _from_inputs(inputs: Any, dtypes: dict[str, str], budget: _Budget) -> dict[str, np.ndarray]:
    """TF Serving's FillTensorMapFromInputsMap: one value per input; keys the signature lacks are ignored."""
    if not _is_object(inputs):
        if len(dtypes) > 1:
            raise invalid("inputs is a plain value/list, but expecting an object as multiple input tensors "
                          "required as per tensorinfo_map")
        name = next(iter(dtypes))
        return {name: _tensor(inputs, dtypes[name], budget)}
    missing = [name for name in dtypes if name not in inputs]
    if missing:
        raise invalid(f"Missing named input: {missing[0]} in 'inputs' object.")
    return {name: _tensor(inputs[name], dtype, budget) for name, dtype in dtypes.items()}


# Classify and regress requests: JSON objects as tf.Examples (FillClassifyRegressRequestFromJson).

def _feature_kind_error(name: str, feature: feature_pb2.Feature) -> ServingError:
    kind = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}[feature.WhichOneof("kind")]
    return invalid(f"Unexpected element type in feature: {name} expecting type: {kind}")


def _add_to_feature(value: Any, name: str, feature: feature_pb2.Feature) -> None:
    """TF Serving's AddValueToFeature: the first value decides the list kind; bools are int64s."""
    if isinstance(value, str) or _is_b64(value):
        kind, item = "bytes_list", _string(value)
    elif isinstance(value, bool) or (isinstance(value, int) and value <= _INT_RANGES["int64"][1]):
        kind, item = "int64_list", int(value)
    elif isinstance(value, int) and value <= _INT_RANGES["uint64"][1]:
        raise invalid(f"Feature: {name} has uint64_t element. Only int64_t is supported.")
    elif isinstance(value, (int, float)):
        kind, item = "float_list", float(value)
    else:
        raise invalid(f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}")
    if feature.WhichOneof("kind") not in (None, kind):
        raise _feature_kind_error(name, feature)
    getattr(feature, kind).value.append(item)


def _example(value: Any, example: example_pb2.Example, budget: _Budget) -> None:
    if not isinstance(value, dict):
        raise invalid(f"Example must be JSON object but got JSON {_json_type(value)}")
    for name, content in value.items():
        items = content if isinstance(content, list) else [content]
        budget.take([len(items)])
        feature = example.features.feature[name]
        for item in items:
            _add_to_feature(item, name, feature)


def examples_input(request: dict, max_elements: int) -> input_pb2.Input:
    """The Input (tf.Examples, with their `context`) of a classify or regress request."""
    budget = _Budget(max_elements)
    request_input = input_pb2.Input()
    if "context" in request:
        _example(request["context"], request_input.example_list_with_context.context, budget)
    listed = request_input.example_list_with_context if "context" in request else request_input.example_list
    examples = request.get("examples")
    if examples is None:
        raise invalid(f"JSON Value: {_debug(request)} When method is classify, key 'examples' is expected and was "
                      "not found")
    if not isinstance(examples, list):
        raise invalid(f"JSON Value: {_debug(request)} Expecting 'examples' value to be an list/array")
    if not examples:
        raise invalid(f"JSON Value: {_debug(request)} 'examples' value is an empty array")
    for value in examples:
        _example(value, listed.examples.add(), budget)
    return request_input


def classify_reply(results: list[list[tuple[str, float]]]) -> str:
    """`{"results": [[[label, score], ...], ...]}` (MakeJsonFromClassificationResult)."""
    if not results:
        raise invalid("Cannot convert empty ClassificationResults to JSON")
    rows = []
    for classes in results:
        scores = _float_tokens(np.array([score for _, score in classes], np.float32)).tolist()
        rows.append("[" + ", ".join(f"[{json.dumps(label)}, {score}]" for (label, _), score in zip(classes, scores))
                    + "]")
    return '{"results": [' + ", ".join(rows) + "]}"


def regress_reply(values: list[float]) -> str:
    """`{"results": [value, ...]}` (MakeJsonFromRegressionResult)."""
    if not values:
        raise invalid("Cannot convert empty RegressionResults to JSON")
    return '{"results": ' + _text(_float_tokens(np.array(values, np.float32))) + "}"


# Replies.

def _float_tokens(array: np.ndarray) -> np.ndarray:
    """TF Serving's WriteDecimal: "%g" when it reads back as the same value, else max_digits10 digits; a whole
    number gets ".0"; NaN and infinities as the tokens `NaN`, `Infinity`, `-Infinity`."""
    values = array.ravel()
    wide = values.astype(np.float64).tolist()
    short = ["%g" % v for v in wide]
    with np.errstate(invalid="ignore", over="ignore"):
        exact = (np.array(short, dtype=np.float64).astype(array.dtype) == values).tolist()
    digits = "%.9g" if array.dtype == np.float32 else "%.17g"
    tokens = [_special(v) or _decimal(s if ok else digits % v) for s, ok, v in zip(short, exact, wide)]
    return np.array(tokens, dtype=object).reshape(array.shape)


def _special(value: float) -> str | None:
    if value != value:
        return "NaN"
    return {math.inf: "Infinity", -math.inf: "-Infinity"}.get(value)


def _decimal(text: str) -> str:
    """A whole number gets ".0", so that a list of floats never reads as integers."""
    return text if "." in text or "e" in text else text + ".0"


def _tokens(name: str, array: np.ndarray) -> np.ndarray:
    """Each value of an output as its JSON text."""
    if array.dtype in (np.float32, np.float64):
        return _float_tokens(array)
    if array.dtype == object:  # tf.string
        if name.endswith("_bytes"):
            encode = np.frompyfunc(lambda v: '{"b64": "' + base64.b64encode(v).decode() + '"}', 1, 1)
        else:
            encode = np.frompyfunc(lambda v: json.dumps(v.decode("utf-8", "replace")), 1, 1)
        return encode(array) if array.ndim else np.array(encode(array[()]), dtype=object)
    if array.dtype == np.bool_:
        return np.where(array, "true", "false").astype(object)
    if array.dtype.name in _INT_RANGES:
        return array.astype(str).astype(object)
    raise invalid(f"Failed to write JSON value for tensor type: {array.dtype.name}")


def _text(tokens: np.ndarray | str) -> str:
    """Nested JSON lists of the tokens; a token on its own (a scalar, or one value of a row) as it is."""
    if not isinstance(tokens, np.ndarray):
        return tokens
    if tokens.ndim == 0:
        return tokens[()]
    if tokens.ndim == 1:
        return "[" + ",".join(tokens.tolist()) + "]"
    return "[" + ",".join(_text(t) for t in tokens) + "]"


def predict_reply(outputs: dict[str, np.ndarray], request_format: str) -> str:
    """The JSON text of a predict reply: `predictions` (row format) or `outputs` (columnar)."""
    if not outputs:
        raise invalid("Cannot convert empty tensor map to JSON")
    tokens = {name: _tokens(name, array) for name, array in sorted(outputs.items())}
    single = len(tokens) == 1
    if request_format == COLUMNAR:
        if single:
            return '{"outputs": ' + _text(next(iter(tokens.values()))) + "}"
        return '{"outputs": {' + ", ".join(f"{json.dumps(k)}: {_text(t)}" for k, t in tokens.items()) + "}}"
    batch = None
    for name, array in tokens.items():
        if array.ndim == 0:
            raise invalid(f"Tensor name: {name} has no shape information ")
        if batch is not None and len(array) != batch:
            raise invalid(f"Tensor name: {name} has inconsistent batch size: {len(array)} expecting: {batch}")
        batch = len(array)
    if single:
        rows = [_text(row) for row in next(iter(tokens.values()))]
    else:
        rows = ["{" + ", ".join(f"{json.dumps(k)}: {_text(t[i])}" for k, t in tokens.items()) + "}"
                for i in range(batch)]
    return '{"predictions": [' + ", ".join(rows) + "]}"
