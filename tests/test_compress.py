"""Compression: pruning's schedule and masks in the compiled step, across SIGKILL and resume, and into the
SavedModel; quantization-aware fine-tuning; distillation; their bad inputs."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import keras
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, assert_same_weights, checkpoint_weights, kerasbig, latest_checkpoint, load_config
from kerasbig import config as config_lib, data, evaluation, export, lora
from kerasbig.models import build
from kerasbig.compress.distillation import load_teacher
from kerasbig.compress.pruning import Pruner, Schedule, sparsities, strip
from kerasbig.compress.quantization import check_model, quantize_for_training
from kerasbig.errors import UsageError


def test_schedule_is_zhu_and_gupta_cubic_reaching_its_target_at_the_end_step():
    schedule = Schedule(target=0.8, start=10, end=50, frequency=7)
    assert float(schedule.sparsity(10)) == 0.0
    assert float(schedule.sparsity(30)) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert float(schedule.sparsity(50)) == pytest.approx(0.8) and float(schedule.sparsity(90)) == pytest.approx(0.8)
    steps = [t for t in range(100) if bool(schedule.is_pruning_step(t))]
    assert steps == [10, 17, 24, 31, 38, 45, 50]  # every 7th from the start, and the end step itself


def _pruned_model(schedule: Schedule, **options):
    """A two-layer Dense model with masks, and one compiled training step on random data."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, name="a"), keras.layers.Dense(8, name="b")],
                             name="net")
    optimizer = keras.optimizers.Adam(0.01)
    Pruner(model, optimizer, schedule, **options)
    optimizer.build(model.trainable_variables)
    x, y = np.random.rand(16, 64).astype("float32"), np.random.randint(0, 8, 16)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    return model, step


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_masks_follow_the_schedule_inside_the_compiled_step_and_pruned_weights_stay_zero(scope):
    schedule = Schedule(target=0.75, start=2, end=8, frequency=3)  # masks recomputed after steps 2, 5 and 8
    model, step = _pruned_model(schedule, scope=scope)
    sizes = {"net/a/kernel": 64 * 32, "net/b/kernel": 32 * 8}
    zeros_before = None
    for t in range(1, 13):
        step()
        sparsity = float(schedule.sparsity(max(s for s in (0, 2, 5, 8) if s <= t)))
        per_matrix = sizes.values() if scope == "layer" else [sum(sizes.values())]  # rounded per matrix, or once
        values = sparsities(model)
        assert round(sum(values[p] * n for p, n in sizes.items())) == sum(round(sparsity * n) for n in per_matrix), t
        zeros = [np.asarray(model.get_layer(name).kernel.value) == 0 for name in "ab"]
        if zeros_before is not None:  # once pruned, a weight stays zero through every later update
            assert all(np.all(now[before]) for now, before in zip(zeros, zeros_before)), t
        zeros_before = zeros
    assert sparsity == pytest.approx(0.75)
    if scope == "layer":
        assert values == {p: pytest.approx(0.75) for p in sizes}
    else:  # one threshold: the matrices differ
        assert values["net/a/kernel"] != values["net/b/kernel"]


def test_two_of_four_keeps_the_two_largest_of_every_group_along_the_input_axis():
    model, step = _pruned_model(Schedule(target=0.5, start=1, end=2, frequency=1), structured=True)
    for _ in range(3):
        step()
    for kernel in (model.get_layer("a").kernel, model.get_layer("b").kernel):
        groups = np.asarray(kernel.value).reshape(-1, 4, kernel.shape[-1])  # [in / 4, 4, out]
        assert np.all(np.sum(groups != 0, axis=1) == 2)
    stripped = strip(model)
    assert [w.path for w in stripped.weights] == ["net/a/kernel", "net/a/bias",
                                                  "net/b/kernel", "net/b/bias"]
    assert sparsities(stripped) == sparsities(model) == {"net/a/kernel": 0.5, "net/b/kernel": 0.5}
    assert lora.counts(model) == lora.counts(stripped) == (64 * 32 + 32 + 32 * 8 + 8,) * 2  # masks are no parameters


