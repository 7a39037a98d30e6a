"""kerasbig's training loop side by side with plain `model.fit` and the bare compiled step (`bench --suite=cpu`).

Every variant trains the same model from the same initial weights on the same batches (kerasbig's input
stream), with the same optimizer, schedule, batch, steps and validation cadence, in a fresh process:
- `kerasbig`: `Trainer.fit` with the run's callbacks (schedule, throughput, TensorBoard dashboard) and its
  checkpoints, as `python -m kerasbig.train` runs it;
- `fit`: `model.compile` + `model.fit(steps_per_epoch=..., validation_data=...)` with the same schedule as the
  optimizer's learning rate;
- `turns`: five loops in one process on one model, taking turns period by period (a turn is one epoch of steps
  and the work that ends it): kerasbig's loop as above; the bare step, kerasbig's own compiled multi-step call
  on kerasbig's own input iterator in a plain loop (no callbacks, validation or checkpoints), which is the
  floor; the same bare loop again; the bare step on the run's batches made before the loop (`ready`: each step
  only takes its batch from memory); and the bare step on one batch repeated from memory (`cached`). On this
  machine a step's speed drifts by up to 2x between seconds, two copies of a model run a few percent apart in
  any process, and so do two traces of one function, so loops in separate processes, one after another or on
  copies cannot be compared to a few percent. Taking turns on the same variables, kerasbig's loop and the bare
  ones calling the same trace on the same iterator, they differ only in their loops and inputs. (They all train
  the one model, so it takes 5x the steps: the numbers are not a run's, the step's cost is.) `bare again /
  bare`, two identical loops, is the method's resolution, so the floor is the mean of the two. `kerasbig /
  bare` is what the loop adds to a step. `input wait`, 1 - ready / bare, is what making the input costs the step
  beyond taking a made batch: one CPU replica's batch ops inside the step, or on several replicas the tf.data
  pipeline's CPU, which on 2 cores is taken from the step's. `one batch`, 1 - cached / bare, also counts what a
  step pays for a batch that changes from step to step at all: a repeated batch is the same tensor every step,
  which no training run has. The suite gives their medians and ranges over processes.
`kerasbig` and `fit` report the training call's seconds, the median step time of the executions after the first
(inside `on_train_batch_begin`..`end`) and the seconds from process start to the end of the first step
(start-up, tracing, compilation). `turns` reports each loop's median step time and, for kerasbig's loop, the
median share of its step spent outside the compiled call (`TensorFlowSteps.train`).

    python -m kerasbig.bench_loop VARIANT CASE      # one measurement, a JSON line (what the suite runs)

`checkpoint_rows` (`bench --suite=checkpoint`) times how long a checkpoint holds training up, written in the
foreground and in the background, for GPT states of a few sizes.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from kerasbig import checkpoint, data, distribute, models
from kerasbig.data import pipeline
from kerasbig.train import CONFIGS, make_callbacks, make_optimizer, schedule_of
from kerasbig.trainer import Trainer

VARIANTS = ("kerasbig", "fit", "turns")
LOOPS = ("kerasbig", "bare", "bare_again", "ready", "cached")  # the loops that take turns


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


class Turns:
    """Loops on threads of one process running one at a time: `wait(name)` blocks until it is `name`'s turn,
    `done(name)` hands the turn on, `finished(name)` leaves the rotation. The turns go in rounds, every loop once a
    round: the first loop named first, then each round in a new random order. What runs just before a step
    changes its speed by several percent here (caches, thread pools), so no loop may always follow the same one."""

    def __init__(self, names, seed: int | None = None):
        self._loops, self._random = list(names), random.Random(seed)
        self._round = self._random.sample(self._loops[1:], len(self._loops) - 1)  # the first loop goes first
        self.taken = {name: 1 if name == names[0] else 0 for name in names}  # turns each loop has had
        self._changed = threading.Condition()
        self._current = names[0]

    def _next(self) -> str | None:
        if not self._round:
            self._round = self._random.sample(self._loops, len(self._loops))
        if not self._round:
            return None
        name = self._round.pop()
        self.taken[name] += 1
        return name

    def wait(self, name: str) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._current == name)

    def done(self, name: str) -> None:
        with self._changed:
            self._current = self._next()
            self._changed.notify_all()

    def finished(self, name: str) -> None:
        with self._changed:
            self._loops.remove(name)
            if name in self._round:
                self._round.remove(name)
            if self._current == name:
                self._current = self._next()
            self._changed.notify_all()


class TurnTimes(StepTimes):
    """StepTimes that end the loop's turn where each period (epoch) after the first begins, and wait for its next:
    a turn is one period of steps and the work that closes it (kerasbig's validation, callbacks, checkpoint)."""

    def __init__(self, turns: Turns, name: str):
        super().__init__()
        self.turns, self.name = turns, name

    def on_epoch_begin(self, epoch, logs=None):
        if self.spans:
            self.turns.done(self.name)
            self.turns.wait(self.name)


def _setup(case: LoopCase):
    if case.replicas > 1:
        distribute.split_cpu(case.replicas)
    config = _config(case)
    strategy = distribute.make("mirrored" if case.replicas > 1 else "one_device", num_cpu_replicas=case.replicas)
    return config, strategy, data.load_task(config.data)


def _trainer(config, strategy, task, workdir: str) -> Trainer:
    keras.utils.set_random_seed(0)  # every variant and loop starts from the same weights
    with strategy.scope():
        model = models.build(task.spec, config.model)
        optimizer = make_optimizer(config, model=model)
    return Trainer(model, optimizer, task, strategy, config, pathlib.Path(workdir))


def _kerasbig(trainer: Trainer, timer: StepTimes, replicas: int) -> None:
    config, workdir = trainer.config, trainer.workdir
    callbacks = make_callbacks(config, workdir, task=trainer.task, total_steps=trainer.total_steps,
                               flops_per_step=None,
                               run_info={"seed": 0, "mixed_precision": "float32", "replicas": replicas},
                               validation_predictions=trainer.latest_validation)
    trainer.fit([*callbacks, timer], verbose=False)


def measure(variant: str, case: LoopCase) -> dict:
    """One variant of one case, in this process."""
    if variant == "turns":
        return measure_turns(case)
    config, strategy, task = _setup(case)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = _trainer(config, strategy, task, workdir)
        timer = StepTimes()
        start = time.perf_counter()
        if variant == "kerasbig":
            _kerasbig(trainer, timer, case.replicas)
        else:
            _fit(trainer, timer)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "step_ms": _step_ms(timer, config), "first_step_end": timer.first_end,
            "steps": trainer.total_steps, "executions": len(timer.spans)}


