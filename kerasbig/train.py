"""`python -m kerasbig.train`: config -> data -> model -> train (resuming) -> evaluate -> export.

    python -m kerasbig.train --config=configs/gpt_small.py --config.train.epochs=3 --strategy=mirrored

Exit codes: 0 done; 2 bad flags or config (one line on stderr); 1 failure at run time (one line; --verbose
for the traceback); 75 preempted by SIGTERM after saving a checkpoint (rerun the same command to resume).
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import tempfile

import keras
from absl import flags, logging
from ml_collections import config_flags

# TensorFlow's modules (distribute, export) are imported where the TensorFlow path needs them: a JAX run
# imports no TensorFlow (see docs/distributed.md).
from kerasbig import checkpoint, cli, compress, config as config_lib, data, evaluation, lora, models, pretrained
from kerasbig.callbacks import (Dashboard, EarlyStopping, LearningRateScheduler, ProfileSteps, Throughput,
                                WarmupDecay, peak_flops_per_device)
from kerasbig.compress import quantization
from kerasbig.data.spec import LANGUAGE_MODEL
from kerasbig.errors import PREEMPTED_EXIT_CODE, RunError, UsageError, first_line
from kerasbig.files import hold_workdir, write_atomically
from kerasbig.models import sizing
from kerasbig.trainer import Preempted, Trainer

# The shipped configs: configs/ in a checkout, kerasbig/configs/ in an installed wheel (setup.py puts them there).
PACKAGE = pathlib.Path(__file__).resolve().parent
CONFIGS = PACKAGE / "configs" if (PACKAGE / "configs").is_dir() else PACKAGE.parent / "configs"
MODES = ("train_and_export", "train", "eval", "export", "dry_run")
EXPORT_FORMATS = ("saved_model", "hf")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
BACKENDS = ("tensorflow", "jax")
JAX_STRATEGIES = ("auto", "one_device", "data_parallel", "model_parallel")  # keras.distribution layouts
DEFAULT_CONFIG = CONFIGS / "digits_cnn.py"

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, `--config` included (config_flags loads the default file and checks overrides already
    while defining it)."""
    flags.DEFINE_string("workdir", None, "Run folder (default logs/<config name>); rerunning resumes from it.")
    flags.DEFINE_string("export_dir", None, "Base folder of SavedModel versions (default saved_models/<model name>).")
    flags.DEFINE_string("mode", "train_and_export", f"One of {', '.join(MODES)}.")
    flags.DEFINE_string("export_format", "saved_model", "saved_model (for TF Serving) or hf (a Hugging Face folder "
                        "of a gpt or llama model, at --export_dir or saved_models/<name>-hf).")
    flags.DEFINE_string("backend", os.environ.get("KERAS_BACKEND", "tensorflow"),
                        "Keras backend, tensorflow or jax (default: KERAS_BACKEND); read before Keras is imported.")
    flags.DEFINE_string("strategy", "auto", "TensorFlow: auto, one_device, mirrored, multi_worker or tpu; "
                        "JAX: auto, one_device, data_parallel or model_parallel (see docs/distributed.md).")
    flags.DEFINE_integer("num_devices", 0, "JAX: devices to lay the model over (0: all); dry_run: the devices "
                         "of the plan (data_parallel: replicas; model_parallel: shards).")
    flags.DEFINE_integer("model_shards", 0, "JAX model_parallel: devices each large kernel is split over (0: all "
                         "of them); the batch is split over num_devices / model_shards model replicas.")
    flags.DEFINE_string("tpu", "", "TPU name or grpc:// address for TPUClusterResolver.")
    flags.DEFINE_integer("num_cpu_replicas", 0, "Split the CPU into N logical devices (MirroredStrategy without GPUs).")
    flags.DEFINE_string("mixed_precision", "float32", f"One of {', '.join(PRECISIONS)}.")
    flags.DEFINE_integer("seed", 0, "Seed for weights, dropout, shuffling and augmentation.")
    flags.DEFINE_boolean("deterministic", False, "Make TensorFlow ops deterministic (slower).")
    flags.DEFINE_list("profile_steps", [], "Profile global steps A,B (inclusive) for TensorBoard's Profile tab "
                      "(view it with the [profile] extra).")
    try:
        config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG),
                                        "Config file configs/NAME.py[:arg]; override keys with --config.a.b=value.")
    except Exception as err:
        cli.fail(2, _config_error(err, sys.argv))


