"""`config.model.init_from=PATH`: start from a checkpoint on disk, offline. The architecture comes from it:

- a Hugging Face folder (`config.json` with model_type gpt2 or llama, `model.safetensors` or its shards):
  GPT-2 into the `gpt` builder, Llama into the `llama` builder (`kerasbig.pretrained.hf`);
- a keras-hub GPT-2 preset folder (`config.json`, `model.weights.h5`), read without keras-hub
  (`kerasbig.pretrained.keras_hub`);
- a kerasbig workdir (`config.json` and `checkpoints/`): continue from your own run with a new config;
- a `.keras` file of a kerasbig model, or a `.weights.h5` file (weights only: `config.model` names the
  architecture, and the shapes must match it).

Other `config.model` keys may be given when they agree with the checkpoint; one that contradicts it is refused
(exit 2, naming both values). Keys a checkpoint does not fix (dropout) are the config's.

The checkpoint's tokenizer (`kerasbig.pretrained.tokenizers`: tokenizer.model, tokenizer.json, vocab.json +
merges.txt in its folder) reads `corpus:` data: `adopt_tokenizer` sets `data.tokenizer=pretrained:PATH`.
"""
from __future__ import annotations

import json
import pathlib
import zipfile

import keras
import numpy as np

from kerasbig.errors import UsageError
from kerasbig.pretrained import hf, keras_hub, tokenizers

PREFIX = "pretrained:"  # data.tokenizer=pretrained:PATH, the tokenizer files in a checkpoint's folder
# Keys a checkpoint leaves to the config: regularisation, not shape.
FREE = ("dropout",)


def _kind(path: pathlib.Path) -> str:
    if path.is_dir():
        if (path / "checkpoints").is_dir():
            return "workdir"
        return "keras_hub" if keras_hub.is_preset(path) else "hf"
    if path.name.endswith(".weights.h5"):
        return "weights"
    if path.suffix == ".keras":
        return "keras"
    if not path.exists():
        raise UsageError(f"config.model.init_from={path} does not exist; pass a Hugging Face folder, a kerasbig "
                         "workdir, a .keras or a .weights.h5 file")
    raise UsageError(f"config.model.init_from={path} is neither a folder nor a .keras / .weights.h5 file")


def _workdir_architecture(path: pathlib.Path) -> tuple[str, dict]:
    """The run's builder and hyperparameters; a language model's context is the one it was trained with,
    whatever data.seq_len the new config has."""
    from kerasbig.models import hyperparameters

    try:
        config = json.loads((path / "config.json").read_text())
        model, seq_len = dict(config["model"]), config["data"]["seq_len"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"config.model.init_from={path}: a kerasbig workdir needs the config.json its run "
                         "wrote; pass the folder of a training run") from None
    name, found = hyperparameters(model)
    if name in ("gpt", "llama") and not found.get("context"):
        found["context"] = seq_len
    return name, found


