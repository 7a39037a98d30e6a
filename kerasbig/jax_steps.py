"""The JAX half of kerasbig's loop: a jitted stateless step under a `keras.distribution` layout.

`kerasbig.trainer.Trainer` drives these steps (cadences, callbacks, checkpoints, preemption); this module only
computes them. One step is `jax.jit` of a pure function of (model and optimizer state, batch): Keras's stateless
API (`model.stateless_call`, `optimizer.stateless_apply`) with the state donated, so parameters and optimizer
slots are updated in place. Gradients of the micro-batches are summed before global-norm clipping, so clipping
sees the whole batch's gradient, as on TensorFlow. After each call the new state is put back into the Keras
variables (a reference swap, no copy), so callbacks and checkpoints see the step's weights as under `fit`.

Strategies (`--strategy`), each a `keras.distribution.Distribution` over a `DeviceMesh`:
- `one_device`: the first device;
- `data_parallel`: the batch split over every device (`DataParallel`), variables replicated;
- `model_parallel`: the large kernels sharded over a `model` axis (`ModelParallel` with the builder's
  `LayoutMap`, `kerasbig.models.layout_map`); optimizer slots follow their variable's layout. With
  `model_shards` K of N devices, the mesh is (batch=N/K, model=K): N/K model replicas, each split K ways.
Each step sees the same global batch whatever the layout, so losses agree with one device.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import keras
import numpy as np
from jax.experimental import multihost_utils

import kerasbig
from kerasbig import cluster, models
from kerasbig.data import windows
from kerasbig.data.spec import Task
from kerasbig.errors import UsageError
from kerasbig.losses import correct_predictions, per_example_loss



def join_cluster() -> bool:
    """Joins this process to the others of its cluster (TF_CONFIG, or the tasks of a SLURM step, as for
    TensorFlow) in one JAX runtime whose devices span them all; rank 0 (the chief, else worker 0) coordinates at
    its own address. Call before JAX touches a device. Returns whether this process is the chief."""
    found = cluster.from_environment()
    if found is None or found.size < 2:
        return True
    found.wait_for_peers()  # every task up within the start timeout, or one line naming the missing ones
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives across processes on CPU too
    keras.distribution.initialize(found.coordinator, num_processes=found.size, process_id=found.rank)
    return found.rank == 0


def _to_host(array) -> np.ndarray:
    """A (possibly multi-process) array's whole value on this host; every process must call it together."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def make_distribution(name: str, model_config, *, num_devices: int = 0,
                      model_shards: int = 0) -> keras.distribution.Distribution:
    """The `keras.distribution` layout `--strategy=name` means over the first `num_devices` devices (0: all);
    `auto` is data parallel over several devices, else one device. `model_parallel` splits the kernels over
    `model_shards` of them (0: all) and the batch over the rest."""
    devices = keras.distribution.list_devices()
    if num_devices > len(devices):
        raise UsageError(f"--num_devices={num_devices} but JAX sees {len(devices)} device(s): {devices}")
    devices = devices[:num_devices or len(devices)]
    shards = model_shards or len(devices)
    if len(devices) % shards:
        raise UsageError(f"--model_shards={model_shards} must divide the {len(devices)} device(s) "
                         "(the mesh is devices/model_shards replicas by model_shards)")
    if name == "auto":
        name = "data_parallel" if len(devices) > 1 else "one_device"
    if name == "one_device":
        return keras.distribution.DataParallel(devices=devices[:1])
    if name == "data_parallel":
        return keras.distribution.DataParallel(devices=devices)
    if name == "model_parallel":
        mesh = keras.distribution.DeviceMesh((len(devices) // shards, shards), ("batch", "model"), devices)
        return keras.distribution.ModelParallel(layout_map=models.layout_map(model_config, mesh),
                                                batch_dim_name="batch")
    raise UsageError(f"--strategy={name!r} does not run on JAX (see docs/distributed.md)")


class JaxSteps:
    """Jitted train and eval steps of `model` under `distribution`."""

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, task: Task,
                 distribution: keras.distribution.Distribution, config, *, seed: int, loss_denominator: float):
        self.model, self.optimizer, self.task, self.distribution = model, optimizer, task, distribution
        self.config, self.seed, self._loss_denominator = config, seed, loss_denominator
        self.replicas = distribution.num_model_replicas  # data-parallel copies: the batch is split this many ways
        # Several processes (`join_cluster`) each feed the same global batches and keep the parts on their devices.
        self.multi_worker = jax.process_count() > 1
        self.accelerated = jax.devices()[0].platform != "cpu"  # keras.distribution runs on JAX's default devices
        with distribution.scope():
            optimizer.build(model.trainable_variables)
        # On one device Keras keeps the variables unsharded and uncommitted: the step commits them to that device.
        self._one_device = (model.variables[0].value.sharding if distribution.device_mesh.devices.size == 1
                            else None)
        self._train_step = None  # jitted at the first step, once callbacks have installed the schedule
        self._eval_step = jax.jit(self._eval_sums)
        self._eval_inputs = {}
        self._all_finite = jax.jit(lambda values: jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values])))

    # ---- what the loop calls ------------------------------------------------------------------------
    def step(self) -> int:
        return int(self.optimizer.iterations.value)

    def train_iterator(self, start_step: int, total_steps: int):
        """Global batches as numpy, from `start_step` to `total_steps` (the same stream as TensorFlow's): a language
        model's token windows directly, other datasets through tf.data."""
        batches = dict(global_batch=self.config.data.batch_size, seed=self.seed, start_step=start_step,
                       total_steps=total_steps)
        if self.task.windows is not None:
            return windows.train_batches(self.task.windows, **batches)
        return self._tf_pipeline().train_batches(self.task, **batches).as_numpy_iterator()

    def train(self, iterator, steps: int, sigterm: bool) -> np.ndarray:
        """Runs `steps` steps: summed (loss, correct, count), SIGTERM (0 or 1), the next learning rate."""
        if self._train_step is None:
            self._train_step = self._jit_train_step()
        state = self._state()
        totals = jnp.zeros(3)
        for _ in range(steps):
            state, sums, learning_rate = self._train_step(state, *self._on_devices(next(iterator)))
            totals = totals + sums
        self._assign(state)
        if self.multi_worker:  # a SIGTERM on any process stops them all at the same step
            sigterm = multihost_utils.process_allgather(np.int32(sigterm)).sum() > 0
        return np.concatenate([_to_host(totals), [float(sigterm), float(_to_host(learning_rate))]])

    def evaluate(self, split: str, batch_size: int):
        """Yields (sums, predictions, labels, weights) as numpy for every global batch of `split`."""
        if self.task.windows is not None:
            batches = windows.eval_batches(self.task.windows, split, global_batch=batch_size)
        else:
            if split not in self._eval_inputs:  # built once, iterated at every evaluation
                self._eval_inputs[split] = self._tf_pipeline().eval_batches(self.task, split, global_batch=batch_size)
            batches = self._eval_inputs[split].as_numpy_iterator()
        trainable, non_trainable, _ = self._state()
        for x, y, w in batches:
            sums, predictions = self._eval_step(trainable, non_trainable, *self._on_devices((x, y, w)))
            yield _to_host(sums), _to_host(predictions), y, w

    def all_finite(self) -> bool:
        return bool(self._all_finite([v.value for v in self.model.variables + self.optimizer.variables
                                      if keras.backend.is_float_dtype(v.dtype)]))

    def check_workers_agree(self, step: int) -> list[int]:
        """The distinct steps the processes would resume from."""
        if not self.multi_worker:
            return [step]
        return sorted({int(s) for s in multihost_utils.process_allgather(np.int64(step))})

    @contextlib.contextmanager
    def cluster_errors(self, doing: str):
        yield  # JAX's coordination service stops every process when one is lost

    @staticmethod
    def _tf_pipeline():
        kerasbig.require_tensorflow("tf.data input (datasets other than text_lm and corpus:)")
        from kerasbig.data import pipeline

        return pipeline

    # ---- state --------------------------------------------------------------------------------------
    def _variables(self) -> tuple[list, list, list]:
        return self.model.trainable_variables, self.model.non_trainable_variables, self.optimizer.variables

    def _state(self) -> tuple[list, list, list]:
        return tuple([v.value for v in variables] for variables in self._variables())

    def _assign(self, state) -> None:
        for variables, values in zip(self._variables(), state):
            for variable, value in zip(variables, values):
                variable.assign(value)

    def _on_devices(self, arrays: tuple) -> tuple:
        """A global batch laid out along the mesh's batch axis."""
        return tuple(keras.distribution.distribute_tensor(a, self.distribution.get_data_layout(a.shape))
                     for a in arrays)

    # ---- the pure functions that are jitted ---------------------------------------------------------
    def _stats(self, labels, logits, weights):
        """(loss sum, correct sum, count) of a batch; weights are per example."""
        loss = per_example_loss(labels, logits, self.config.optimizer.label_smoothing)
        correct = correct_predictions(labels, logits)
        weights = jnp.broadcast_to(jnp.reshape(weights, (-1,) + (1,) * (loss.ndim - 1)), loss.shape)
        return jnp.stack([jnp.sum(loss * weights), jnp.sum(correct * weights), jnp.sum(weights)])

    def _scaled_loss(self, trainable, non_trainable, optimizer_values, x, y):
        """The micro-batch's loss (scaled for float16 loss scaling), with its sums and the new dropout state."""
        logits, non_trainable = self.model.stateless_call(trainable, non_trainable, x, training=True)
        sums = self._stats(y, logits, jnp.ones(y.shape[:1]))
        with keras.StatelessScope(state_mapping=list(zip(self.optimizer.variables, optimizer_values))):
            scaled = self.optimizer.scale_loss(sums[0] / self._loss_denominator)
        return scaled, (sums, non_trainable)

    def _train_step_fn(self, state, x, y):
        trainable, non_trainable, optimizer_values = state
        gradient = jax.value_and_grad(self._scaled_loss, has_aux=True)
        grads, totals = None, jnp.zeros(3)
        for xs, ys in zip(self._micro_batches(x), self._micro_batches(y)):
            (_, (sums, non_trainable)), step_grads = gradient(trainable, non_trainable, optimizer_values, xs, ys)
            grads = step_grads if grads is None else jax.tree.map(jnp.add, grads, step_grads)
            totals = totals + sums
        mapping = list(zip(self.optimizer.variables, optimizer_values))
        clip_norm = self.config.optimizer.clip_norm
        if clip_norm > 0:
            with keras.StatelessScope(state_mapping=mapping):
                factor = self.optimizer.loss_scale_factor
            grads = _clip_by_global_norm(grads, clip_norm * (1.0 if factor is None else factor))
        trainable, optimizer_values = self.optimizer.stateless_apply(optimizer_values, grads, trainable)
        with keras.StatelessScope(state_mapping=list(zip(self.optimizer.variables, optimizer_values))):
            learning_rate = jnp.asarray(self.optimizer.learning_rate, jnp.float32)
        return (trainable, non_trainable, optimizer_values), totals, learning_rate

    def _micro_batches(self, batch) -> list:
        """`accumulation_steps` micro-batches: every k-th example of the batch from the i-th on. The same examples
        whatever the layout (so every layout trains alike), and spread evenly over the devices."""
        count = self.config.optimizer.accumulation_steps
        strided = jnp.reshape(batch, (-1, count, *batch.shape[1:]))
        return [strided[:, i] for i in range(count)]

    def _jit_train_step(self):
        """The step, jitted with its state donated and kept in the variables' own shardings."""
        if self._one_device is not None:  # committed now, as the step's outputs will be: else a second compilation
            self._assign(jax.device_put(self._state(), self._one_device))
        shardings = tuple([v.value.sharding for v in variables] for variables in self._variables())
        return jax.jit(self._train_step_fn, donate_argnums=0, out_shardings=(shardings, None, None))

    def _eval_sums(self, trainable, non_trainable, x, y, w):
        logits, _ = self.model.stateless_call(trainable, non_trainable, x, training=False)
        return self._stats(y, logits, w), jnp.argmax(logits, -1).astype(jnp.int32)


def _clip_by_global_norm(grads: list, clip_norm: float) -> list:
    """`grads` scaled down so that their global norm is at most `clip_norm` (as tf.clip_by_global_norm)."""
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in grads))
    scale = clip_norm / jnp.maximum(norm, clip_norm)
    return [(g * scale).astype(g.dtype) for g in grads]
