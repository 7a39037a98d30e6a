"""LoRA: only the adapters train, merging keeps the model's outputs, bad settings fail in one line, and through
the real command a killed LoRA run resumes exactly and exports without LoRA variables (int8 too)."""
import json
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import REPO, checkpoint_weights, kerasbig

from kerasbig import export, lora, models
from kerasbig.data.spec import DataSpec
from kerasbig.errors import UsageError

LM = DataSpec("language_model", "tokens", (16,), "int32", 50)
GPT = {"name": "gpt", "width": 32, "depth": 2, "heads": 4}
TOKENS = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])


def _adapted(**settings):
    keras.utils.set_random_seed(0)
    return models.build(LM, {**GPT, "lora_rank": 4, **settings})


def test_only_the_adapters_are_trainable_biases_included():
    model = _adapted()
    trainable = {v.path for v in model.trainable_weights}
    expected = {f"block_{i}/{layer}/lora_kernel_{ab}" for i in range(2) for ab in "ab"
                for layer in ("attn/qkv", "attn/out", "mlp_fc", "mlp_proj")}
    assert trainable == expected
    assert lora.counts(model) == (4096, models.build(LM, GPT).count_params() + 4096)  # 2 x 4 x (128 + 160 + 160 + 64)


def test_targets_pick_layers_by_name_and_alpha_scales():
    model = _adapted(lora_targets="qkv", lora_alpha=8)
    adapted = [layer for layer in model._flatten_layers() if getattr(layer, "lora_enabled", False)]
    assert [layer.path for layer in adapted] == ["block_0/attn/qkv", "block_1/attn/qkv"]
    assert {layer.lora_alpha for layer in adapted} == {8}


def test_merged_model_has_no_adapters_and_the_same_outputs_and_quantizes():
    model = _adapted(lora_alpha=8)
    for variable in model.trainable_weights:  # B starts at zero: give the adapters something to merge
        variable.assign(np.random.default_rng(1).normal(0, 0.1, variable.shape).astype("float32"))
    merged = lora.merged(model)
    assert not lora.is_adapted(merged) and not any("lora" in v.path for v in merged.weights)
    assert len(merged.weights) == len(models.build(LM, GPT).weights)
    np.testing.assert_allclose(merged(TOKENS), model(TOKENS), atol=1e-5)
    plain = models.build(LM, GPT)  # the adapters did change the outputs
    plain.set_weights([v.numpy() for v in model.weights if "lora" not in v.path])
    assert np.abs(plain(TOKENS) - model(TOKENS)).max() > 1e-2
    quantized = export.quantized_copy(merged)
    np.testing.assert_allclose(quantized(TOKENS), model(TOKENS), atol=0.1)


@pytest.mark.parametrize("settings, message", [
    ({"lora_rank": -1}, r"lora_rank=-1 must be an integer >= 0"),
    ({"lora_rank": 33}, r"lora_rank=33 is above the width of layer block_0/attn/out \(32\)"),
    ({"lora_rank": 4, "lora_targets": "q_proj,out"}, r"lora_targets='q_proj,out' names no Dense layer .*q_proj"),
    ({"lora_rank": 4, "lora_alpha": -2}, r"lora_alpha=-2 must be a number >= 0"),
    ({"lora_rank": 4, "lora_targets": ["qkv"]}, r"must be a comma-separated string"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(UsageError, match=message):
        models.build(LM, {**GPT, **settings})


def test_rank_0_is_full_fine_tuning():
    model = models.build(LM, {**GPT, "lora_rank": 0})
    assert not lora.is_adapted(model) and len(model.trainable_weights) == len(model.weights)


TINY = ["--config=configs/gpt_small.py", "--config.model.width=32", "--config.model.depth=2",
        "--config.model.dropout=0.0", "--config.data.seq_len=32", "--config.data.batch_size=8",
        "--config.data.max_tokens=40000", "--config.train.jit_compile=False", "--config.train.log_every_steps=5"]


def test_bad_lora_config_exits_2_in_one_line_and_writes_nothing(tmp_path):
    # One bad setting through the command (the others' messages: test_bad_settings_are_refused, in process).
    workdir = tmp_path / "run"
    result = kerasbig("train", *TINY, "--config.model.lora_rank=129", f"--workdir={workdir}",
                      f"--export_dir={tmp_path / 'm'}", check=False)
    message = "lora_rank=129 is above the width of layer block_0/attn/out (32)"
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not workdir.exists() and not (tmp_path / "m").exists()


def test_dry_run_prints_trainable_parameters_and_optimizer_state():
    result = kerasbig("train", "--config=configs/gpt2_124m.py", "--mode=dry_run", "--config.model.lora_rank=8")
    # 12 blocks x rank 8 x (768 + 2304 + 768 + 768 + 768 + 3072 + 3072 + 768) adapter values, Adam's two moments.
    assert ("with LoRA: 1,179,648 of 125,619,456 parameters trainable (0.94%); optimizer state 9.00 MiB"
            in result.stdout), result.stdout


@pytest.mark.slow
def test_killed_lora_run_resumes_exactly_and_exports_merged(tmp_path):
    args = [*TINY, "--config.model.lora_rank=4", "--config.model.lora_alpha=8", "--config.train.steps=20",
            "--config.train.checkpoint_every_steps=5", "--config.train.steps_per_execution=1",
            "--config.train.eval_every_steps=20", "--deterministic"]
    straight, resumed, saved = tmp_path / "straight", tmp_path / "resumed", tmp_path / "saved_models"
    started = kerasbig("train", *args, "--mode=train", f"--workdir={straight}")
    assert "model gpt: 4,096 of " in started.stdout and "optimizer state 0.03 MiB" in started.stdout

    process = subprocess.Popen([sys.executable, "-m", "kerasbig.train", *args, "--mode=train",
                                f"--workdir={resumed}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (resumed / "checkpoints" / "step-00000010").exists():
        assert process.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = checkpoint_weights(resumed / "checkpoints" / "step-00000010")
    kerasbig("train", *args, "--mode=train", f"--workdir={resumed}")
    final, other = checkpoint_weights(resumed), checkpoint_weights(straight)
    assert sorted(final) == sorted(other) and any("lora_kernel_b" in path for path in final)
    for path, value in final.items():
        np.testing.assert_array_equal(value, other[path], err_msg=path)
        if "lora" not in path:  # everything but the adapters stayed frozen, biases and norms included
            np.testing.assert_array_equal(value, first[path], err_msg=f"{path} was trained")
    assert not np.array_equal(final["block_0/attn/qkv/lora_kernel_b"], first["block_0/attn/qkv/lora_kernel_b"])
    slots = [path for path in checkpoint_weights(resumed, "optimizer") if "moment" in path or "velocity" in path]
    assert slots and all("lora" in path for path in slots), slots  # optimizer state for the adapters only

    kerasbig("train", *args, "--mode=export", "--config.export.quantize=int8", f"--workdir={resumed}",
             f"--export_dir={saved / 'lora'}")
    script = ("import sys, tensorflow as tf\nfor path in sys.argv[1:]: print(sorted({v.name.split(':')[0]"
              ".split('/')[-1] for v in tf.saved_model.load(path).variables}))")
    versions = [str(saved / "lora" / version) for version in ("1", "2")]  # float and int8, in one fresh process
    printed = subprocess.run([sys.executable, "-c", script, *versions], capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-2:]
    for names in printed:
        assert "kernel" in names and "lora" not in names, names
    assert json.loads((saved / "lora" / "2" / "assets.extra" / "kerasbig.json").read_text())["quantization"] == "int8"
