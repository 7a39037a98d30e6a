"""Magnitude pruning of Keras 3 models, with the polynomial schedule of Zhu & Gupta (2017).

Keras 3 has no pruning (the Model Optimization toolkit prunes Keras 2 models only), so kerasbig keeps its own
masks, small enough to read in one sitting:

- Every weight matrix (the `kernel` of Dense, EinsumDense and convolution layers) gets a boolean mask, a
  non-trainable weight of its layer (`<layer path>/prune_mask`). Checkpoints save weights by path, so a resume
  restores the masks exactly.
- The masks are applied as the kernels' Keras constraints, which optimizers apply after every update inside
  the compiled step, identically on every replica. The constraint of the first pruned kernel also recomputes
  all masks on the steps the schedule names (every update has been applied by then, and no mask yet).
- The schedule is a function of the optimizer's step: after optimizer step t in [start, end], on every
  `frequency`-th step and at `end`, the sparsity is `target * (1 - (1 - (t - start) / (end - start)) ** 3)`, so
  it reaches `target` exactly at `end` and stays there. New masks are taken from the masked weights, so a
  pruned weight stays pruned.
- Scope `layer` prunes each kernel to the sparsity; `global` ranks all kernels' magnitudes together.
  `structured` keeps the 2 largest of every 4 consecutive weights along the kernel's last input axis (the
  2:4 pattern sparse tensor cores accelerate), from `start` to `end`, then keeps those masks.
- `strip(model)` is the model without masks (for export and quantization): its kernels hold exact zeros.
"""
from __future__ import annotations

import dataclasses
import math
import re

import keras
from keras import ops

MASK_NAME = "prune_mask"
GROUP = 4  # 2:4 structured sparsity: 2 of every 4 weights are kept


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When and how far to prune: `target` sparsity reached at optimizer step `end`, from `start`."""
    target: float
    start: int
    end: int
    frequency: int

    def sparsity(self, step):
        """The sparsity after optimizer step `step` (a number or a tensor)."""
        progress = ops.clip((ops.cast(step, "float32") - self.start) / (self.end - self.start), 0.0, 1.0)
        return self.target * (1.0 - (1.0 - progress) ** 3)

    def is_pruning_step(self, step):
        """True after the steps on which masks are recomputed: every `frequency`-th from `start`, and `end`."""
        step = ops.cast(step, "int64")
        on_cadence = ops.equal(ops.mod(step - self.start, self.frequency), 0)
        return ops.logical_and(ops.logical_and(step >= self.start, step <= self.end),
                               ops.logical_or(on_cadence, ops.equal(step, self.end)))


def prunable(model: keras.Model) -> list[tuple[keras.layers.Layer, keras.Variable]]:
    """(layer, kernel) for every weight matrix of `model`, in the order of `model.trainable_variables`."""
    order = {id(v): i for i, v in enumerate(model.trainable_variables)}
    found = [(layer, layer.kernel) for layer in model._flatten_layers(include_self=False)
             if len(list(layer._flatten_layers())) == 1 and isinstance(getattr(layer, "kernel", None), keras.Variable)
             and len(layer.kernel.shape) >= 2 and id(layer.kernel) in order]
    return sorted(found, key=lambda pair: order[id(pair[1])])


def group_axis(layer: keras.layers.Layer, kernel: keras.Variable) -> int:
    """The kernel's input axis nearest its outputs: the axis along which 2:4 groups run."""
    equation = getattr(layer, "equation", None)
    if equation:  # EinsumDense: the kernel's axes that the output does not keep are its inputs
        inputs, output = re.split(",|->", equation)[1:]
        return max(i for i, axis in enumerate(inputs) if axis not in output)
    return len(kernel.shape) - 2  # Dense [in, out] and convolutions [..., in, out]


