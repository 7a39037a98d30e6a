"""Strategies through the real command line: one device, two logical-CPU replicas and two real worker processes
on localhost agree; only the chief writes; clipping is global; a lost worker stops the other; TPU errors are clear."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, assert_same_weights, checkpoint_weights, free_port

pytestmark = pytest.mark.slow
MLP = ["--config=configs/digits_mlp.py", "--config.model.hidden=(16,)", "--config.model.dropout=0.0",
       "--deterministic"]
MIRRORED = ["--strategy=mirrored", "--num_cpu_replicas=2"]




def start_workers(*args: str, folders: list[pathlib.Path]) -> list[subprocess.Popen]:
    """Starts one `kerasbig.train --strategy=multi_worker` process per folder, worker 0 (the chief) first.
    Each gets its own --workdir, --export_dir and TMPDIR in its folder, so what each one writes can be told
    apart (real clusters give every worker the same --workdir on a shared filesystem); output goes to
    folder/out.txt."""
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in folders]}
    processes = []
    for index, folder in enumerate(folders):
        (folder / "tmp").mkdir(parents=True)
        env = {**os.environ, "TMPDIR": str(folder / "tmp"),
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        with open(folder / "out.txt", "w") as out:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "kerasbig.train", "--strategy=multi_worker", *args,
                 f"--workdir={folder / 'run'}", f"--export_dir={folder / 'saved_models' / 'digits'}"],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    return processes


def wait_all(processes: list[subprocess.Popen], folders: list[pathlib.Path], timeout: float = 300) -> None:
    try:
        returncodes = [process.wait(timeout) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for returncode, folder in zip(returncodes, folders):
        assert returncode == 0, (folder / "out.txt").read_text()[-3000:]


def test_one_device_mirrored_and_multi_worker_agree(train, tmp_path):
    """Same seed, global batch and data: one replica, two Mirrored replicas and two worker processes end with
    the same test loss (1e-4 relative) and weights, which also shows that both workers started from the same
    weights. In the multi-worker run only the chief writes anything."""
    args = [*MLP, "--config.train.steps=200", "--config.train.eval_every_epochs=100"]  # validate at the end only
    train(*args, "--mode=train", f"--workdir={tmp_path / 'one'}", "--strategy=one_device")
    train(*args, "--mode=train", f"--workdir={tmp_path / 'mirrored'}", *MIRRORED)
    chief, worker = tmp_path / "chief", tmp_path / "worker"
    wait_all(start_workers(*args, folders=[chief, worker]), [chief, worker])

    losses = {name: json.loads((folder / "metrics.json").read_text())["loss"]
              for name, folder in [("one", tmp_path / "one"), ("mirrored", tmp_path / "mirrored"),
                                   ("multi_worker", chief / "run")]}
    assert losses["mirrored"] == pytest.approx(losses["one"], rel=1e-4)
    assert losses["multi_worker"] == pytest.approx(losses["one"], rel=1e-4)
    for folder in (tmp_path / "mirrored", chief / "run"):
        assert_same_weights(tmp_path / "one", folder, rtol=1e-4, atol=1e-5)

    run = chief / "run"
    assert {"config.json", "metrics.json", "checkpoints", "train", "validation"} <= {p.name for p in run.iterdir()}
    assert (chief / "saved_models" / "digits" / "1" / "saved_model.pb").is_file()
    assert "Test: accuracy" in (worker / "out.txt").read_text()  # it took part in the final evaluation
    assert not (worker / "run").exists() and not (worker / "saved_models").exists()
    assert not list((worker / "tmp").glob(".tmp-*"))  # its throw-away checkpoint copies are gone


def test_clipping_sees_the_global_gradient(train, tmp_path):
    """Clipping to a global norm small enough to bind gives the same weights on one and on two replicas
    (clipping each replica's part of the gradient, as Keras does, would not)."""
    args = [*MLP, "--mode=train", "--config.train.steps=10", "--config.optimizer.name=sgd",
            "--config.optimizer.momentum=0.0", "--config.optimizer.learning_rate=0.5",
            "--config.schedule.decay=constant"]
    clip = "--config.optimizer.clip_norm=0.01"
    train(*args, clip, f"--workdir={tmp_path / 'one'}", "--strategy=one_device")
    train(*args, clip, f"--workdir={tmp_path / 'two'}", *MIRRORED)
    train(*args, f"--workdir={tmp_path / 'unclipped'}", "--strategy=one_device")
    assert_same_weights(tmp_path / "one", tmp_path / "two", rtol=1e-5, atol=1e-7)
    one, unclipped = checkpoint_weights(tmp_path / "one"), checkpoint_weights(tmp_path / "unclipped")
    assert one.keys() == unclipped.keys()
    assert not all(np.allclose(one[path], unclipped[path], atol=1e-4) for path in one), "clipping did not bind"


def test_batch_must_split_evenly_over_replicas(train, tmp_path):
    result = train(*MLP, *MIRRORED, "--config.data.batch_size=63", f"--workdir={tmp_path}", check=False)
    assert result.returncode == 2
    assert "batch_size=63 is not divisible by the 2 replicas" in result.stderr.strip().splitlines()[-1]


def test_lost_worker_stops_the_other_with_a_clear_error(tmp_path):
    """SIGKILL the non-chief mid-training: the chief exits 1 with a one-line reason within the heartbeat
    timeout (10 s) plus slack for a loaded machine, keeping its last checkpoint."""
    chief, worker = tmp_path / "chief", tmp_path / "worker"
    processes = start_workers(*MLP, "--mode=train", "--config.train.steps=100000", "--config.data.batch_size=8",
                              "--config.train.checkpoint_every_steps=20", folders=[chief, worker])
    try:
        deadline = time.time() + 300
        while not list((chief / "run" / "checkpoints").glob("step-*")):
            assert processes[0].poll() is None and time.time() < deadline, (chief / "out.txt").read_text()[-3000:]
            time.sleep(0.1)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.time()
        returncode = processes[0].wait(timeout=120)
        stopped_after = time.time() - killed
    finally:
        for process in processes:
            process.kill()
            process.wait()
    errors = [line for line in (chief / "out.txt").read_text().splitlines() if line.startswith("error: ")]
    assert returncode == 1 and len(errors) == 1
    assert errors[0].startswith("error: lost contact with another worker while training at step")
    assert stopped_after < 60
    assert list((chief / "run" / "checkpoints").glob("step-*"))


def test_unreachable_tpu_fails_fast(train, tmp_path):
    """TensorFlow would wait forever for a TPU worker that is not there; kerasbig says so within seconds."""
    started = time.time()
    result = train(*MLP, "--strategy=tpu", "--tpu=grpc://127.0.0.1:1", f"--workdir={tmp_path}", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot reach TPU grpc://127.0.0.1:1")
    assert time.time() - started < 120
