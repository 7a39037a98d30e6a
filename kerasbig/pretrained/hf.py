"""Hugging Face folders: `config.json` and `model.safetensors` (or its shards) <-> kerasbig builders' weights.

Two families: `gpt2` into the `gpt` builder (GPT-2's Conv1D weights are [in, out] like Dense kernels, so
nothing is transposed), and `llama` into the `llama` builder (torch Linear weights are [out, in]: transposed).
`mapping` pairs each kerasbig variable path with its Hugging Face tensor name, both ways: reading a checkpoint
and writing one back (`--export_format=hf`).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from kerasbig.errors import UsageError
from kerasbig.models import llama

GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
FAMILIES = ("gpt2", "llama")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_config(folder: pathlib.Path) -> dict:
    """The folder's config.json; UsageError when it is missing, unreadable or of a family kerasbig lacks."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except OSError as error:
        raise UsageError(f"config.model.init_from={folder}: cannot read config.json ({error.strerror}); pass a "
                         "Hugging Face folder with config.json and model.safetensors") from None
    except ValueError as error:
        raise UsageError(f"config.model.init_from={folder}: config.json is not JSON ({error})") from None
    if config.get("model_type") not in FAMILIES:
        raise UsageError(f"config.model.init_from={folder}: model_type {config.get('model_type')!r} is not one "
                         f"kerasbig can load; supported: {list(FAMILIES)}")
    return config


def _require(folder: pathlib.Path, config: dict, key: str, accepted, what: str) -> None:
    if config.get(key, accepted[0]) not in accepted:
        raise UsageError(f"config.model.init_from={folder}: {key}={config[key]!r} is not supported ({what})")


def hyperparameters(folder: pathlib.Path, config: dict) -> tuple[str, dict]:
    """The kerasbig builder and its keyword arguments for the checkpoint `config` describes."""
    if config["model_type"] == "gpt2":
        _require(folder, config, "activation_function", list(GPT2_ACTIVATIONS), "GPT-2 uses gelu_new")
        width = config["n_embd"]
        return "gpt", dict(width=width, depth=config["n_layer"], heads=config["n_head"],
                           mlp_ratio=(config.get("n_inner") or 4 * width) // width, bias=True,
                           vocab_size=config["vocab_size"], context=config["n_positions"],
                           activation=GPT2_ACTIVATIONS[config.get("activation_function", "gelu_new")])
    _require(folder, config, "hidden_act", ["silu"], "Llama's SwiGLU uses silu")
    _require(folder, config, "attention_bias", [False], "Llama has no attention biases")
    _require(folder, config, "mlp_bias", [False], "Llama has no MLP biases")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _require(folder, {"rope_type": rope_type}, "rope_type", ["default", "llama3"],
             "unscaled rotary positions or Llama 3.1's")
    missing = [key for key in llama.SCALING_KEYS if key not in rope] if rope_type == "llama3" else []
    if missing:
        raise UsageError(f"config.model.init_from={folder}: rope_type 'llama3' needs {missing} in config.json")
    width, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim", width // heads) != width // heads:
        raise UsageError(f"config.model.init_from={folder}: head_dim={config['head_dim']} is not hidden_size / "
                         f"num_attention_heads = {width // heads}, which kerasbig's llama needs")
    return "llama", dict(width=width, depth=config["num_hidden_layers"], heads=heads,
                         kv_heads=config.get("num_key_value_heads") or heads, hidden=config["intermediate_size"],
                         vocab_size=config["vocab_size"], context=config["max_position_embeddings"],
                         norm_epsilon=config.get("rms_norm_eps", 1e-6),
                         rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
                         rope_scaling=({key: rope[key] for key in llama.SCALING_KEYS} if rope_type == "llama3"
                                       else None),
                         tie_embeddings=bool(config.get("tie_word_embeddings", False)))


def mapping(family: str, depth: int, tied: bool = True) -> list[tuple[str, str, bool]]:
    """(kerasbig variable path, Hugging Face tensor name, transposed?) for every weight of the family."""
    if family == "gpt2":
        pairs = [("token_embedding/embeddings", "transformer.wte.weight"),
                 ("position_embedding/embeddings", "transformer.wpe.weight"),
                 ("ln_f/gamma", "transformer.ln_f.weight"), ("ln_f/beta", "transformer.ln_f.bias")]
        for i in range(depth):
            for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
                pairs += [(f"block_{i}/{ours}/gamma", f"transformer.h.{i}.{theirs}.weight"),
                          (f"block_{i}/{ours}/beta", f"transformer.h.{i}.{theirs}.bias")]
            for ours, theirs in (("attn/qkv", "attn.c_attn"), ("attn/out", "attn.c_proj"),
                                 ("mlp_fc", "mlp.c_fc"), ("mlp_proj", "mlp.c_proj")):
                pairs += [(f"block_{i}/{ours}/kernel", f"transformer.h.{i}.{theirs}.weight"),
                          (f"block_{i}/{ours}/bias", f"transformer.h.{i}.{theirs}.bias")]
        return [(ours, theirs, False) for ours, theirs in pairs]
    rows = [("token_embedding/embeddings", "model.embed_tokens.weight", False),
            ("ln_f/scale", "model.norm.weight", False)]
    if not tied:
        rows.append(("token_embedding/reverse_embeddings", "lm_head.weight", True))
    for i in range(depth):
        prefix = f"model.layers.{i}"
        rows += [(f"block_{i}/attn_norm/scale", f"{prefix}.input_layernorm.weight", False),
                 (f"block_{i}/mlp_norm/scale", f"{prefix}.post_attention_layernorm.weight", False)]
        rows += [(f"block_{i}/attn/{ours}/kernel", f"{prefix}.self_attn.{theirs}_proj.weight", True)
                 for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))]
        rows += [(f"block_{i}/{name}/kernel", f"{prefix}.mlp.{name}_proj.weight", True)
                 for name in ("gate", "up", "down")]
    return rows


