"""TF Serving's own JSON <-> tensor cases (tensorflow_serving/util/json_tensor_test.cc), ported to
`kerasbig.serving.json_tensor`. Each test is named after the case it ports; where kerasbig deliberately
differs, the test says so (docs/serving.md lists the differences)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kerasbig.serving import json_tensor
from kerasbig.serving.errors import ServingError

LIMIT = 1 << 22


def inputs(body: str, dtypes: dict[str, str]) -> tuple[str, dict[str, np.ndarray]]:
    request = json_tensor.parse(body.encode())
    json_tensor.signature_name(request)
    return json_tensor.predict_inputs(request, dtypes, LIMIT)


def refused(body: str, dtypes: dict[str, str], message: str, code: str = "INVALID_ARGUMENT") -> None:
    with pytest.raises(ServingError, match=None) as error:
        inputs(body, dtypes)
    assert error.value.code == code and message in str(error.value), str(error.value)


def assert_tensor(array: np.ndarray, dtype: str, shape: tuple, values: list) -> None:
    assert (array.dtype.name if array.dtype != object else "string", array.shape) == (dtype, shape)
    flat = array.reshape(-1).tolist()
    assert len(flat) == len(values) and all(
        (math.isnan(a) and math.isnan(b)) if isinstance(b, float) and math.isnan(b) else a == b
        for a, b in zip(flat, values)), flat


def test_SingleUnnamedTensor():
    request_format, tensors = inputs('{"instances": [[1,2],[3,4],[5,6]]}', {"default": "int32"})
    assert request_format == json_tensor.ROW and list(tensors) == ["default"]
    assert_tensor(tensors["default"], "int32", (3, 2), [1, 2, 3, 4, 5, 6])


def test_DeeplyNestedWellFormed_differs():
    """TF Serving parses iteratively and ignores an unused key holding 500,000 nested lists; Python's parser
    recurses, so kerasbig refuses such a body with a 400 instead (deliberate difference)."""
    body = '{"instances":[1], "nested":' + "[" * 500_000 + "]" * 500_000 + "}"
    refused(body, {"default": "int32"}, "JSON Parse error: nested too deeply")
    # a nesting Python's parser takes is ignored, as in TF Serving
    _, tensors = inputs('{"instances":[1], "nested":' + "[" * 500 + "]" * 500 + "}", {"default": "int32"})
    assert_tensor(tensors["default"], "int32", (1,), [1])


def test_DeeplyNestedMalformed():
    refused('{"signature_name":' + "[" * 500 + "]" * 500 + "}", {"default": "int32"}, "key must be a string value")


def test_MixedInputForFloatTensor():
    _, tensors = inputs('{"instances": [1, 2.0, 3, 4, 5.003, 0.007, 0.0]}', {"default": "float32"})
    assert_tensor(tensors["default"], "float32", (7,), np.float32([1, 2, 3, 4, 5.003, 0.007, 0]).tolist())


def test_MixedInputForDoubleTensor():
    _, tensors = inputs('{"instances": [1.0, 2, 3, 4, 0.662, 0, 0.0]}', {"default": "float64"})
    assert_tensor(tensors["default"], "float64", (7,), [1, 2, 3, 4, 0.662, 0, 0])


def test_FloatTensorWithPrecisionLoss():
    for number in ("1435774380", "1435774380.0"):
        _, tensors = inputs(f'{{"instances": [{number}]}}', {"default": "float32"})
        assert_tensor(tensors["default"], "float32", (1,), [float(np.float32(1435774380))])


def test_FloatTensorThatExceedsMaxReturnsInf():
    for number, expected in ((np.finfo(np.float64).max, math.inf), (-np.finfo(np.float64).max, -math.inf)):
        _, tensors = inputs(f'{{"instances": [{float(number)!r}]}}', {"default": "float32"})
        assert_tensor(tensors["default"], "float32", (1,), [expected])


def test_FloatTensorThatExceedsMinReturnsZero():
    for number in (np.finfo(np.float64).tiny, -np.finfo(np.float64).tiny):
        _, tensors = inputs(f'{{"instances": [{float(number)!r}]}}', {"default": "float32"})
        assert_tensor(tensors["default"], "float32", (1,), [0.0])
        assert math.copysign(1, tensors["default"][0]) == math.copysign(1, number)


def test_SingleUnnamedTensorWithSignature():
    request = json_tensor.parse(b'{"signature_name": "predict_images", "instances": [[1,2]]}')
    assert json_tensor.signature_name(request) == "predict_images"
    _, tensors = json_tensor.predict_inputs(request, {"default": "int32"}, LIMIT)
    assert_tensor(tensors["default"], "int32", (1, 2), [1, 2])


def test_TensorFromNonNullTerminatedBuffer():
    body = b'{"instances": [[1,2],[3,4],[5,6]]}'
    _, tensors = json_tensor.predict_inputs(json_tensor.parse(body[:]), {"default": "int32"}, LIMIT)
    assert_tensor(tensors["default"], "int32", (3, 2), [1, 2, 3, 4, 5, 6])


def test_SingleUnnamedTensorBase64Scalars():
    _, tensors = inputs('{"instances": [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}]}', {"default": "string"})
    assert_tensor(tensors["default"], "string", (2,), [b"hello", b"world"])


def test_SingleUnnamedTensorBase64Lists():
    _, tensors = inputs('{"instances": [[{"b64": "aGVsbG8="}], [{"b64": "d29ybGQ="}]]}', {"default": "string"})
    assert_tensor(tensors["default"], "string", (2, 1), [b"hello", b"world"])


def test_SingleNamedTensorBase64():
    _, tensors = inputs('{"instances": [{"default": [[{"b64": "aGVsbG8="}], [{"b64": "d29ybGQ="}]]}]}',
                        {"default": "string"})
    assert_tensor(tensors["default"], "string", (1, 2, 1), [b"hello", b"world"])


MULTIPLE = {"int_tensor": "int32", "str_tensor": "string", "float_tensor": "float32", "dbl_tensor": "float64"}


def test_MultipleNamedTensor():
    _, tensors = inputs("""{"instances": [
        {"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"], "float_tensor": [1.0, NaN],
         "dbl_tensor": [NaN]},
        {"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"], "float_tensor": [2.0, Infinity],
         "dbl_tensor": [2.0]}]}""", MULTIPLE)
    assert_tensor(tensors["int_tensor"], "int32", (2, 3, 2), [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2])
    assert_tensor(tensors["str_tensor"], "string", (2, 2), [b"foo", b"bar", b"baz", b"bat"])
    assert_tensor(tensors["float_tensor"], "float32", (2, 2), [1.0, math.nan, 2.0, math.inf])
    assert_tensor(tensors["dbl_tensor"], "float64", (2, 1), [math.nan, 2.0])


def test_SingleUnnamedTensorColumnarFormat():
    for body in ('{"inputs": {"int_tensor": [[[1,2],[3,4],[5,6]]]}}', '{"inputs": [[[1,2],[3,4],[5,6]]]}'):
        request_format, tensors = inputs(body, {"int_tensor": "int32"})
        assert request_format == json_tensor.COLUMNAR
        assert_tensor(tensors["int_tensor"], "int32", (1, 3, 2), [1, 2, 3, 4, 5, 6])


def test_MultipleNamedTensorColumnarFormat():
    _, tensors = inputs("""{"inputs": {"int_tensor": [[[1,2],[3,4],[5,6]]], "str_tensor": ["foo", "bar"],
                                       "bin_tensor": {"b64": "aGVsbG8="}}}""",
                        {"int_tensor": "int32", "str_tensor": "string", "bin_tensor": "string"})
    assert_tensor(tensors["int_tensor"], "int32", (1, 3, 2), [1, 2, 3, 4, 5, 6])
    assert_tensor(tensors["str_tensor"], "string", (2,), [b"foo", b"bar"])
    assert_tensor(tensors["bin_tensor"], "string", (), [b"hello"])


def test_SingleUnnamedTensorErrors():
    default = {"default": "int32"}
    refused("", default, "document is empty")
    refused('{"signature_name": 5, "instances": [[1,2],[3,4],[5,6,7]]}', default, "must be a string value")
    refused('{"instances": [[1,2],[3,4],[5,6,7]], "inputs": [[1,2],[3,4],[5,6,7]]}', default,
            "Not formatted correctly")
    refused('{"instances": [[1,2],[3,4],[5,6,7]]}', default, "Expecting tensor size")
    refused('{"instances": [[1,2],[3,4],[[5,6]]]}', default, "Expecting shape")
    refused('{"instances": [1, [1]]}', default, "Expecting shape")
    refused('{"instances": [[1,2],["a", "b"]]}', default, "not of expected type")


def test_MultipleNamedTensorErrors():
    two = {"int_tensor": "int32", "str_tensor": "string"}
    refused("""{"instances": [{"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"]},
                              {"int_tensor": [[[7,8],[9,0],[1,2]]], "str_tensor": ["baz", "bat"]}]}""",
            two, "Expecting shape")
    refused("""{"instances": [{"int_tensor": [[1,2],[3,4],[5,6],[7,8]], "str_tensor": ["foo", "bar"]},
                              {"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"]}]}""",
            two, "Expecting tensor size")
    refused("""{"instances": [{"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"]}, [1, 20, 30],
                              {"int_tensor": [[[7,8],[9,0],[1,2]]], "str_tensor": ["baz", "bat"]}]}""",
            two, "Expecting object but got list")
    refused('{"instances": [["baz", "bar"], {"str_tensor": ["baz", "bat"]}]}', {"str_tensor": "string"},
            "Expecting value/list but got object")


def reply(tensors: dict[str, np.ndarray], request_format: str = json_tensor.ROW) -> dict:
    return json.loads(json_tensor.predict_reply(tensors, request_format))


def strings(array: list, shape: tuple) -> np.ndarray:
    return np.array(array, dtype=object).reshape(shape)


INTS = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2], "int32").reshape(2, 3, 2)


def test_FromJsonSingleTensor():
    nested = INTS.tolist()
    assert reply({"int_tensor": INTS}) == {"predictions": nested}
    assert reply({"int_tensor": INTS}, json_tensor.COLUMNAR) == {"outputs": nested}


def test_FromJsonSingleScalarTensor():
    ints = np.array([1, 2, 3, 4, 5], "int32")
    assert reply({"int_tensor": ints}) == {"predictions": [1, 2, 3, 4, 5]}
    assert reply({"int_tensor": ints}, json_tensor.COLUMNAR) == {"outputs": [1, 2, 3, 4, 5]}


def test_FromJsonSingleBytesTensor():
    tensor = strings([b"hello", b"world", b"tf", b"serving"], (2, 2))
    assert reply({"str_tensor_bytes": tensor}) == {"predictions": [
        [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}], [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}]]}


def test_FromJsonSingleFloatTensorSixDigitPrecision():
    tensor = np.array([9000000, 999999, 0.5, .0003, .00003, 555557.5], "float32").reshape(2, 3)
    text = json_tensor.predict_reply({"float_tensor": tensor}, json_tensor.ROW)
    assert text.replace(" ", "") == '{"predictions":[[9e+06,999999.0,0.5],[0.0003,3e-05,555557.5]]}'


def test_FromJsonSingleFloatTensorNonFinite():
    tensor = np.array([math.nan, math.inf, 3, -math.inf], "float32").reshape(2, 2)
    text = json_tensor.predict_reply({"float_tensor": tensor}, json_tensor.ROW)
    assert text.replace(" ", "") == '{"predictions":[[NaN,Infinity],[3.0,-Infinity]]}'


def test_float32_outputs_print_as_tf_serving_prints_them():
    """WriteDecimal: six significant digits when they read back as the same float32, else nine, and ".0" on
    whole numbers (16777216 needs nine digits: "%g" would print 1.67772e+07)."""
    tensor = np.array([0.1, 1 / 3, 2.5, 1e-7, 16777216], "float32")
    text = json_tensor.predict_reply({"y": tensor}, json_tensor.COLUMNAR)
    assert text == '{"outputs": [0.1,0.333333343,2.5,1e-07,16777216.0]}'
    doubles = json_tensor.predict_reply({"y": np.array([0.1, 1 / 3])}, json_tensor.COLUMNAR)
    assert doubles == '{"outputs": [0.1,0.33333333333333331]}'


def test_FromJsonSingleTensorErrors():
    with pytest.raises(ServingError, match="empty tensor map"):
        json_tensor.predict_reply({}, json_tensor.ROW)
    with pytest.raises(ServingError, match="tensor type: complex64"):
        json_tensor.predict_reply({"tensor": np.array([1, 2], "complex64")}, json_tensor.ROW)
    with pytest.raises(ServingError, match="no shape information"):
        json_tensor.predict_reply({"tensor": np.array(1, "int32")}, json_tensor.ROW)


def test_FromJsonMultipleNamedTensors():
    tensors = {"int_tensor": INTS, "str_tensor": strings([b"foo", b"bar", b"baz", b"bat"], (2, 2)),
               "float_tensor": np.array([[1.0], [2.0]], "float32"),
               "double_scalar_tensor": np.array([8.0, 9.0]),
               "str_tensor_bytes": strings([b"hello", b"world", b"tf", b"serving"], (2, 2))}
    assert reply(tensors) == {"predictions": [
        {"double_scalar_tensor": 8.0, "float_tensor": [1.0], "int_tensor": [[1, 2], [3, 4], [5, 6]],
         "str_tensor": ["foo", "bar"], "str_tensor_bytes": [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}]},
        {"double_scalar_tensor": 9.0, "float_tensor": [2.0], "int_tensor": [[7, 8], [9, 0], [1, 2]],
         "str_tensor": ["baz", "bat"], "str_tensor_bytes": [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}]}]}
    assert reply(tensors, json_tensor.COLUMNAR) == {"outputs": {
        "double_scalar_tensor": [8.0, 9.0], "float_tensor": [[1.0], [2.0]],
        "int_tensor": INTS.tolist(), "str_tensor": [["foo", "bar"], ["baz", "bat"]],
        "str_tensor_bytes": [[{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}], [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}]]}}


def test_FromJsonMultipleNamedTensorsErrors():
    with pytest.raises(ServingError, match="inconsistent batch size"):
        json_tensor.predict_reply({"int_tensor": np.arange(6, dtype="int32").reshape(2, 3),
                                   "str_tensor": strings([b"foo", b"bar", b"baz"], (1, 3))}, json_tensor.ROW)


def test_FromJsonSingleZeroBatchTensor():
    assert reply({"int_tensor": np.zeros((0, 2), "int32")}) == {"predictions": []}


def test_FromJsonMultipleZeroBatchTensors():
    assert reply({"str_tensor": strings([], (0, 1, 2)), "float_tensor": np.zeros((0, 3, 4), "float32")}) == {
        "predictions": []}


def test_FromJsonMultipleZeroBatchTensorsErrors():
    with pytest.raises(ServingError, match="inconsistent batch size"):
        json_tensor.predict_reply({"int_tensor": np.zeros((0, 2), "int32"),
                                   "str_tensor": strings([b"foo", b"bar"], (1, 2))}, json_tensor.ROW)


# What TF Serving's AddValueToTensor accepts per dtype (rapidjson's IsNumber, IsInt, IsInt64, IsBool, IsString).
@pytest.mark.parametrize("dtype, value, accepted", [
    ("float32", "true", False), ("float32", '"1.5"', False), ("float32", "null", False), ("float32", "7", True),
    ("int32", "2147483647", True), ("int32", "2147483648", False), ("int32", "-2147483649", False),
    ("int32", "1.0", False), ("int32", "true", False),
    ("int64", "9223372036854775807", True), ("int64", "9223372036854775808", False),
    ("uint32", "4294967295", True), ("uint32", "-1", False),
    ("uint64", "18446744073709551615", True), ("uint64", "-1", False),
    ("bool", "true", True), ("bool", "1", False),
    ("string", '"x"', True), ("string", "1", False), ("string", '{"b64": 1}', False),
])
def test_AddValueToTensor_accepts_the_json_types_of_each_dtype(dtype, value, accepted):
    body = f'{{"inputs": [{value}]}}'
    if accepted:
        assert inputs(body, {"x": dtype})[1]["x"].shape == (1,)
    else:
        with pytest.raises(ServingError) as error:
            inputs(body, {"x": dtype})
        assert error.value.code == "INVALID_ARGUMENT"


def test_narrow_ints_are_refused_past_their_range_differs():
    """TF Serving takes any int32 for int8, int16 and uint8 inputs and lets the value wrap; kerasbig refuses
    values outside the dtype (deliberate difference: a client must not rely on wrapping)."""
    assert inputs('{"inputs": [255]}', {"x": "uint8"})[1]["x"].tolist() == [255]
    refused('{"inputs": [256]}', {"x": "uint8"}, "not of expected type: uint8")
    refused('{"inputs": [-129]}', {"x": "int8"}, "not of expected type: int8")


def test_unsupported_input_dtypes_are_unimplemented():
    refused('{"inputs": [1.0]}', {"x": "float16"}, "to type: float16", code="UNIMPLEMENTED")


def test_inputs_ignores_keys_the_signature_does_not_have():
    _, tensors = inputs('{"inputs": {"x": [1], "unused": "anything"}}', {"x": "int32"})
    assert list(tensors) == ["x"]
    refused('{"inputs": {"unused": [1]}}', {"x": "int32"}, "Missing named input: x in 'inputs' object.")


def test_more_values_than_the_limit_are_refused_differs():
    """kerasbig bounds the values a request expands into (TF Serving has no such limit): 413, not memory."""
    request = json_tensor.parse(b'{"instances": [[1, 2], [3, 4], [5, 6]]}')
    assert json_tensor.predict_inputs(request, {"x": "int32"}, 6)[1]["x"].shape == (3, 2)
    with pytest.raises(ServingError, match="more than 5 values") as error:
        json_tensor.predict_inputs(request, {"x": "int32"}, 5)
    assert error.value.http_status == 413


def test_tensors_deeper_than_the_rank_limit_are_refused_differs():
    """A JSON list nested 255 deep once aborted the process (TensorFlow's dimension check); now a 400."""
    deep = "[" * 255 + "1" + "]" * 255
    refused(f'{{"inputs": {deep}}}', {"x": "int32"}, f"at most {json_tensor.MAX_RANK}")
    ok = "[" * json_tensor.MAX_RANK + "1" + "]" * json_tensor.MAX_RANK
    assert inputs(f'{{"inputs": {ok}}}', {"x": "int32"})[1]["x"].ndim == json_tensor.MAX_RANK


# Classify and regress (ClassifyRegressRequestTest and ClassifyRegressnResultTest).

def examples(body: str):
    return json_tensor.examples_input(json_tensor.parse(body.encode()), LIMIT)


def features(example) -> dict:
    return {name: (feature.WhichOneof("kind"), list(getattr(feature, feature.WhichOneof("kind")).value))
            for name, feature in example.features.feature.items()}


def test_RequestNoContext():
    request_input = examples("""{"examples": [{"names": ["foo", "bar"], "ratings": [8.0, 9.0], "age": 20},
                                              {"names": ["baz"], "ratings": 6.0}]}""")
    first, second = request_input.example_list.examples
    assert features(first) == {"names": ("bytes_list", [b"foo", b"bar"]), "ratings": ("float_list", [8.0, 9.0]),
                               "age": ("int64_list", [20])}
    assert features(second) == {"names": ("bytes_list", [b"baz"]), "ratings": ("float_list", [6.0])}


def test_RequestWithContextAndSignature():
    request = json_tensor.parse(b"""{"signature_name": "custom_signture",
        "context": {"query": "pizza", "location": ["sfo"]},
        "examples": [{"names": ["foo", "bar"], "ratings": [8.0, 9.0, NaN, Infinity], "age": 20},
                     {"names": ["baz", {"b64": "aGVsbG8="}], "ratings": 6.0, "intboolmix": [1, true, false]},
                     {"names": "bar", "ratings": -Infinity}]}""")
    assert json_tensor.signature_name(request) == "custom_signture"
    listed = json_tensor.examples_input(request, LIMIT).example_list_with_context
    assert features(listed.context) == {"query": ("bytes_list", [b"pizza"]), "location": ("bytes_list", [b"sfo"])}
    first, second, third = (features(e) for e in listed.examples)
    assert first["ratings"][1][:2] == [8.0, 9.0] and math.isnan(first["ratings"][1][2]) and \
        first["ratings"][1][3] == math.inf
    assert second == {"names": ("bytes_list", [b"baz", b"hello"]), "ratings": ("float_list", [6.0]),
                      "intboolmix": ("int64_list", [1, 1, 0])}
    assert third == {"names": ("bytes_list", [b"bar"]), "ratings": ("float_list", [-math.inf])}


@pytest.mark.parametrize("body, message", [
    ('{"signature_name": ["hello"], "examples": [{"names": ["foo", "bar"]}]}', "'signature_name' key must be a string"),
    ('{"context": [{"names": ["foo", "bar"]}]}', "Example must be JSON object"),
    ('{"examples": {"names": ["foo", "bar"]}}', "list/array"),
    ('{"examples": [[{"names": ["foo", "bar"]}]]}', "Example must be JSON object"),
    ('{"examples": [{"names": [10, null]}]}', "names has element with unexpected JSON type: Null"),
    ('{"examples": [{"names": [10, 10.0]}]}', "feature: names expecting type: int64"),
    ('{"examples": [{"names": [10, {"test": 10}]}]}', "names has element with unexpected JSON type: Object"),
    ('{"examples": [{"names": [[10], 20]}]}', "names has element with unexpected JSON type: Array"),
    ('{"examples": [{"names": [20, 18446744073709551603]}]}', "Only int64_t is supported"),
])
def test_JsonErrors(body, message):
    with pytest.raises(ServingError) as error:
        request = json_tensor.parse(body.encode())
        json_tensor.signature_name(request)
        json_tensor.examples_input(request, LIMIT)
    assert error.value.code == "INVALID_ARGUMENT" and message in str(error.value), str(error.value)


def test_JsonFromClassificationResult():
    results = [[("car", 0.2), ("bike", 0.7), ("bus", 0.1)], [("car", 0.7), ("bike", 0.1), ("bus", 0.2)]]
    assert json.loads(json_tensor.classify_reply(results)) == {"results": [
        [["car", 0.2], ["bike", 0.7], ["bus", 0.1]], [["car", 0.7], ["bike", 0.1], ["bus", 0.2]]]}


def test_JsonFromRegressionResult():
    assert json.loads(json_tensor.regress_reply([0.2, 0.9, 1.0])) == {"results": [0.2, 0.9, 1.0]}


def test_JsonFromRegressionResultWithNonFinite():
    text = json_tensor.regress_reply([0.2, math.inf, 1.0, -math.inf, math.nan])
    assert text == '{"results": [0.2,Infinity,1.0,-Infinity,NaN]}'


def test_JsonFromResultErrors():
    with pytest.raises(ServingError, match="empty ClassificationResults"):
        json_tensor.classify_reply([])
    with pytest.raises(ServingError, match="empty RegressionResults"):
        json_tensor.regress_reply([])
