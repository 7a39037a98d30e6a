"""`python -m kerasbig.bench`: training speed and memory of shipped configs, through the real training command.

Each case runs `python -m kerasbig.train --mode=train` for a fixed number of steps in a fresh process and reads
the throughput that the run itself logged to TensorBoard (the `Throughput` callback: the first, compiling
execution is excluded), so the figures are what users get. Peak memory is the process's maximum resident set.
Achieved FLOP/s is the run's logged `tflops_per_sec`: the analytic training FLOPs that `--mode=dry_run` prints,
times steps per second.

    python -m kerasbig.bench                       # all cases, table on stdout
    python -m kerasbig.bench --cases=gpt_small --output=docs/benchmark.md
    python -m kerasbig.bench --suite=generation    # generated tokens/s: the compiled cache, recomputing, keras-hub
    python -m kerasbig.bench --suite=lora          # LoRA against full fine-tuning of gpt_small
    python -m kerasbig.bench --suite=cpu           # kerasbig's loop against model.fit and the bare step
    python -m kerasbig.bench --suite=checkpoint    # how long a checkpoint holds training up, foreground/background
    python -m kerasbig.bench --suite=compression --output=docs/compression.md  # pruning and quantization
    python -m kerasbig.bench --suite=gpu           # kerasbig's JAX loop beside PyTorch's anchor (bench_gpu)
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags, logging

from kerasbig import bench_gpu, cli, summaries
from kerasbig.errors import RunError, UsageError

REPO = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: str
    overrides: tuple[str, ...] = ()
    steps: int = 60


CASES = {case.name: case for case in [
    Case("digits_mlp", "digits_mlp", ("--config.train.steps_per_execution=8",), steps=200),
    Case("digits_cnn", "digits_cnn", steps=120),
    Case("digits_cnn_spe1", "digits_cnn", ("--config.train.steps_per_execution=1",), steps=120),
    Case("text_transformer", "text_transformer", steps=60),
    Case("gpt_small", "gpt_small", steps=60),
    Case("gpt_small_no_xla", "gpt_small", ("--config.train.jit_compile=False",), steps=60),
    Case("gpt_small_bf16", "gpt_small", ("--mixed_precision=mixed_bfloat16",), steps=60),
]}

SUITES = ("train", "cpu", "generation", "lora", "compression", "gpu", "checkpoint")
FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_enum("suite", "train", SUITES, "train: throughput of the training cases through the real command; "
                      "cpu: kerasbig's loop side by side with model.fit and the bare step; generation: the decoding "
                      "cache; lora: LoRA against full fine-tuning; compression: size, accuracy and served latency "
                      "of pruned and quantized versions; gpu: kerasbig's JAX loop at GPT-2-small shape beside the "
                      "PyTorch anchor; checkpoint: how long a checkpoint holds training up.")
    flags.DEFINE_list("cases", None, f"Cases to run (default all): train {', '.join(CASES)}; gpu: batch sizes "
                      f"({', '.join(bench_gpu.BATCHES)}) or largest; an unknown case lists the suite's cases.")
    flags.DEFINE_integer("repeats", 3, "cpu suite: interleaved repeats of each variant.", lower_bound=1)
    flags.DEFINE_string("output", "", "Also write the table, with the machine's description, to this Markdown file.")


def run_case(case: Case) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "kerasbig.train", f"--config=configs/{case.config}.py", *case.overrides,
                   "--mode=train", f"--workdir={workdir}", f"--config.train.steps={case.steps}",
                   f"--config.train.log_every_steps={max(1, case.steps // 4)}"]
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status):
            raise RunError(f"{case.name}: training failed: {process.stderr.read().strip().splitlines()[-1:]}")
        rates = summaries.last_scalars(pathlib.Path(workdir) / "train")
    return {"case": case.name, "examples/s": rates["examples_per_sec"], "tokens/s": rates.get("tokens_per_sec"),
            "GFLOP/s": rates["tflops_per_sec"] * 1e3, "peak RSS (GiB)": usage.ru_maxrss / 2**20,
            "wall (s)": seconds, "steps": case.steps}


def tokens_per_second(model, *, batch: int, prompt: int, new_tokens: int, use_cache: bool) -> float:
    """Sampled tokens per second of the compiled generation loop (the SavedModel's `generate`) for `batch`
    prompts of `prompt` tokens, not counting reading the prompts: (time for new_tokens + 1 tokens - time for
    one) per generated token; the graph is traced before timing."""
    import tensorflow as tf  # noqa: PLC0415

    from kerasbig import generation  # noqa: PLC0415

    tokens = np.random.default_rng(0).integers(model.output_shape[-1], size=(batch, prompt)).astype(np.int32)
    family = generation.decoder_for(model, use_cache)

    def elapsed(count: int) -> float:
        start = time.perf_counter()
        generation._compiled(model, family, tf.constant(tokens), tf.fill([batch], prompt), tf.constant(count),
                             tf.constant(0.8), tf.constant(40), tf.constant(1.0), tf.constant(0, tf.int64),
                             tf.constant(generation.NO_END_TOKEN))["count"].numpy()
        return time.perf_counter() - start

    elapsed(2)
    return batch * new_tokens / (elapsed(new_tokens + 1) - elapsed(1))


def generation_rows(new_tokens: int = 32, prompt: int = 128) -> list[dict]:
    """Generated tokens/s at batch 1 and 8, with the preallocated key/value cache and by recomputing the
    whole prefix at every step, for two GPT sizes with a 512-token context."""
    from kerasbig.data.spec import DataSpec  # noqa: PLC0415
    from kerasbig.models.gpt import build_gpt  # noqa: PLC0415

    rows = []
    for width, depth in ((64, 2), (256, 4)):
        model = build_gpt(DataSpec("language_model", "tokens", (512,), "int32", 256), width=width, depth=depth,
                          heads=4)
        for batch in (1, 8):
            cached, recomputed = (tokens_per_second(model, batch=batch, prompt=prompt, new_tokens=new_tokens,
                                                    use_cache=use_cache) for use_cache in (True, False))
            rows.append({"model": f"gpt width {width}, depth {depth}", "batch": batch,
                         "compiled cache (tokens/s)": cached, "recompute (tokens/s)": recomputed,
                         "speed-up": cached / recomputed})
    return rows


KERAS_HUB_PRESET = REPO / "tests" / "fixtures" / "gpt2_keras_hub"  # a tiny GPT-2 both libraries read


def keras_hub_tokens_per_second(preset: pathlib.Path, *, batch: int, prompt: int, new_tokens: int) -> float:
    """`tokens_per_second` for keras-hub's `GPT2CausalLM.generate` on `preset` (top-k 40 at temperature 0.8,
    its default compiled graph), timed the same way: (generating new_tokens + 1 - generating one) per token."""
    import keras_hub  # noqa: PLC0415

    model = keras_hub.models.GPT2CausalLM(backbone=keras_hub.models.Backbone.from_preset(str(preset)),
                                          preprocessor=None)
    model.compile(sampler=keras_hub.samplers.TopKSampler(k=40, temperature=0.8))
    vocab = model.backbone.vocabulary_size
    tokens = np.random.default_rng(0).integers(vocab, size=(batch, prompt)).astype(np.int32)

    def elapsed(count: int) -> float:
        inputs = {"token_ids": np.pad(tokens, [(0, 0), (0, count)]),
                  "padding_mask": np.pad(np.ones_like(tokens, bool), [(0, 0), (0, count)])}
        model.generate(inputs, stop_token_ids=None)  # traced for this length before timing
        start = time.perf_counter()
        model.generate(inputs, stop_token_ids=None)
        return time.perf_counter() - start

    return batch * new_tokens / (elapsed(new_tokens + 1) - elapsed(1))


def keras_hub_rows(new_tokens: int = 16, prompt: int = 32) -> list[dict]:
    """Tokens/s of one tiny keras-hub GPT-2 preset (64-token context) generated by kerasbig (the compiled cache
    and recomputing) and by keras-hub's own `generate`, side by side; keras-hub's column is "-" where it is not
    installed (`pip install kerasbig[hub]`)."""
    from kerasbig import models, pretrained  # noqa: PLC0415
    from kerasbig.data.spec import LANGUAGE_MODEL, DataSpec  # noqa: PLC0415

    model_config = {"init_from": str(KERAS_HUB_PRESET)}
    model = models.build(DataSpec(LANGUAGE_MODEL, "tokens", (prompt + new_tokens,), "int32", 320), model_config)
    pretrained.load_weights(model, model_config)
    try:
        import keras_hub  # noqa: F401, PLC0415
    except ImportError:
        print("keras-hub is not installed (pip install kerasbig[hub]): its generate column is left out")
        keras_hub = None
    rows = []
    for batch in (1, 8):
        sizes = {"batch": batch, "prompt": prompt, "new_tokens": new_tokens}
        rows.append({"model": "gpt2_keras_hub fixture", "batch": batch,
                     "compiled cache (tokens/s)": tokens_per_second(model, **sizes, use_cache=True),
                     "recompute (tokens/s)": tokens_per_second(model, **sizes, use_cache=False),
                     "keras-hub generate (tokens/s)": (keras_hub_tokens_per_second(KERAS_HUB_PRESET, **sizes)
                                                       if keras_hub else None)})
    return rows


LORA_CASES = (Case("full fine-tuning", "gpt_small", steps=60),
              Case("LoRA rank 8", "gpt_small", ("--config.model.lora_rank=8",), steps=60))


def lora_rows() -> list[dict]:
    """gpt_small trained in full and with LoRA through the real command: trainable parameters, optimizer
    state, step time and the process's peak memory."""
    import importlib.util  # noqa: PLC0415

    from kerasbig import lora, models  # noqa: PLC0415
    from kerasbig.data.spec import DataSpec  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("gpt_small", REPO / "configs" / "gpt_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    rows = []
    for case in LORA_CASES:
        model_config = {**config.model, "lora_rank": 8 if case.overrides else 0}
        model = models.build(DataSpec("language_model", "tokens", (config.data.seq_len,), "int32", 256), model_config)
        trainable, total = lora.counts(model)
        result = run_case(case)
        rows.append({"case": case.name, "trainable params": f"{trainable:,} of {total:,}",
                     "Adam state (KiB)": 8 * trainable / 1024,
                     "step (ms)": 1e3 * config.data.batch_size / result["examples/s"],
                     "peak RSS (GiB)": result["peak RSS (GiB)"]})
    return rows


def table(rows: list[dict]) -> str:
    columns = list(rows[0])
    def cell(value):
        if value is None:
            return "-"
        return f"{value:,.1f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _suite_module(name: str):
    """The module of a suite that needs TensorFlow, imported only when it runs (the gpu suite runs without it)."""
    return importlib.import_module({"cpu": "kerasbig.bench_loop", "checkpoint": "kerasbig.bench_loop",
                                    "compression": "kerasbig.compress.bench"}[name])


def main() -> None:
    logging.set_verbosity(logging.WARNING)  # as in training: TensorFlow's info lines are not the figures
    if FLAGS.suite == "gpu":
        unknown = [case for case in FLAGS.cases or [] if not case.isdigit() and case != "largest"]
        if unknown:
            raise UsageError(f"--cases: {unknown} are neither batch sizes nor `largest`; the gpu suite takes e.g. "
                             "--cases=16,32,largest")
    else:
        if FLAGS.suite == "cpu":
            known = _suite_module("cpu").LOOP_CASES
        elif FLAGS.suite == "compression":
            known = _suite_module("compression").MODELS
        else:
            known = CASES
        unknown = sorted(set(FLAGS.cases or []) - set(known))
        if unknown:
            raise UsageError(f"--cases: unknown {unknown}; choose from {list(known)}")
    if FLAGS.suite == "compression":
        compression = _suite_module("compression")

        def markdown(tables: dict) -> str:
            return "\n\n".join(f"### {name}\n\n{table(rows)}" for name, rows in tables.items())

        def write(tables: dict) -> None:  # after every row, atomically: a partial run keeps its rows
            if FLAGS.output:
                compression.write_results(pathlib.Path(FLAGS.output),
                                          f"Measured on {machine()}.\n\n{markdown(tables)}\n")
        tables = compression.suite(FLAGS.cases or list(compression.MODELS), on_row=write)
        print(f"\n{machine()}\n\n{markdown(tables)}")
        return
    if FLAGS.suite == "gpu":
        rows = bench_gpu.suite(FLAGS.cases or list(bench_gpu.BATCHES))
    elif FLAGS.suite == "generation":
        print(f"\n{table(keras_hub_rows())}")
        rows = generation_rows()
    elif FLAGS.suite == "lora":
        rows = lora_rows()
    elif FLAGS.suite == "cpu":
        loop = _suite_module("cpu")
        rows = loop.suite(FLAGS.cases or list(loop.LOOP_CASES), repeats=FLAGS.repeats)
    elif FLAGS.suite == "checkpoint":
        rows = _suite_module("checkpoint").checkpoint_rows()
    else:
        rows = []
        for name in FLAGS.cases or list(CASES):
            print(f"running {name} ...", flush=True)
            rows.append(run_case(CASES[name]))
    result = table(rows)
    print(f"\n{machine()}\n\n{result}")
    if FLAGS.output:
        pathlib.Path(FLAGS.output).write_text(f"Measured with `python -m kerasbig.bench` on {machine()}.\n\n{result}\n")


def machine() -> str:
    """The machine the figures come from; the gpu suite's with its device and the date."""
    installed = []
    for package in ("tensorflow", "jax"):
        try:
            installed.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    described = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {', '.join(installed)}, "
                 f"Python {platform.python_version()}")
    if FLAGS.suite == "gpu":
        described += f"; {bench_gpu.device()}; {time.strftime('%Y-%m-%d')}"
    return described


if __name__ == "__main__":
    define_flags()
    cli.run(main)
