"""kerasbig's training loop side by side with plain `model.fit` and the bare compiled step (`bench --suite=cpu`).

Every variant trains the same model from the same initial weights on the same batches (kerasbig's input
stream), with the same optimizer, schedule, batch, steps and validation cadence, in a fresh process:
- `kerasbig`: `Trainer.fit` with the run's callbacks (schedule, throughput, TensorBoard dashboard) and its
  checkpoints, as `python -m kerasbig.train` runs it;
- `fit`: `model.compile` + `model.fit(steps_per_epoch=..., validation_data=...)` with the same schedule as the
  optimizer's learning rate;
- `step`: kerasbig's compiled multi-step function, with the same schedule, called in a bare loop (no callbacks,
  validation or checkpoints): the floor;
- `step_validated`: the same, stopping for the validation pass after each period as kerasbig and `fit` do: on
  this 2-core machine any pause of ~0.1 s, even a sleep, leaves the next ~10 steps up to 2x slower (the bare step
  on one cached batch too), so `kerasbig / step_validated` is what the loop itself costs;
- `step_cached`: the bare step with one batch repeated from memory: the step without any input pipeline, so that
  `step - step_cached` is what waiting for input costs.
Each reports the training call's seconds, the median step time of the executions after the first (inside
`on_train_batch_begin`..`end` for the loops with callbacks) and the seconds from process start to the end of the
first step (start-up, tracing, compilation). `kerasbig` also reports the median share of its step time spent
outside the compiled call (`TensorFlowSteps.train`): the loop's own work in a step, which the ratio of two noisy
medians cannot resolve below a few percent.

    python -m kerasbig.bench_loop VARIANT CASE      # one measurement, a JSON line (what the suite runs)

`checkpoint_rows` (`bench --suite=checkpoint`) times how long a checkpoint holds training up, written in the
foreground and in the background, for GPT states of a few sizes.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from kerasbig import checkpoint, data, distribute, models
from kerasbig.data import pipeline
from kerasbig.train import CONFIGS, make_callbacks, make_optimizer, schedule_of
from kerasbig.trainer import Trainer

VARIANTS = ("kerasbig", "fit", "step", "step_validated", "step_cached")


@dataclasses.dataclass(frozen=True)
class LoopCase:
    config: str
    train: dict
    replicas: int = 1


LOOP_CASES = {
    "digits_mlp": LoopCase("digits_mlp", {"epochs": 20}),
    "digits_cnn": LoopCase("digits_cnn", {"epochs": 8}),
    "digits_cnn_mirrored": LoopCase("digits_cnn", {"epochs": 8}, replicas=2),
    "text_transformer": LoopCase("text_transformer", {"steps": 60, "eval_every_steps": 30}),
    "gpt_small": LoopCase("gpt_small", {"steps": 60, "eval_every_steps": 30}),
}


def _config(case: LoopCase):
    spec = importlib.util.spec_from_file_location(case.config, CONFIGS / f"{case.config}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.update({"early_stopping": {**config.train.early_stopping, "enabled": False}, **case.train})
    return config


class StepTimes(keras.callbacks.Callback):
    """Wall time of each execution, from its `on_train_batch_begin` to its `on_train_batch_end` (last in the list,
    so the other callbacks' end hooks count), and when the first one ended."""

    def __init__(self):
        super().__init__()
        self.spans, self.first_end, self._begin = [], None, None

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.spans.append(time.perf_counter() - self._begin)
        self.first_end = self.first_end or time.time()


def measure(variant: str, case: LoopCase) -> dict:
    """One variant of one case, in this process."""
    if case.replicas > 1:
        distribute.split_cpu(case.replicas)
    keras.utils.set_random_seed(0)
    config = _config(case)
    strategy = distribute.make("mirrored" if case.replicas > 1 else "one_device", num_cpu_replicas=case.replicas)
    task = data.load_task(config.data)
    with strategy.scope():
        model = models.build(task.spec, config.model)
        optimizer = make_optimizer(config, model=model)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(model, optimizer, task, strategy, config, pathlib.Path(workdir))
        spe, steps = config.train.steps_per_execution, trainer.total_steps
        timer = StepTimes()
        calls = []
        start = time.perf_counter()
        if variant == "kerasbig":
            trainer.steps.train = _timed(trainer.steps.train, calls)
            callbacks = make_callbacks(config, pathlib.Path(workdir), task=task, total_steps=steps, flops_per_step=None,
                                       run_info={"seed": 0, "mixed_precision": "float32", "replicas": case.replicas},
                                       validation_predictions=trainer.latest_validation)
            trainer.fit([*callbacks, timer], verbose=False)
        elif variant == "fit":
            _fit(model, optimizer, task, config, trainer, strategy, timer)
        else:
            _bare_steps(trainer, steps, spe, cached=variant == "step_cached", validated=variant == "step_validated",
                        timer=timer)
        seconds = time.perf_counter() - start
    per_execution = statistics.median(timer.spans[1:]) if len(timer.spans) > 1 else float("nan")
    result = {"seconds": seconds, "step_ms": 1e3 * per_execution / spe, "first_step_end": timer.first_end,
              "steps": steps, "executions": len(timer.spans)}
    if variant == "kerasbig":  # each execution's span holds one compiled call
        result["outside_step"] = statistics.median(1 - call / span for call, span in zip(calls[1:], timer.spans[1:]))
    return result


def _timed(function, durations: list):
    """`function`, appending the seconds of each call to `durations`."""
    def timed(*args):
        start = time.perf_counter()
        result = function(*args)
        durations.append(time.perf_counter() - start)
        return result
    return timed


def _fit(model, optimizer, task, config, trainer: Trainer, strategy, timer: StepTimes) -> None:
    """Plain Keras: the same schedule as the optimizer's rate, the same batches, validation each period."""
    with strategy.scope():
        optimizer.learning_rate = schedule_of(config, trainer.total_steps)
        if config.optimizer.clip_norm:
            optimizer.global_clipnorm = config.optimizer.clip_norm
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                      steps_per_execution=config.train.steps_per_execution, jit_compile=config.train.jit_compile)
    batch = config.data.batch_size
    train = pipeline.train_batches(task, global_batch=batch, seed=0, start_step=0, total_steps=trainer.total_steps)
    # Per-example weights (0 on padding) broadcast to per-token weights for language models.
    validation = pipeline.eval_batches(task, "validation", global_batch=config.data.eval_batch_size).map(
        lambda x, y, w: (x, y, tf.broadcast_to(tf.reshape(w, [-1] + [1] * (len(y.shape) - 1)), tf.shape(y))))
    model.fit(train, epochs=trainer.epochs, steps_per_epoch=trainer.period, validation_data=validation,
              callbacks=[timer], verbose=0)


