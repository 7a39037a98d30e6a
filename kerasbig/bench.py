"""`python -m kerasbig.bench`: training speed and memory of shipped configs, through the real training command.

Each case runs `python -m kerasbig.train --mode=train` for a fixed number of steps in a fresh process and reads
the throughput that the run itself logged to TensorBoard (the `Throughput` callback: the first, compiling
execution is excluded), so the figures are what users get. Peak memory is the process's maximum resident set.
Achieved FLOP/s is the run's logged `tflops_per_sec`: the analytic training FLOPs that `--mode=dry_run` prints,
times steps per second.

    python -m kerasbig.bench                       # all cases, table on stdout
    python -m kerasbig.bench --cases=gpt_small --output=docs/benchmark.md
    python -m kerasbig.bench --suite=generation    # time per generated token, cached keys/values vs recomputing
    python -m kerasbig.bench --suite=cpu           # kerasbig's loop against model.fit and the bare step
    python -m kerasbig.bench --suite=gpu           # kerasbig's JAX loop beside PyTorch's anchor (bench_gpu)
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import flags

from kerasbig import bench_gpu, bench_loop, cli
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

SUITES = ("train", "cpu", "generation", "gpu")
FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_enum("suite", "train", SUITES, "train: throughput of the training cases through the real command; "
                      "cpu: kerasbig's loop side by side with model.fit and the bare step; generation: the decoding "
                      "cache; gpu: kerasbig's JAX loop at GPT-2-small shape beside the PyTorch anchor.")
    flags.DEFINE_list("cases", None, f"Cases to run (default all): train {', '.join(CASES)}; cpu "
                      f"{', '.join(bench_loop.LOOP_CASES)}; gpu: batch sizes ({', '.join(bench_gpu.BATCHES)}).")
    flags.DEFINE_integer("repeats", 3, "cpu suite: interleaved repeats of each variant.", lower_bound=1)
    flags.DEFINE_string("output", "", "Also write the table, with the machine's description, to this Markdown file.")


def _last_scalars(logdir: pathlib.Path, tags: tuple[str, ...]) -> dict[str, float]:
    values = {}
    for record in tf.data.TFRecordDataset(sorted(str(p) for p in logdir.glob("events.out.tfevents.*"))):
        for value in tf.compat.v1.Event.FromString(record.numpy()).summary.value:
            if value.tag in tags:
                values[value.tag] = float(tf.make_ndarray(value.tensor))
    return values


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
        rates = _last_scalars(pathlib.Path(workdir) / "train", ("examples_per_sec", "tokens_per_sec", "tflops_per_sec"))
    return {"case": case.name, "examples/s": rates["examples_per_sec"], "tokens/s": rates.get("tokens_per_sec"),
            "GFLOP/s": rates["tflops_per_sec"] * 1e3, "peak RSS (GiB)": usage.ru_maxrss / 2**20,
            "wall (s)": seconds, "steps": case.steps}


def seconds_per_token(model, *, context: int, new_tokens: int, use_cache: bool) -> float:
    """Greedy decoding time per token after a `context`-token prompt, not counting reading the prompt. The
    model's context must hold `context + new_tokens + 1` positions so that no run re-encodes a full window."""
    from kerasbig.generation import generate

    prompt = np.random.default_rng(0).integers(model.output_shape[-1], size=context).tolist()

    def elapsed(count: int) -> float:
        start = time.perf_counter()
        generate(model, prompt, count, temperature=0, use_cache=use_cache)
        return time.perf_counter() - start

    elapsed(3)  # warm up: the first steps trace the graphs (a cache that grows each step, after two)
    return (elapsed(new_tokens + 1) - elapsed(1)) / new_tokens


def generation_rows(new_tokens: int = 16) -> list[dict]:
    """Milliseconds per generated token with the key/value cache and by recomputing the whole window."""
    from kerasbig.data.spec import DataSpec
    from kerasbig.models.gpt import build_gpt

    rows = []
    for width, depth, context in ((64, 2, 512), (256, 4, 512)):
        spec = DataSpec("language_model", "tokens", (context + new_tokens + 1,), "int32", 256)
        model = build_gpt(spec, width=width, depth=depth, heads=4)
        cached, recomputed = (seconds_per_token(model, context=context, new_tokens=new_tokens, use_cache=use_cache)
                              for use_cache in (True, False))
        rows.append({"model": f"gpt width {width}, depth {depth}", "context": context,
                     "cached (ms/token)": cached * 1e3, "recomputed (ms/token)": recomputed * 1e3,
                     "speed-up": recomputed / cached})
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


def main() -> None:
    if FLAGS.suite == "gpu":
        unknown = [case for case in FLAGS.cases or [] if not case.isdigit()]
        if unknown:
            raise UsageError(f"--cases: {unknown} are not batch sizes; the gpu suite takes e.g. --cases=16,32")
    else:
        known = bench_loop.LOOP_CASES if FLAGS.suite == "cpu" else CASES
        unknown = sorted(set(FLAGS.cases or []) - set(known))
        if unknown:
            raise UsageError(f"--cases: unknown {unknown}; choose from {list(known)}")
    if FLAGS.suite == "gpu":
        rows = bench_gpu.suite(FLAGS.cases or list(bench_gpu.BATCHES))
    elif FLAGS.suite == "generation":
        rows = generation_rows()
    elif FLAGS.suite == "cpu":
        rows = bench_loop.suite(FLAGS.cases or list(bench_loop.LOOP_CASES), repeats=FLAGS.repeats)
    else:
        rows = []
        for name in FLAGS.cases or list(CASES):
            print(f"running {name} ...", flush=True)
            rows.append(run_case(CASES[name]))
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}, "
               f"Python {platform.python_version()}")
    if FLAGS.suite == "gpu":
        machine += f"; {bench_gpu.device()}; {time.strftime('%Y-%m-%d')}"
    result = table(rows)
    print(f"\n{machine}\n\n{result}")
    if FLAGS.output:
        pathlib.Path(FLAGS.output).write_text(f"Measured with `python -m kerasbig.bench` on {machine}.\n\n{result}\n")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