PRUNE = ["--config=configs/digits_mlp.py", "--config.model.hidden=(64,)", "--config.train.steps=40",
         "--config.compress.prune.sparsity=0.8", "--config.compress.prune.start_step=5",
         "--config.compress.prune.end_step=25", "--config.compress.prune.frequency=4",
         "--config.train.checkpoint_every_steps=3", "--deterministic"]


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """(workdir, export base, output) of one pruned run, uninterrupted, exported as float and int8."""
    root = tmp_path_factory.mktemp("pruned")
    result = kerasbig("train", *PRUNE, "--config.train.log_every_steps=5", "--config.export.quantize=int8",
                      f"--workdir={root / 'run'}", f"--export_dir={root / 'models' / 'digits'}")
    return root / "run", root / "models", result


@pytest.mark.slow
def test_pruned_weights_are_exact_zeros_in_checkpoint_and_saved_model_and_compress(pruned_run):
    workdir, models, result = pruned_run
    weights = checkpoint_weights(workdir)
    for layer in ("dense_0", "logits"):
        kernel, mask = weights[f"mlp/{layer}/kernel"], weights[f"mlp/{layer}/prune_mask"]
        assert np.mean(kernel == 0) == pytest.approx(0.8, abs=1 / kernel.size)
        np.testing.assert_array_equal(kernel != 0, mask)
    # The SavedModel: the same weights, without masks, pruned ones exactly zero.
    version = models / "digits" / "1"
    saved = tf.train.load_checkpoint(str(version / "variables" / "variables"))
    kernels = [saved.get_tensor(k) for k, shape in saved.get_variable_to_shape_map().items() if len(shape) == 2]
    assert {k.shape for k in kernels} == {weights[f"mlp/{n}/kernel"].shape for n in ("dense_0", "logits")}
    for kernel in kernels:
        assert any(np.array_equal(kernel, weights[f"mlp/{n}/kernel"]) for n in ("dense_0", "logits"))
    assert not any("prune_mask" in k for k in saved.get_variable_to_shape_map())
    record = json.loads((version / "assets.extra" / "kerasbig.json").read_text())
    assert record["size_gzip_bytes"] < record["size_bytes"] / 2
    assert "Test: accuracy" in result.stdout
    # Pruned and quantized: a version beside the float one, with its test accuracy.
    quantized = json.loads((models / "digits" / "2" / "assets.extra" / "kerasbig.json").read_text())
    comparison = quantized["comparison"]
    assert quantized["quantization"] == "int8" and comparison["float"]["size_bytes"] == record["size_bytes"]
    assert abs(comparison["int8"]["test_accuracy"] - comparison["float"]["test_accuracy"]) < 0.05
    assert f"SavedModel (int8): {models / 'digits' / '2'}" in result.stdout
    assert "int8" in (models / "models.config").read_text()
    tags = {value.tag for path in (workdir / "train").glob("events*") for event in tf.compat.v1.train.summary_iterator(
        str(path)) for value in event.summary.value}
    assert {"sparsity/mlp/dense_0/kernel", "sparsity/mlp/logits/kernel", "sparsity/all"} <= tags


