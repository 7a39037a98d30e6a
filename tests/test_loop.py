"""kerasbig's training loop in-process: one input stream per run, evaluation and checkpoint cadences in steps,
and weight decay that spares biases and normalisation parameters."""
import json
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import checkpoint_weights
from kerasbig import config as config_lib
from kerasbig import models
from kerasbig.checkpoint import saved_steps
from kerasbig.data import pipeline
from kerasbig.data.digits import load_digits
from kerasbig.data.spec import DataSpec, Task
from kerasbig.train import make_callbacks, make_optimizer
from kerasbig.trainer import Trainer


def digits_config(**train):
    config = config_lib.base()
    config.data.batch_size = 256  # 1257 training examples: 4 steps per epoch
    config.model = dict(name="mlp", hidden=(16,), dropout=0.0)
    config.train.update(train)
    return config


def trainer(config, workdir) -> Trainer:
    task = load_digits(augment=False)
    model = models.build(task.spec, config.model)
    return Trainer(model, make_optimizer(config, model=model), task, tf.distribute.get_strategy(), config, workdir)


@pytest.mark.parametrize("accelerated", [False, True])
def test_periodic_checkpoints_are_written_in_place_on_cpus_and_in_the_background_on_accelerators(
        tmp_path, monkeypatch, accelerated):
    """On CPUs the step keeps every core busy, so a writer thread beside it would slow the next steps: the
    periodic saves of a CPU run start no thread. With the step on a GPU or TPU they are written in the background.
    Either way every checkpoint ends up on disk."""
    from kerasbig import checkpoint

    writers = []
    real_thread = checkpoint.threading.Thread
    monkeypatch.setattr(checkpoint.threading, "Thread",
                        lambda *args, **kwargs: writers.append(kwargs["name"]) or real_thread(*args, **kwargs))
    run = trainer(digits_config(steps=12, checkpoint_every_steps=3, keep_checkpoints=20), tmp_path)
    assert run.steps.accelerated is False  # this machine has no GPU
    run.steps.accelerated = accelerated
    run.fit([], verbose=False)
    assert saved_steps(tmp_path / "checkpoints") == [3, 4, 6, 8, 9, 12]
    # On accelerators every periodic save is written in the background (the final, complete one in place).
    assert writers == ([f"checkpoint-{step}" for step in (3, 4, 6, 8, 9, 12)] if accelerated else [])


class Counting:
    """Wraps a pipeline function, counting the calls that build an input (the real function still runs)."""

    def __init__(self, function):
        self.function, self.calls = function, []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs.get("split", args[1] if len(args) > 1 else None))
        return self.function(*args, **kwargs)


def test_inputs_are_built_once_per_run_and_cadences_follow_steps(tmp_path, monkeypatch):
    """Three epochs of data (4 steps each) with evaluation every 5 steps and checkpoints every 3: the training
    input is built once, the validation input once, and evaluations and checkpoints land on their steps, not on
    the data's epoch boundaries."""
    train_inputs, eval_inputs = Counting(pipeline.step_batches), Counting(pipeline.eval_batches)
    monkeypatch.setattr(pipeline, "step_batches", train_inputs)  # one CPU replica: batches made in the step
    monkeypatch.setattr(pipeline, "train_batches", Counting(pipeline.train_batches))
    monkeypatch.setattr(pipeline, "eval_batches", eval_inputs)
    evaluated = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: evaluated.append(
        (int(model.optimizer.iterations.numpy()), "val_loss" in logs)))
    config = digits_config(steps=12, eval_every_steps=5, checkpoint_every_steps=3, keep_checkpoints=20)
    run = trainer(config, tmp_path)
    model = run.model
    run.fit([record], verbose=False)

    assert len(train_inputs.calls) == 1 and not pipeline.train_batches.calls and eval_inputs.calls == ["validation"]
    assert evaluated == [(5, True), (10, True), (12, True)]
    assert saved_steps(tmp_path / "checkpoints") == [3, 5, 6, 9, 10, 12]


