"""Serving artefacts: float32 signatures after mixed precision under a strategy, TF Serving warmup records,
models.config, and the int8 version beside the float one."""
import json

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """digits_mlp trained in bfloat16 on two logical-CPU replicas, exported as float and int8 versions."""
    from conftest import kerasbig
    root = tmp_path_factory.mktemp("export")
    result = kerasbig("train", "--config=configs/digits_mlp.py", "--config.train.epochs=4",
                      "--config.schedule.decay=constant", "--config.optimizer.learning_rate=0.005",
                      "--mixed_precision=mixed_bfloat16", "--strategy=mirrored", "--num_cpu_replicas=2",
                      "--config.export.quantize=int8", f"--workdir={root / 'run'}",
                      f"--export_dir={root / 'models' / 'digits'}")
    return root / "models", result.stdout


def test_float32_outputs_after_mixed_precision_under_a_strategy(exported):
    models, _ = exported
    signature = tf.saved_model.load(str(models / "digits" / "1")).signatures["serving_default"]
    assert {k: v.dtype for k, v in signature.structured_outputs.items()} == {
        "probabilities": tf.float32, "classes": tf.int64, "class_names": tf.string}
    assert list(signature.structured_input_signature[1]) == ["image"]


def test_warmup_records_parse_and_replay(exported):
    models, _ = exported
    for version in ("1", "2"):
        path = models / "digits" / version
        records = list(tf.data.TFRecordDataset(str(path / "assets.extra" / "tf_serving_warmup_requests")))
        assert records
        signature = tf.saved_model.load(str(path)).signatures["serving_default"]
        for record in records:
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            request = log.predict_log.request
            assert request.model_spec.name == "digits" and request.model_spec.signature_name == "serving_default"
            inputs = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()}
            probabilities = signature(**inputs)["probabilities"].numpy()
            np.testing.assert_allclose(probabilities.sum(-1), 1, rtol=1e-5)


def test_models_config_is_a_model_server_config(exported):
    models, _ = exported
    config = text_format.Parse((models / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    (entry,) = config.model_config_list.config
    assert entry.name == "digits" and entry.base_path == "/models/digits" and entry.model_platform == "tensorflow"
    assert list(entry.model_version_policy.specific.versions) == [1, 2]
    assert dict(entry.version_labels) == {"stable": 1, "int8": 2}


def test_int8_version_is_smaller_and_as_accurate(exported):
    models, stdout = exported
    assert f"SavedModel (int8): {models / 'digits' / '2'}" in stdout
    record = json.loads((models / "digits" / "2" / "assets.extra" / "kerasbig.json").read_text())
    float_record = json.loads((models / "digits" / "1" / "assets.extra" / "kerasbig.json").read_text())
    comparison = record["comparison"]
    assert record["quantization"] == "int8" and comparison["float"]["size_bytes"] == float_record["size_bytes"]
    assert record["size_bytes"] * 2 <= float_record["size_bytes"]
    assert comparison["float"]["test_accuracy"] > 0.85
    assert abs(comparison["int8"]["test_accuracy"] - comparison["float"]["test_accuracy"]) <= 0.01
