"""The main job end to end: train -> TensorBoard logs -> metrics -> SavedModel, rerun, resume and export safety."""
import hashlib
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from conftest import REPO, assert_same_weights, kerasbig, latest_checkpoint

pytestmark = pytest.mark.slow
QUICK = ["--config=configs/digits_mlp.py", "--config.train.epochs=2", "--config.model.hidden=(64,)",
         "--config.schedule.warmup_steps=0", "--config.schedule.decay=constant", "--config.optimizer.learning_rate=0.005"]


def tree_digest(folder: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(workdir, export base, output) of QUICK trained once and exported: the first run of both tests below."""
    root = tmp_path_factory.mktemp("quick")
    workdir, models = root / "run", root / "saved_models"
    return workdir, models, kerasbig("train", *QUICK, f"--workdir={workdir}", f"--export_dir={models / 'digits'}")


def test_train_export_serve_and_rerun(train, quick_run):
    workdir, models, first = quick_run
    assert f"Logs: {workdir}" in first.stdout and f"SavedModel: {models / 'digits' / '1'}" in first.stdout

    metrics = json.loads((workdir / "metrics.json").read_text())
    assert {"accuracy", "precision", "recall", "f1", "confusion_matrix"} <= metrics.keys()
    assert metrics["accuracy"] > 0.8 and metrics["examples"] == 360
    assert json.loads((workdir / "config.json").read_text())["model"]["hidden"] == [64]
    for split in ("train", "validation"):
        assert list((workdir / split).glob("events.out.tfevents.*")), split
    assert latest_checkpoint(workdir).name == "step-00000038"

    version = models / "digits" / "1"
    assert (version / "saved_model.pb").is_file() and (version / "variables").is_dir()
    assert (version / "assets.extra" / "tf_serving_warmup_requests").is_file()
    record = json.loads((version / "assets.extra" / "kerasbig.json").read_text())
    assert record["metrics"]["accuracy"] == metrics["accuracy"] and record["versions"]["keras"]
    assert 'name: "digits"' in (models / "models.config").read_text()

    # The signature, as TF Serving sees it, and its predictions on the real test set in a fresh process:
    # serving-side preprocessing must reproduce training-side preprocessing exactly.
    shown = subprocess.run([str(pathlib.Path(sys.executable).parent / "saved_model_cli"), "show", "--all",
                            "--dir", str(version)], capture_output=True, text=True, check=True).stdout
    assert "inputs['image']" in shown and "outputs['probabilities']" in shown and "outputs['classes']" in shown
    script = f"""
import json, numpy as np, tensorflow as tf
from kerasbig.data.digits import load_digits
task = load_digits()
images, labels = zip(*task.test.as_numpy_iterator())
out = tf.saved_model.load({str(version)!r}).signatures["serving_default"](image=tf.constant(np.stack(images)))
print(json.dumps({{"accuracy": float(np.mean(out["classes"].numpy() == np.array(labels))),
                  "dtype": out["probabilities"].dtype.name}}))
"""
    served = json.loads(subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                                       check=True).stdout.strip().splitlines()[-1])
    assert served == {"accuracy": pytest.approx(metrics["accuracy"], abs=1e-9), "dtype": "float32"}

    before = tree_digest(version)
    second = train(*QUICK, f"--workdir={workdir}", f"--export_dir={models / 'digits'}")
    assert "already complete" in second.stdout and "Epoch 1/" not in second.stdout
    assert f"SavedModel: {models / 'digits' / '2'}" in second.stdout
    assert tree_digest(version) == before
    assert "versions: 2" in (models / "models.config").read_text()


def test_eval_and_export_modes_use_the_latest_checkpoint(train, quick_run, tmp_path):
    """Eval on a workdir without a checkpoint fails; on a copy of the trained run's workdir it rewrites the
    run's own test metrics, and export mode writes a SavedModel from it."""
    workdir, models = tmp_path / "run", tmp_path / "saved_models"
    missing = train(*QUICK, f"--workdir={workdir}", "--mode=eval", check=False)
    assert missing.returncode == 1 and "no checkpoint" in missing.stderr
    shutil.copytree(quick_run[0], workdir, dirs_exist_ok=True)
    trained = json.loads((workdir / "metrics.json").read_text())
    (workdir / "metrics.json").unlink()
    evaluated = train(*QUICK, f"--workdir={workdir}", "--mode=eval")
    assert "Test: accuracy" in evaluated.stdout
    assert json.loads((workdir / "metrics.json").read_text())["accuracy"] == trained["accuracy"]
    train(*QUICK, f"--workdir={workdir}", "--mode=export", f"--export_dir={models / 'm'}")
    assert (models / "m" / "1" / "saved_model.pb").is_file()


def test_killed_run_resumes_to_the_same_weights(train, tmp_path):
    """SIGKILL mid-epoch, rerun: the final weights equal an uninterrupted run's (model, optimizer, dropout RNG,
    augmentation and data position all resume exactly)."""
    args = ["--config=configs/digits_cnn.py", "--config.model.filters=(8,)", "--config.model.dense=32",
            "--config.train.epochs=3", "--config.train.checkpoint_every_steps=5", "--config.train.steps_per_execution=1",
            "--deterministic", "--mode=train"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*args, f"--workdir={straight}")

    process = subprocess.Popen([sys.executable, "-m", "kerasbig.train", *args, f"--workdir={resumed}"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (resumed / "checkpoints" / "step-00000025").exists():  # epoch 2 of 3, mid-epoch
        assert process.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = latest_checkpoint(resumed).name
    assert killed_at != "step-00000057"

    rerun = train(*args, f"--workdir={resumed}")
    assert f"Resuming from step {int(killed_at[5:])}" in rerun.stdout
    assert_same_weights(straight, resumed, rtol=1e-6, atol=1e-6)


def test_export_keeps_the_optimizer_out_of_the_saved_model_and_on_the_model(tmp_path, monkeypatch):
    """Export detaches the optimizer while it writes (so its state stays out of the SavedModel) and puts it back
    whether the export succeeds or is interrupted; an interrupted export leaves no version."""
    from kerasbig import export, models
    from kerasbig.config import base
    from kerasbig.data.digits import load_digits
    from kerasbig.errors import RunError
    from kerasbig.train import make_optimizer

    task = load_digits()
    config = base()
    config.model = dict(name="mlp", hidden=(8,))
    model = models.build(task.spec, config.model)
    optimizer = make_optimizer(config, model=model)
    optimizer.build(model.trainable_variables)
    model.optimizer = optimizer

    version = export.export(model, task, base=tmp_path, name="digits", record={})
    assert model.optimizer is optimizer
    saved = tf.train.load_checkpoint(str(version / "variables" / "variables"))
    assert not [key for key in saved.get_variable_to_shape_map() if "optimizer" in key or "momentum" in key]

    def fail(*_):
        raise RunError("interrupted")
    monkeypatch.setattr(export, "_verify_in_fresh_process", fail)
    with pytest.raises(RunError):
        export.export(model, task, base=tmp_path, name="digits", record={})
    assert sorted(p.name for p in (tmp_path / "digits").iterdir() if p.name != ".lock") == ["1"]  # no temporary
    assert model.optimizer is optimizer


def test_finished_run_trains_on_when_given_more_steps(train, tmp_path):
    workdir = tmp_path / "run"
    args = ["--config=configs/digits_mlp.py", "--config.model.hidden=(16,)", f"--workdir={workdir}", "--mode=train"]
    train(*args, "--config.train.steps=10")
    same = train(*args, "--config.train.steps=10")
    assert "already complete (step 10)" in same.stdout
    more = train(*args, "--config.train.steps=25")
    assert "Resuming from step 10" in more.stdout
    assert latest_checkpoint(workdir).name == "step-00000025"


def test_gradient_accumulation_matches_the_full_batch(train, tmp_path):
    """Micro-batches summed into one optimizer step give the full batch's update (MLP without dropout)."""
    args = ["--config=configs/digits_mlp.py", "--config.model.hidden=(32,)", "--config.model.dropout=0.0",
            "--config.train.steps=20", "--deterministic", "--mode=train"]
    train(*args, f"--workdir={tmp_path / 'full'}")
    train(*args, "--config.optimizer.accumulation_steps=4", f"--workdir={tmp_path / 'micro'}")
    assert_same_weights(tmp_path / "full", tmp_path / "micro", rtol=1e-4, atol=1e-6)


def test_a_gpt_whose_data_is_shorter_than_its_cadences_evaluates_and_checkpoints_on_them(train, tmp_path):
    """3 steps of data per epoch (499 windows of 32 tokens, batch 128), evaluation every 5 steps, checkpoints
    every 3 and 10 steps per execution: validation and checkpoints follow the step cadences, not the epochs."""
    workdir = tmp_path / "gpt"
    result = train("--config=configs/gpt_small.py", "--config.model.width=16", "--config.model.depth=1",
                   "--config.model.heads=2", "--config.data.max_tokens=20000", "--config.data.seq_len=32",
                   "--config.data.batch_size=128", "--config.data.eval_batch_size=32", "--config.train.steps=10",
                   "--config.train.eval_every_steps=5", "--config.train.checkpoint_every_steps=3",
                   "--config.train.keep_checkpoints=10", "--config.train.jit_compile=False", "--mode=train",
                   f"--workdir={workdir}")
    assert "Epoch 2/2" in result.stdout and "Epoch 3/" not in result.stdout
    assert [p.name for p in sorted((workdir / "checkpoints").glob("step-*"))] == [
        f"step-{step:08d}" for step in (3, 5, 6, 9, 10)]
    validated = sorted(event.step for path in (workdir / "validation").glob("events.*")
                       for event in tf.compat.v1.train.summary_iterator(str(path))
                       if any(value.tag == "epoch_loss" for value in event.summary.value))
    assert validated == [5, 10]