@pytest.mark.slow
def test_masks_survive_sigkill_and_resume_exactly(pruned_run, train, tmp_path):
    """Killed mid-schedule and rerun: the weights and masks equal an uninterrupted run's."""
    straight, resumed = pruned_run[0], tmp_path / "resumed"
    process = subprocess.Popen([sys.executable, "-m", "kerasbig.train", *PRUNE, "--mode=train",
                                f"--workdir={resumed}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (resumed / "checkpoints" / "step-00000015").exists():  # inside the pruning schedule
        assert process.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = int(latest_checkpoint(resumed).name[5:])
    assert killed_at < 25, "killed after the schedule ended"
    rerun = train(*PRUNE, "--mode=train", f"--workdir={resumed}")
    assert f"Resuming from step {killed_at}" in rerun.stdout
    assert_same_weights(straight, resumed, rtol=1e-6, atol=1e-6)
    masks = {k: v for k, v in checkpoint_weights(resumed).items() if k.endswith("prune_mask")}
    assert len(masks) == 2 and all(np.mean(~m) == pytest.approx(0.8, abs=0.01) for m in masks.values())


QUANTIZED = ["--config=configs/digits_cnn.py", "--config.model.filters=(8,)", "--config.model.dense=32",
             "--config.schedule.warmup_steps=2", "--config.schedule.decay=constant",
             "--config.train.checkpoint_every_steps=8",
             "--config.train.log_every_steps=4", "--config.compress.quantize_training=int8", "--deterministic"]


def _batch_losses(workdir) -> dict[int, float]:
    return {event.step: float(tf.make_ndarray(value.tensor)) for path in (workdir / "train").glob("events*")
            for event in tf.compat.v1.train.summary_iterator(str(path)) for value in event.summary.value
            if value.tag == "batch_loss"}


@pytest.mark.slow
def test_quantization_aware_fine_tuning_trains_around_int8_kernels_resumes_exactly_and_exports_int8(train, tmp_path):
    """int8 from the start: the loss falls while the int8 kernels stay as quantized; its step-8 checkpoint,
    resumed to 16 in a new workdir, equals the straight run of 16; the SavedModel holds int8 kernels and its
    test score."""
    straight, resumed, models = tmp_path / "straight", tmp_path / "resumed", tmp_path / "models"
    result = train(*QUANTIZED, "--config.train.steps=16", f"--workdir={straight}", f"--export_dir={models / 'int8'}")
    losses = _batch_losses(straight)
    assert losses[max(losses)] < losses[min(losses)], losses
    step_8 = straight / "checkpoints" / "step-00000008"
    shutil.copytree(step_8, resumed / "checkpoints" / step_8.name)  # as if that run had stopped there
    shutil.copy(straight / "config.json", resumed)
    at_8 = checkpoint_weights(resumed)
    rerun = train(*QUANTIZED, "--config.train.steps=16", "--mode=train", f"--workdir={resumed}")
    assert "Resuming from step 8" in rerun.stdout
    assert_same_weights(straight, resumed, rtol=1e-6, atol=1e-6)
    at_16 = checkpoint_weights(resumed)
    kernels = [k for k, v in at_16.items() if v.dtype == np.int8]
    assert sorted(kernels) == ["cnn/dense/kernel", "cnn/logits/kernel"], sorted(at_16)
    for path in kernels:  # frozen as quantized; what stays float trains
        np.testing.assert_array_equal(at_8[path], at_16[path])
    assert not np.array_equal(at_8["cnn/logits/bias"], at_16["cnn/logits/bias"])
    # The SavedModel: the int8 kernels as trained, and the run's test score.
    version = models / "int8" / "1"
    saved = tf.train.load_checkpoint(str(version / "variables" / "variables"))
    int8 = [saved.get_tensor(k) for k, dtype in saved.get_variable_to_dtype_map().items()
            if k.startswith("variables/") and dtype == tf.int8]  # each variable once
    assert sorted(v.shape for v in int8) == sorted(at_16[k].shape for k in kernels)
    for value in int8:
        assert any(np.array_equal(value, at_16[k]) for k in kernels)
    record = json.loads((version / "assets.extra" / "kerasbig.json").read_text())
    metrics = json.loads((straight / "metrics.json").read_text())
    assert record["quantization"] == "int8" and record["metrics"]["accuracy"] == metrics["accuracy"]
    assert f"Test: accuracy {metrics['accuracy']:.4f}" in result.stdout
    assert 'key: "int8"' in (models / "models.config").read_text()


GPTQ_GPT = ["--config=configs/gpt_small.py", "--config.model.width=16", "--config.model.depth=1",
            "--config.model.heads=2", "--config.data.seq_len=32", "--config.train.steps=10",
            "--config.train.jit_compile=False", "--config.train.eval_every_steps=10", "--config.model.dropout=0.0"]


@pytest.mark.slow
def test_gptq_version_is_calibrated_exported_and_served_beside_the_float_one(train, tmp_path):
    """A tiny GPT exported as float and gptq: the gptq version (verified in a fresh process by the export) scores
    close to float's bits per token, and differently from both float and plain int4 (quantized here from the
    same run): it is calibrated."""
    workdir, models = tmp_path / "run", tmp_path / "models"
    result = train(*GPTQ_GPT, "--config.export.quantize=gptq", f"--workdir={workdir}", f"--export_dir={models / 'gpt'}")
    assert f"SavedModel (gptq): {models / 'gpt' / '2'}" in result.stdout
    record = json.loads((models / "gpt" / "2" / "assets.extra" / "kerasbig.json").read_text())
    assert record["quantization"] == "gptq"
    bits = {mode: record["comparison"][mode]["test_bits_per_token"] for mode in ("float", "gptq")}
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    task = data.load_task(config.data)
    trained = load_teacher(str(workdir), config.data, task.spec, build(task.spec, config.model))
    bits["int4"] = evaluation.serving_scores(export.quantized_copy(trained, "int4"), task)["bits_per_token"]
    assert abs(bits["gptq"] - bits["float"]) < 0.05 * bits["float"], bits
    assert len(set(bits.values())) == 3, bits
    saved = tf.train.load_checkpoint(str(models / "gpt" / "2" / "variables" / "variables"))
    dtypes = saved.get_variable_to_dtype_map()
    # 4-bit kernels, packed two to a byte, and their zero points: the block's 4 Dense layers, no other layer.
    assert sum(1 for key, dtype in dtypes.items() if key.startswith("variables/") and dtype == tf.uint8) == 8
    assert 'key: "gptq"' in (models / "models.config").read_text()


def test_gptq_is_refused_for_a_model_without_transformer_blocks():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)], name="mlp")
    with pytest.raises(UsageError, match=re.escape("config.export.quantize=int8,gptq: gptq calibrates the "
                                                   "transformer blocks of a decoder language model (gpt, llama), "
                                                   "which model mlp is not; use ['int8', 'int4']")):
        check_model(model, ["int8", "gptq"])


