"""The JAX backend: `python -m kerasbig.train --backend=jax` with keras.distribution layouts over 8 virtual CPU
devices, exact resume after SIGKILL under model parallel, and a JAX checkpoint exported under TensorFlow.

Every JAX process runs apart (a subprocess with XLA_FLAGS making 8 CPU devices), since this pytest process
runs TensorFlow's Keras."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import REPO, kerasbig

JAX = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
TINY_GPT = ("--config=configs/gpt_small.py", "--config.model.width=32", "--config.model.depth=2",
            "--config.model.heads=4", "--config.data.seq_len=32", "--config.data.batch_size=16",
            "--config.data.max_tokens=20000", "--config.optimizer.accumulation_steps=2",
            "--config.optimizer.learning_rate=0.01", "--config.schedule.warmup_steps=2")
SHORT = ("--config.train.steps=6", "--config.train.eval_every_steps=3", "--config.train.steps_per_execution=2")


def weights(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    """The newest checkpoint's arrays (model and optimizer) of a JAX run, by key."""
    latest = sorted((workdir / "checkpoints").glob("step-*"))[-1]
    with np.load(latest / "weights.npz") as stored:
        return {key: stored[key] for key in stored.files}


def assert_same_run(got: pathlib.Path, expected: pathlib.Path, rtol: float) -> None:
    a, b = weights(got), weights(expected)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=1e-6, err_msg=key)
    loss = lambda workdir: json.loads((workdir / "metrics.json").read_text())["loss"]
    assert loss(got) == pytest.approx(loss(expected), rel=rtol)


def total_gib(dry_run_output: str) -> float:
    """The memory total a dry run prints, in GiB."""
    line = next(line for line in dry_run_output.splitlines() if line.strip().startswith("total"))
    value, unit = line.split()[-2:]
    return float(value.replace(",", "")) * {"GiB": 1, "TiB": 1024}[unit]


