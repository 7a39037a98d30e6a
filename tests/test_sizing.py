"""Size estimates: exact parameter counts, FLOPs checked by hand, memory that follows precision and optimizer."""
import time

import ml_collections
import pytest

from kerasbig import models
from kerasbig.data.spec import DataSpec
from kerasbig.errors import UsageError
from kerasbig.models import sizing

GPT2_DATA = DataSpec("language_model", "tokens", (1024,), "int32", 50257)
DIGITS = DataSpec("classification", "image", (8, 8, 1), "float32", 10)
SMALL_LM = DataSpec("language_model", "tokens", (32,), "int32", 97)


def _config(name: str, **hyperparameters) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": name, **hyperparameters})


@pytest.mark.parametrize("width, depth, heads, params", [
    (768, 12, 12, 124_439_808),
    (1024, 24, 16, 354_823_168),
    (1280, 36, 20, 774_030_080),
    (1600, 48, 25, 1_557_611_200),
])
def test_gpt2_parameter_counts(width, depth, heads, params):
    estimate = sizing.estimate(GPT2_DATA, _config("gpt", width=width, depth=depth, heads=heads), batch_per_replica=1)
    assert estimate.total_params == estimate.trainable_params == params


@pytest.mark.parametrize("hyperparameters", [
    dict(width=16, depth=1, heads=2),
    dict(width=24, depth=3, heads=3, mlp_ratio=2),
    dict(width=32, depth=2, heads=4, bias=False),
])
def test_analytic_gpt_count_matches_the_built_model(hyperparameters):
    config = _config("gpt", **hyperparameters)
    estimate = sizing.estimate(SMALL_LM, config, batch_per_replica=1)
    assert estimate.total_params == models.build(SMALL_LM, config).count_params()


def test_analytic_gpt2_124m_matches_the_built_model():
    assert models.build(GPT2_DATA, _config("gpt")).count_params() == 124_439_808


def test_7b_gpt_is_estimated_without_building_it():
    data = DataSpec("language_model", "tokens", (2048,), "int32", 50304)
    start = time.perf_counter()
    estimate = sizing.estimate(data, _config("gpt", width=4096, depth=32, heads=32), batch_per_replica=4,
                               precision="mixed_bfloat16")
    assert time.perf_counter() - start < 5
    assert estimate.total_params == 6_658_596_864
    non_embedding = estimate.total_params - 2048 * 4096  # position embeddings cost no FLOPs
    assert estimate.train_flops_per_token == 6 * non_embedding + 12 * 32 * 4096 * 2048
    assert estimate.train_flops_per_example == estimate.train_flops_per_token * 2048
    assert estimate.optimizer_bytes == 2 * 4 * estimate.total_params
    assert 10 * 2**30 < estimate.activation_bytes < 200 * 2**30


def test_mlp_flops_by_hand():
    estimate = sizing.estimate(DIGITS, _config("mlp", hidden=(32,)), batch_per_replica=1)
    assert estimate.forward_flops_per_example == 2 * (64 * 32 + 32 * 10)
    assert estimate.train_flops_per_example == 3 * estimate.forward_flops_per_example
    assert estimate.train_flops_per_token is None


def test_cnn_flops_by_hand():
    estimate = sizing.estimate(DIGITS, _config("cnn", filters=(4,), dense=16), batch_per_replica=1)
    convolutions = 2 * 64 * (3 * 3 * 1 * 4 + 3 * 3 * 4 * 4)  # two 3x3 convolutions over 8x8 pixels
    dense = 2 * (4 * 4 * 4 * 16 + 16 * 10)  # after pooling to 4x4x4
    assert estimate.forward_flops_per_example == convolutions + dense


def test_lstm_flops_by_hand():
    text = DataSpec("classification", "tokens", (10,), "int32", 3)
    estimate = sizing.estimate(text, _config("rnn", units=8, embed_dim=4, vocab_size=24), batch_per_replica=1)
    per_step = (4 + 8) * 4 * 8  # input and recurrent kernels feed four gates
    assert estimate.forward_flops_per_example == 2 * 10 * per_step + 2 * 8 * 3