def read_tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors file, or of the shards its index lists."""
    from safetensors.numpy import load_file

    if (folder / INDEX).is_file():
        files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    elif (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise UsageError(f"config.model.init_from={folder}: no {WEIGHTS} (or {INDEX}); kerasbig reads "
                         "safetensors weights, not PyTorch .bin files")
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(folder / name))
        except (OSError, Exception) as error:  # safetensors raises its own error type for a truncated file
            raise UsageError(f"config.model.init_from={folder}: cannot read {name} ({error}); the file is "
                             "missing or incomplete, download it again") from None
    # GPT-2 checkpoints are saved with and without the `transformer.` prefix.
    return {(f"transformer.{k}" if k.split(".")[0] in ("wte", "wpe", "h", "ln_f") else k): v
            for k, v in tensors.items()}


def weights(folder: pathlib.Path, family: str, depth: int, tied: bool) -> dict[str, np.ndarray]:
    """{kerasbig variable path: array} from the folder's safetensors; UsageError for a tensor it lacks."""
    tensors = read_tensors(folder)
    found = {}
    for ours, theirs, transposed in mapping(family, depth, tied):
        if theirs not in tensors:
            raise UsageError(f"config.model.init_from={folder}: the weights lack {theirs!r} (a partial or "
                             "mismatched checkpoint); download the checkpoint again")
        value = tensors[theirs].astype(np.float32)
        found[ours] = value.T if transposed else value
    return found


def checkpoint_config(name: str, hyper: dict, *, vocab: int, context: int, end_token: int | None) -> dict:
    """The config.json `transformers` reads for a kerasbig `gpt` or `llama` of these hyperparameters."""
    tokens = {} if end_token is None else {"bos_token_id": end_token, "eos_token_id": end_token}
    if name == "gpt":
        if not hyper["bias"]:
            raise UsageError("--export_format=hf: GPT-2 has biases; a gpt trained with bias=False has no "
                             "Hugging Face form")
        width = hyper["width"]
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab,
                "n_positions": context, "n_embd": width, "n_layer": hyper["depth"],
                "n_head": hyper["heads"], "n_inner": hyper["mlp_ratio"] * width,
                "activation_function": "gelu_new" if hyper["activation"] == "gelu_tanh" else "gelu",
                "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, **tokens}
    if name == "llama":
        theta, scaling = hyper["rope_theta"], hyper["rope_scaling"]
        rope = {"rope_type": "llama3", **scaling} if scaling else {"rope_type": "default"}
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
                "hidden_size": hyper["width"], "intermediate_size": hyper["hidden"],
                "num_hidden_layers": hyper["depth"], "num_attention_heads": hyper["heads"],
                "num_key_value_heads": hyper["kv_heads"] or hyper["heads"], "max_position_embeddings": context,
                "rms_norm_eps": hyper["norm_epsilon"], "hidden_act": "silu", "attention_bias": False,
                "mlp_bias": False, "tie_word_embeddings": hyper["tie_embeddings"],
                "rope_theta": theta, "rope_parameters": {**rope, "rope_theta": theta}, **tokens}
    raise UsageError(f"--export_format=hf writes gpt and llama models; this run trained {name!r}")


def write(model, folder: pathlib.Path, config: dict, tokenizer_files: dict[str, bytes]) -> None:
    """Writes `model` as the Hugging Face folder `folder` (config.json, model.safetensors, the tokenizer's
    files), into a temporary sibling renamed into place, replacing an earlier export."""
    import shutil
    import tempfile

    from safetensors.numpy import save_file

    variables = {v.path: v for v in model.weights}
    tied = config["model_type"] == "gpt2" or config["tie_word_embeddings"]
    depth = config.get("n_layer") or config["num_hidden_layers"]
    tensors = {theirs: np.ascontiguousarray(variables[ours].numpy().T if transposed else variables[ours].numpy())
               for ours, theirs, transposed in mapping(config["model_type"], depth, tied)}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}, indent=2))
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        for name, content in tokenizer_files.items():
            (tmp / name).write_bytes(content)
        if folder.exists():
            old = folder.parent / f".old-{folder.name}"
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