PRUNING = "compress.prune."
BAD_PRUNING = [
    ({PRUNING + "sparsity": 1.0, PRUNING + "end_step": 10}, "config.compress.prune.sparsity=1.0 must be in [0, 1)"),
    ({PRUNING + "sparsity": -0.1, PRUNING + "end_step": 10}, "config.compress.prune.sparsity=-0.1 must be in [0, 1)"),
    ({PRUNING + "sparsity": 0.5, PRUNING + "start_step": 20, PRUNING + "end_step": 10},
     "config.compress.prune.end_step=10 must come after"),
    ({PRUNING + "sparsity": 0.5, PRUNING + "end_step": 10, PRUNING + "scope": "row"},
     "config.compress.prune.scope='row' is not one of"),
    ({PRUNING + "structured": True, PRUNING + "sparsity": 0.8, PRUNING + "end_step": 10}, "keeps 2 of every 4 weights"),
    ({PRUNING + "sparsity": 0.5, PRUNING + "end_step": 10, PRUNING + "frequency": 0},
     "config.compress.prune.frequency=0 must be >= 1"),
]


BAD_QUANTIZATION = [
    ({"export.quantize": "awq"}, "config.export.quantize='awq': awq is not written by kerasbig yet"),
    ({"export.quantize": "float8"}, "float8 keeps float weights"),
    ({"export.quantize": "int8,int2"}, "'int2' is not a mode Keras"),
    ({"export.quantize": "int8,int8"}, "names a mode twice"),
]


