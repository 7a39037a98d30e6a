"""SavedModel export that TF Serving loads as it is.

`saved_models/<name>/<N>/` holds `saved_model.pb`, `variables/`, `assets.extra/tf_serving_warmup_requests` and
`assets.extra/kerasbig.json`. A version is written to a hidden temporary folder, verified by loading it in a
fresh process, and only then renamed into place, so TF Serving never sees half a version.
`saved_models/models.config` (TF Serving's `--model_config_file`) is rewritten atomically after each export.

Verification entry point (run by `export` itself): `python -m kerasbig.export SAVED_MODEL_DIR SAMPLES.npz PARENT_PID`.
Classifiers answer `probabilities`, `classes` and, when the data names its classes, `class_names`; language
models answer next-token `logits` and have a `generate` signature too (`kerasbig.generation`). Every graph is
kept to ops that TF Serving registers (`unservable_ops`).
"""
from __future__ import annotations

import ctypes
import gzip
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from kerasbig import generation, versions
from kerasbig.compress import quantization
from kerasbig.data.spec import CLASSIFICATION, LANGUAGE_MODEL, Task
from kerasbig.data.text import BYTE_VOCAB
from kerasbig.errors import RunError
from kerasbig.files import locked, remove_temporaries, write_atomically

WARMUP_EXAMPLES = 8
PR_SET_PDEATHSIG = 1  # prctl(2)


def _outputs(model: keras.Model, task: Task, raw) -> dict[str, tf.Tensor]:
    """A batch of raw inputs -> preprocess -> model -> the named outputs (float32 whatever the precision)."""
    logits = tf.cast(model(task.preprocess(raw), training=False), tf.float32)
    if task.spec.kind != CLASSIFICATION:
        return {"logits": logits[:, -1, :]}  # language models: the next token's logits
    classes = tf.argmax(logits, -1)
    outputs = {"probabilities": tf.nn.softmax(logits), "classes": classes}
    if task.spec.class_names:
        outputs["class_names"] = tf.gather(tf.constant(task.spec.class_names), classes)
    return outputs


def serving_functions(model: keras.Model, task: Task) -> dict[str, tf.types.experimental.GenericFunction]:
    """The SavedModel's signatures by name: `serving_default` takes what clients send (the raw input, or its
    encoded form when the task has one, which then also gets a signature for the raw input)."""
    def signature(spec, to_raw=lambda x: x):
        # autograph=False: plain Python at trace time.
        return tf.function(lambda x: _outputs(model, task, to_raw(x)), input_signature=[spec], autograph=False)

    raw = signature(task.serving_input)
    if task.encoded is None:
        functions = {"serving_default": raw}
    else:
        functions = {"serving_default": signature(task.encoded.spec, task.encoded.decode), task.serving_input.name: raw}
    if task.spec.kind == LANGUAGE_MODEL:
        functions[generation.GENERATE] = generation.signature(model)
        if task.tokenizer is None and task.spec.num_classes == BYTE_VOCAB:  # token ids are UTF-8 bytes
            functions[generation.GENERATE_TEXT] = generation.text_signature(model)
    return functions


def graph_ops(directory: pathlib.Path) -> set[str]:
    """The op types of a SavedModel's graphs, those inside its functions included."""
    saved_model = saved_model_pb2.SavedModel.FromString((directory / "saved_model.pb").read_bytes())
    ops = set()
    for graph in (meta.graph_def for meta in saved_model.meta_graphs):
        functions = {function.signature.name for function in graph.library.function}
        nodes = [*graph.node, *(node for function in graph.library.function for node in function.node_def)]
        ops |= {node.op for node in nodes if node.op not in functions}  # a call of a function is not an op
    return ops


def unservable_ops(ops: set[str]) -> list[str]:
    """The ops of `ops` that TF Serving may lack: any that core TensorFlow does not register itself (TF Text's
    and other libraries' custom ops; stock TF Serving embeds TF Text 2.12.1 only, tensorflow/serving#4057) and
    the XLA-only ones (`Xla*`, e.g. the `slice_update` of Keras's TensorFlow backend)."""
    return sorted(op for op in ops if not hasattr(tf.raw_ops, op) or op.startswith("Xla"))


def next_version(base: pathlib.Path) -> int:
    return max(versions.folders(base), default=0) + 1


