"""The config schema every `configs/*.py` starts from, and the checks that turn bad values into one-line errors.

A config file does `config = kerasbig.config.base(); config.model = ...; return config.lock()`-style edits (see
configs/digits_cnn.py). Every section and key is declared here with a typed default, so a locked
ConfigDict rejects unknown keys and wrong types on `--config.a.b=value`; `config.model` alone is free-form
and checked against the chosen builder's signature.
"""
from __future__ import annotations

import json
import math
import pathlib

import ml_collections

from kerasbig import lora
from kerasbig.callbacks.lr_schedule import DECAYS
from kerasbig.compress import quantization
from kerasbig.data.corpus import parse_tokenizer
from kerasbig.errors import UsageError
from kerasbig.files import write_atomically

OPTIMIZERS = ("adamw", "adam", "sgd", "lion")
MONITORED = ("val_loss", "val_accuracy", "loss", "accuracy")  # what early stopping can watch in kerasbig's loop
SEED_LIMIT = 2 ** 32  # numpy's seeds, which Keras and scikit-learn use
DECODE_ERRORS = ("strict", "replace")
MIN_IMAGE_SIZE = 8
PRUNE_SCOPES = ("layer", "global")


def base() -> ml_collections.ConfigDict:
    """Every configurable key with its default. Batch sizes are global (summed over all replicas)."""
    config = ml_collections.ConfigDict()
    config.data = dict(
        name="digits",            # digits | text_lm | text_classification | tfds:NAME | images:DIR | text:DIR |
                                  # csv:FILE | corpus:GLOB (see kerasbig.data and docs/data.md)
        batch_size=64,            # global batch size
        eval_batch_size=256,
        split_seed=0,             # fixes the train/validation/test split, independent of --seed
        test_fraction=0.2,        # embedded data and folders without test/: held out, never used for training
        validation_fraction=0.1,
        augment=False,
        seq_len=128,              # text datasets
        source="pydoc_topics",    # text_lm: pydoc_topics | stdlib | both
        max_tokens=4_000_000,     # text_lm: cap on the corpus, shared by the splits 80/10/10
        data_dir="",              # tfds: where prepared datasets live ('' = TFDS_DATA_DIR or ~/tensorflow_datasets)
        image_size=64,            # images: side of the square every image is resized to
        skip_bad_files=False,     # images: skip (and list) files that do not decode instead of stopping
        cache_images=False,       # images: keep decoded images in memory after their first read
        decode_errors="strict",   # text: strict (a file that is not UTF-8 stops the run) | replace (bad bytes -> U+FFFD)
        label="",                 # csv: the label column
        numeric="",               # csv: comma-separated numeric columns ('' = inferred)
        categorical="",           # csv: comma-separated categorical columns ('' = inferred)
        tokenizer="bytes",        # corpus: bytes | bpe:N | unigram:N (SentencePiece, trained on the train split)
        cache_dir="",             # corpus: token shards and tokenizer ('' = a .kerasbig-cache folder beside the files)
    )
    config.model = dict(name="cnn")
    config.optimizer = dict(
        name="adamw",
        learning_rate=1e-3,       # peak rate, reached after warmup
        weight_decay=1e-4,
        clip_norm=0.0,            # global gradient-norm clipping across all replicas; 0 = off
        accumulation_steps=1,     # micro-batches per optimizer step (the global batch is split into them)
        label_smoothing=0.0,
        momentum=0.9,             # sgd only
    )
    config.schedule = dict(
        warmup_steps=0,
        decay="cosine",           # one of DECAYS
        min_learning_rate=0.0,
        decay_rate=0.1,           # exponential and step
        step_size=1000,           # step: multiply by decay_rate every step_size steps
    )
    config.train = dict(
        epochs=10,
        steps=0,                  # > 0: stop after this many optimizer steps instead of `epochs`
        steps_per_execution=1,    # optimizer steps per compiled call: fewer host round trips
        jit_compile=False,        # XLA
        eval_every_steps=0,       # > 0: evaluate every this many steps (an "epoch" for callbacks); 0: every epoch
        eval_every_epochs=1,      # of those epochs, evaluate every this many
        log_every_steps=50,
        checkpoint_every_steps=0, # > 0: also checkpoint every this many steps (always at the end of every epoch)
        keep_checkpoints=3,
        early_stopping=dict(enabled=False, monitor="val_loss", mode="auto", min_delta=0.0, patience=3,
                            baseline=ml_collections.config_dict.placeholder(float), start_from_epoch=0,
                            restore_best_weights=True),
    )
    config.export = dict(
        name="",                  # saved_models/<name>/; '' = the config file's name
        quantize="",              # '' | comma-separated modes (int8, int4): also write a version quantized to each
        stable_label=True,        # label the newest version 'stable' in saved_models/models.config
    )
    config.compress = dict(      # see kerasbig/compress and docs/compression.md
        prune=dict(
            sparsity=0.0,         # fraction of every weight matrix set to zero by end_step; 0 = no pruning
            start_step=0,         # optimizer steps: pruning grows from 0 at start_step to `sparsity` at end_step
            end_step=0,
            frequency=100,        # masks are recomputed every this many steps (and at end_step)
            scope="layer",        # layer: each matrix to `sparsity` | global: one magnitude threshold for all
            structured=False,     # 2:4 (2 of every 4 weights along the input axis) instead of `sparsity`
        ),
        teacher="",               # a trained run's workdir: distil from its logits ('' = train on labels only)
        temperature=2.0,          # distillation: softmax temperature on teacher and student logits
        teacher_weight=0.5,       # distillation: the teacher's share of the loss, the labels' is 1 - it
        quantize_training="",     # '' | int8: quantize before training and fine-tune (and export) the int8 model
    )
    return config


