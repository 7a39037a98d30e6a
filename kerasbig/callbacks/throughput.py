"""Training throughput (examples/s, tokens/s) and model FLOPs utilisation."""
from __future__ import annotations

import time

import keras

from kerasbig.callbacks import global_step
from kerasbig.errors import UsageError
from kerasbig.summaries import SummaryWriter

# Dense bf16 (fp16 where the chip has no bf16) tensor-core peak per chip, from vendor datasheets.
# Checked in order, so a more specific name comes before a name it contains.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("V100", 125e12),
    ("T4", 65e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
)


def peak_flops_per_device(peak_tflops: float | None = None, device_name: str | None = None) -> float | None:
    """Peak FLOP/s of one accelerator: `peak_tflops` if given, else looked up from its name.

    `device_name` defaults to the first GPU's name as the backend reports it. Returns None when
    there is no accelerator (CPU) or the name is not in `PEAK_FLOPS`: pass `peak_tflops` then.

    >>> peak_flops_per_device(device_name="NVIDIA H100 80GB HBM3")
    989000000000000.0
    >>> peak_flops_per_device(peak_tflops=100.0)
    100000000000000.0
    """
    if peak_tflops is not None:
        return peak_tflops * 1e12
    device_name = device_name or _first_gpu_name()
    if device_name is None:
        return None
    return next((peak for known, peak in PEAK_FLOPS if known in device_name), None)


def _first_gpu_name() -> str | None:
    """The first GPU's name as the Keras backend reports it ("NVIDIA H100 80GB HBM3"), or None."""
    if keras.backend.backend() == "jax":
        import jax

        gpus = [device for device in jax.devices() if device.platform == "gpu"]
        return gpus[0].device_kind if gpus else None
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return tf.config.experimental.get_device_details(gpus[0]).get("device_name") if gpus else None


class Throughput(keras.callbacks.Callback):
    """Adds `examples_per_sec`, `tokens_per_sec` and `mfu` to batch logs and TensorBoard.

    Time is measured between consecutive `on_train_batch_end` calls and steps as the change in
    `optimizer.iterations`, so one call per multi-step execution is handled; nothing is read from the
    device but that counter, once per epoch (`GlobalStep`). The first execution of a fit (tracing and
    compilation) is not timed, and each epoch's clock starts at its first `on_train_batch_begin`, so
    validation and input set-up between epochs are not counted. All per-step arguments are global (all replicas); `peak_flops` is
    the summed peak of all devices, e.g. `peak_flops_per_device() * num_replicas`. TensorBoard gets
    averages over at least `log_every_steps` steps, written to `log_dir` against the global step.

    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> seen = []
    >>> record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(logs))
    >>> _ = model.fit(np.ones((8, 1)), np.ones((8, 1)), batch_size=2, verbose=0,
    ...               callbacks=[Throughput(examples_per_step=2), record])
    >>> "examples_per_sec" in seen[0], seen[-1]["examples_per_sec"] > 0
    (False, True)
    """

    def __init__(self, examples_per_step: int, tokens_per_step: int | None = None,
                 flops_per_step: float | None = None, peak_flops: float | None = None,
                 log_dir: str | None = None, log_every_steps: int = 100):
        super().__init__()
        for name, value in [("examples_per_step", examples_per_step), ("tokens_per_step", tokens_per_step),
                            ("flops_per_step", flops_per_step), ("peak_flops", peak_flops),
                            ("log_every_steps", log_every_steps)]:
            if value is not None and not value > 0:
                raise UsageError(f"Throughput {name} must be > 0, got {value}")
        self.examples_per_step, self.tokens_per_step = examples_per_step, tokens_per_step
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self.log_dir, self.log_every_steps = log_dir, log_every_steps
        self._writer = None
        self._last = None  # (time, global step) where the next execution's timing starts
        self._epoch_start = False
        self._window = (0, 0.0)  # (steps, seconds) measured since the last TensorBoard write
        self._steps = global_step.GlobalStep()

    def on_train_begin(self, logs=None):
        if self.log_dir:
            self._writer = SummaryWriter(self.log_dir)
        self._last = None
        self._window = (0, 0.0)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = True
        self._steps.new_epoch()

    def on_train_batch_begin(self, batch, logs=None):
        if self._epoch_start and self._last is not None:
            # Restart the clock: validation and building the epoch's input iterator are not training.
            self._last = (time.perf_counter(), self._last[1])
        self._epoch_start = False

    def on_train_batch_end(self, batch, logs=None):
        now, step = time.perf_counter(), self._steps.at_batch_end(self.model, batch)
        if self._last is not None and step > self._last[1]:
            steps, seconds = step - self._last[1], now - self._last[0]
            if logs is not None:
                logs.update(self.rates(steps, seconds))
            self._window = (self._window[0] + steps, self._window[1] + seconds)
            if self._writer and self._window[0] >= self.log_every_steps:
                self._write(step)
        self._last = (now, step)

    def on_train_end(self, logs=None):
        if self._writer:
            self._writer.close()
            self._writer = None

    def rates(self, steps: int, seconds: float) -> dict[str, float]:
        """The throughput figures for `steps` global steps taking `seconds` of wall time."""
        steps_per_sec = steps / seconds
        rates = {"examples_per_sec": self.examples_per_step * steps_per_sec}
        if self.tokens_per_step:
            rates["tokens_per_sec"] = self.tokens_per_step * steps_per_sec
        if self.flops_per_step:
            rates["tflops_per_sec"] = self.flops_per_step * steps_per_sec / 1e12  # achieved, all devices
            if self.peak_flops:
                rates["mfu"] = self.flops_per_step * steps_per_sec / self.peak_flops
        return rates

    def _write(self, step: int) -> None:
        for name, value in self.rates(*self._window).items():
            self._writer.scalar(name, value, step)
        self._window = (0, 0.0)
