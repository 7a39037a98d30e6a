"""`python -m kerasbig.bench --suite=gpu`: kerasbig's JAX loop at GPT-2-small shape beside the PyTorch anchor.

Both run in the same command on the same GPU, one fresh process each: `python -m kerasbig.train --backend=jax`
(kerasbig's loop, callbacks and all, on `configs/gpt2_124m.py`: bf16 mixed precision, byte-level text, GPT-2's
vocabulary padded to 50304, no accumulation) and the anchor `../shared/anchors/gpt_torch.py` (plain PyTorch, `torch.compile`, bf16 autocast). The shape
comes from the anchor's own variables, so one setting sizes both: L layers, H heads, D width, T context, B batch
(defaults 12, 12, 768, 1024; batches 16 and 32), STEPS. kerasbig's tokens/s and FLOP/s are what its run logged to
TensorBoard (the first, compiling execution excluded), its FLOPs those of `--mode=dry_run`: the anchor's estimate,
6N + 12·L·D·T per token with N without position embeddings. MFU for both is against PEAK_TFLOPS (default 989,
an H100's or H200's dense bf16 peak).

    python -m kerasbig.bench --suite=gpu                 # batches 16 and 32
    python -m kerasbig.bench --suite=gpu --cases=largest # the largest GPT that trains on the device
    L=2 H=2 D=64 T=64 STEPS=6 python -m kerasbig.bench --suite=gpu --cases=4   # a tiny shape, e.g. on CPU

`largest` climbs GPT-2's sizes and GPT-3's 2.7B and 6.7B shapes at context T with bf16, rematerialized blocks and
8 micro-batches of 1, until one runs out of device memory (LADDER_SHAPES="L,H,D;..." sets other shapes).
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tempfile

from kerasbig import summaries
from kerasbig.errors import RunError

REPO = pathlib.Path(__file__).resolve().parent.parent
ANCHOR = REPO.parent / "shared" / "anchors" / "gpt_torch.py"
BATCHES = ("16", "32")
VOCABULARY = 50304  # GPT-2's 50257 padded to a multiple of 64, as the anchor has it


def shape() -> dict[str, int]:
    """The anchor's shape variables, with its defaults."""
    defaults = {"L": 12, "H": 12, "D": 768, "T": 1024, "STEPS": 40}
    return {name: int(os.environ.get(name, default)) for name, default in defaults.items()}


def peak_flops() -> float:
    return float(os.environ.get("PEAK_TFLOPS", 989.0)) * 1e12


OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")


class OutOfDeviceMemory(RunError):
    """The training run stopped because its shape does not fit on the device."""


def _train(size: dict[str, int], *, batch: int, accumulation: int = 1, remat: bool = False) -> dict[str, float]:
    """Trains a GPT of `size` through `python -m kerasbig.train --backend=jax` (bf16); what its run logged. Raises
    OutOfDeviceMemory when it does not fit, RunError when it fails otherwise."""
    steps = max(size["STEPS"], 4)
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "kerasbig.train", "--backend=jax", "--strategy=one_device",
                   "--config=configs/gpt2_124m.py",
                   "--mode=train", "--mixed_precision=mixed_bfloat16", f"--workdir={workdir}",
                   f"--config.model.depth={size['L']}", f"--config.model.heads={size['H']}",
                   f"--config.model.width={size['D']}", f"--config.model.vocab_size={VOCABULARY}",
                   f"--config.model.remat={remat}", f"--config.optimizer.accumulation_steps={accumulation}",
                   f"--config.data.seq_len={size['T']}",
                   # Enough text for the steps, little to evaluate: the evaluations are not what is measured.
                   f"--config.data.max_tokens={max(200_000, 40 * batch * size['T'])}",
                   f"--config.data.batch_size={batch}", f"--config.data.eval_batch_size={batch // accumulation}",
                   f"--config.train.steps={steps}", f"--config.train.eval_every_steps={steps}",
                   "--config.train.steps_per_execution=1", f"--config.train.log_every_steps={max(1, steps // 4)}"]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "KERAS_BACKEND": "jax"})
        if result.returncode:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            fault = OutOfDeviceMemory if any(sign in result.stderr for sign in OUT_OF_MEMORY) else RunError
            raise fault(f"batch {batch}, {size['L']} x {size['D']}: {last}")
        logs = pathlib.Path(workdir) / "train"
        logged = summaries.last_scalars(logs)
        if "tokens_per_sec" not in logged:
            raise RunError(f"the run logged no tokens_per_sec in {logs}; train for more steps (STEPS)")
        return logged