def _config_error(err: Exception, argv: list[str]) -> str:
    """One line for a config that failed to load or an override that does not fit it."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    path = pathlib.Path((given[-1] if given else str(DEFAULT_CONFIG)).split(":")[0])
    if not path.is_file():
        return f"--config: {path} does not exist; the shipped configs are in {CONFIGS}: {sorted(shipped_configs())}"
    key = str(err).strip("'\" ")
    overrides = [a.split("=")[0][2:] for a in argv if a.startswith("--config.")]
    for flag in overrides:
        if key in flag.split("."):
            return f"--{flag}: unknown config key {key!r}; the keys of {path.name} are printed at the start of a run"
    return f"--config={path}: {first_line(err)} (a config file must define get_config() returning a ConfigDict)"


def shipped_configs() -> list[str]:
    return [p.stem for p in CONFIGS.glob("*.py") if not p.name.startswith("_")]


def parse_flags(argv: list[str]) -> list[str]:
    """kerasbig's flag parsing, plus the config file's errors (config_flags raises plain exceptions, and reports a
    file that failed to load only on first use) as one line and exit 2."""
    try:
        rest = cli.parse_flags(argv)
        FLAGS.config.keys()
    except Exception as err:
        cli.fail(2, _config_error(err, argv))
    for name, accepted in (("mode", MODES), ("mixed_precision", PRECISIONS), ("backend", BACKENDS),
                           ("strategy", strategies(FLAGS.backend, FLAGS.mode)), ("export_format", EXPORT_FORMATS)):
        if FLAGS[name].value not in accepted:
            cli.fail(2, f"--{name}={FLAGS[name].value!r} is not one of {list(accepted)}")
    if FLAGS.backend != keras.backend.backend():
        cli.fail(2, f"--backend={FLAGS.backend} but Keras loaded {keras.backend.backend()}: KERAS_BACKEND must "
                    "agree with --backend (or leave one of them unset)")
    if FLAGS.backend == "jax" and FLAGS.mode == "export":
        cli.fail(2, "--mode=export writes a SavedModel under TensorFlow: rerun with --backend=tensorflow (it reads "
                    "the JAX run's checkpoint)")
    if FLAGS.num_devices < 0:
        cli.fail(2, f"--num_devices={FLAGS.num_devices} must be >= 0")
    if FLAGS.model_shards < 0 or (FLAGS.model_shards and FLAGS.strategy != "model_parallel"):
        cli.fail(2, f"--model_shards={FLAGS.model_shards} must be >= 0, and only --strategy=model_parallel "
                    "splits kernels")
    if FLAGS.profile_steps and (len(FLAGS.profile_steps) != 2 or not all(s.isdigit() for s in FLAGS.profile_steps)):
        cli.fail(2, f"--profile_steps={','.join(FLAGS.profile_steps)} must be two step numbers A,B, e.g. 20,30")
    if FLAGS.num_cpu_replicas < 0:
        cli.fail(2, f"--num_cpu_replicas={FLAGS.num_cpu_replicas} must be >= 0")
    if not 0 <= FLAGS.seed < config_lib.SEED_LIMIT:
        cli.fail(2, f"--seed={FLAGS.seed} must be in [0, {config_lib.SEED_LIMIT})")
    return rest


def strategies(backend: str, mode: str) -> tuple[str, ...]:
    """The --strategy values of `backend`; a dry run plans any of them (it only sizes the model)."""
    if backend == "jax" and mode != "dry_run":
        return JAX_STRATEGIES
    try:
        from kerasbig import distribute  # imports TensorFlow
    except ImportError:
        if backend == "jax":  # a dry run on a machine without TensorFlow plans the JAX layouts
            return JAX_STRATEGIES
        raise
    if mode == "dry_run":
        return tuple(dict.fromkeys(distribute.STRATEGIES + JAX_STRATEGIES))
    return distribute.STRATEGIES


def config_name() -> str:
    return pathlib.Path(config_flags.get_config_filename(FLAGS["config"])).stem


def writable_dir(path: pathlib.Path, flag: str) -> pathlib.Path:
    """Creates `path` if needed and proves it can be written, before any work is done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"{flag}={path} cannot be written ({err.strerror}); choose a writable folder") from None
    return path


