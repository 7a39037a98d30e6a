"""keras-hub preset folders of GPT-2 (`config.json` naming `keras_hub>GPT2Backbone`, `model.weights.h5`), read
with h5py into the `gpt` builder, so keras-hub (which pulls the full `tensorflow` wheel) is not needed.

Keras's weights file keeps each layer's variables under `layers/<layer>/vars/<i>`, the layers named by their
class (`transformer_decoder`, `transformer_decoder_1`, ...). keras-hub's attention keeps queries, keys and
values as [width, heads, head_width] kernels: they are flattened and concatenated into `gpt`'s `qkv`.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from kerasbig.errors import UsageError

BACKBONES = ("keras_hub>GPT2Backbone",)
WEIGHTS = "model.weights.h5"


def is_preset(folder: pathlib.Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("registered_name", "").startswith("keras_hub>")
    except (OSError, ValueError, AttributeError):
        return False


def hyperparameters(folder: pathlib.Path) -> tuple[str, dict]:
    """The `gpt` builder's arguments for the preset's backbone; other backbones are refused."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("registered_name") not in BACKBONES:
        raise UsageError(f"config.model.init_from={folder}: the keras-hub backbone {config.get('registered_name')!r} "
                         f"is not one kerasbig reads ({list(BACKBONES)}); use the model's Hugging Face folder")
    c = config["config"]
    return "gpt", dict(width=c["hidden_dim"], depth=c["num_layers"], heads=c["num_heads"],
                       mlp_ratio=c["intermediate_dim"] // c["hidden_dim"], bias=True,
                       vocab_size=c["vocabulary_size"], context=c["max_sequence_length"], activation="gelu_tanh")


def weights(folder: pathlib.Path, depth: int) -> dict[str, np.ndarray]:
    """{kerasbig variable path: array} from the preset's model.weights.h5."""
    import h5py

    try:
        with h5py.File(folder / WEIGHTS, "r") as file:
            layers = file["layers"]

            def read(layer: str, index: int) -> np.ndarray:
                return np.asarray(layers[f"{layer}/vars/{index}"], np.float32)

            found = {"token_embedding/embeddings": read("reversible_embedding", 0),
                     "position_embedding/embeddings": read("position_embedding", 0),
                     "ln_f/gamma": read("layer_normalization", 0), "ln_f/beta": read("layer_normalization", 1)}
            for i in range(depth):
                block = "transformer_decoder" + (f"_{i}" if i else "")
                attention = f"{block}/_self_attention_layer"
                width = read(f"{attention}/query_dense", 0).shape[0]
                found[f"block_{i}/attn/qkv/kernel"] = np.concatenate(
                    [read(f"{attention}/{part}_dense", 0).reshape(width, -1) for part in ("query", "key", "value")], 1)
                found[f"block_{i}/attn/qkv/bias"] = np.concatenate(
                    [read(f"{attention}/{part}_dense", 1).reshape(-1) for part in ("query", "key", "value")])
                found[f"block_{i}/attn/out/kernel"] = read(f"{attention}/output_dense", 0).reshape(-1, width)
                found[f"block_{i}/attn/out/bias"] = read(f"{attention}/output_dense", 1)
                for ours, theirs in (("ln_1", "_self_attention_layer_norm"), ("ln_2", "_feedforward_layer_norm")):
                    found[f"block_{i}/{ours}/gamma"] = read(f"{block}/{theirs}", 0)
                    found[f"block_{i}/{ours}/beta"] = read(f"{block}/{theirs}", 1)
                for ours, theirs in (("mlp_fc", "_feedforward_intermediate_dense"),
                                     ("mlp_proj", "_feedforward_output_dense")):
                    found[f"block_{i}/{ours}/kernel"] = read(f"{block}/{theirs}", 0)
                    found[f"block_{i}/{ours}/bias"] = read(f"{block}/{theirs}", 1)
    except (OSError, KeyError) as error:
        raise UsageError(f"config.model.init_from={folder}: cannot read {WEIGHTS} ({error}); the file is "
                         "missing, incomplete or not a GPT-2 preset's") from None
    return found