BAD_QUANTIZE_TRAINING = [
    ({"compress.quantize_training": "int4"}, "quantize_training='int4' is not a mode kerasbig fine-tunes"),
    ({"compress.quantize_training": "int8", PRUNING + "sparsity": 0.5, PRUNING + "end_step": 10},
     "freezes the kernels that config.compress.prune would prune"),
    ({"compress.quantize_training": "int8", "export.quantize": "int4"}, "exports the int8 model itself; leave"),
    ({"compress.quantize_training": "int8", "model.lora_rank": 4}, "the adapters would be merged into float kernels"),
]


BAD_DISTILLATION = [
    ({"compress.temperature": 0.0}, "config.compress.temperature=0.0 must be > 0"),
    ({"compress.teacher_weight": 1.5}, "config.compress.teacher_weight=1.5 must be in [0, 1]"),
]
BAD = BAD_PRUNING + BAD_QUANTIZATION + BAD_QUANTIZE_TRAINING + BAD_DISTILLATION


@pytest.mark.parametrize("values,message", BAD, ids=[m for _, m in BAD])
def test_bad_compression_values_are_named(values, message):
    config = config_lib.base()
    for key, value in values.items():  # a dotted path from the config's root
        *sections, leaf = key.split(".")
        section = config
        for name in sections:
            section = section[name]
        section[leaf] = value
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config_lib.validate(config)


def test_quantize_training_refuses_a_model_without_a_layer_keras_quantizes():
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3)], name="convs")
    with pytest.raises(UsageError, match="config.compress.quantize_training=int8: model convs has no Dense"):
        quantize_for_training(model, "int8")


