"""Callbacks for `model.fit` and kerasbig's training loop, all keyed to the optimizer's global step."""
from kerasbig.callbacks.dashboard import Dashboard
from kerasbig.callbacks.early_stopping import EarlyStopping
from kerasbig.callbacks.lr_schedule import LearningRateScheduler, WarmupDecay
from kerasbig.callbacks.nonfinite import StopOnNonFiniteLoss
from kerasbig.callbacks.profiler import ProfileSteps
from kerasbig.callbacks.throughput import Throughput, peak_flops_per_device

__all__ = ["Dashboard", "EarlyStopping", "LearningRateScheduler", "ProfileSteps", "StopOnNonFiniteLoss",
           "Throughput", "WarmupDecay", "peak_flops_per_device"]