def sample_inputs(task: Task, n: int = WARMUP_EXAMPLES, *, encoded: bool = True):
    """A few real test inputs as clients send them to `serving_default` (the raw ones with `encoded=False`), for
    warmup requests and the fresh-process check: an array, or a dict of arrays by input name."""
    examples = task.encoded.examples("test") if encoded and task.encoded else task.examples("test")
    return tf.nest.map_structure(lambda t: t.numpy(), next(iter(examples.batch(n)))[0])


def _named(spec, samples) -> dict[str, np.ndarray]:
    """{signature input name: array} for the samples of a signature whose input is `spec`."""
    return samples if isinstance(spec, dict) else {spec.name: samples}


def _write_warmup(path: pathlib.Path, name: str, samples: dict[str, np.ndarray]) -> None:
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=name, signature_name="serving_default"))
    for input_name, values in samples.items():
        request.inputs[input_name].CopyFrom(tf.make_tensor_proto(values))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(log.SerializeToString())


def _die_with_parent(parent: int) -> None:
    """In the verifier process: Linux kills it when the export that started it dies (SIGKILL included); a
    parent already gone by now means the same."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        sys.exit("the export that started this check has ended")


def _verify_in_fresh_process(directory: pathlib.Path, cases: dict[str, tuple[dict, dict]]) -> None:
    """`cases`: signature name -> (named inputs, expected outputs), checked by `_check` in a new process."""
    with tempfile.TemporaryDirectory() as tmp:
        npz = pathlib.Path(tmp) / "samples.npz"
        np.savez(npz, **{f"{signature}/{part}/{key}": value for signature, pair in cases.items()
                         for part, values in zip(("in", "out"), pair) for key, value in values.items()})
        result = subprocess.run([sys.executable, "-m", "kerasbig.export", str(directory), str(npz), str(os.getpid())],
                                capture_output=True, text=True)
    if result.returncode != 0:
        raise RunError(f"the exported SavedModel failed its check in a fresh process: "
                       f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")


def _quantization(version_dir: pathlib.Path) -> str:
    try:
        return json.loads((version_dir / "assets.extra" / "kerasbig.json").read_text()).get("quantization", "")
    except (OSError, ValueError):
        return ""


def write_models_config(base: pathlib.Path, *, stable_label: bool = True) -> pathlib.Path:
    """TF Serving's ModelServerConfig for every model under `base`, as mounted at /models in its container.

    Each model serves its newest version, labelled `stable` when it is a float export, plus the newest int8
    version under the label `int8` when there is one. Writers take turns, each scanning the folders and
    replacing the file whole, so the last one lists every version and readers never see a partial file."""
    with locked(base / ".models.config.lock"):
        return _write_models_config(base, stable_label)


def _write_models_config(base: pathlib.Path, stable_label: bool) -> pathlib.Path:
    config = model_server_config_pb2.ModelServerConfig()
    for model_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = versions.folders(model_dir)
        if not found:
            continue
        newest = {}
        for version, folder in found.items():
            newest[_quantization(folder) or "stable"] = version
        labels = {label: v for label, v in newest.items() if label != "stable" or stable_label}
        entry = config.model_config_list.config.add(name=model_dir.name, base_path=f"/models/{model_dir.name}",
                                                    model_platform="tensorflow")
        entry.model_version_policy.specific.versions.extend(sorted({max(found), *labels.values()}))
        for label, version in labels.items():
            entry.version_labels[label] = version
    path = base / "models.config"
    write_atomically(path, text_format.MessageToString(config))
    return path


def saved_model_bytes(directory: pathlib.Path) -> int:
    """The SavedModel's size on disk: graph and variables, without kerasbig's extra assets."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and "assets.extra" not in p.parts)


def saved_model_gzip_bytes(directory: pathlib.Path) -> int:
    """What the SavedModel's files take gzipped (level 6), kerasbig's extra assets left out: pruned zeros compress."""
    return sum(len(gzip.compress(p.read_bytes(), 6)) for p in directory.rglob("*")
               if p.is_file() and "assets.extra" not in p.parts)


