"""How big a model is before training it: parameters, FLOPs, and memory per replica.

GPT is counted analytically (nothing is built, so a 7B configuration takes milliseconds); the other families
are small, so they are built and their layers walked.

Conventions:
- A multiply-add is 2 FLOPs; only matrix products (Dense, Conv2D, recurrent kernels, attention) are counted.
- Training costs 3x the forward pass (the backward pass is about twice the forward).
- GPT training FLOPs per token follow nanoGPT/PaLM: 6N + 12 * layers * width * seq_len, with N the parameters
  less the position embeddings (looking a row up is free; the tied output head is a real matmul).
- Memory: variables, gradients and optimizer slots are float32 under every precision policy (mixed precision
  keeps float32 variables). Activations are a rough estimate of what backprop keeps, in the compute dtype:
  for GPT, per token and layer, (8 + 2 * mlp_ratio) * width + heads * seq_len values (Korthikanti et al.
  2022, eq. 1, without dropout masks), plus float32 logits and their softmax; for built models every layer's
  output, attention probabilities, and each recurrent step's gates and state. Framework workspace and
  fragmentation are not included.
- Model parallel (`model_shards` > 1, GPT's `LayoutMap`): each device holds 1/model_shards of the sharded
  weights (embeddings, attention and MLP kernels, their biases) and their gradients and optimizer slots, and
  all of the replicated ones (LayerNorms, the other biases); activations are counted unsharded, an upper bound.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import NamedTuple

import keras

from kerasbig.data.spec import LANGUAGE_MODEL, DataSpec
from kerasbig.errors import UsageError
from kerasbig.models import BUILDERS, build, gpt, hyperparameters

PRECISION_BYTES = {"float32": 4, "mixed_float16": 2, "mixed_bfloat16": 2}  # bytes per activation value
OPTIMIZER_SLOTS = {"adamw": 2, "adam": 2, "sgd": 1, "lion": 1}  # float32 values kept per parameter
GATES = {keras.layers.LSTM: 4, keras.layers.GRU: 3}


class _Counts(NamedTuple):
    """What a model family's counter works out, per example."""

    params: int
    trainable: int
    forward_flops: int
    activations: int  # values backprop keeps in the compute dtype
    float32_activations: int = 0  # values kept in float32 whatever the policy (GPT's logits)
    sharded: int = 0  # parameters a model-parallel layout splits over the `model` axis


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Size of one model configuration; FLOPs per example, memory per replica (per device when the model is
    sharded over `model_shards` devices) in bytes."""

    model: str
    batch_per_replica: int
    precision: str
    optimizer: str
    total_params: int
    trainable_params: int
    forward_flops_per_example: int
    train_flops_per_example: int
    train_flops_per_token: int | None  # language models only
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    model_shards: int = 1

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes

    def format(self) -> str:
        """A table for people, e.g. for `--mode=dry_run`."""
        rows = [
            ("model", self.model),
            ("parameters", f"{self.total_params:,}"),
            ("trainable parameters", f"{self.trainable_params:,}"),
            ("forward FLOPs / example", _flops(self.forward_flops_per_example)),
            ("training FLOPs / example", _flops(self.train_flops_per_example)),
        ]
        if self.train_flops_per_token is not None:
            rows.append(("training FLOPs / token", _flops(self.train_flops_per_token)))
        rows += [
            ("memory / replica" if self.model_shards == 1 else "memory / device",
             f"batch {self.batch_per_replica}, {self.precision}, {self.optimizer}"
             + (f", weights sharded {self.model_shards} ways" if self.model_shards > 1 else "")),
            ("  weights", _bytes(self.weight_bytes)),
            ("  gradients", _bytes(self.gradient_bytes)),
            ("  optimizer state", _bytes(self.optimizer_bytes)),
            ("  activations (rough)", _bytes(self.activation_bytes)),
            ("  total", _bytes(self.total_bytes)),
        ]
        return "\n".join(f"{name:<26}{value}" for name, value in rows)


def _flops(n: float) -> str:
    exponent = min(int(math.log10(n) // 3), 5) if n >= 1000 else 0
    return f"{n / 1000 ** exponent:,.2f} {' KMGTP'[exponent].strip()}FLOP"


def _bytes(n: float) -> str:
    exponent = min(int(math.log2(n) // 10), 4) if n >= 1024 else 0
    return f"{n / 1024 ** exponent:,.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][exponent]}"


def estimate(spec: DataSpec, model_config, *, batch_per_replica: int, precision: str = "float32",
             optimizer: str = "adamw", model_shards: int = 1) -> Estimate:
    """Sizes the model `model_config` describes for data shaped by `spec`, its variables sharded over
    `model_shards` devices (model parallel; GPT only).

    >>> import ml_collections
    >>> from kerasbig.data.spec import DataSpec
    >>> spec = DataSpec("language_model", "tokens", (1024,), "int32", 50257)
    >>> gpt2 = ml_collections.ConfigDict({"name": "gpt", "width": 768, "depth": 12, "heads": 12})
    >>> estimate(spec, gpt2, batch_per_replica=8).total_params
    124439808
    >>> full, eighth = (estimate(spec, gpt2, batch_per_replica=8, model_shards=n).weight_bytes for n in (1, 8))
    >>> round(full / eighth, 2)  # LayerNorms and some biases stay whole on every device
    7.97
    """
    if precision not in PRECISION_BYTES:
        raise UsageError(f"precision={precision!r} is not one of {list(PRECISION_BYTES)}")
    if optimizer not in OPTIMIZER_SLOTS:
        raise UsageError(f"optimizer={optimizer!r} is not one of {list(OPTIMIZER_SLOTS)}")
    if batch_per_replica < 1:
        raise UsageError(f"batch_per_replica={batch_per_replica} must be positive")
    name, kwargs = hyperparameters(model_config)
    if model_shards > 1 and name != "gpt":
        raise UsageError(f"model_parallel shards only gpt models, not {name!r}; use data_parallel")
    if name == "gpt":
        counts = _gpt(spec, **_with_defaults(name, kwargs))
    else:
        # Variables made in a stateless scope that does not initialise them have shapes but no values: a model
        # far too large for this machine is sized without being allocated.
        with keras.StatelessScope(initialize_variables=False):
            counts = _walk(build(spec, model_config), spec)
    train = 3 * counts.forward_flops
    activation_bytes = counts.activations * PRECISION_BYTES[precision] + counts.float32_activations * 4
    per_device = counts.trainable - counts.sharded + math.ceil(counts.sharded / model_shards)
    return Estimate(
        model=name, batch_per_replica=batch_per_replica, precision=precision, optimizer=optimizer,
        total_params=counts.params, trainable_params=counts.trainable,
        forward_flops_per_example=counts.forward_flops, train_flops_per_example=train,
        train_flops_per_token=train // spec.seq_len if spec.kind == LANGUAGE_MODEL else None,
        weight_bytes=4 * (counts.params - counts.trainable + per_device), gradient_bytes=4 * per_device,
        optimizer_bytes=4 * OPTIMIZER_SLOTS[optimizer] * per_device,
        activation_bytes=batch_per_replica * activation_bytes, model_shards=model_shards,
    )


def _with_defaults(name: str, kwargs: dict) -> dict:
    defaults = {p.name: p.default for p in inspect.signature(BUILDERS[name]).parameters.values() if p.name != "spec"}
    return {**defaults, **kwargs}


def _gpt(spec: DataSpec, *, width: int, depth: int, heads: int, mlp_ratio: int, dropout: float,
         bias: bool, vocab_size: int, context: int, activation: str, remat: bool = False) -> _Counts:
    """A GPT's counts from its shapes alone (the activation costs no matrix product). With `remat`, training
    holds each block's input and one block's activations (recomputed in the backward pass)."""
    gpt.check_hyperparameters(spec, width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout)
    vocab, table, context, b = gpt.vocabulary(spec, vocab_size), context or spec.seq_len, spec.seq_len, int(bias)
    layer_norm = (1 + b) * width  # scale, and the offset when bias=True
    attention = (3 * width * width + 3 * width * b) + (width * width + width * b)
    mlp = (mlp_ratio * width * width + mlp_ratio * width * b) + (mlp_ratio * width * width + width * b)
    params = vocab * width + table * width + depth * (2 * layer_norm + attention + mlp) + layer_norm
    # What gpt.gpt_layout_map splits: both embeddings, the QKV, output and MLP kernels, the QKV and first MLP biases.
    sharded = (vocab + table) * width + depth * ((4 + 2 * mlp_ratio) * width * width + (3 + mlp_ratio) * width * b)
    train_per_token = 6 * (params - table * width) + 12 * depth * width * context
    per_token_layer = (8 + 2 * mlp_ratio) * width + heads * context
    return _Counts(params, params, forward_flops=train_per_token * context // 3,
                   # blocks and the final LayerNorm
                   activations=context * ((depth * width + per_token_layer if remat else depth * per_token_layer)
                                          + width),
                   float32_activations=2 * context * vocab,  # logits and the loss's softmax
                   sharded=sharded)


def _walk(model: keras.Model, spec: DataSpec) -> _Counts:
    """A built model's counts, layer by layer."""
    forward, values = 0, 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        output = _shape(layer.output, spec)
        flops, internal = _layer_cost(layer, output, spec)
        forward += flops
        values += math.prod(output) + internal
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    return _Counts(model.count_params(), trainable, forward, values)


