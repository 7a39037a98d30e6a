"""`python -m kerasbig.generate`: sample text from a trained language model (GPT or RNN) in a workdir.

    python -m kerasbig.generate --workdir=logs/gpt_small --prompt="The with statement" --max_new_tokens=300

It runs the same compiled loop as the SavedModel's `generate` signature (`kerasbig.generation`), so for the same
prompt, settings and seed it prints the tokens that TF Serving or `kerasbig.serve` answers.
"""
from __future__ import annotations

import json
import pathlib

import ml_collections
from absl import flags

from kerasbig import cli, data, models
from kerasbig.checkpoint import load_model_weights
from kerasbig.data import text
from kerasbig.data.spec import LANGUAGE_MODEL
from kerasbig.errors import UsageError
from kerasbig.generation import generate

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The run folder of a trained language model (holds config.json, checkpoints/).")
    flags.DEFINE_string("prompt", "\n", "Text to continue.")
    flags.DEFINE_integer("max_new_tokens", 200, "How many tokens to generate.")
    flags.DEFINE_float("temperature", 0.8, "0 is greedy; higher is more random.")
    flags.DEFINE_integer("top_k", 40, "Sample from the k most likely tokens only (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Sample from the most likely tokens whose probability reaches p (1: all).")
    flags.DEFINE_integer("seed", 0, "The same seed draws the same text.")


def load_language_model(workdir: pathlib.Path):
    """The config, task and model of a run, with the latest checkpoint's weights."""
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise UsageError(f"--workdir={workdir} holds no config.json; pass the folder of a training run")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    task = data.load_task(config.data)
    if task.spec.kind != LANGUAGE_MODEL:
        raise UsageError(f"--workdir={workdir} trained a {task.spec.kind} model; generation needs a language model")
    model = models.build(task.spec, config.model)
    try:
        step = load_model_weights(workdir / "checkpoints", model)
    except FileNotFoundError:
        raise UsageError(f"--workdir={workdir} has no checkpoint yet; train it first") from None
    return task, model, step


def main() -> None:
    if not FLAGS.workdir:
        raise UsageError("--workdir is required: the folder of a trained language model, e.g. logs/gpt_small")
    task, model, step = load_language_model(pathlib.Path(FLAGS.workdir))
    tokenizer = task.tokenizer  # the corpus' trained tokenizer; None for bytes
    prompt = tokenizer.encode(FLAGS.prompt) if tokenizer else text.encode(FLAGS.prompt)
    tokens = generate(model, prompt, FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                      top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
    print(f"[{model.name} at step {step}]")
    print(FLAGS.prompt + (tokenizer.decode(tokens) if tokenizer else text.decode(tokens)))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