@pytest.mark.parametrize("name, data, hyperparameters", [
    ("resnet", DataSpec("classification", "image", (32, 32, 3), "float32", 10), dict(stage_widths=(8, 16))),
    ("rnn", SMALL_LM, dict(cell="gru", units=16, layers=2)),
    ("rnn", DataSpec("classification", "tokens", (16,), "int32", 2), dict(units=8, bidirectional=True)),
    ("transformer", DataSpec("classification", "tokens", (16,), "int32", 2), dict(width=16, heads=2)),
])
def test_built_families_count_their_parameters(name, data, hyperparameters):
    config = _config(name, **hyperparameters)
    estimate = sizing.estimate(data, config, batch_per_replica=2)
    model = models.build(data, config)
    assert estimate.total_params == model.count_params()
    assert estimate.forward_flops_per_example > estimate.total_params  # every weight is used at least once
    assert (estimate.train_flops_per_token is None) == (data.kind == "classification")


def test_memory_follows_batch_precision_and_optimizer():
    config = _config("mlp", hidden=(32,))
    base = sizing.estimate(DIGITS, config, batch_per_replica=8)
    assert base.weight_bytes == base.gradient_bytes == 4 * base.total_params
    assert base.optimizer_bytes == 2 * base.gradient_bytes
    assert sizing.estimate(DIGITS, config, batch_per_replica=8, optimizer="sgd").optimizer_bytes == base.gradient_bytes
    assert sizing.estimate(DIGITS, config, batch_per_replica=16).activation_bytes == 2 * base.activation_bytes
    mixed = sizing.estimate(DIGITS, config, batch_per_replica=8, precision="mixed_bfloat16")
    assert mixed.activation_bytes == base.activation_bytes // 2
    assert mixed.weight_bytes == base.weight_bytes  # mixed precision keeps float32 variables
    assert base.total_bytes == base.weight_bytes + base.gradient_bytes + base.optimizer_bytes + base.activation_bytes


def test_format_is_a_readable_table():
    estimate = sizing.estimate(GPT2_DATA, _config("gpt"), batch_per_replica=8, precision="mixed_bfloat16")
    table = estimate.format()
    assert "124,439,808" in table
    assert "291.90 GFLOP" in table  # forward, per example of 1024 tokens
    assert "855.17 MFLOP" in table  # training, per token: nanoGPT's 6N + 12LHQT
    assert "474.7 MiB" in table  # float32 weights
    assert "batch 8, mixed_bfloat16, adamw" in table
    assert "training FLOPs / token" in table


@pytest.mark.parametrize("config, options, message", [
    (_config("gpt", width=100, heads=12), {}, "width=100 must be divisible by heads=12"),
    (_config("gpt", layers=3), {}, "config.model.layers"),
    (_config("gpt"), {"precision": "float16"}, "precision"),
    (_config("gpt"), {"optimizer": "adagrad"}, "optimizer"),
    (_config("gpt"), {"batch_per_replica": 0}, "batch_per_replica"),
])
def test_bad_input_raises_usage_error(config, options, message):
    with pytest.raises(UsageError, match=message):
        sizing.estimate(GPT2_DATA, config, **{"batch_per_replica": 1, **options})


def test_dry_run_of_a_huge_built_model_allocates_nothing(tmp_path):
    """A 7.5-billion-parameter MLP (30 GB of float32 weights) is sized from shapes alone: the command stays
    under 3 GB of memory and writes nothing."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    command = [sys.executable, "-m", "kerasbig.train", "--config=configs/digits_mlp.py", "--mode=dry_run",
               "--config.model.hidden=(100000000,)", f"--workdir={tmp_path / 'run'}"]
    with open(tmp_path / "out.txt", "w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    output = (tmp_path / "out.txt").read_text()
    assert os.waitstatus_to_exitcode(status) == 0, output[-2000:]
    assert "7,500,000,010" in output
    assert usage.ru_maxrss < 3 * 2**20  # KiB
    assert not (tmp_path / "run").exists()