def test_executions_read_nothing_back_but_their_sums_and_evaluate_the_schedule_once_a_step(tmp_path, monkeypatch):
    """Within an epoch, the run's callbacks (schedule, throughput, dashboard) never read the optimizer's step
    counter from the device (each read waits for it): they count steps from one read per epoch. And the compiled
    step evaluates the learning-rate schedule once, not again for every weight-decayed kernel. With no step
    cadence set, the period is an epoch of the data, and the run ends with a complete checkpoint."""
    config = digits_config(epochs=2)
    config.data.batch_size = 64  # 19 executions per epoch
    run = trainer(config, tmp_path)
    assert (run.period, run.epochs, run.total_steps) == (19, 2, 38)
    iterations, reads, traced_schedules, reads_at_batch_end = run.optimizer.iterations, [], [], []
    numpy = type(iterations).numpy
    monkeypatch.setattr(type(iterations), "numpy",
                        lambda variable: (variable is iterations and reads.append(1), numpy(variable))[1])
    callbacks = make_callbacks(config, tmp_path, task=run.task, total_steps=run.total_steps, flops_per_step=None,
                               run_info={"seed": 0, "mixed_precision": "float32", "replicas": 1})
    schedule = callbacks[0].schedule
    evaluate = type(schedule).__call__
    monkeypatch.setattr(type(schedule), "__call__", lambda self, step: (
        tf.executing_eagerly() or traced_schedules.append(1), evaluate(self, step))[1])
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: reads_at_batch_end.append(len(reads)))
    run.fit([*callbacks, record], verbose=False)

    assert len(reads_at_batch_end) == run.total_steps == 38
    for epoch in (0, 1):
        in_epoch = reads_at_batch_end[epoch * 19:(epoch + 1) * 19]
        assert in_epoch[1:] == in_epoch[:1] * 18, f"reads by the end of each execution of epoch {epoch}: {in_epoch}"
    assert len(traced_schedules) == 2  # the step's rate, and the next step's that the execution returns
    state = json.loads((tmp_path / "checkpoints" / "step-00000038" / "state.json").read_text())
    assert state["complete"] and sorted(checkpoint_weights(tmp_path)) == sorted(v.path for v in run.model.variables)


def test_batch_hooks_reach_every_callback_that_has_them(tmp_path):
    """The loop calls only the batch hooks that do something, its own way: those a Callback subclass overrides and
    a LambdaCallback's, with the batch index (in the epoch) of the execution's first and last step, and at its end
    the logs."""
    seen = []

    class Begins(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(("begin", batch))

    ends = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(("end", batch, logs)))
    trainer(digits_config(steps=6, steps_per_execution=4), tmp_path).fit([Begins(), ends], verbose=False)
    # 4-step epochs: each execution is one epoch here, its batches counted from the epoch's start
    assert [event[:2] for event in seen] == [("begin", 0), ("end", 3), ("begin", 0), ("end", 1)]
    assert all(event[2]["learning_rate"] > 0 and event[2]["loss"] > 0 for event in seen if event[0] == "end")


def test_each_training_iterator_traces_a_compiled_step_of_its_own():
    """An iterator of batches made in the step traces the train function anew (the bench's loops make three).
    Its XLA-compiled step captures the learning rate that trace evaluated, so each trace makes its own: a step
    shared with an earlier trace reads a tensor of that trace's graph ("out of scope") and cannot run."""
    from kerasbig import bench_loop

    turns = bench_loop.measure("turns", bench_loop.LoopCase("digits_mlp", {"epochs": 1, "jit_compile": True}))
    assert turns["executions"] == {loop: 5 for loop in bench_loop.LOOPS}  # 19 steps, 4 an execution


def test_training_calls_the_trace_of_the_iterator_it_is_given(tmp_path):
    """`TensorFlowSteps.train` calls the train function's trace directly, remembering the last iterator's: two
    iterators taking turns each advance their own stream, and the optimizer counts every step."""
    steps = trainer(digits_config(steps=20), tmp_path).steps
    first, second = steps.train_iterator(0, 20), steps.train_iterator(10, 20)
    for iterator, count in ((first, 2), (second, 3), (first, 1), (second, 2)):
        steps.train(iterator, count, False)
    assert (int(first.next_step.numpy()), int(second.next_step.numpy()), steps.step()) == (3, 15, 8)


def test_a_resumed_stream_continues_with_the_same_batches(tmp_path):
    """The stream from step k is the tail of the stream from step 0, across epoch boundaries and reshuffles."""
    task = load_digits(augment=True)
    whole = [x.numpy() for x, _ in pipeline.train_batches(task, global_batch=256, seed=3, start_step=0,
                                                           total_steps=11)]
    resumed = [x.numpy() for x, _ in pipeline.train_batches(task, global_batch=256, seed=3, start_step=6,
                                                             total_steps=11)]
    assert len(whole) == 11 and len(resumed) == 5
    for a, b in zip(whole[6:], resumed):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(whole[0], whole[4])  # epoch 2 is another permutation of the same examples


