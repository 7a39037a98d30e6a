"""LoRA: fine-tune low-rank adapters of a model's Dense layers and freeze every other weight.

`config.model.lora_rank` (0: off, full fine-tuning), `lora_alpha` (the adapters' scale is alpha / rank; 0 means
alpha = rank) and `lora_targets` (comma-separated Dense layer names; '' means every Dense inside a block: a GPT's
`qkv`, `out`, `mlp_fc` and `mlp_proj`) are read here, not by the builders. Keras's `Dense.enable_lora` freezes
the kernel but leaves the bias trainable; `apply` freezes biases, norms and embeddings too, so the optimizer
holds state for the adapters only. The adapters are ordinary variables of the model, so checkpoints keep them
and a resume restores them. `merged` folds them into the kernels for export: the SavedModel holds no LoRA
variables and can be quantized like any other model.

>>> from kerasbig.data.spec import DataSpec
>>> from kerasbig.models.gpt import build_gpt
>>> model = build_gpt(DataSpec("language_model", "tokens", (16,), "int32", 64), width=32, depth=1, heads=4)
>>> apply(model, Settings(rank=4))
>>> counts(model)
(2048, 17376)
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import keras

from kerasbig.errors import UsageError

KEYS = ("lora_rank", "lora_alpha", "lora_targets")
# A config's `model` section declares these (off) so that `--config.model.lora_rank=8` overrides a locked config.
DEFAULTS = {"lora_rank": 0, "lora_alpha": 0.0, "lora_targets": ""}
ADAPTER_NAMES = ("lora_kernel_a", "lora_kernel_b")


@dataclasses.dataclass(frozen=True)
class Settings:
    rank: int = 0
    alpha: float = 0.0  # 0: alpha = rank (a scale of 1)
    targets: str = ""   # '' : every Dense inside a block

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def split(model_config) -> tuple[dict, Settings]:
    """`config.model` as a dict without the LoRA keys, and the LoRA settings they hold."""
    kwargs = dict(model_config)
    settings = Settings(**{key.removeprefix("lora_"): kwargs.pop(key) for key in KEYS if key in kwargs})
    if isinstance(settings.rank, bool) or not isinstance(settings.rank, int) or settings.rank < 0:
        raise UsageError(f"config.model.lora_rank={settings.rank!r} must be an integer >= 0 (0: full fine-tuning)")
    if not (isinstance(settings.alpha, (int, float)) and 0 <= settings.alpha < math.inf):
        raise UsageError(f"config.model.lora_alpha={settings.alpha!r} must be a number >= 0 (0: equal to the rank)")
    if not isinstance(settings.targets, str):
        raise UsageError(f"config.model.lora_targets={settings.targets!r} must be a comma-separated string of "
                         "Dense layer names, e.g. 'qkv,out'")
    return kwargs, settings


def _dense_layers(model: keras.Model) -> list[tuple[str, keras.layers.Dense]]:
    """(path, layer) of every Dense layer in `model`, nested ones included, in model order."""
    return [(layer.path, layer) for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.Dense)]


def targets(model: keras.Model, names: str) -> list[keras.layers.Dense]:
    """The Dense layers that `names` (comma-separated layer names; '' for every Dense inside a block) picks."""
    dense = _dense_layers(model)
    if not names:
        chosen = [layer for path, layer in dense if "/" in path]
        if not chosen:
            raise UsageError(f"model {model.name!r} has no Dense layers inside blocks for LoRA; name them in "
                             f"config.model.lora_targets, one of {sorted({layer.name for _, layer in dense})}")
        return chosen
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    available = sorted({layer.name for _, layer in dense})
    unknown = [name for name in wanted if name not in available]
    if unknown or not wanted:
        raise UsageError(f"config.model.lora_targets={names!r} names no Dense layer of {model.name!r} "
                         f"({', '.join(unknown) or 'empty'}); choose from {available}")
    return [layer for _, layer in dense if layer.name in wanted]


def apply(model: keras.Model, settings: Settings) -> None:
    """Adds rank-`settings.rank` adapters to the targeted Dense layers of a built model and freezes all else."""
    if not settings.enabled:
        return
    chosen = targets(model, settings.targets)
    narrowest = min(chosen, key=lambda layer: (min(layer.kernel.shape), layer.path))
    width = min(narrowest.kernel.shape)
    if settings.rank > width:
        raise UsageError(f"config.model.lora_rank={settings.rank} is above the width of layer {narrowest.path} "
                         f"({width}); choose a rank in [1, {width}]")
    for variable in model.trainable_variables:
        variable.trainable = False
    for layer in chosen:
        # Zero B: the adapted model starts equal to the pre-trained one.
        layer.enable_lora(settings.rank, lora_alpha=settings.alpha or settings.rank,
                          a_initializer=keras.initializers.HeUniform(), b_initializer="zeros")


def is_adapted(model: keras.Model) -> bool:
    return any(getattr(layer, "lora_enabled", False) for _, layer in _dense_layers(model))


def counts(model: keras.Model) -> tuple[int, int]:
    """(trainable, total) parameters; boolean weights (pruning's masks) are not parameters."""
    return (sum(math.prod(v.shape) for v in model.trainable_weights),
            sum(math.prod(v.shape) for v in model.weights if v.dtype != "bool"))


def describe(model: keras.Model, optimizer_slots: int) -> str:
    """One line: trainable and total parameters and the optimizer's state (float32, `optimizer_slots` values
    per trainable parameter: 2 for Adam's moments)."""
    trainable, total = counts(model)
    state = 4 * optimizer_slots * trainable
    return (f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%); optimizer state "
            f"{state / 2 ** 20:,.2f} MiB")


def _without_lora(layer: keras.layers.Layer) -> keras.layers.Layer:
    """`clone_model`'s copy of one layer, with no adapters (a top-level Dense's config would carry them)."""
    config = {key: value for key, value in layer.get_config().items() if key not in ("lora_rank", "lora_alpha")}
    return layer.__class__.from_config(config)


def merged(model: keras.Model) -> keras.Model:
    """`model` with every adapter folded into its kernel (kernel + alpha / rank * A B), as a new model without
    LoRA variables; `model` itself when it has none."""
    if not is_adapted(model):
        return model
    with warnings.catch_warnings():  # Keras warns that a nested layer's clone does not copy its weights
        warnings.simplefilter("ignore")
        copy = keras.models.clone_model(model, clone_function=_without_lora)
    values = {v.path: v for v in model.weights}
    for _, layer in _dense_layers(model):
        if layer.lora_enabled:
            values[layer._kernel.path] = layer.kernel  # the merged kernel
    for variable in copy.weights:
        variable.assign(values[variable.path])
    return copy