def _bare_steps(trainer: Trainer, steps: int, spe: int, *, cached: bool, validated: bool, timer: StepTimes) -> None:
    trainer.optimizer.learning_rate = schedule_of(trainer.config, steps)  # kerasbig's step computes it too
    def dataset_fn(context):
        stream = pipeline.train_batches(trainer.task, global_batch=trainer.global_batch, seed=0, start_step=0,
                                        total_steps=steps, context=context)
        return stream.take(1).cache().repeat() if cached else stream
    iterator = iter(trainer.strategy.distribute_datasets_from_function(dataset_fn))
    done = 0
    while done < steps:
        n = min(spe, steps - done, trainer.period - done % trainer.period)  # executions end where periods do
        timer.on_train_batch_begin(done)
        trainer.steps.train(iterator, n, False)
        timer.on_train_batch_end(done)
        done += n
        if validated and (done % trainer.period == 0 or done == steps):
            trainer.evaluate("validation")


def suite(cases: list[str], repeats: int = 3) -> list[dict]:
    """Interleaved repeats of every variant of each case in fresh processes; medians, spreads and ratios."""
    rows = []
    for name in cases:
        runs = {variant: [] for variant in VARIANTS}
        for _ in range(repeats):
            for variant in VARIANTS:
                spawned = time.time()
                result = subprocess.run([sys.executable, "-m", "kerasbig.bench_loop", variant, name],
                                        capture_output=True, text=True)
                if result.returncode:
                    raise RuntimeError(f"{name} {variant}: {result.stderr.strip().splitlines()[-1:]}")
                measured = json.loads(result.stdout.strip().splitlines()[-1])
                measured["first_step_s"] = measured.pop("first_step_end") - spawned
                runs[variant].append(measured)
        rows.append(_row(name, runs))
        print(json.dumps(rows[-1]), flush=True)  # each case as it completes: the suite takes a while
    return rows


