"""Compression, set by `config.compress`: magnitude pruning (`pruning`), distillation (`distillation`),
quantization-aware fine-tuning (`quantize_training`); and the quantization modes of `config.export.quantize`
(`quantization`).

train.py calls `prepare` and `train_loss` after building the model, adds `callbacks` to the run's and exports
`servable(model)`.
"""
from __future__ import annotations

import pathlib

import keras

from kerasbig.compress import quantization
from kerasbig.compress.pruning import Pruner, Schedule, is_pruned, strip


def prepare(model: keras.Model, optimizer: keras.optimizers.Optimizer, compress) -> Pruner | None:
    """Quantizes `model` when `compress.quantize_training` asks for it, or adds pruning masks when
    `compress.prune` does. Call it inside the strategy's scope, before the optimizer is built and before
    checkpoints are made (quantized weights and masks are part of their state)."""
    if compress.quantize_training:
        quantization.quantize_for_training(model, compress.quantize_training)
    prune = compress.prune
    if not (prune.sparsity or prune.structured):
        return None
    schedule = Schedule(prune.sparsity or 0.5, prune.start_step, prune.end_step, prune.frequency)
    pruner = Pruner(model, optimizer, schedule, scope=prune.scope, structured=prune.structured)
    if pruner.skipped:
        print(f"Pruning 2:4 leaves {len(pruner.skipped)} weight matrices dense (their input axis is not a multiple "
              f"of 4): {', '.join(pruner.skipped)}")
    return pruner


def train_loss(compress, data_config, spec, model: keras.Model):
    """Distillation's training loss when `compress.teacher` names a teacher (loaded and checked here, before
    training), else None. Call it inside the strategy's scope."""
    if not compress.teacher:
        return None
    from kerasbig.compress.distillation import DistillationLoss, load_teacher
    return DistillationLoss(load_teacher(compress.teacher, data_config, spec, model), temperature=compress.temperature,
                            teacher_weight=compress.teacher_weight)


def callbacks(model: keras.Model, workdir: pathlib.Path | None, *, log_every_steps: int) -> list:
    """The sparsity of a pruned model to TensorBoard (`workdir/train`); nothing on non-chief workers."""
    if workdir is None or not is_pruned(model):
        return []
    from kerasbig.compress.callbacks import SparsityLogger  # TensorFlow's summaries
    return [SparsityLogger(str(workdir / "train"), log_every_steps)]


def servable(model: keras.Model) -> keras.Model:
    """The model to export: without pruning masks (its pruned weights exact zeros)."""
    return strip(model)


def export_record(compress) -> dict:
    """What kerasbig.json says of a model fine-tuned quantized: its mode (its test scores are the run's own)."""
    return {"quantization": compress.quantize_training} if compress.quantize_training else {}