@pytest.mark.parametrize("augment", [False, True])
def test_batches_made_inside_the_step_are_the_pipelines_batches(augment):
    """One CPU replica's batches, made in the compiled step from a step counter (`StepBatches`), are the tf.data
    pipeline's, value for value, from a resume mid-epoch across two reshuffles: eagerly, in a tf.function, and
    three steps at a time with their indices drawn at once (`execution`), across the ends of epochs."""
    task = load_digits(augment=augment)  # 1,257 examples: 4 steps of 256 an epoch
    stream = dict(global_batch=256, seed=3)
    expected = list(pipeline.train_batches(task, start_step=2, total_steps=11, **stream))
    in_step = pipeline.step_batches(task, start_step=2, **stream)
    traced = tf.function(lambda: next(in_step))

    @tf.function
    def three_steps():
        next_batch = in_step.execution(3)
        return [next_batch() for _ in range(3)]
    made = [next(in_step), *three_steps(), traced(), *three_steps(), next(in_step)]  # steps 2, 3-5, 6, 7-9, 10
    assert len(expected) == len(made) == 9 and int(in_step.next_step.numpy()) == 11
    for (x, y), (made_x, made_y) in zip(expected, made):
        np.testing.assert_array_equal(x.numpy(), made_x.numpy())
        np.testing.assert_array_equal(y.numpy(), made_y.numpy())


def test_every_epoch_draws_distinct_examples_in_a_new_order():
    """Inputs 0..n-1: each epoch's batches hold n // batch * batch distinct examples, in a fresh order."""
    n, batch = 103, 10
    inputs = tf.data.Dataset.from_tensor_slices((np.arange(n, dtype="float32"), np.zeros(n, "int32")))
    task = Task(DataSpec("classification", "x", (), "float32", 2), train=inputs, validation=inputs, test=inputs,
                num_examples={"train": n, "validation": n, "test": n}, serving_input=tf.TensorSpec([None]))
    stream = np.concatenate([x.numpy() for x, _ in pipeline.train_batches(task, global_batch=batch, seed=0,
                                                                          start_step=0, total_steps=20)])
    first, second = stream[:100], stream[100:]
    assert len(set(first)) == len(set(second)) == 100 and set(first) | set(second) <= set(range(n))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "lion"])
def test_weight_decay_spares_biases_and_normalisation(name):
    """With a zero gradient, only decay moves a weight: kernels and embeddings shrink, biases and LayerNorm
    scales and offsets do not (nanoGPT's rule: decay parameters of rank >= 2)."""
    config = config_lib.base()
    config.optimizer.name, config.optimizer.weight_decay, config.optimizer.learning_rate = name, 0.1, 0.5
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(10, 4),
                              keras.layers.LayerNormalization(), keras.layers.Dense(2)])
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    optimizer = make_optimizer(config, model=model)
    optimizer.apply([tf.zeros_like(v) for v in model.trainable_variables], model.trainable_variables)
    for variable in model.trainable_variables:
        moved = not np.allclose(variable.numpy(), before[variable.path])
        assert moved == (len(variable.shape) >= 2), variable.path


def test_validation_calls_the_test_hooks_as_fit_does(tmp_path):
    """Keras's fit runs validation between on_test_begin and on_test_end with a batch hook per batch."""
    calls = []
    hooks = keras.callbacks.LambdaCallback(
        on_test_begin=lambda logs: calls.append("begin"),
        on_test_batch_begin=lambda batch, logs: calls.append(f"batch {batch}"),
        on_test_batch_end=lambda batch, logs: calls.append("end" if "loss" in logs else "no loss"),
        on_test_end=lambda logs: calls.append(f"done {sorted(logs)}"))
    config = digits_config(steps=2, eval_every_steps=1)
    config.data.eval_batch_size = 64  # 180 validation examples: 3 batches
    trainer(config, tmp_path).fit([hooks], verbose=False)
    one_pass = ["begin", "batch 0", "end", "batch 1", "end", "batch 2", "end", "done ['accuracy', 'loss']"]
    assert calls == one_pass * 2


def test_an_evaluation_batch_larger_than_the_split_evaluates_it_once(tmp_path):
    """The last evaluation batch is padded to full size, so a huge eval batch would allocate its padding: it
    is cut to the split instead, and every example still counts once."""
    config = digits_config(steps=4)
    config.data.eval_batch_size = 10 ** 8
    sums, labels, _ = trainer(config, tmp_path).evaluate("test")
    assert sums.count == len(labels) == 360


def test_evaluations_reuse_one_iterator_and_a_pass_cut_short_does_not_shift_the_next(tmp_path):
    """Every pass covers the split once in the same order, whether the one before it ran to the end (the
    repeated iterator continues at a pass boundary) or was cut short (its iterator is dropped)."""
    config = digits_config(steps=4)
    config.data.eval_batch_size = 64  # 360 test examples: 5 full batches and a padded one
    run = trainer(config, tmp_path)
    passes = [run.evaluate("test"), run.evaluate("test")]
    cut_short = run.steps.evaluate("test", 64)
    next(cut_short)
    cut_short.close()
    passes.append(run.evaluate("test"))
    for sums, labels, predictions in passes:
        assert (sums.loss, sums.count) == (passes[0][0].loss, 360.0)
        np.testing.assert_array_equal(labels, passes[0][1])
        np.testing.assert_array_equal(predictions, passes[0][2])