def run() -> None:
    logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    config_lib.validate(config)
    if config.model.get("init_from"):
        pretrained.adopt_tokenizer(config)
    if FLAGS.export_format == "hf" and FLAGS.mode in ("train_and_export", "export"):
        pretrained.check_hf_export(config.model)
    if FLAGS.num_cpu_replicas > 1:
        from kerasbig import distribute

        distribute.split_cpu(FLAGS.num_cpu_replicas)
    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.deterministic and FLAGS.backend == "tensorflow":  # XLA on JAX is deterministic on CPU already
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(FLAGS.mixed_precision)

    if FLAGS.mode == "dry_run" and FLAGS.strategy in ("data_parallel", "model_parallel"):
        # Planned, not made: these layouts need no devices to be sized.
        devices = FLAGS.num_devices or 1
        replicas = devices // (FLAGS.model_shards or devices) if FLAGS.strategy == "model_parallel" else devices
        strategy, chief = None, True
    else:
        strategy, replicas, chief = make_strategy(config)
    # A dry run plans from the spec and split sizes alone, without reading the examples.
    task = (data.load_plan if FLAGS.mode == "dry_run" else data.load_task)(config.data)
    if "train" in task.num_examples:  # unknown for a TFDS dataset not prepared here
        config_lib.check_batch(config, splits=task.num_examples, replicas=replicas)
    name = config_name()
    workdir = pathlib.Path(FLAGS.workdir or pathlib.Path("logs") / name)
    export_name = config.export.name or name
    export_base = pathlib.Path(FLAGS.export_dir or "saved_models")
    if FLAGS.export_dir:  # --export_dir is the model's own base folder, as DESIGN.md says
        export_base, export_name = export_base.parent, export_base.name

    # Activations are held for one micro-batch at a time: the per-replica batch over accumulation steps.
    micro_batch = config.data.batch_size // replicas // config.optimizer.accumulation_steps
    model_shards = (FLAGS.model_shards or FLAGS.num_devices or 1) if FLAGS.strategy == "model_parallel" else 1
    estimate = sizing.estimate(task.spec, config.model, batch_per_replica=micro_batch,
                               precision=FLAGS.mixed_precision, optimizer=config.optimizer.name,
                               model_shards=model_shards)
    if FLAGS.mode == "dry_run":
        print(f"{name}: {replicas} replica(s), global batch {config.data.batch_size}, "
              f"{config.optimizer.accumulation_steps} accumulation step(s)\n{estimate.format()}")
        if lora.split(config.model)[1].enabled:
            print(f"with LoRA: {lora_summary(config, task.spec)}")
        return

    with strategy.scope():
        # A resumed run then restores its own checkpoint over the pretrained weights.
        model = models.build(task.spec, config.model, load_pretrained=True)
        optimizer = make_optimizer(config, FLAGS.mixed_precision, model)
        compress.prepare(model, optimizer, config.compress)
        train_loss = compress.train_loss(config.compress, config.data, task.spec, model)
    quantization.check_model(model, quantization.parse_modes(config.export.quantize))
    check_resumable(workdir, config, FLAGS.seed)
    if chief:
        writable_dir(workdir, "--workdir")
        hold_workdir(workdir)
        if FLAGS.mode in ("train_and_export", "export"):
            writable_dir(export_base / export_name, "--export_dir")
        print(f"Config {name}:\n{config}")
        config_lib.save_json(config, workdir / "config.json")
        for file_name, content in (task.tokenizer.files if task.tokenizer else {}).items():
            write_atomically(workdir / file_name, content)  # the run's own tokenizer, beside its checkpoints
    print(f"Strategy {type(strategy).__name__} with {replicas} replica(s) on {FLAGS.backend}; "
          f"model {model.name}: {lora.describe(model, sizing.OPTIMIZER_SLOTS[config.optimizer.name])}; "
          f"{task.num_examples['train']} training examples")

    trainer = Trainer(model, optimizer, task, strategy, config, workdir, is_chief=chief, seed=FLAGS.seed,
                      train_loss=train_loss)
    run_info = {"seed": FLAGS.seed, "mixed_precision": FLAGS.mixed_precision, "replicas": replicas,
                "backend": FLAGS.backend, "strategy": FLAGS.strategy}
    callbacks = make_callbacks(config, workdir if chief else None, task=task, total_steps=trainer.total_steps,
                               run_info=run_info, flops_per_step=estimate.train_flops_per_example * config.data.batch_size,
                               validation_predictions=trainer.latest_validation,
                               profile_steps=tuple(map(int, FLAGS.profile_steps)))
    callbacks += compress.callbacks(model, workdir if chief else None, log_every_steps=config.train.log_every_steps)
    if FLAGS.mode in ("train", "train_and_export"):
        try:
            trainer.fit(callbacks)
        except Preempted as stop:
            # Saved: later SIGTERMs must not turn exit 75 into a kill (srun --kill-on-bad-exit=1 terminates the
            # other tasks as soon as the first one exits 75).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print(f"Preempted: saved step {stop.step} to {workdir / 'checkpoints'}; rerun the same command to resume.")
            sys.exit(PREEMPTED_EXIT_CODE)
    elif trainer.restore(callbacks) is None:
        raise RunError(f"no checkpoint in {workdir / 'checkpoints'}; train first (--mode=train) or pass the "
                       "--workdir of a trained run")

    metrics_path = workdir / "metrics.json"
    if FLAGS.mode in ("train", "train_and_export", "eval"):
        sums, labels, predictions = trainer.evaluate("test")
        metrics = evaluation.metrics(task, sums, labels, predictions)
        print(f"Test: {evaluation.summary_line(metrics)}")
        if chief:
            write_atomically(metrics_path, json.dumps({"split": "test", **metrics}, indent=2))
    print(f"Logs: {workdir}  (tensorboard --logdir {workdir.parent})")

    if FLAGS.mode not in ("train_and_export", "export") or not chief:
        return
    if FLAGS.backend != "tensorflow":
        print(f"Export: python -m kerasbig.train --backend=tensorflow --mode=export --config=... --workdir={workdir} "
              "(a SavedModel is written under TensorFlow, from this run's checkpoint)")
        return
    from kerasbig import export

    # Adapters folded into the kernels, pruning masks dropped: no LoRA or mask variables in what is exported.
    model = compress.servable(lora.merged(model))
    if FLAGS.export_format == "hf":
        folder = pretrained.export_hf(model, config.model, export_base / (
            export_name if FLAGS.export_dir else f"{export_name}-hf"), tokenizer=task.tokenizer,
            seq_len=task.spec.seq_len)
        print(f"Hugging Face folder: {folder}  (transformers.AutoModelForCausalLM.from_pretrained loads it)")
        return
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    record = {"config": config_lib.to_dict(config), "config_name": name, "metrics": metrics,
              "step": trainer.steps.step(), "mixed_precision": FLAGS.mixed_precision,
              **compress.export_record(config.compress)}
    path = export.export(model, task, base=export_base, name=export_name, record=record,
                         stable_label=config.export.stable_label)
    print(f"SavedModel: {path}  (verified in a fresh process; serve with TF Serving or python -m kerasbig.serve)")
    modes = quantization.parse_modes(config.export.quantize)
    if modes:
        export_quantized(model, task, float_version=path, record=record, base=export_base, name=export_name,
                         modes=modes, stable_label=config.export.stable_label)