@pytest.mark.parametrize("devices, fits", [(8, True), (1, False)])
def test_dry_run_plans_per_device_memory_of_the_sharded_layout(train, devices, fits):
    """gpt_7b (bf16, one example per micro-batch) fits in 80 GB per device sharded 8 ways, not on one device."""
    result = train("--config=configs/gpt_7b.py", "--mode=dry_run", "--strategy=model_parallel",
                   f"--num_devices={devices}", "--mixed_precision=mixed_bfloat16",
                   "--config.optimizer.accumulation_steps=512")
    assert ("memory / device" in result.stdout) == (devices > 1)
    assert (total_gib(result.stdout) * 2**30 < 80e9) == fits, result.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(strategy)`: the workdir of the same short training under that JAX strategy, trained once."""
    root, done = tmp_path_factory.mktemp("jax"), {}

    def run(strategy: str) -> pathlib.Path:
        if strategy not in done:
            kerasbig("train", *TINY_GPT, *SHORT, "--mode=train", f"--strategy={strategy}",
                     f"--workdir={root / strategy}", env=JAX)
            done[strategy] = root / strategy
        return done[strategy]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["data_parallel", "model_parallel"])
def test_layouts_train_as_one_device_does(runs, strategy):
    """Same global batches, same updates: weights, optimizer slots and test loss agree with one device."""
    assert_same_run(runs(strategy), runs("one_device"), rtol=1e-4)


@pytest.mark.slow
def test_model_parallel_shards_every_large_kernel_over_the_devices():
    """Under ModelParallel each of the 8 devices holds 1/8 of every kernel the GPT layout names (and of its
    optimizer slots), the rest is replicated, and sizing's count of sharded parameters is the real one."""
    script = textwrap.dedent("""
        import math, ml_collections, keras, numpy as np
        from kerasbig import jax_steps, models
        from kerasbig.data.spec import DataSpec
        from kerasbig.models import sizing
        from kerasbig.train import make_optimizer
        from kerasbig import config as config_lib
        spec = DataSpec("language_model", "tokens", (32,), "int32", 64)
        model_config = ml_collections.ConfigDict(dict(name="gpt", width=32, depth=2, heads=4))
        distribution = jax_steps.make_distribution("model_parallel", model_config)
        keras.distribution.set_distribution(distribution)
        model = models.build(spec, model_config)
        optimizer = make_optimizer(config_lib.base(), model=model)
        optimizer.build(model.trainable_variables)
        sharded, weight_ids = 0, {id(v) for v in model.weights}
        for v in model.weights + optimizer.variables:
            shard = v.value.addressable_shards[0].data
            assert len(v.value.addressable_shards) == 8, v.path
            if shard.size != v.value.size:
                assert shard.size * 8 == v.value.size, (v.path, shard.shape, v.shape)
                sharded += v.value.size if id(v) in weight_ids else 0
        names = [v.path for v in model.weights if v.value.addressable_shards[0].data.size * 8 == v.value.size]
        print(sorted(names))
        plan = sizing._gpt(spec, width=32, depth=2, heads=4, mlp_ratio=4, dropout=0.0, bias=True, vocab_size=0,
                           context=0, activation="gelu")
        assert sharded == plan.sharded, (sharded, plan.sharded)
        slots = [v.path for v in optimizer.variables if v.value.addressable_shards[0].data.size * 8 == v.value.size]
        assert len(slots) == 2 * len(names), slots
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, **JAX})
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = eval(result.stdout.strip().splitlines()[-1])
    for kernel in ("token_embedding/embeddings", "position_embedding/embeddings", "block_0/attn/qkv/kernel",
                   "block_0/attn/out/kernel", "block_1/mlp_fc/kernel", "block_1/mlp_proj/kernel"):
        assert kernel in sharded


@pytest.mark.slow
def test_sigkill_and_rerun_resumes_exactly_under_model_parallel(tmp_path):
    """A model-parallel run killed after a mid-run checkpoint and rerun ends on the weights of a run that was
    never interrupted."""
    args = (*TINY_GPT, "--config.train.steps=40", "--config.train.eval_every_steps=20",
            "--config.train.checkpoint_every_steps=4", "--config.train.steps_per_execution=1",
            "--mode=train", "--strategy=model_parallel")
    kerasbig("train", *args, f"--workdir={tmp_path / 'whole'}", env=JAX)
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "kerasbig.train", *args, f"--workdir={killed}"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **JAX})
    deadline = time.monotonic() + 300
    while not list((killed / "checkpoints").glob("step-*/state.json")):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    saved = sorted(p.parent.name for p in (killed / "checkpoints").glob("step-*/state.json"))
    assert saved and saved[-1] < "step-00000040", saved  # killed mid-run
    resumed = kerasbig("train", *args, f"--workdir={killed}", env=JAX)
    assert "Resuming from step" in resumed.stdout
    assert_same_run(killed, tmp_path / "whole", rtol=1e-6)


@pytest.mark.slow
def test_a_jax_checkpoint_exports_under_tensorflow_to_the_same_predictions(runs, tmp_path):
    """`--mode=export` on TensorFlow reads the JAX run's weights.npz; the SavedModel, loaded in a fresh process,
    predicts the logits the JAX model computes from the same checkpoint."""
    workdir = runs("one_device")
    kerasbig("train", *TINY_GPT, *SHORT, "--backend=tensorflow", "--mode=export", f"--workdir={workdir}",
             f"--export_dir={tmp_path / 'gpt'}")
    version = next(p for p in (tmp_path / "gpt").iterdir() if p.name.isdigit())
    tokens = np.random.default_rng(0).integers(0, 64, size=(2, 32)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    served = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        signature = tf.saved_model.load("{version}").signatures["serving_default"]
        np.save("{tmp_path / 'served.npy'}", signature(tokens=tf.constant(np.load("{tmp_path / 'tokens.npy'}")))["logits"].numpy())
    """)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    computed = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json, ml_collections, numpy as np
        from kerasbig import checkpoint, data, models
        config = ml_collections.ConfigDict(json.load(open("{workdir / 'config.json'}")))
        model = models.build(data.load_plan(config.data).spec, config.model)
        checkpoint.load_model_weights("{workdir / 'checkpoints'}", model)
        np.save("{tmp_path / 'jax.npy'}", np.asarray(model(np.load("{tmp_path / 'tokens.npy'}"))[:, -1]))
    """)], cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **JAX})
    assert computed.returncode == 0, computed.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "served.npy"), np.load(tmp_path / "jax.npy"), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gpu_suite_runs_kerasbigs_jax_loop_beside_the_anchor_at_a_tiny_shape():
    """`bench --suite=gpu` trains through kerasbig's JAX loop and reports tokens/s and MFU; the PyTorch anchor
    gets its own row (here without torch: saying why it did not run)."""
    tiny = {"L": "1", "H": "2", "D": "32", "T": "32", "STEPS": "8", "PEAK_TFLOPS": "1"}
    result = kerasbig("bench", "--suite=gpu", "--cases=4", env={**JAX, **tiny})
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    cells = {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows[1:]}
    batch, tokens_per_second, mfu, _ = cells["kerasbig, JAX loop"]
    assert batch == "4" and float(tokens_per_second.replace(",", "")) > 0 and float(mfu) > 0
    assert any(name.startswith("PyTorch") for name in cells)