def kerasbig_row(batch: int, size: dict[str, int]) -> dict:
    """kerasbig's JAX loop at this shape: tokens/s as its Throughput callback logged it."""
    logged = _train(size, batch=batch)
    return {"implementation": "kerasbig, JAX loop", "batch": batch, "tokens/s": logged["tokens_per_sec"],
            "MFU (%)": 100 * logged["tflops_per_sec"] * 1e12 / peak_flops(), "note": ""}


# GPT-2's four sizes, then GPT-3's 2.7B and 6.7B shapes (layers, heads, width): the ladder `largest_rows` climbs.
LADDER = ((12, 12, 768), (24, 16, 1024), (36, 20, 1280), (48, 25, 1600), (32, 32, 2560), (32, 32, 4096))


def ladder() -> list[tuple[int, int, int]]:
    """The shapes to climb: LADDER, or LADDER_SHAPES="L,H,D;L,H,D" (e.g. tiny ones on CPU)."""
    given = os.environ.get("LADDER_SHAPES")
    return [tuple(map(int, shape.split(","))) for shape in given.split(";")] if given else list(LADDER)


def largest_rows(size: dict[str, int], batch: int = 8, accumulation: int = 8) -> list[dict]:
    """Climbs the ladder of GPT shapes at context T, with bf16, rematerialized blocks and micro-batches of
    batch / accumulation, until one runs out of device memory: a row per shape that trained, and one for the first
    that did not."""
    rows = []
    for layers, heads, width in ladder():
        shaped = {**size, "L": layers, "H": heads, "D": width}
        params = 12 * layers * width ** 2 + VOCABULARY * width  # about: the blocks' matrices and the tied embedding
        label = f"largest: {layers} x {width} ({params / 1e9:.2f}B)"
        try:
            logged = _train(shaped, batch=batch, accumulation=accumulation, remat=True)
        except OutOfDeviceMemory:
            rows.append({"implementation": label, "batch": batch, "tokens/s": None, "MFU (%)": None,
                         "note": "out of device memory"})
            break
        rows.append({"implementation": label, "batch": batch, "tokens/s": logged["tokens_per_sec"],
                     "MFU (%)": 100 * logged["tflops_per_sec"] * 1e12 / peak_flops(),
                     "note": f"remat, {accumulation} micro-batches"})
    return rows


def anchor_row(batch: int, size: dict[str, int]) -> dict:
    """The PyTorch anchor at this shape, or a row saying why it did not run."""
    result = subprocess.run([sys.executable, str(ANCHOR)], capture_output=True, text=True,
                            env={**os.environ, **{k: str(v) for k, v in size.items()}, "B": str(batch)})
    found = re.search(r"RESULT (\S+): params=.* tokens/s=([\d,]+) MFU=([\d.]+)%", result.stdout)
    if result.returncode or not found:
        reason = (result.stderr.strip().splitlines() or ["no RESULT line"])[-1]
        return {"implementation": "PyTorch anchor", "batch": batch, "tokens/s": None, "MFU (%)": None,
                "note": f"not run: {reason[:80]}"}
    tokens_per_second = float(found.group(2).replace(",", ""))
    return {"implementation": f"PyTorch, {found.group(1)}", "batch": batch, "tokens/s": tokens_per_second,
            "MFU (%)": float(found.group(3)), "note": ""}


def device() -> str:
    """The first JAX device and the versions, asked in a child process: JAX in this one would claim the GPU's
    memory before the runs."""
    script = "import jax, keras; print(f'{jax.devices()[0].device_kind}, JAX {jax.__version__}, Keras {keras.__version__}')"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    return result.stdout.strip() or "unknown device"


def suite(cases: list[str]) -> list[dict]:
    """Batch sizes: kerasbig's row and the anchor's at each; `largest`: the ladder."""
    size = shape()
    rows = []
    for case in cases:
        rows += largest_rows(size) if case == "largest" else [kerasbig_row(int(case), size),
                                                              anchor_row(int(case), size)]
    return rows