def lora_summary(config, spec) -> str:
    """Trainable and total parameters and optimizer state of the LoRA model `config` describes, sized from
    variables that are never allocated (a dry run of a model too large for this machine)."""
    with keras.StatelessScope(initialize_variables=False):
        model = models.build(spec, config.model)
    return lora.describe(model, sizing.OPTIMIZER_SLOTS[config.optimizer.name])


def make_strategy(config) -> tuple:
    """(strategy, data-parallel replicas, whether this process is the chief) of --strategy: a tf.distribute
    strategy on TensorFlow, a keras.distribution layout on JAX (set globally, so the model is built in it)."""
    if FLAGS.backend == "jax":
        from kerasbig import jax_steps  # imports JAX
        chief = jax_steps.join_cluster()
        distribution = jax_steps.make_distribution(FLAGS.strategy, config.model, num_devices=FLAGS.num_devices,
                                                   model_shards=FLAGS.model_shards)
        keras.distribution.set_distribution(distribution)
        return distribution, distribution.num_model_replicas, chief
    from kerasbig import distribute

    strategy = distribute.make(FLAGS.strategy, tpu=FLAGS.tpu, num_cpu_replicas=FLAGS.num_cpu_replicas)
    return strategy, strategy.num_replicas_in_sync, distribute.is_chief(strategy)