def _keras_file_model(path: pathlib.Path) -> tuple[str, dict]:
    """The builder and hyperparameters of the kerasbig model saved in a .keras file, read from its layers."""
    try:
        with zipfile.ZipFile(path) as archive:
            layers = json.loads(archive.read("config.json"))["config"]["layers"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise UsageError(f"config.model.init_from={path} is not a readable .keras file ({error})") from None
    by_name = {layer["config"]["name"]: layer for layer in layers}
    blocks = [layer["config"] for layer in layers if layer["class_name"] in ("Block", "LlamaBlock")]
    embedding = by_name.get("token_embedding", {}).get("config", {})
    if not blocks or not embedding:
        raise UsageError(f"config.model.init_from={path} does not hold a kerasbig gpt or llama model")
    block = blocks[0]
    common = dict(width=block["width"], depth=len(blocks), heads=block["heads"], vocab_size=embedding["input_dim"])
    if "position_embedding" in by_name:
        return "gpt", {**common, "mlp_ratio": block["mlp_ratio"], "bias": block["use_bias"],
                       "activation": block.get("activation", "gelu"),
                       "context": by_name["position_embedding"]["config"]["max_length"]}
    return "llama", {**common, "kv_heads": block["kv_heads"], "hidden": block["hidden"],
                     "norm_epsilon": block["norm_epsilon"], "rope_theta": block["rope_theta"],
                     "rope_scaling": block.get("rope_scaling"),
                     "tie_embeddings": embedding["tie_weights"], "context": block.get("context", 0)}


def architecture(path: pathlib.Path, given: dict) -> tuple[str, dict]:
    """The builder name and hyperparameters of the checkpoint at `path`; `given` is config.model without
    init_from, for a .weights.h5 file (which holds no architecture)."""
    kind = _kind(path)
    if kind == "hf":
        return hf.hyperparameters(path, hf.read_config(path))
    if kind == "keras_hub":
        return keras_hub.hyperparameters(path)
    if kind == "workdir":
        return _workdir_architecture(path)
    if kind == "keras":
        return _keras_file_model(path)
    if "name" not in given:
        raise UsageError(f"config.model.init_from={path}: a .weights.h5 file holds no architecture; give "
                         "config.model.name and the builder's keys it was trained with")
    return given["name"], {k: v for k, v in given.items() if k != "name"}


def hyperparameters(model_config: dict) -> tuple[str, dict]:
    """`config.model` with `init_from`: the checkpoint's builder and hyperparameters, with the config's own
    keys where they agree (or the checkpoint leaves them open); a contradiction is a UsageError."""
    given = {k: v for k, v in model_config.items() if k != "init_from"}
    path = pathlib.Path(model_config["init_from"]).expanduser()
    name, found = architecture(path, given)
    for key, value in given.items():
        if key == "name" and value != name:
            raise UsageError(f"config.model.name={value!r} contradicts config.model.init_from={path}, a {name!r} "
                             "checkpoint; leave config.model.name out")
        if key != "name" and key not in FREE and key in found and found[key] != value:
            raise UsageError(f"config.model.{key}={value!r} contradicts config.model.init_from={path}, whose "
                             f"{key} is {found[key]!r}; leave the key out")
    return name, {**found, **{k: v for k, v in given.items() if k in FREE or k not in found and k != "name"}}


def load_weights(model: keras.Model, model_config: dict) -> None:
    """Puts the weights of `model_config.init_from` into `model`, built from `hyperparameters(model_config)`."""
    path = pathlib.Path(model_config["init_from"]).expanduser()
    kind = _kind(path)
    if kind == "hf":
        config = hf.read_config(path)
        name, found = hf.hyperparameters(path, config)
        tied = name == "gpt" or found["tie_embeddings"]
        _assign(model, hf.weights(path, config["model_type"], found["depth"], tied), path)
    elif kind == "keras_hub":
        _assign(model, keras_hub.weights(path, keras_hub.hyperparameters(path)[1]["depth"]), path)
    elif kind == "workdir":
        _load_workdir_weights(model, path)
    else:
        try:
            model.load_weights(str(path))
        except (ValueError, OSError) as error:
            raise UsageError(f"config.model.init_from={path} does not fit the model ({str(error).splitlines()[0]}); "
                             "give the architecture it was saved with") from None


def _load_workdir_weights(model: keras.Model, workdir: pathlib.Path) -> None:
    """The weights of the run's newest checkpoint, without its random-number states."""
    from kerasbig import checkpoint

    try:
        checkpoint.load_model_weights(workdir / "checkpoints", model)
    except FileNotFoundError:
        raise UsageError(f"config.model.init_from={workdir} has no checkpoint yet; train it first") from None
    except ValueError as error:
        raise UsageError(f"config.model.init_from={workdir}: {error}; its checkpoint does not match its own "
                         "config.json") from None


def _assign(model: keras.Model, values: dict[str, np.ndarray], path: pathlib.Path) -> None:
    variables = {v.path: v for v in model.weights}
    missing = sorted(set(variables) - set(values))
    if missing:
        raise UsageError(f"config.model.init_from={path} has no weights for {missing[:3]}; the checkpoint does "
                         "not match its own config.json")
    for name, value in values.items():
        if tuple(variables[name].shape) != value.shape:
            raise UsageError(f"config.model.init_from={path}: {name} is {value.shape} in the weights but "
                             f"{tuple(variables[name].shape)} in config.json; the checkpoint is inconsistent")
    for name, value in values.items():
        variables[name].assign(value)


def adopt_tokenizer(config) -> None:
    """With `model.init_from` and `corpus:` data, the checkpoint's tokenizer reads the corpus
    (`data.tokenizer=pretrained:PATH`); a tokenizer of another kind would give its ids other meanings."""
    path = pathlib.Path(config.model.init_from).expanduser()
    folder = path if path.is_dir() else path.parent
    if tokenizers.load(folder) is None:
        return
    if not config.data.name.startswith("corpus:"):
        raise UsageError(f"config.data.name={config.data.name!r}: config.model.init_from={path} reads text with "
                         "its own tokenizer, which only corpus: data takes; use corpus:GLOB")
    chosen = config.data.tokenizer
    if chosen == "bytes":  # the default: nothing chosen
        config.data.tokenizer = f"{PREFIX}{folder}"
    elif not chosen.startswith(PREFIX):
        raise UsageError(f"config.data.tokenizer={chosen!r} contradicts config.model.init_from={path}, which has "
                         f"its own tokenizer; leave data.tokenizer out (or set {PREFIX}{folder})")


def _builder_arguments(model_config) -> tuple[str, dict]:
    """The builder name and all its keyword arguments, defaults included."""
    import inspect

    from kerasbig.models import BUILDERS, hyperparameters

    name, given = hyperparameters(model_config)
    defaults = {p.name: p.default for p in inspect.signature(BUILDERS[name]).parameters.values() if p.name != "spec"}
    return name, {**defaults, **given}


def check_hf_export(model_config) -> None:
    """Refuses, before any training, a model that `--export_format=hf` cannot write."""
    hf.checkpoint_config(*_builder_arguments(model_config), vocab=1, context=1, end_token=None)


def export_hf(model: keras.Model, model_config, folder: pathlib.Path, *, tokenizer, seq_len: int) -> pathlib.Path:
    """`--export_format=hf`: the trained `gpt` or `llama` as a Hugging Face folder with the run's `tokenizer`
    (None: bytes); `seq_len` is the data's, the context of a model built without one."""
    name, hyper = _builder_arguments(model_config)
    config = hf.checkpoint_config(name, hyper, vocab=model.get_layer("token_embedding").input_dim,
                                  context=hyper["context"] or seq_len,
                                  end_token=tokenizer.separator if tokenizer else None)
    hf.write(model, folder, config, tokenizer.files if tokenizer else {})
    return folder