def quantized_copy(model: keras.Model, mode: str = "int8", task: Task | None = None) -> keras.Model:
    """A copy of `model` with Keras's weight quantization (Dense, EinsumDense and Embedding layers); a
    calibrated mode (gptq) calibrates on `task`'s training split."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    quantization.quantize(copy, mode, task)
    return copy


def export(model: keras.Model, task: Task, *, base: pathlib.Path, name: str, record: dict,
           stable_label: bool = True) -> pathlib.Path:
    """Writes the next version of `name` under `base`; returns its folder. `record` goes to kerasbig.json.
    Exports of one model take turns (a lock in its folder), so each gets its own version number, and the
    temporaries that a killed export left are removed first."""
    model_base = base / name
    model_base.mkdir(parents=True, exist_ok=True)
    with locked(model_base / ".lock"):
        remove_temporaries(model_base)
        final = _write_version(model, task, model_base, name, record)
    write_models_config(base, stable_label=stable_label)
    return final


def _write_version(model: keras.Model, task: Task, model_base: pathlib.Path, name: str, record: dict) -> pathlib.Path:
    version = next_version(model_base)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_base))
    # Serving needs the weights only: detach the optimizer so its state stays out of the SavedModel (`del`,
    # since assigning None leaves Keras tracking the old one).
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        del model.optimizer
    try:
        functions = serving_functions(model, task)
        archive = keras.export.ExportArchive()
        archive.track(model)
        for signature_name, function in functions.items():
            archive.add_endpoint(signature_name, function)
        archive.write_out(str(tmp), verbose=False)
        unservable = unservable_ops(graph_ops(tmp))
        if unservable:
            raise RunError(f"the SavedModel would use ops that TF Serving does not register: {unservable}")
        cases = {}
        for signature_name, function in functions.items():
            spec = function.input_signature[0]
            samples = (generation.SAMPLE_REQUESTS[signature_name](task) if signature_name in generation.SAMPLE_REQUESTS
                       else sample_inputs(task, encoded=signature_name == "serving_default"))
            expected = {k: v.numpy() for k, v in function(tf.nest.map_structure(tf.constant, samples)).items()}
            cases[signature_name] = (_named(spec, samples), expected)
        extra = tmp / "assets.extra"
        extra.mkdir()
        for file_name, content in (task.tokenizer.files if task.tokenizer else {}).items():
            (extra / file_name).write_bytes(content)  # for clients that tokenize text themselves
        _write_warmup(extra / "tf_serving_warmup_requests", name, cases["serving_default"][0])
        libraries = {"keras": keras.__version__, "tensorflow": tf.__version__, "python": sys.version.split()[0]}
        record = {**record, "size_bytes": saved_model_bytes(tmp), "size_gzip_bytes": saved_model_gzip_bytes(tmp),
                  "versions": libraries}
        (extra / "kerasbig.json").write_text(json.dumps(record, indent=2, default=str))
        _verify_in_fresh_process(tmp, cases)
        final = model_base / str(version)
        tmp.rename(final)
    finally:
        if optimizer is not None:
            model.optimizer = optimizer
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check(directory: str, samples_path: str) -> None:
    """Loads a SavedModel as TF Serving would and compares each signature with the expected outputs."""
    cases: dict[str, tuple[dict, dict]] = {}
    with np.load(samples_path, allow_pickle=True) as data:  # our own file: strings are object arrays
        for key in data.files:
            signature_name, part, name = key.split("/", 2)
            cases.setdefault(signature_name, ({}, {}))[part == "out"][name] = data[key]
    signatures = tf.saved_model.load(directory).signatures
    for signature_name, (inputs, expected) in cases.items():
        outputs = signatures[signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        for key, want in expected.items():
            got = outputs[key].numpy()
            if want.dtype == object:  # strings
                if not np.array_equal(got, want):
                    sys.exit(f"{signature_name} output {key!r} differs from the trained model's")
            elif got.dtype != want.dtype or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
                sys.exit(f"{signature_name} output {key!r} differs from the trained model's (max abs diff "
                         f"{np.max(np.abs(got.astype(np.float64) - want)):.3g}, dtypes {got.dtype}/{want.dtype})")
        for key, value in outputs.items():
            if value.dtype not in (tf.float32, tf.int64, tf.string):
                sys.exit(f"output {key!r} has dtype {value.dtype.name}; serving outputs must be float32, int64 "
                         "or string")


if __name__ == "__main__":
    _die_with_parent(int(sys.argv[3]))
    _check(*sys.argv[1:3])