def check_resumable(workdir: pathlib.Path, config, seed: int) -> None:
    """Refuses a config (or seed) that the checkpoints in `workdir` were not trained with, unless a resume can
    take the change (more steps, other cadences: config.RESUMABLE)."""
    state = checkpoint.latest_state(workdir / "checkpoints")
    if not state or "config" not in state:
        return
    conflicts = config_lib.resume_conflicts({**state["config"], "seed": state.get("seed")},
                                            {**config_lib.to_dict(config), "seed": seed})
    if conflicts:
        raise UsageError(f"--workdir={workdir} holds checkpoints of another run ({'; '.join(conflicts[:5])}"
                         f"{'; ...' if len(conflicts) > 5 else ''}); rerun with its config and seed, or pass another "
                         "--workdir (a resume may change only the length and the cadences)")


def export_quantized(model, task, *, float_version: pathlib.Path, record: dict, base: pathlib.Path, name: str,
                     modes: list[str], stable_label: bool) -> None:
    """Writes a quantized version per mode after the float one; each kerasbig.json sets size and test scores
    side by side with the float version's."""
    float_record = json.loads((float_version / "assets.extra" / "kerasbig.json").read_text())
    from kerasbig import export

    float_scores = scores(model, task)
    for mode in modes:
        quantized = export.quantized_copy(model, mode, task)
        comparison = {"float": {"version": int(float_version.name), "size_bytes": float_record["size_bytes"],
                                **float_scores},
                      mode: scores(quantized, task)}
        path = export.export(quantized, task, base=base, name=name, stable_label=stable_label,
                             record={**record, "quantization": mode, "comparison": comparison})
        size = json.loads((path / "assets.extra" / "kerasbig.json").read_text())["size_bytes"]
        print(f"SavedModel ({mode}): {path}  {size / 1e6:.2f} MB, test accuracy "
              f"{comparison[mode]['test_accuracy']:.4f} (float: {comparison['float']['size_bytes'] / 1e6:.2f} MB, "
              f"{comparison['float']['test_accuracy']:.4f})")


