"""Training that survives being stopped, through the real command line: a corrupt checkpoint, SIGTERM, SIGKILL
between epochs and a diverging loss. (SIGKILL mid-epoch resuming to the same weights: test_train.py.)"""
import json
import math
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, assert_same_weights, checkpoint_arrays
from kerasbig.errors import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow
MLP = ["--config=configs/digits_mlp.py", "--config.model.hidden=(16,)", "--mode=train"]


def checkpoints(workdir: pathlib.Path) -> list[pathlib.Path]:
    return sorted((workdir / "checkpoints").glob("step-*"))


def start(*args: str, workdir: pathlib.Path, output: pathlib.Path) -> subprocess.Popen:
    """Starts training in the background, its stdout and stderr going to `output` (a pipe could fill up)."""
    with open(output, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "kerasbig.train", *args, f"--workdir={workdir}"], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "training ended first"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(train, tmp_path):
    args = [*MLP, "--config.train.steps=40", "--config.train.checkpoint_every_steps=10",
            "--config.train.keep_checkpoints=2", "--deterministic"]
    train(*args, f"--workdir={tmp_path}")
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000038", "step-00000040"]  # the last 2 of 6
    complete = json.loads((checkpoints(tmp_path)[-1] / "state.json").read_text())
    weights = checkpoints(tmp_path)[-1] / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])

    rerun = train(*args, f"--workdir={tmp_path}")
    assert "step-00000040 is unreadable" in rerun.stderr and "falling back to the previous one" in rerun.stderr
    assert "Resuming from step 38" in rerun.stdout
    assert json.loads((checkpoints(tmp_path)[-1] / "state.json").read_text()) == complete
    assert checkpoint_arrays(checkpoints(tmp_path)[-1])  # rewritten whole


def learning_rates(log_files: list[pathlib.Path]) -> dict[int, float]:
    """The `learning_rate` scalars in TensorBoard event files, by global step."""
    rates = {}
    for path in log_files:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "learning_rate":
                    rates[event.step] = float(tf.make_ndarray(value.tensor))
    return rates


def closed_form_rate(step: int, *, peak: float, warmup: int, total: int) -> float:
    """Linear warmup to `peak`, then cosine to 0 at `total`: the schedule written out by hand."""
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))


def preempt(process: subprocess.Popen, output: pathlib.Path, started: callable) -> tuple[int, str]:
    """SIGTERM once training has started; returns the step it says it saved and its output."""
    wait_for(started, process)
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    output = output.read_text()
    assert process.returncode == PREEMPTED_EXIT_CODE == 75, output[-3000:]
    saved = re.search(r"Preempted: saved step (\d+) to (\S+); rerun the same command to resume\.", output)
    assert saved, output[-3000:]
    return int(saved.group(1)), output


@pytest.mark.parametrize("steps_per_execution", [1, 8])
def test_sigterm_saves_and_the_schedule_continues_exactly(tmp_path, steps_per_execution):
    """SIGTERM saves and exits 75 ("preempted, rerun to resume") saying how; the rerun resumes from that step,
    and every learning rate logged before and after equals the closed-form schedule at its global step."""
    total, warmup, peak = 20_000, 50, 0.01
    args = [*MLP, "--config.data.batch_size=8", f"--config.train.steps={total}",
            f"--config.schedule.warmup_steps={warmup}", f"--config.optimizer.learning_rate={peak}",
            "--config.train.log_every_steps=1", f"--config.train.steps_per_execution={steps_per_execution}"]
    logs, output = tmp_path / "train", tmp_path / "output.txt"
    first_step, _ = preempt(start(*args, workdir=tmp_path, output=output), output, logs.exists)
    assert first_step > 0 and checkpoints(tmp_path)[-1].name == f"step-{first_step:08d}"
    first_files = sorted(logs.glob("events.*"))

    rerun = start(*args, workdir=tmp_path, output=output)
    second_step, text = preempt(rerun, output, lambda: len(list(logs.glob("events.*"))) > len(first_files))
    assert f"Resuming from step {first_step} " in text and second_step > first_step

    before = learning_rates(first_files)
    after = learning_rates(sorted(set(logs.glob("events.*")) - set(first_files)))
    assert before and after and max(before) <= first_step < min(after)
    for step, rate in {**before, **after}.items():
        assert rate == pytest.approx(closed_form_rate(step, peak=peak, warmup=warmup, total=total), rel=1e-5, abs=1e-9)


def early_stopping_state(workdir: pathlib.Path) -> dict:
    state = json.loads((checkpoints(workdir)[-1] / "state.json").read_text())
    return {"step": state["step"], "complete": state["complete"], **state["callbacks"]["EarlyStopping"]}


def test_early_stopping_stops_at_the_same_epoch_after_an_interruption(train, tmp_path):
    """No epoch improves on the first by min_delta=100, so patience 2 stops after the third epoch and restores
    the first epoch's weights. A run killed after its second epoch must keep counting (and its best weights)
    from the checkpoint; starting over would stop two epochs later."""
    args = [*MLP, "--config.data.batch_size=4", "--config.train.epochs=20", "--deterministic",
            "--config.train.early_stopping.enabled=true", "--config.train.early_stopping.min_delta=100.0",
            "--config.train.early_stopping.patience=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*args, f"--workdir={straight}")
    expected = early_stopping_state(straight)
    steps_per_epoch = 1257 // 4
    assert expected.items() >= {"step": 3 * steps_per_epoch, "complete": True, "wait": 2, "best_epoch": 0,
                                "stopped_epoch": 2}.items()

    process = start(*args, workdir=resumed, output=tmp_path / "killed.txt")
    wait_for((resumed / "checkpoints" / f"step-{2 * steps_per_epoch:08d}").exists, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not early_stopping_state(resumed)["complete"], "the run ended before it could be killed"

    rerun = train(*args, f"--workdir={resumed}")
    assert "Resuming from step" in rerun.stdout and "Epoch 3: early stopping" in rerun.stdout
    assert early_stopping_state(resumed) == expected
    assert_same_weights(straight, resumed, rtol=1e-6, atol=1e-6)


def test_nonfinite_loss_exits_1_and_keeps_the_last_good_checkpoint(train, tmp_path):
    """A rate of 1e37 after warmup overflows the weights within a few steps; checkpoints every step."""
    result = train(*MLP, "--config.optimizer.learning_rate=1e37", "--config.schedule.warmup_steps=20",
                   "--config.train.checkpoint_every_steps=1", "--config.train.keep_checkpoints=100",
                   f"--workdir={tmp_path}", check=False)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    bad_step = int(re.search(r"the training loss became nan by step (\d+);.*last good checkpoint", message).group(1))
    saved = checkpoints(tmp_path)
    assert saved and int(saved[-1].name[5:]) < bad_step
    for checkpoint in saved:
        for key, value in checkpoint_arrays(checkpoint).items():
            if np.issubdtype(value.dtype, np.floating):
                assert np.isfinite(value).all(), (checkpoint.name, key)