class Pruner:
    """Masks on the kernels of `model`, kept to `schedule` by the optimizer's step (see the module docstring).
    Build it inside the distribution strategy's scope, before the optimizer is built."""

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, schedule: Schedule, *,
                 scope: str = "layer", structured: bool = False):
        self.optimizer, self.schedule, self.scope, self.structured = optimizer, schedule, scope, structured
        pairs = prunable(model)
        if structured:  # a 2:4 group needs 4 weights along the input axis
            self.skipped = [k.path for layer, k in pairs if k.shape[group_axis(layer, k)] % GROUP]
            pairs = [(layer, k) for layer, k in pairs if k.path not in self.skipped]
        else:
            self.skipped = []
        self.kernels = [kernel for _, kernel in pairs]
        self.axes = [group_axis(layer, kernel) for layer, kernel in pairs]
        self.masks = [_add_mask(layer, kernel) for layer, kernel in pairs]
        for i, kernel in enumerate(self.kernels):
            kernel.constraint = _Masked(self, i)

    def update_masks(self) -> None:
        """Recomputes every mask if the optimizer's current update is a pruning step."""
        step = self.optimizer.iterations + 1  # the step this update completes
        new = ops.cond(self.schedule.is_pruning_step(step), lambda: self._masks_at(step),
                       lambda: [mask.value for mask in self.masks])
        for mask, value in zip(self.masks, new):
            mask.assign(value)

    def _masks_at(self, step) -> list:
        magnitudes = [ops.abs(kernel.value * ops.cast(mask.value, kernel.dtype))
                      for kernel, mask in zip(self.kernels, self.masks)]
        if self.structured:
            return [two_of_four(m, axis) for m, axis in zip(magnitudes, self.axes)]
        sparsity = self.schedule.sparsity(step)
        if self.scope == "layer":
            return [largest(m, sparsity) for m in magnitudes]
        flat = largest(ops.concatenate([ops.reshape(m, (-1,)) for m in magnitudes]), sparsity)
        sizes = [math.prod(m.shape) for m in magnitudes]
        return [ops.reshape(part, m.shape) for part, m in zip(ops.split(flat, _offsets(sizes)), magnitudes)]


def _offsets(sizes: list[int]) -> list[int]:
    total, offsets = 0, []
    for size in sizes[:-1]:
        total += size
        offsets.append(total)
    return offsets


def largest(magnitudes, sparsity):
    """A boolean mask keeping all but round(sparsity * size) of `magnitudes`, the largest ones (ties by position)."""
    flat = ops.reshape(magnitudes, (-1,))
    size = flat.shape[0]
    keep = size - ops.cast(ops.round(sparsity * size), "int32")
    order = ops.argsort(-flat)
    rank = ops.scatter(ops.expand_dims(order, -1), ops.arange(size, dtype="int32"), (size,))
    return ops.reshape(rank < keep, magnitudes.shape)


def two_of_four(magnitudes, axis: int):
    """A boolean mask keeping the 2 largest of every 4 consecutive values along `axis`."""
    moved = ops.moveaxis(magnitudes, axis, -1)
    groups = ops.reshape(moved, (*moved.shape[:-1], moved.shape[-1] // GROUP, GROUP))
    rank = ops.argsort(ops.argsort(-groups, axis=-1), axis=-1)
    return ops.moveaxis(ops.reshape(rank < GROUP // 2, moved.shape), -1, axis)


class _Masked(keras.constraints.Constraint):
    """The kernel times its mask; the first pruned kernel's constraint also updates all masks first."""

    def __init__(self, pruner: Pruner, index: int):
        self.pruner, self.index = pruner, index

    def __call__(self, kernel):
        if self.index == 0:
            self.pruner.update_masks()
        return kernel * ops.cast(self.pruner.masks[self.index].value, kernel.dtype)


def _add_mask(layer: keras.layers.Layer, kernel: keras.Variable) -> keras.Variable:
    """A non-trainable all-true mask beside `kernel`, a weight of `layer` (so checkpoints by path carry it).
    Keras locks a built layer's state; its own `quantize` unlocks it the same way to add weights."""
    locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        # only_first_replica: the mask is assigned inside the replicated step, where every replica computes it alike.
        return layer.add_weight(name=MASK_NAME, shape=kernel.shape, dtype="bool", initializer="ones",
                                trainable=False, aggregation="only_first_replica")
    finally:
        if locked:
            layer._tracker.lock()


def sparsities(model: keras.Model) -> dict[str, float]:
    """{kernel path: fraction of its weights that are exactly zero} for every weight matrix of `model`."""
    return {kernel.path: float(ops.mean(ops.equal(kernel.value, 0))) for _, kernel in prunable(model)}


def is_pruned(model: keras.Model) -> bool:
    return any(w.path.endswith("/" + MASK_NAME) for w in model.weights)


def strip(model: keras.Model) -> keras.Model:
    """`model` without its masks: a clone with the same weights (the pruned ones exact zeros) and no constraints;
    `model` itself when it has no masks."""
    if not is_pruned(model):
        return model
    copy = keras.models.clone_model(model)
    weights = {w.path: w for w in model.weights}
    for weight in copy.weights:
        weight.assign(weights[weight.path])
    return copy
