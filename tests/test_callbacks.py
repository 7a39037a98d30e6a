"""kerasbig.callbacks on real tiny Keras models in plain `model.fit` (TensorFlow backend)."""
import doctest
import json
import math
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kerasbig.callbacks import (EarlyStopping, LearningRateScheduler, StopOnNonFiniteLoss, Throughput, WarmupDecay,
                                early_stopping, global_step, lr_schedule, nonfinite, peak_flops_per_device,
                                throughput)
from kerasbig.errors import UsageError

BATCH = 2
SCHEDULE = dict(peak=0.1, warmup_steps=4, decay="cosine", decay_steps=16, min_learning_rate=0.01)


def reference_rate(step: int) -> float:
    """SCHEDULE written out by hand: 4 warmup steps, then 16 cosine steps down to 0.01."""
    if step < 4:
        return 0.1 * step / 4
    t = min(step - 4, 16)
    return 0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * t / 16))


def one_weight_model(steps_per_execution: int = 1, learning_rate: float = 0.5) -> keras.Model:
    """y = w * x with w = 1. With x = 1 and targets far below, the MAE gradient is exactly 1, so after
    n SGD steps w = 1 - (sum of the n rates applied): the weight is a record of the schedule."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    model.compile(keras.optimizers.SGD(learning_rate), loss="mae", steps_per_execution=steps_per_execution)
    return model


def ones_data(steps: int) -> tuple[np.ndarray, np.ndarray]:
    return np.ones((steps * BATCH, 1), "float32"), np.full((steps * BATCH, 1), -1000.0, "float32")


def batch_recorder(model: keras.Model, seen: list) -> keras.callbacks.Callback:
    """Records (global step, logs) at each batch end; it runs after the callbacks listed before it."""
    return keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append((int(model.optimizer.iterations), dict(logs))))


def scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]


@pytest.mark.parametrize("module", [lr_schedule, early_stopping, throughput, nonfinite, global_step])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0


# --- learning rate ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    (dict(peak=1.0, warmup_steps=10, decay="cosine", decay_steps=100, min_learning_rate=0.1),
     {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 60: 0.55, 110: 0.1, 500: 0.1}),
    (dict(peak=1.0, decay="linear", decay_steps=100), {0: 1.0, 25: 0.75, 100: 0.0, 200: 0.0}),
    (dict(peak=1.0, decay="exponential", decay_rate=0.5, step_size=10, min_learning_rate=0.2),
     {0: 1.0, 10: 0.5, 15: 0.5 ** 1.5, 30: 0.2}),
    (dict(peak=1.0, decay="exponential", decay_rate=0.5, step_size=10, decay_steps=20), {40: 0.25}),
    (dict(peak=1.0, warmup_steps=5, decay="step", decay_rate=0.1, step_size=10),
     {5: 1.0, 14: 1.0, 15: 0.1, 30: 0.01}),
    (dict(peak=1.0, warmup_steps=4, init_learning_rate=0.2, decay="constant"), {0: 0.2, 2: 0.6, 4: 1.0, 10**6: 1.0}),
])
def test_every_decay_matches_its_formula(kwargs, expected):
    schedule = WarmupDecay(**kwargs)
    restored = WarmupDecay.from_config(schedule.get_config())
    for step, rate in expected.items():
        assert float(schedule(step)) == pytest.approx(rate, rel=1e-5, abs=1e-7), step
        assert float(restored(step)) == float(schedule(step))


@pytest.mark.parametrize("steps_per_execution, written_steps", [(1, [1, 6, 11, 16, 21]), (8, [8, 16, 24])])
def test_rate_is_keyed_to_the_global_step(tmp_path, steps_per_execution, written_steps):
    model, seen = one_weight_model(steps_per_execution), []
    scheduler = LearningRateScheduler(WarmupDecay(**SCHEDULE), log_dir=str(tmp_path), log_every_steps=5)
    model.fit(*ones_data(24), batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[scheduler, batch_recorder(model, seen)])

    assert [step for step, _ in seen] == list(range(steps_per_execution, 25, steps_per_execution))
    for step, logs in seen:
        assert logs["learning_rate"] == pytest.approx(reference_rate(step), rel=1e-5)
    # Every update inside a compiled multi-step execution used its own step's rate.
    applied = sum(reference_rate(step) for step in range(24))
    assert float(model.layers[0].kernel[0, 0]) == pytest.approx(1 - applied, rel=1e-5)
    assert [step for step, _ in scalars(tmp_path, "learning_rate")] == written_steps
    for step, rate in scalars(tmp_path, "learning_rate"):
        assert rate == pytest.approx(reference_rate(step), rel=1e-5)


def test_rate_continues_exactly_after_save_and_restore(tmp_path):
    model = one_weight_model()
    model.fit(*ones_data(10), batch_size=BATCH, verbose=0, callbacks=[LearningRateScheduler(WarmupDecay(**SCHEDULE))])
    model.save(tmp_path / "model.keras")

    resumed, seen = keras.models.load_model(tmp_path / "model.keras"), []
    resumed.fit(*ones_data(10), batch_size=BATCH, verbose=0,
                callbacks=[LearningRateScheduler(WarmupDecay(**SCHEDULE)), batch_recorder(resumed, seen)])

    assert [step for step, _ in seen] == list(range(11, 21))
    for step, logs in seen:
        assert logs["learning_rate"] == pytest.approx(reference_rate(step), rel=1e-5)
    applied = sum(reference_rate(step) for step in range(20))
    assert float(resumed.layers[0].kernel[0, 0]) == pytest.approx(1 - applied, rel=1e-5)


@pytest.mark.parametrize("kwargs", [
    dict(peak=0.1, decay="poly"),
    dict(peak=0.0, decay="constant"),
    dict(peak=0.1, decay="cosine"),
    dict(peak=0.1, decay="constant", warmup_steps=-1),
    dict(peak=0.1, decay="constant", warmup_steps=2.5),
    dict(peak=0.1, decay="linear", decay_steps=10, min_learning_rate=0.2),
    dict(peak=0.1, decay="exponential", step_size=10),
    dict(peak=0.1, decay="step", decay_rate=1.5, step_size=10),
    dict(peak=0.1, decay="step", decay_rate=0.5, step_size=0),
])
def test_bad_schedule_arguments_raise_a_one_line_usage_error(kwargs):
    with pytest.raises(UsageError) as error:
        WarmupDecay(**kwargs)
    assert "\n" not in str(error.value)


def test_scheduler_rejects_a_plain_number():
    with pytest.raises(UsageError, match="LearningRateSchedule"):
        LearningRateScheduler(0.1)


# --- early stopping --------------------------------------------------------------------------------

def drive(stopper: EarlyStopping, values: list[float], first_epoch: int = 0, monitor: str = "val_loss") -> int | None:
    """Feeds epoch logs from `values` starting at `first_epoch`; returns the epoch it stopped at."""
    for epoch, value in enumerate(values[first_epoch:], start=first_epoch):
        stopper.on_epoch_end(epoch, {"loss": 0.0, monitor: value})
        if stopper.model.stop_training:
            return epoch
    return None


def started(stopper: EarlyStopping) -> EarlyStopping:
    stopper.set_model(one_weight_model())
    stopper.on_train_begin()
    return stopper


VAL_LOSS = [1.0, 0.8, 0.81, 0.798, 0.85, 0.9, 0.7]  # the 0.002 gain at epoch 3 counts only without min_delta


@pytest.mark.parametrize("kwargs, values, stop_epoch", [
    (dict(patience=2), VAL_LOSS, 5),
    (dict(patience=2, min_delta=0.005), VAL_LOSS, 3),
    (dict(patience=2, baseline=0.5), [1.0, 0.9, 0.9], 2),
    (dict(patience=2), [1.0, 0.9, 0.9], None),
    (dict(patience=1, start_from_epoch=3), [1.0, 2.0, 3.0, 0.5, 0.6, 0.7], 4),
    (dict(patience=1), [1.0, 2.0, 3.0, 0.5, 0.6, 0.7], 1),
    (dict(patience=1, monitor="val_accuracy", mode="max"), [0.5, 0.6, 0.55, 0.58], 2),
])
def test_stops_at_the_expected_epoch(kwargs, values, stop_epoch):
    stopper = started(EarlyStopping(**kwargs))
    assert drive(stopper, values, monitor=kwargs.get("monitor", "val_loss")) == stop_epoch


@pytest.mark.parametrize("interrupted_after", [1, 3, 4])
def test_resumed_state_stops_at_the_same_epoch(interrupted_after):
    before = started(EarlyStopping(patience=2))
    assert drive(before, VAL_LOSS[:interrupted_after]) is None
    state = json.loads(json.dumps(before.get_state()))

    after = EarlyStopping(patience=2)
    after.set_model(one_weight_model())
    after.set_state(state)
    after.on_train_begin()
    assert drive(after, VAL_LOSS, first_epoch=interrupted_after) == 5
    assert after.get_state() == {"wait": 2, "best": 0.798, "best_epoch": 3, "stopped_epoch": 5}


def test_real_fit_stops_and_restores_the_best_weights():
    # Training pulls the output towards +1 while validation wants -1: val_loss gets worse every epoch.
    model, weights_by_epoch = one_weight_model(learning_rate=0.1), []
    x, y = np.ones((8, 1), "float32"), np.ones((8, 1), "float32")
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: weights_by_epoch.append(model.get_weights()))
    model.layers[0].kernel.assign([[0.0]])
    history = model.fit(x, y, validation_data=(x, -y), batch_size=BATCH, epochs=10, verbose=0,
                        callbacks=[EarlyStopping(patience=2, restore_best_weights=True), record])

    assert len(history.history["val_loss"]) == 3
    np.testing.assert_array_equal(model.get_weights()[0], weights_by_epoch[0][0])
    assert not np.array_equal(model.get_weights()[0], weights_by_epoch[-1][0])


def test_bad_early_stopping_arguments_raise_usage_error():
    with pytest.raises(UsageError, match="mode='up'"):
        EarlyStopping(mode="up")
    with pytest.raises(UsageError, match="patience"):
        EarlyStopping(patience=-1)


# --- throughput ------------------------------------------------------------------------------------

def test_rates_follow_steps_and_wall_time():
    model = one_weight_model()
    model.optimizer.build(model.trainable_variables)
    meter = Throughput(examples_per_step=32, tokens_per_step=32 * 16, flops_per_step=1e9, peak_flops=1e12)
    meter.set_model(model)
    meter.on_train_begin()
    meter.on_epoch_begin(0)
    first = {}
    meter.on_train_batch_end(0, first)
    assert first == {}  # the first execution compiles: not timed

    meter.on_epoch_begin(1)
    time.sleep(0.5)  # validation and a new input iterator: not training, so not timed
    meter.on_train_batch_begin(0)
    model.optimizer.iterations.assign_add(8)  # one execution of 8 steps
    time.sleep(0.05)
    logs = {}
    meter.on_train_batch_end(0, logs)

    assert 8 * 32 / 0.5 < logs["examples_per_sec"] <= 8 * 32 / 0.05
    assert logs["tokens_per_sec"] == pytest.approx(16 * logs["examples_per_sec"])
    assert logs["mfu"] == pytest.approx(1e9 * (logs["examples_per_sec"] / 32) / 1e12)


def test_throughput_in_fit_logs_and_tensorboard(tmp_path):
    model, seen = one_weight_model(steps_per_execution=4), []
    meter = Throughput(examples_per_step=BATCH, tokens_per_step=BATCH * 8, log_dir=str(tmp_path), log_every_steps=8)
    start = time.perf_counter()
    model.fit(*ones_data(32), batch_size=BATCH, verbose=0, callbacks=[meter, batch_recorder(model, seen)])
    elapsed = time.perf_counter() - start

    timed = [logs for _, logs in seen[1:]]
    assert "examples_per_sec" not in seen[0][1] and len(timed) == 7
    assert all(logs["examples_per_sec"] > 0 and "mfu" not in logs for logs in timed)
    measured_seconds = sum(4 * BATCH / logs["examples_per_sec"] for logs in timed)
    assert measured_seconds < elapsed
    assert [step for step, _ in scalars(tmp_path, "tokens_per_sec")] == [12, 20, 28]


def test_peak_flops_per_device():
    assert peak_flops_per_device(peak_tflops=123.0) == 123e12
    assert peak_flops_per_device(device_name="NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device(device_name="NVIDIA H100 PCIe") == 756e12
    assert peak_flops_per_device(device_name="NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops_per_device(device_name="Some Future Chip") is None
    if not tf.config.list_physical_devices("GPU"):
        assert peak_flops_per_device() is None


def test_bad_throughput_arguments_raise_usage_error():
    with pytest.raises(UsageError, match="examples_per_step"):
        Throughput(examples_per_step=0)


# --- non-finite loss -------------------------------------------------------------------------------

@pytest.mark.parametrize("steps_per_execution, bad_step", [(1, 4), (3, 6)])
def test_non_finite_loss_stops_within_one_execution(steps_per_execution, bad_step):
    model = one_weight_model(steps_per_execution)
    x, y = ones_data(12)
    x[3 * BATCH] = np.inf  # the 4th step's batch
    stopper = StopOnNonFiniteLoss()
    model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0, callbacks=[stopper])

    assert stopper.bad_step == bad_step == int(model.optimizer.iterations)
    assert f"step {bad_step}" in stopper.message


@pytest.mark.parametrize("monitor, better", [("val_accuracy", 0.9), ("val_loss", 0.1)])
def test_early_stopping_auto_mode_on_kerasbigs_own_logs(monitor, better):
    stopper = EarlyStopping(monitor=monitor, patience=0)
    stopper.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    stopper.on_train_begin()
    stopper.on_epoch_end(0, {monitor: 0.5})
    stopper.on_epoch_end(1, {monitor: better})
    assert stopper.wait == 0 and stopper.best == better


def test_profile_steps_writes_a_trace_of_the_chosen_steps(tmp_path):
    from kerasbig.callbacks import ProfileSteps
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    model.fit(np.ones((32, 4)), np.ones((32, 2)), batch_size=4, verbose=0,
              callbacks=[ProfileSteps(str(tmp_path), 2, 3)])
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))


# --- Keras's own semantics (cases after keras/src/callbacks/early_stopping_test.py and
# learning_rate_scheduler_test.py) -----------------------------------------------------------------

def test_early_stopping_takes_keras_positional_arguments():
    stopper = EarlyStopping("val_loss", 0.01, 2)
    assert (stopper.monitor, stopper.patience, stopper.mode) == ("val_loss", 2, "auto")
    assert stopper.min_delta == 0.01


@pytest.mark.parametrize("metric, values, stop_epoch", [
    (keras.metrics.R2Score(), [0.1, 0.2, 0.3, 0.4], None),              # goes up: improving, no stop
    (keras.metrics.R2Score(), [0.4, 0.3, 0.2, 0.1], 2),
    (keras.metrics.CosineSimilarity(), [0.1, 0.2, 0.3, 0.4], None),
    (keras.metrics.FBetaScore(), [0.1, 0.2, 0.3, 0.4], None),
    (keras.metrics.MeanIoU(num_classes=2), [0.1, 0.2, 0.3, 0.4], None),
    (keras.metrics.PearsonCorrelation(), [0.1, 0.2, 0.3, 0.4], None),
    (keras.metrics.MeanSquaredError(), [0.4, 0.3, 0.2, 0.1], None),    # goes down
])
def test_auto_mode_follows_the_compiled_metrics_direction(metric, values, stop_epoch):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse", metrics=[metric])
    model.compute_metrics(np.ones((4, 2)), np.ones((4, 2)), model(np.ones((4, 2))))  # builds them, eagerly
    stopper = EarlyStopping(monitor=f"val_{metric.name}", patience=2)
    stopper.set_model(model)
    stopper.on_train_begin()
    assert drive(stopper, values, monitor=f"val_{metric.name}") == stop_epoch


def test_a_second_fit_applies_its_own_schedule():
    model, seen = one_weight_model(), []
    model.fit(*ones_data(4), batch_size=BATCH, verbose=0,
              callbacks=[LearningRateScheduler(WarmupDecay(0.01, decay="constant"))])
    before = float(model.layers[0].kernel[0, 0])
    model.fit(*ones_data(4), batch_size=BATCH, verbose=0,
              callbacks=[LearningRateScheduler(WarmupDecay(0.5, decay="constant")), batch_recorder(model, seen)])
    assert [logs["learning_rate"] for _, logs in seen] == pytest.approx([0.5] * 4)
    assert float(model.layers[0].kernel[0, 0]) == pytest.approx(before - 4 * 0.5)
