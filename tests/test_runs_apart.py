"""Runs never corrupt each other: a workdir has one writer, a resume keeps its config, exports take turns and
models.config is never seen half written, and what a killed run left behind is cleaned up."""
import os
import signal
import subprocess
import sys
import time

import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from conftest import REPO, latest_checkpoint

pytestmark = pytest.mark.slow
MLP = ["--config=configs/digits_mlp.py", "--config.model.hidden=(8,)", "--mode=train"]


def test_a_second_run_on_a_busy_workdir_stops_at_once_naming_the_first(train, tmp_path):
    workdir = tmp_path / "run"
    with open(tmp_path / "first.txt", "w") as out:
        first = subprocess.Popen([sys.executable, "-m", "kerasbig.train", *MLP, "--config.train.steps=100000",
                                  f"--workdir={workdir}"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not (workdir / "checkpoints").exists():  # the first run is training, holding the lock
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.txt").read_text()[-2000:]
            time.sleep(0.2)
        second = train(*MLP, "--config.train.steps=5", f"--workdir={workdir}", check=False)
    finally:
        first.kill()
        first.wait()
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 1 and len(lines) == 1
    assert lines[0].startswith(f"error: --workdir={workdir} is in use by run {first.pid} on ")


def test_a_resume_with_another_config_is_refused_and_changes_nothing(train, tmp_path):
    workdir = tmp_path / "run"
    train(*MLP, "--config.train.steps=6", f"--workdir={workdir}")
    saved_config = (workdir / "config.json").read_text()
    newest = latest_checkpoint(workdir)
    refused = train(*MLP, "--config.train.steps=12", "--config.optimizer.learning_rate=0.1", "--seed=4",
                    f"--workdir={workdir}", check=False)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1
    assert "holds checkpoints of another run (optimizer.learning_rate: 0.002 -> 0.1; seed: 0 -> 4)" in lines[0]
    assert (workdir / "config.json").read_text() == saved_config and latest_checkpoint(workdir) == newest
    longer = train(*MLP, "--config.train.steps=12", "--config.train.log_every_steps=2", f"--workdir={workdir}")
    assert "Resuming from step 6" in longer.stdout and latest_checkpoint(workdir).name == "step-00000012"


def test_models_config_is_never_seen_half_written(tmp_path):
    """Three writers rewrite models.config 150 times each while a reader parses it 600 times: every read finds
    both models."""
    for name in ("a", "b"):
        (tmp_path / name / "1").mkdir(parents=True)
    writer = ("import sys, pathlib\nfrom kerasbig.export import write_models_config\n"
              "for _ in range(150): write_models_config(pathlib.Path(sys.argv[1]))")
    writers = [subprocess.Popen([sys.executable, "-c", writer, str(tmp_path)], cwd=REPO) for _ in range(3)]
    path, reads, partial = tmp_path / "models.config", 0, 0
    try:
        while reads < 600 or any(w.poll() is None for w in writers):
            if path.exists():
                config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
                partial += sorted(c.name for c in config.model_config_list.config) != ["a", "b"]
                reads += 1
            assert reads < 10**6
    finally:
        codes = [w.wait(timeout=300) for w in writers]
    assert codes == [0, 0, 0] and reads >= 600 and partial == 0
    assert not list(tmp_path.glob(".models.config.*.tmp"))


def test_temporaries_of_killed_saves_and_exports_are_removed(train, tmp_path):
    workdir, models = tmp_path / "run", tmp_path / "models" / "digits"
    (workdir / "checkpoints" / ".tmp-killed").mkdir(parents=True)
    (models / ".tmp-3-killed").mkdir(parents=True)
    (models / ".tmp-3-killed" / "saved_model.pb").write_text("half an export")
    train("--config=configs/digits_mlp.py", "--config.model.hidden=(8,)", "--config.train.steps=3",
          f"--workdir={workdir}", f"--export_dir={models}")
    assert not list((workdir / "checkpoints").glob(".tmp-*")) and not list(models.glob(".tmp-*"))
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == ["1"]


def test_the_export_check_dies_with_the_export(tmp_path):
    """The fresh-process check of an export is killed with the process that started it, even by SIGKILL. Its
    samples file here is a FIFO nobody writes, so the check would otherwise wait forever."""
    fifo = tmp_path / "samples.npz"
    os.mkfifo(fifo)
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-m', 'kerasbig.export', {str(tmp_path)!r}, {str(fifo)!r}, "
        "str(os.getpid())])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child, writer = int(parent.stdout.readline()), None
    try:
        deadline = time.time() + 300
        while writer is None:  # opening the FIFO's write end succeeds once the check is reading its samples
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                assert _alive(child) and time.time() < deadline, "the check never started reading"
                time.sleep(0.2)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 30
        while _alive(child):
            assert time.time() < deadline, "the check outlived the export"
            time.sleep(0.2)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
        if writer is not None:
            os.close(writer)
    stranger = subprocess.run([sys.executable, "-m", "kerasbig.export", str(tmp_path), "missing.npz", "1"],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert stranger.returncode == 1 and "has ended" in stranger.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
