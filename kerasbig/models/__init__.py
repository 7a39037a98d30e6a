"""Model builders, one module per family. `build(spec, model_config)` picks one by `model_config.name`.

Every builder is `build_<family>(spec: DataSpec, *, <hyperparameters with defaults>) -> keras.Model`, written
with `keras.layers`/`keras.ops` only so it runs on every Keras backend, returning float32 logits
(classification: [batch, num_classes]; language model: [batch, seq_len, vocab]).
"""
from __future__ import annotations

import inspect

import keras

from kerasbig import lora
from kerasbig.data.spec import DataSpec
from kerasbig.errors import UsageError
from kerasbig.models.cnn import build_cnn
from kerasbig.models.gpt import build_gpt, gpt_layout_map
from kerasbig.models.llama import build_llama
from kerasbig.models.mlp import build_mlp
from kerasbig.models.resnet import build_resnet
from kerasbig.models.rnn import build_rnn
from kerasbig.models.transformer import build_transformer

BUILDERS = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "resnet": build_resnet,
    "rnn": build_rnn,
    "transformer": build_transformer,
    "gpt": build_gpt,
    "llama": build_llama,
}

# Builders whose large weights can be sharded over a `model` mesh axis (`--strategy=model_parallel` on JAX).
LAYOUT_MAPS = {"gpt": gpt_layout_map}


def hyperparameters(model_config) -> tuple[str, dict]:
    """Splits `config.model` into the builder name and its keyword arguments (without the LoRA keys, which
    `build` applies), rejecting unknown keys; with `init_from`, the architecture is the checkpoint's."""
    kwargs, _ = lora.split(model_config)
    if kwargs.get("init_from"):
        from kerasbig import pretrained  # it reads checkpoints with these builders
        name, kwargs = pretrained.hyperparameters(kwargs)
    else:
        kwargs.pop("init_from", None)
        name = kwargs.pop("name")
    if name not in BUILDERS:
        raise UsageError(f"config.model.name={name!r} is not a model builder; choose one of {sorted(BUILDERS)}")
    accepted = [p for p in inspect.signature(BUILDERS[name]).parameters if p != "spec"]
    for key in kwargs:
        if key not in accepted:
            raise UsageError(f"config.model.{key} is not a hyperparameter of {name!r}; accepted: {accepted}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return name, kwargs


def build(spec: DataSpec, model_config, *, load_pretrained: bool = False) -> keras.Model:
    """Builds the model `model_config` names for data shaped by `spec`, with LoRA adapters when it asks.

    `load_pretrained`: first put in the weights of `model_config.init_from` (a run starting from a checkpoint;
    the adapters then start from zero on top of them)."""
    name, kwargs = hyperparameters(model_config)
    model = BUILDERS[name](spec, **kwargs)
    if load_pretrained and model_config.get("init_from"):
        from kerasbig import pretrained
        pretrained.load_weights(model, model_config)
    lora.apply(model, lora.split(model_config)[1])
    return model


def layout_map(model_config, mesh: keras.distribution.DeviceMesh) -> keras.distribution.LayoutMap:
    """The builder's LayoutMap for `mesh` (variables it does not name are replicated)."""
    if model_config.name not in LAYOUT_MAPS:
        raise UsageError(f"config.model.name={model_config.name!r} has no model-parallel layout; "
                         f"--strategy=model_parallel shards {sorted(LAYOUT_MAPS)} (use data_parallel)")
    return LAYOUT_MAPS[model_config.name](mesh)