@pytest.mark.slow
def test_bad_pruning_is_one_line_exit_2_before_training(train, tmp_path):
    result = train("--config=configs/digits_mlp.py", "--config.compress.prune.sparsity=0.5",
                   "--config.compress.prune.start_step=30", "--config.compress.prune.end_step=20",
                   f"--workdir={tmp_path / 'run'}", check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: config.compress.prune.end_step=20 must come after config.compress.prune.start_step=30"]
    assert not (tmp_path / "run").exists()


STUDENT = ["--config=configs/digits_mlp.py", "--config.model.hidden=(16,)", "--config.train.steps=40",
           "--config.train.steps_per_execution=1",  # a logged loss every 4 steps: 10
           "--config.optimizer.learning_rate=0.01", "--config.train.log_every_steps=4", "--mode=train"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(workdir, SavedModel version) of a trained 256+128-unit digits_mlp teacher, exported."""
    root = tmp_path_factory.mktemp("teacher")
    kerasbig("train", "--config=configs/digits_mlp.py", "--config.train.steps=300", f"--workdir={root / 'run'}",
             f"--export_dir={root / 'models' / 'digits'}")
    return root / "run", root / "models" / "digits" / "1"


@pytest.fixture(scope="module")
def students(teacher, tmp_path_factory):
    """Workdirs of the 16-unit student, same budget: on labels alone, and distilled from the teacher's workdir
    and from its SavedModel."""
    root = tmp_path_factory.mktemp("students")
    for name, source in (("alone", None), ("workdir", teacher[0]), ("saved_model", teacher[1])):
        kerasbig("train", *STUDENT, *([f"--config.compress.teacher={source}"] if source else []),
                 f"--workdir={root / name}")
    return root


def _digits():
    """(data config, task, a digits_mlp student) for in-process teacher checks."""
    config = load_config("digits_mlp").unlock()
    task = data.load_task(config.data)
    return config.data, task, build(task.spec, config.model)


@pytest.mark.slow
def test_distilled_student_against_the_same_student_on_labels_alone(students):
    """A 16-unit digits_mlp student, 40 steps, from a trained 256+128-unit teacher, against the same student and
    budget on labels alone: the distilled one's test loss (cross-entropy on the labels) is lower. (Its accuracy
    at this budget is within noise of the other's: docs/compression.md has the figures.)"""
    loss = {name: json.loads((students / name / "metrics.json").read_text())["loss"] for name in ("alone", "workdir")}
    assert loss["workdir"] < loss["alone"], loss
    names = [k for k in checkpoint_weights(students / "workdir")]  # the teacher is not in the student's checkpoint
    assert names and all(k.startswith("mlp/dense_0/") or k.startswith("mlp/logits/") for k in names), names


@pytest.mark.slow
def test_a_saved_model_teacher_gives_its_workdirs_logits_and_the_same_distillation(teacher, students):
    """Rebuilt from the export's kerasbig.json and variables: the workdir teacher's logits exactly, and a
    student distilled from it trains to the same losses and weights."""
    data_config, task, student = _digits()
    x = task.preprocess(next(iter(task.examples("test").batch(64)))[0])
    from_workdir, from_saved_model = (load_teacher(str(source), data_config, task.spec, student) for source in teacher)
    np.testing.assert_allclose(from_saved_model(x), from_workdir(x), rtol=1e-6, atol=1e-6)
    losses = [_batch_losses(students / name) for name in ("workdir", "saved_model")]
    assert len(losses[0]) == 10 and losses[0] == losses[1]
    assert_same_weights(students / "workdir", students / "saved_model", rtol=0, atol=0)


@pytest.mark.slow
def test_a_quantized_version_as_teacher_is_rebuilt_quantized_and_a_model_folder_gives_its_newest(pruned_run):
    """The pruned run's model folder: its newest version is the int8 one, whose rebuilt teacher gives the
    probabilities that version serves."""
    data_config, task, student = _digits()
    raw = next(iter(task.examples("test").batch(64)))[0]
    teacher = load_teacher(str(pruned_run[1] / "digits"), data_config, task.spec, student)
    assert [layer.quantization_mode for layer in teacher.layers if layer.weights] == ["int8", "int8"]
    served = tf.saved_model.load(str(pruned_run[1] / "digits" / "2")).signatures["serving_default"]
    np.testing.assert_allclose(tf.nn.softmax(teacher(task.preprocess(raw))), served(image=raw)["probabilities"],
                               atol=1e-6)


@pytest.mark.slow
def test_bad_teachers_are_refused_before_training(teacher, tmp_path):
    """Other data; a folder that is neither a workdir nor an export; an export whose variables are not those of
    the model its config builds; a gptq version."""
    data_config, task, student = _digits()
    other = data_config.copy_and_resolve_references()
    other.test_fraction = 0.3
    mismatched, gptq = tmp_path / "mismatched" / "1", tmp_path / "gptq" / "3"
    for copy, change in ((mismatched, lambda r: r["config"]["model"].update(hidden=[64, 128])),
                         (gptq, lambda r: r.update(quantization="gptq", comparison={"float": {"version": 1}}))):
        shutil.copytree(teacher[1], copy)
        record = json.loads((copy / "assets.extra" / "kerasbig.json").read_text())
        change(record)
        (copy / "assets.extra" / "kerasbig.json").write_text(json.dumps(record))
    for data_config_, source, message in [
            (other, teacher[0], "was trained on other data (data.test_fraction: "),
            (other, teacher[1], "was trained on other data (data.test_fraction: "),
            (data_config, teacher[0] / "checkpoints", "is neither a trained kerasbig workdir"),
            (data_config, mismatched, "its variables do not match the model its config builds (mlp/dense_0/kernel: "
                                      "saved (64, 256) float32, rebuilt (64, 64) float32)"),
            (data_config, gptq.parent, f"is quantized with gptq, which cannot be rebuilt without calibrating again; "
                                       f"distil from the float version {gptq.parent / '1'}")]:
        with pytest.raises(UsageError, match=re.escape(message)):
            load_teacher(str(source), data_config_, task.spec, student)