def _shape(tensor, spec: DataSpec) -> list[int]:
    """One example's shape; a language model's open sequence axis is its training length."""
    return [spec.seq_len if dim is None else dim for dim in tensor.shape[1:]]


def _kernel_size(layer) -> int:
    """Weights multiplied with the inputs: every kernel (a recurrent layer also has a recurrent_kernel)."""
    return sum(math.prod(w.shape) for w in layer.weights if w.name.endswith("kernel"))


def _directions(layer) -> list:
    """The LSTM or GRU layers that `layer` runs: both directions of a Bidirectional one."""
    if isinstance(layer, keras.layers.Bidirectional):
        return [layer.forward_layer, layer.backward_layer]
    return [layer]


def _layer_cost(layer, output: list[int], spec: DataSpec) -> tuple[int, int]:
    """Forward FLOPs of one example through `layer`, and the values it keeps for backprop beyond its output."""
    if isinstance(layer, (keras.layers.Bidirectional, *GATES)):
        directions = _directions(layer)
        steps = spec.seq_len  # every recurrent layer here runs over the whole token sequence
        flops = sum(2 * steps * _kernel_size(d) for d in directions)  # both kernels, once per step
        gates_and_state = sum(steps * (GATES[type(d)] + 2) * d.units for d in directions)
        return flops, gates_and_state
    if isinstance(layer, keras.layers.MultiHeadAttention):
        length, inner = output[0], layer.num_heads * layer.key_dim
        projections = 2 * length * _kernel_size(layer)
        scores_and_mixing = 2 * 2 * length * length * inner
        probabilities_and_qkv = layer.num_heads * length * length + 3 * length * inner
        return projections + scores_and_mixing, probabilities_and_qkv
    if isinstance(layer, keras.layers.Conv2D):
        return 2 * _kernel_size(layer) * output[0] * output[1], 0
    if isinstance(layer, keras.layers.Dense):
        return 2 * _kernel_size(layer) * math.prod(output[:-1]), 0
    return 0, 0