def _positive(config, key: str, value, minimum=1):
    if value < minimum:
        raise UsageError(f"config.{key}={value} must be >= {minimum}")


def _in_range(key: str, value, accepted: str, ok) -> None:
    if not ok(value):  # NaN fails every comparison, so it lands here too
        raise UsageError(f"config.{key}={value} must be {accepted}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the values that types alone cannot; raises UsageError naming the key and what is accepted."""
    _positive(config, "data.batch_size", config.data.batch_size)
    _positive(config, "data.eval_batch_size", config.data.eval_batch_size)
    _positive(config, "data.max_tokens", config.data.max_tokens)
    if config.train.steps == 0:
        _positive(config, "train.epochs", config.train.epochs)
    _positive(config, "train.steps", config.train.steps, 0)
    _positive(config, "train.steps_per_execution", config.train.steps_per_execution)
    _positive(config, "train.eval_every_steps", config.train.eval_every_steps, 0)
    _positive(config, "train.eval_every_epochs", config.train.eval_every_epochs)
    _positive(config, "train.log_every_steps", config.train.log_every_steps)
    _positive(config, "train.checkpoint_every_steps", config.train.checkpoint_every_steps, 0)
    _positive(config, "train.keep_checkpoints", config.train.keep_checkpoints)
    _positive(config, "optimizer.accumulation_steps", config.optimizer.accumulation_steps)
    _in_range("optimizer.label_smoothing", config.optimizer.label_smoothing, "[0, 1)", lambda v: 0 <= v < 1)
    _in_range("optimizer.weight_decay", config.optimizer.weight_decay, ">= 0", lambda v: v >= 0)
    _in_range("optimizer.clip_norm", config.optimizer.clip_norm, ">= 0 (0 = off)", lambda v: 0 <= v < math.inf)
    _in_range("data.test_fraction", config.data.test_fraction, "in (0, 1)", lambda v: 0 < v < 1)
    _in_range("data.validation_fraction", config.data.validation_fraction, "in (0, 1)", lambda v: 0 < v < 1)
    if not config.data.test_fraction + config.data.validation_fraction < 1:
        raise UsageError(f"config.data.test_fraction + config.data.validation_fraction = "
                         f"{config.data.test_fraction + config.data.validation_fraction} leaves nothing to train on; "
                         "keep their sum below 1")
    _in_range("data.split_seed", config.data.split_seed, f"in [0, {SEED_LIMIT})", lambda v: 0 <= v < SEED_LIMIT)
    _positive(config, "data.image_size", config.data.image_size, MIN_IMAGE_SIZE)
    if config.data.decode_errors not in DECODE_ERRORS:
        raise UsageError(f"config.data.decode_errors={config.data.decode_errors!r} is not one of {list(DECODE_ERRORS)}")
    parse_tokenizer(config.data.tokenizer)
    if config.optimizer.name not in OPTIMIZERS:
        raise UsageError(f"config.optimizer.name={config.optimizer.name!r} is not one of {list(OPTIMIZERS)}")
    if not config.optimizer.learning_rate > 0:
        raise UsageError(f"config.optimizer.learning_rate={config.optimizer.learning_rate} must be > 0")
    if config.schedule.decay not in DECAYS:
        raise UsageError(f"config.schedule.decay={config.schedule.decay!r} is not one of {list(DECAYS)}")
    quantization.parse_modes(config.export.quantize)
    _check_export_name(config.export.name)
    _check_compress(config.compress)
    quantization.check_training(config)
    stop = config.train.early_stopping
    if stop.enabled and stop.monitor not in MONITORED:
        raise UsageError(f"config.train.early_stopping.monitor={stop.monitor!r} is not logged by the training loop; "
                         f"choose one of {list(MONITORED)}")
    if config.data.batch_size % config.optimizer.accumulation_steps:
        raise UsageError(f"config.data.batch_size={config.data.batch_size} must be divisible by "
                         f"config.optimizer.accumulation_steps={config.optimizer.accumulation_steps}")


def _check_compress(compress: ml_collections.ConfigDict) -> None:
    _in_range("compress.temperature", compress.temperature, "> 0", lambda v: 0 < v < math.inf)
    _in_range("compress.teacher_weight", compress.teacher_weight, "in [0, 1]", lambda v: 0 <= v <= 1)
    prune = compress.prune
    _in_range("compress.prune.sparsity", prune.sparsity, "in [0, 1)", lambda v: 0 <= v < 1)
    if prune.scope not in PRUNE_SCOPES:
        raise UsageError(f"config.compress.prune.scope={prune.scope!r} is not one of {list(PRUNE_SCOPES)}")
    if prune.structured and prune.sparsity not in (0, 0.5):
        raise UsageError(f"config.compress.prune.structured keeps 2 of every 4 weights (sparsity 0.5); leave "
                         f"config.compress.prune.sparsity={prune.sparsity} at 0 or set it to 0.5")
    if prune.sparsity or prune.structured:
        _positive(None, "compress.prune.start_step", prune.start_step, 0)
        _positive(None, "compress.prune.frequency", prune.frequency)
        if prune.end_step <= prune.start_step:
            raise UsageError(f"config.compress.prune.end_step={prune.end_step} must come after "
                             f"config.compress.prune.start_step={prune.start_step}")


def _check_export_name(name: str) -> None:
    """The model's folder under the export base: one plain folder name, so nothing is written outside it."""
    if name and (name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0")):
        raise UsageError(f"config.export.name={name!r} must be a plain folder name (no '/', '\\', NUL or "
                         "leading '.'), e.g. digits_cnn")


# Keys a resumed run may change: how long and how often, not what is trained or how (rematerialization
# recomputes the same values).
RESUMABLE = ("train.epochs", "train.steps", "train.steps_per_execution", "train.jit_compile",
             "train.eval_every_steps", "train.eval_every_epochs", "train.log_every_steps",
             "train.checkpoint_every_steps", "train.keep_checkpoints", "train.early_stopping.", "data.eval_batch_size",
             "export.", "model.remat")


def resume_conflicts(saved: dict, new: dict) -> list[str]:
    """`key: saved -> new` for every key where the `new` config (a dict) differs from the `saved` config of a
    checkpoint in a way a resume cannot take (see RESUMABLE)."""
    from kerasbig.callbacks.dashboard import flatten  # the callbacks package imports this module

    old, new = flatten(saved), flatten(new)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and not key.startswith(RESUMABLE)]


def check_batch(config: ml_collections.ConfigDict, *, splits: dict[str, int], replicas: int) -> None:
    """The global batch must fit the training set and split evenly over replicas and micro-batches; `splits`
    gives the number of examples of each split."""
    batch, train_examples = config.data.batch_size, splits["train"]
    if batch > train_examples:
        raise UsageError(f"config.data.batch_size={batch} is larger than the training set ({train_examples} "
                         "examples); use a smaller batch")
    for name, size in (("data.batch_size", batch), ("data.eval_batch_size", config.data.eval_batch_size)):
        if size % replicas:
            raise UsageError(f"config.{name}={size} is not divisible by the {replicas} replicas; "
                             f"use a multiple of {replicas}")
    micro = batch // replicas
    if micro % config.optimizer.accumulation_steps:
        raise UsageError(f"per-replica batch {micro} is not divisible by config.optimizer.accumulation_steps="
                         f"{config.optimizer.accumulation_steps}")


def save_json(config: ml_collections.ConfigDict, path: pathlib.Path) -> None:
    """Writes the resolved config atomically."""
    write_atomically(path, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


GPT_SIZES = {  # width, depth, heads, vocabulary, context: GPT-2's published shapes, and a 6.7B model
    "gpt2_124m": (768, 12, 12, 50257, 1024),
    "gpt2_350m": (1024, 24, 16, 50257, 1024),
    "gpt2_774m": (1280, 36, 20, 50257, 1024),
    "gpt2_1558m": (1600, 48, 25, 50257, 1024),
    "gpt_7b": (4096, 32, 32, 50304, 2048),
}


def gpt_pretraining(size: str) -> ml_collections.ConfigDict:
    """A GPT pre-training config of one of GPT_SIZES, for GPUs and TPUs (`--mode=dry_run` runs anywhere).

    The data default is byte-level CPython source so that it runs as shipped; bytes are a subset of the
    vocabulary. Point `data.name` at your own tokenized corpus (e.g. `tfds:...`) for real pre-training.
    """
    width, depth, heads, vocab, context = GPT_SIZES[size]
    big = width >= 1280
    config = base()
    config.data.name = "text_lm"
    config.data.source = "stdlib"
    config.data.seq_len = context
    config.data.batch_size = 512
    config.data.eval_batch_size = 64
    config.model = dict(name="gpt", width=width, depth=depth, heads=heads, mlp_ratio=4, dropout=0.0, bias=True,
                        vocab_size=vocab, remat=False, **lora.DEFAULTS)
    config.optimizer.learning_rate = 3e-4 if big else 6e-4
    config.optimizer.weight_decay = 0.1
    config.optimizer.clip_norm = 1.0
    config.optimizer.accumulation_steps = 8 if big else 4
    config.schedule.warmup_steps = 2000
    config.schedule.min_learning_rate = 6e-5
    config.train.steps = 600_000
    config.train.steps_per_execution = 100
    config.train.jit_compile = True
    config.train.log_every_steps = 100
    config.train.eval_every_steps = 2000  # the shipped data is only a few steps long: cadences are in steps
    config.export.name = size
    return config