def test_the_cpu_bench_times_each_variant_of_a_case_over_the_same_steps():
    """`bench --suite=cpu`'s measurements, in-process on a 2-epoch digits_mlp: kerasbig's loop and fit each train
    the case's 38 steps in 10 executions (4 steps each, ending where the 19-step epochs do) and report positive
    times; in `turns`, kerasbig's loop, the bare step (twice), on made batches and on a cached batch each run 10
    executions on three traces of the step (kerasbig's and the bare loops' share one), kerasbig's loop spends part
    of each step outside the compiled call (and less than half), and the row's ratios are those of the loops' step
    times."""
    from kerasbig import bench_loop

    case = bench_loop.LoopCase("digits_mlp", {"epochs": 2})
    runs = {variant: [bench_loop.measure(variant, case)] for variant in bench_loop.VARIANTS}
    for variant in ("kerasbig", "fit"):
        (run,) = runs[variant]
        assert (run["steps"], run["executions"]) == (38, 10), (variant, run)
        assert run["seconds"] > 0 and run["step_ms"] > 0, (variant, run)
        run["first_step_s"] = 1.0
    (turns,) = runs["turns"]
    assert turns["executions"] == {"kerasbig": 10, "bare": 10, "bare_again": 10, "ready": 10, "cached": 10}
    assert turns["turns"] == {"kerasbig": 2, "bare": 2, "bare_again": 2, "ready": 2, "cached": 2}  # one an epoch
    assert turns["traces"] == 3
    assert all(turns[f"{loop}_ms"] > 0 for loop in bench_loop.LOOPS) and 0 < turns["outside_step"] < 0.5
    row = bench_loop._row("digits_mlp", runs)
    floor = (turns["bare_ms"] + turns["bare_again_ms"]) / 2
    ratio, wait, one = turns["kerasbig_ms"] / floor, 1 - turns["ready_ms"] / floor, 1 - turns["cached_ms"] / floor
    again = turns["bare_again_ms"] / turns["bare_ms"]
    assert row["kerasbig / bare"] == f"{ratio:.3f} ({ratio:.3f} to {ratio:.3f})"  # one process: its own range
    assert row["bare again / bare"] == f"{again:.3f} ({again:.3f} to {again:.3f})"
    assert row["input wait"] == f"{wait:.1%} ({wait:.1%} to {wait:.1%})" and row["steps"] == 38
    assert row["one batch"] == f"{one:.1%} ({one:.1%} to {one:.1%})"


@pytest.mark.parametrize("in_step", [True, False])
def test_the_cpu_bench_floors_take_the_runs_batches_from_memory(tmp_path, monkeypatch, in_step):
    """The floors' inputs: `ready` gives the run's own batches, step by step, and `cached` its first batch every
    step; both from memory, whether the batches are made in the step or by tf.data."""
    from kerasbig import bench_loop

    run = trainer(digits_config(steps=6), tmp_path)
    monkeypatch.setattr(run.steps, "_one_cpu_replica", in_step)
    stream = run.steps.train_iterator(0, 6)
    expected = [next(stream) for _ in range(6)]
    ready, cached = (bench_loop._floor_input(run, loop) for loop in ("ready", "cached"))
    assert isinstance(ready, pipeline.StepBatches) == in_step
    for step in range(6):
        for made, want in ((next(ready), expected[step]), (next(cached), expected[0])):
            for a, b in zip(made, want):
                np.testing.assert_array_equal(a, b)


def test_the_cpu_bench_loops_take_turns_one_at_a_time_in_rounds_of_changing_order():
    """`bench_loop.Turns`: loops on threads run one at a time, each once a round, the first named first and then in an
    order that changes from round to round; a loop that finishes leaves the rotation and the others go on."""
    from kerasbig.bench_loop import Turns

    turns, order, running = Turns(["a", "b", "c"], seed=0), [], []

    def loop(name, executions):
        turns.wait(name)
        for _ in range(executions):
            running.append(name)
            assert running == [name]  # nobody else is between wait() and done()
            order.append(name)
            running.remove(name)
            turns.done(name)
            turns.wait(name)
        turns.finished(name)
    threads = [threading.Thread(target=loop, args=args) for args in (("a", 12), ("b", 1), ("c", 12))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert len(order) == 25 and order[0] == "a" and sorted(order[:3]) == ["a", "b", "c"]
    assert turns.taken == {"a": 13, "b": 2, "c": 13}  # each loop has a last turn to finish in
    rounds = [order[i:i + 2] for i in range(3, 25, 2)]  # b left in round 2, in its turn
    assert all(sorted(each) == ["a", "c"] for each in rounds)
    assert {tuple(each) for each in rounds} == {("a", "c"), ("c", "a")}