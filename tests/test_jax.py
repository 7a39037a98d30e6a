"""The JAX backend: `python -m kerasbig.train --backend=jax` with keras.distribution layouts over 8 virtual CPU
devices, where TensorFlow cannot be imported as well as where it can, exact resume after SIGKILL under model
parallel, and a JAX checkpoint exported under TensorFlow.

Every JAX process runs apart (a subprocess with XLA_FLAGS making 8 CPU devices), since this pytest process
runs TensorFlow's Keras. The trainings are shared: the one-device run is the TF-free one, and every other
layout is compared with it."""
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

from conftest import REPO, checkpoint_arrays, kerasbig
from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator

JAX = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
# JAX where `import tensorflow` fails, as on a GPU machine without TensorFlow.
WITHOUT_TF = {**JAX, "PYTHONPATH": str(REPO / "tests" / "no_tensorflow")}
TINY_GPT = ("--config=configs/gpt_small.py", "--config.model.width=32", "--config.model.depth=2",
            "--config.model.heads=4", "--config.data.seq_len=32", "--config.data.batch_size=16",
            "--config.data.max_tokens=20000", "--config.optimizer.accumulation_steps=2",
            "--config.optimizer.learning_rate=0.01", "--config.schedule.warmup_steps=2")
# Checkpoints every other step, so that the SIGKILL test can stop this run mid-epoch.
LAYOUTS = {"one_device": ("--strategy=one_device",), "data_parallel": ("--strategy=data_parallel",),
           "model_parallel": ("--strategy=model_parallel",),
           "2x4": ("--strategy=model_parallel", "--model_shards=4")}  # 2 replicas, each split 4 ways
SHORT = ("--config.train.steps=8", "--config.train.eval_every_steps=4", "--config.train.checkpoint_every_steps=2",
         "--config.train.steps_per_execution=1")


def assert_same_run(got: pathlib.Path, expected: pathlib.Path, rtol: float) -> None:
    a, b = checkpoint_arrays(got), checkpoint_arrays(expected)
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
    """`runs(strategy)`: the workdir of the same short training under that JAX strategy, trained once; the
    one-device run is trained with TensorFlow unimportable."""
    root, done = tmp_path_factory.mktemp("jax"), {}

    def run(strategy: str) -> pathlib.Path:
        if strategy not in done:
            result = kerasbig("train", *TINY_GPT, *SHORT, "--mode=train", *LAYOUTS[strategy],
                              f"--workdir={root / strategy}",
                              env={**(WITHOUT_TF if strategy == "one_device" else JAX), "JAX_LOG_COMPILES": "1"})
            (root / f"{strategy}.stderr").write_text(result.stderr)
            done[strategy] = root / strategy
        return done[strategy]
    return run


def test_the_test_environment_blocks_tensorflow():
    result = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True,
                            env={**os.environ, **WITHOUT_TF})
    assert result.returncode == 1 and "tests/no_tensorflow blocks it" in result.stderr


def test_token_windows_are_the_tf_data_stream(tmp_path):
    """The JAX path's numpy batches are tf.data's, batch for batch, from any step and across epochs (the same
    permutation as tf.random.experimental.index_shuffle), for in-memory text and the token-shard cache."""
    import ml_collections
    from kerasbig.data import corpus, pipeline, text, windows

    def same(ours, theirs):
        ours, theirs = list(ours), list(theirs.as_numpy_iterator())
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)

    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document {i} of the corpus\n" * 60)
    data_config = ml_collections.ConfigDict(dict(seq_len=16, tokenizer="bytes", split_seed=0,
                                                 decode_errors="strict", cache_dir=str(tmp_path / "cache")))
    for task in (text.load_text_lm(seq_len=32, seed=0, max_tokens=20_000),
                 corpus.load(str(tmp_path / "*.txt"), data_config)):
        epoch = task.num_examples["train"] // 16
        stream = dict(global_batch=16, seed=3, start_step=epoch - 2, total_steps=2 * epoch + 1)
        same(windows.train_batches(task.windows, **stream), pipeline.train_batches(task, **stream))
        same(windows.eval_batches(task.windows, "validation", global_batch=16),
             pipeline.eval_batches(task, "validation", global_batch=16))


@pytest.mark.slow
def test_a_run_without_tensorflow_trains_checkpoints_and_writes_tensorboard(runs):
    """The one-device run, TensorFlow unimportable: it trained, checkpointed and evaluated, and its TensorBoard
    events (scalars, text, HParams) read back with TensorBoard's own reader at the run's steps."""
    workdir = runs("one_device")
    assert sorted(p.name for p in (workdir / "checkpoints").glob("step-*"))[-1] == "step-00000008"

    def tensors(run: str) -> dict[str, list[int]]:
        events = EventAccumulator(str(workdir / run), size_guidance={TENSORS: 0})
        events.Reload()
        return {tag: [event.step for event in events.Tensors(tag)] for tag in events.Tags()[TENSORS]}

    train, validation = tensors("train"), tensors("validation")
    assert validation["epoch_loss"] == [4, 8] and train["epoch_loss"] == [4, 8]
    assert train["batch_loss"] and train["learning_rate"] and train["config"] == [0]
    assert "_hparams_/session_start_info" in tensors("")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["data_parallel", "model_parallel", "2x4"])