def scores(model, task) -> dict[str, float]:
    """The test split's scores of a version, as its kerasbig.json compares them: test_accuracy (and
    test_bits_per_token for language models)."""
    return {f"test_{key}": value for key, value in evaluation.serving_scores(model, task).items()}


def make_callbacks(config, workdir: pathlib.Path | None, *, task, total_steps: int, run_info: dict,
                   flops_per_step: float | None, validation_predictions=None,
                   profile_steps: tuple[int, int] | tuple[()] = ()) -> list:
    """The callbacks of a run: learning-rate schedule, early stopping, throughput and TensorBoard.
    `workdir` is None on non-chief workers, which write no logs; `run_info` (seed, mixed_precision, replicas)
    goes to the HParams table beside the config; `profile_steps` (A, B) traces those steps."""
    replicas = run_info["replicas"]
    train_logs = str(workdir / "train") if workdir else None
    callbacks = [LearningRateScheduler(schedule_of(config, total_steps), log_dir=train_logs,
                                       log_every_steps=config.train.log_every_steps)]
    if config.train.early_stopping.enabled:
        stop = config.train.early_stopping
        callbacks.append(EarlyStopping(stop.monitor, stop.min_delta, stop.patience, verbose=1, mode=stop.mode,
                                       baseline=stop.baseline, restore_best_weights=stop.restore_best_weights,
                                       start_from_epoch=stop.start_from_epoch))
    batch = config.data.batch_size
    tokens = batch * task.spec.seq_len if task.spec.kind == LANGUAGE_MODEL else None
    peak = peak_flops_per_device()
    callbacks.append(Throughput(batch, tokens, flops_per_step, peak * replicas if peak else None,
                                log_dir=train_logs, log_every_steps=config.train.log_every_steps))
    if workdir is not None:
        hparams = {**config_lib.to_dict(config), "run": run_info}
        callbacks.append(Dashboard(str(workdir), hparams, task=task, validation_predictions=validation_predictions,
                                   log_every_steps=config.train.log_every_steps))
        if profile_steps:
            callbacks.append(ProfileSteps(train_logs, *profile_steps))
    return callbacks


def schedule_of(config, total_steps: int) -> WarmupDecay:
    """The learning rate of `config.schedule` over a run of `total_steps` steps."""
    schedule = config.schedule
    return WarmupDecay(config.optimizer.learning_rate, warmup_steps=schedule.warmup_steps, decay=schedule.decay,
                       decay_steps=max(1, total_steps - schedule.warmup_steps),
                       min_learning_rate=schedule.min_learning_rate, decay_rate=schedule.decay_rate,
                       step_size=schedule.step_size)


def make_optimizer(config, mixed_precision: str = "float32", model: keras.Model | None = None
                   ) -> keras.optimizers.Optimizer:
    """The optimizer `config.optimizer` names; the learning-rate schedule is attached by its callback.

    Weight decay (decoupled, as in AdamW) applies to weight matrices and embeddings only: the variables of
    `model` with fewer than two dimensions (biases, normalisation scales and offsets) are excluded, as in
    nanoGPT and GPT-2's training.
    """
    opt = config.optimizer
    # A fixed name: optimizer variable paths (the checkpoint's keys) would otherwise depend on how many
    # optimizers the process made before.
    common = dict(learning_rate=opt.learning_rate, weight_decay=opt.weight_decay or None, name="optimizer")
    if opt.name == "sgd":
        optimizer = keras.optimizers.SGD(momentum=opt.momentum, **common)
    elif opt.name == "adam":
        optimizer = keras.optimizers.Adam(**common)
    elif opt.name == "lion":
        optimizer = keras.optimizers.Lion(**common)
    else:
        optimizer = keras.optimizers.AdamW(**common)
    if opt.weight_decay and model is not None:
        optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) < 2])
    if mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


if __name__ == "__main__":
    define_flags()
    cli.run(run, flags_parser=parse_flags)