def _step_ms(timer: StepTimes, config) -> float:
    """The median step time of the executions after the first (tracing and compilation)."""
    spans = timer.spans[1:]
    return 1e3 * statistics.median(spans) / config.train.steps_per_execution if spans else float("nan")


def measure_turns(case: LoopCase) -> dict:
    """kerasbig's loop, the bare step (twice), on made batches and on a cached batch, taking turns in this process
    on one model: the bare loops call kerasbig's own compiled step, and the two bare loops on kerasbig's own
    input iterator too."""
    config, strategy, task = _setup(case)
    turns, errors, calls = Turns(LOOPS), [], []
    timers = {name: TurnTimes(turns, name) for name in LOOPS}
    with tempfile.TemporaryDirectory() as workdir:
        trainer = _trainer(config, strategy, task, workdir)
        inputs = {name: _floor_input(trainer, name) for name in ("ready", "cached")}
        # kerasbig's loop and both bare loops draw their batches from one iterator, so they call one trace of the
        # compiled step: two traces of the same function run up to a few percent apart here.
        inputs["bare"] = inputs["bare_again"] = shared = trainer.steps.train_iterator(0, 3 * trainer.total_steps)
        trainer.steps.train_iterator = lambda start_step, total_steps: shared  # kerasbig's
        train = trainer.steps.train
        trainer.steps.train = _timed(train, calls)  # kerasbig's calls only

        def run(name):
            try:
                turns.wait(name)
                if name == "kerasbig":
                    _kerasbig(trainer, timers[name], case.replicas)
                else:
                    _bare_steps(trainer, train, timers[name], inputs[name])
            except BaseException as err:  # noqa: BLE001 - raised again below, on the main thread
                errors.append(err)
            finally:
                turns.finished(name)
        threads = [threading.Thread(target=run, args=(name,), name=name) for name in LOOPS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        traces = trainer.steps.train_traces()
    if errors:
        raise errors[0]
    spans = timers["kerasbig"].spans
    return {**{f"{name}_ms": _step_ms(timers[name], config) for name in LOOPS},
            "outside_step": statistics.median(1 - call / span for call, span in zip(calls[1:], spans[1:])),
            "executions": {name: len(timer.spans) for name, timer in timers.items()}, "turns": turns.taken,
            "traces": traces}


def _timed(function, durations: list):
    """`function`, appending the seconds of each call to `durations`."""
    def timed(*args):
        start = time.perf_counter()
        result = function(*args)
        durations.append(time.perf_counter() - start)
        return result
    return timed


def _fit(trainer: Trainer, timer: StepTimes) -> None:
    """Plain Keras: the same schedule as the optimizer's rate, the same batches, validation each period."""
    model, optimizer, task, config = trainer.model, trainer.optimizer, trainer.task, trainer.config
    with trainer.strategy.scope():
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


def _floor_input(trainer: Trainer, loop: str):
    """The input iterator of a floor, held in memory: the run's batches made before the loop ("ready"), or its
    first batch repeated ("cached")."""
    steps = trainer.total_steps
    iterator = trainer.steps.train_iterator(0, steps)
    if isinstance(iterator, pipeline.StepBatches):  # batches made inside the step: take them from memory instead
        no_indices = lambda first_step, steps: tf.zeros([steps])
        if loop == "cached":
            first = next(iterator)
            return pipeline.StepBatches(no_indices, lambda step, indices: first, 0)
        made = tf.nest.map_structure(lambda *batches: tf.stack(batches), *[next(iterator) for _ in range(steps)])
        return pipeline.StepBatches(
            no_indices, lambda step, indices: tf.nest.map_structure(lambda t: tf.gather(t, step), made), 0)

    def dataset_fn(context):  # tf.data reading from its in-memory cache, filled below
        batches = pipeline.train_batches(trainer.task, global_batch=trainer.global_batch, seed=trainer.seed,
                                         start_step=0, total_steps=steps, context=context)
        return (batches.take(1) if loop == "cached" else batches).cache().repeat()
    datasets = trainer.steps.datasets(dataset_fn)
    filling = iter(datasets)
    for _ in range(1 if loop == "cached" else steps):
        next(filling)
    return iter(datasets)


def _bare_steps(trainer: Trainer, train, timer: StepTimes, iterator) -> None:
    """`train` (the trainer's `steps.train`) called in a plain loop over the trainer's steps and periods, on
    `iterator`. The learning-rate schedule is the one kerasbig's loop installed: it takes the first turn."""
    steps, spe = trainer.total_steps, trainer.config.train.steps_per_execution
    done = 0
    while done < steps:
        if done % trainer.period == 0:
            timer.on_epoch_begin(done // trainer.period)
        n = min(spe, steps - done, trainer.period - done % trainer.period)  # executions end where periods do
        timer.on_train_batch_begin(done)
        train(iterator, n, False)
        timer.on_train_batch_end(done)
        done += n


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
                if "first_step_end" in measured:
                    measured["first_step_s"] = measured.pop("first_step_end") - spawned
                runs[variant].append(measured)
        rows.append(_row(name, runs))
        print(json.dumps(rows[-1]), flush=True)  # each case as it completes: the suite takes a while
    return rows


def _row(name: str, runs: dict[str, list[dict]]) -> dict:
    def median(variant, key):
        return statistics.median(run[key] for run in runs[variant])

    def ms(variant, key):  # three figures: digits_mlp's steps differ in the second decimal of a millisecond
        return f"{median(variant, key):.3g}"

    def spread(variant, key):
        values = [run[key] for run in runs[variant]]
        return (max(values) - min(values)) / statistics.median(values)

    def floor(run):  # both bare loops: each loop runs at its own speed, a few percent apart (`bare again / bare`)
        return (run["bare_ms"] + run["bare_again_ms"]) / 2

    def per_process(ratio, form: str) -> str:  # each `turns` process's own ratio: the median, and their range
        values = sorted(ratio(run) for run in runs["turns"])
        return f"{statistics.median(values):{form}} ({values[0]:{form}} to {values[-1]:{form}})"
    return {
        "case": name, "steps": runs["kerasbig"][0]["steps"],
        "kerasbig (s)": median("kerasbig", "seconds"), "fit (s)": median("fit", "seconds"),
        "kerasbig / fit": f"{median('kerasbig', 'seconds') / median('fit', 'seconds'):.2f}",
        "spread": f"{max(spread('kerasbig', 'seconds'), spread('fit', 'seconds')):.0%}",
        "step ms: kerasbig": ms("kerasbig", "step_ms"), "fit": ms("fit", "step_ms"),
        "turns: kerasbig": ms("turns", "kerasbig_ms"), "bare": ms("turns", "bare_ms"),
        "bare again": ms("turns", "bare_again_ms"), "ready": ms("turns", "ready_ms"), "cached": ms("turns", "cached_ms"),
        "bare again / bare": per_process(lambda run: run["bare_again_ms"] / run["bare_ms"], ".3f"),
        "kerasbig / bare": per_process(lambda run: run["kerasbig_ms"] / floor(run), ".3f"),
        "input wait": per_process(lambda run: 1 - run["ready_ms"] / floor(run), ".1%"),
        "one batch": per_process(lambda run: 1 - run["cached_ms"] / floor(run), ".1%"),
        "loop outside step": f"{median('turns', 'outside_step'):.1%}",
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