def test_layouts_train_as_one_device_does(runs, strategy):
    """Same global batches, same updates: weights, optimizer slots and test loss agree with one device."""
    assert_same_run(runs(strategy), runs("one_device"), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", LAYOUTS)
def test_every_layout_compiles_its_train_step_once(runs, strategy):
    """The state the step returns has the layout (and committedness) of the state it took, so the second step
    reuses the first one's program: on one device too, where Keras leaves the variables unsharded."""
    log = (runs(strategy).parent / f"{strategy}.stderr").read_text()
    assert log.count("Compiling jit(_train_step_fn)") == 1, log.count("Compiling jit(_train_step_fn)")


@pytest.mark.slow
def test_model_parallel_shards_every_large_kernel_over_the_devices():
    """Under ModelParallel over the 8 devices, each device holds 1/8 of every kernel the GPT layout names (and of
    its optimizer slots), the rest is replicated, and sizing's count of sharded parameters is the real one; on a
    2x4 mesh (--model_shards=4) each holds 1/4 of them and half of each batch."""
    script = textwrap.dedent("""
        import ml_collections, keras, numpy as np
        from kerasbig import jax_steps, models
        from kerasbig.data.spec import DataSpec
        from kerasbig.models import sizing
        from kerasbig.train import make_optimizer
        from kerasbig import config as config_lib
        spec = DataSpec("language_model", "tokens", (32,), "int32", 64)
        model_config = ml_collections.ConfigDict(dict(name="gpt", width=32, depth=2, heads=4))
        plan = sizing._gpt(spec, width=32, depth=2, heads=4, mlp_ratio=4, dropout=0.0, bias=True, vocab_size=0,
                           context=0, activation="gelu")
        for model_shards, ways in ((0, 8), (4, 4)):
            distribution = jax_steps.make_distribution("model_parallel", model_config, model_shards=model_shards)
            keras.distribution.set_distribution(distribution)
            model = models.build(spec, model_config)
            optimizer = make_optimizer(config_lib.base(), model=model)
            optimizer.build(model.trainable_variables)
            sharded, weight_ids = 0, {id(v) for v in model.weights}
            for v in model.weights + optimizer.variables:
                shard = v.value.addressable_shards[0].data
                assert len(v.value.addressable_shards) == 8, v.path
                if shard.size != v.value.size:
                    assert shard.size * ways == v.value.size, (v.path, shard.shape, v.shape)
                    sharded += v.value.size if id(v) in weight_ids else 0
            names = [v.path for v in model.weights if v.value.addressable_shards[0].data.size * ways == v.value.size]
            assert sharded == plan.sharded, (sharded, plan.sharded)
            slots = [v.path for v in optimizer.variables
                     if v.value.addressable_shards[0].data.size * ways == v.value.size]
            assert len(slots) == 2 * len(names), slots
            batch = keras.distribution.distribute_tensor(np.zeros((16, 32)), distribution.get_data_layout((16, 32)))
            rows = {shard.data.shape[0] for shard in batch.addressable_shards}
            assert rows == {16 // (8 // ways)}, rows
            print(ways, sorted(names))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, **JAX})
    assert result.returncode == 0, result.stderr[-3000:]
    for line in result.stdout.strip().splitlines()[-2:]:
        ways, sharded = line.split(" ", 1)
        for kernel in ("token_embedding/embeddings", "position_embedding/embeddings", "block_0/attn/qkv/kernel",
                       "block_0/attn/out/kernel", "block_1/mlp_fc/kernel", "block_1/mlp_proj/kernel"):
            assert kernel in eval(sharded), (ways, kernel)


@pytest.mark.slow
def test_sigkill_and_rerun_resumes_exactly_under_model_parallel(runs, tmp_path):
    """A model-parallel run without TensorFlow, killed after a mid-epoch checkpoint and rerun, ends on the weights
    and test loss of the same run never interrupted (with TensorFlow importable)."""
    args = (*TINY_GPT, *SHORT, "--mode=train", "--strategy=model_parallel")
    killed = tmp_path / "killed"  # and resumed, without TensorFlow
    process = subprocess.Popen([sys.executable, "-m", "kerasbig.train", *args, f"--workdir={killed}"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, **WITHOUT_TF})
    deadline = time.monotonic() + 300
    while not list((killed / "checkpoints").glob("step-*/state.json")):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    saved = sorted(p.parent.name for p in (killed / "checkpoints").glob("step-*/state.json"))
    assert saved and saved[-1] < "step-00000004", saved  # killed in the first epoch
    resumed = kerasbig("train", *args, f"--workdir={killed}", env=WITHOUT_TF)
    assert "Resuming from step" in resumed.stdout
    assert_same_run(killed, runs("model_parallel"), rtol=1e-6)  # trained whole, with TensorFlow importable


@pytest.mark.slow
def test_a_jax_checkpoint_exports_under_tensorflow_to_the_same_predictions(runs, tmp_path):
    """`--mode=export` on TensorFlow reads the JAX run's checkpoint; the SavedModel, loaded in a fresh process,
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
    """`bench --suite=gpu` trains through kerasbig's JAX loop and reports tokens/s and MFU, with TensorFlow not
    importable (the GPU machines have none); the PyTorch anchor gets its own row (here without torch: saying why it
    did not run)."""
    tiny = {"L": "1", "H": "2", "D": "32", "T": "32", "STEPS": "8", "PEAK_TFLOPS": "1", "LADDER_SHAPES": "1,2,16"}
    result = kerasbig("bench", "--suite=gpu", "--cases=4,largest", env={**WITHOUT_TF, **tiny})
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    cells = {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows[1:]}
    batch, tokens_per_second, mfu, _ = cells["kerasbig, JAX loop"]
    assert batch == "4" and float(tokens_per_second.replace(",", "")) > 0 and float(mfu) > 0
    assert any(name.startswith("PyTorch") for name in cells)
    # The ladder (here one tiny shape): bf16, rematerialized, 8 micro-batches of 1.
    batch, tokens_per_second, mfu, note = cells["largest: 1 x 16 (0.00B)"]
    assert batch == "8" and float(tokens_per_second.replace(",", "")) > 0 and note == "remat, 8 micro-batches"


def test_a_tensorflow_dataset_on_jax_without_tensorflow_is_one_line_naming_the_install(tmp_path):
    result = kerasbig("train", "--config=configs/digits_mlp.py", "--mode=train", f"--workdir={tmp_path}",
                      env=WITHOUT_TF, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "config.data.name='digits' needs TensorFlow" in result.stderr and "pip install tensorflow" in result.stderr


@pytest.mark.slow
def test_early_stopping_stops_a_jax_run_at_the_expected_evaluation(tmp_path):
    """No validation loss can improve by 100 nats: the first evaluation sets the best, the second (step 4) uses
    up a patience of 1, and the run ends there, complete and stopped early, as on TensorFlow."""
    result = kerasbig("train", *TINY_GPT, "--config.train.steps=12", "--config.train.eval_every_steps=2",
                      "--config.train.early_stopping.enabled=true", "--config.train.early_stopping.patience=1",
                      "--config.train.early_stopping.min_delta=100", "--mode=train", f"--workdir={tmp_path}",
                      env=WITHOUT_TF)
    state = json.loads(sorted((tmp_path / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text())
    assert (state["step"], state["complete"], state["stopped_early"]) == (4, True, True)
    assert "Epoch 2/6" in result.stdout and "Epoch 3/6" not in result.stdout


@pytest.mark.slow
def test_rematerialized_blocks_give_the_same_loss_and_gradients_in_less_planned_memory():
    """config.model.remat=true recomputes each GPT block in the backward pass (keras.remat: jax.checkpoint), in
    training with dropout: the same loss and gradients as holding the activations, and sizing plans fewer
    activations."""
    script = textwrap.dedent("""
        import jax, keras, numpy as np
        from kerasbig.data.spec import DataSpec
        from kerasbig.models import gpt, sizing
        spec = DataSpec("language_model", "tokens", (32,), "int32", 64)
        tokens = np.random.default_rng(0).integers(0, 64, (4, 33)).astype("int32")
        results = []
        for remat in (False, True):
            keras.utils.set_random_seed(0)
            model = gpt.build_gpt(spec, width=32, depth=2, heads=4, dropout=0.1, remat=remat)
            non_trainable = [v.value for v in model.non_trainable_variables]  # the dropout seeds: same masks
            def loss(trainable):
                logits, _ = model.stateless_call(trainable, non_trainable, tokens[:, :-1], training=True)
                return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(tokens[:, 1:], logits, True))
            value, grads = jax.value_and_grad(loss)([v.value for v in model.trainable_variables])
            jaxpr = str(jax.make_jaxpr(jax.grad(loss))([v.value for v in model.trainable_variables]))
            results.append((float(value), [np.asarray(g) for g in grads], "checkpoint" in jaxpr or "remat" in jaxpr))
        (plain, plain_grads, plain_marked), (remat, remat_grads, remat_marked) = results
        assert abs(plain - remat) <= 1e-6 * abs(plain), (plain, remat)
        for a, b in zip(plain_grads, remat_grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        assert remat_marked and not plain_marked
        sized = [sizing._gpt(spec, width=768, depth=12, heads=12, mlp_ratio=4, dropout=0.0, bias=True, vocab_size=0,
                             context=0, activation="gelu", remat=remat).activations for remat in (False, True)]
        assert sized[1] < sized[0] / 4, sized
        print("ok", plain)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, **JAX})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("ok")