def _row(name: str, runs: dict[str, list[dict]]) -> dict:
    def median(variant, key):
        return statistics.median(run[key] for run in runs[variant])

    def best(variant, key):  # the process the machine disturbed least
        return min(run[key] for run in runs[variant])

    def spread(variant, key):
        values = [run[key] for run in runs[variant]]
        return (max(values) - min(values)) / statistics.median(values)

    ratio, percent = "{:.2f}".format, "{:.0%}".format  # the table's one decimal would hide them
    return {
        "case": name, "steps": runs["kerasbig"][0]["steps"],
        "kerasbig (s)": median("kerasbig", "seconds"), "fit (s)": median("fit", "seconds"),
        "kerasbig / fit": ratio(median("kerasbig", "seconds") / median("fit", "seconds")),
        "spread": percent(max(spread("kerasbig", "seconds"), spread("fit", "seconds"))),
        "step ms: kerasbig": median("kerasbig", "step_ms"), "fit": median("fit", "step_ms"),
        "bare": median("step", "step_ms"),
        "kerasbig / bare": ratio(median("kerasbig", "step_ms") / median("step", "step_ms")),
        "best of each": ratio(best("kerasbig", "step_ms") / best("step", "step_ms")),
        "bare, validating": median("step_validated", "step_ms"),
        "kerasbig / bare validating": ratio(median("kerasbig", "step_ms") / median("step_validated", "step_ms")),
        "input wait": "{:.1%}".format(max(0.0, 1 - median("step_cached", "step_ms") / median("step", "step_ms"))),
        "loop outside step": "{:.1%}".format(median("kerasbig", "outside_step")),
        "first step (s)": median("kerasbig", "first_step_s"), "fit first step (s)": median("fit", "first_step_s"),
    }


# GPT widths and depths whose weights + AdamW state span ~10 MB to ~1 GB.
CHECKPOINT_SHAPES = ((128, 4), (512, 8), (1024, 12))


def checkpoint_rows(saves: int = 4) -> list[dict]:
    """For each GPT shape: the median time `Checkpoints.save` blocks the training thread, in the foreground and in
    the background, with training (here a pause as long as a foreground write) between saves."""
    rows = []
    for width, depth in CHECKPOINT_SHAPES:
        config = _config(LoopCase("gpt_small", {}))
        config.model.update(width=width, depth=depth)
        spec = data.load_plan(config.data).spec
        model = models.build(spec, config.model)
        optimizer = make_optimizer(config, model=model)
        optimizer.build(model.trainable_variables)
        state_bytes = sum(np.dtype(v.dtype).itemsize * int(np.prod(v.shape)) for v in model.variables + optimizer.variables)
        blocked = {}
        for background in (False, True, False, True):  # interleaved
            with tempfile.TemporaryDirectory() as directory:
                saver = checkpoint.Checkpoints(pathlib.Path(directory), model=model, optimizer=optimizer, keep=2)
                gap = blocked.get(False, [0.5])[-1]
                for step in range(1, saves + 1):
                    start = time.perf_counter()
                    saver.save(step, {"step": step, "complete": False, "callbacks": {}}, background=background)
                    blocked.setdefault(background, []).append(time.perf_counter() - start)
                    time.sleep(gap)
                saver.wait()
        foreground, in_background = (statistics.median(blocked[b]) for b in (False, True))
        rows.append({"GPT width x depth": f"{width} x {depth}", "state (MB)": state_bytes / 1e6,
                     "foreground save (ms)": 1e3 * foreground, "background save (ms)": 1e3 * in_background,
                     "blocked / foreground": in_background / foreground})
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], LOOP_CASES[sys.argv[2]])))
