"""Shared helpers: run kerasbig's real command line in a subprocess as a user would, read its checkpoints, and
prepare TFDS metadata for mock data."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def kerasbig(module: str, *args: str, timeout: float = 600, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Runs `python -m kerasbig.<module> args...` from the repository root and returns the finished process."""
    result = subprocess.run([sys.executable, "-m", f"kerasbig.{module}", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"kerasbig.{module} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


# The files that take longest (minutes each on 2 cores), longest first. `make test` gives each worker whole files
# in collection order, so these start first and the short files fill in around them, instead of one long file
# starting last and running alone.
LONGEST_FILES = ("test_shipped_configs.py", "test_jax.py", "test_compress.py", "test_lora.py", "test_cluster.py",
                 "test_pretrained.py", "test_train.py", "test_generate_signature.py", "test_packaging.py",
                 "test_distribute.py", "test_data_corpus.py", "test_fault_tolerance.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """The JAX processes that tests start share JAX's persistent compilation cache, so that a rerun of the same
    training (a resume after SIGKILL, another layout's twin) does not compile its steps again."""
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax-compilation-cache"))


@pytest.fixture
def train():
    """`train(*args)` runs `python -m kerasbig.train` and returns the CompletedProcess."""
    return lambda *args, **kwargs: kerasbig("train", *args, **kwargs)


def free_port() -> int:
    """A localhost port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """Terminates a server started by a test, killing it if it does not exit in 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# The shipped configs that read TFDS datasets, and the dataset each one reads.
TFDS = {"mnist_cnn": "mnist", "cifar10_resnet": "cifar10", "imdb_transformer": "imdb_reviews"}


def load_config(name: str):
    """The locked config of `configs/<name>.py`."""
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def latest_checkpoint(workdir: pathlib.Path) -> pathlib.Path:
    """The newest `checkpoints/step-N` folder of a run."""
    steps = sorted((workdir / "checkpoints").glob("step-*"))
    assert steps, f"no checkpoint in {workdir}"
    return steps[-1]


def checkpoint_arrays(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """Every array of a checkpoint folder, or of a workdir's newest checkpoint, by key (`model/weights/<path>`,
    `model/rng/<i>`, `optimizer/<path>`)."""
    from kerasbig.checkpoint import StoredArrays

    if (folder / "checkpoints").is_dir():
        folder = latest_checkpoint(folder)
    with StoredArrays(folder) as stored:
        return {key: stored[key] for key in stored.keys()}


def checkpoint_weights(folder: pathlib.Path, section: str = "model/weights") -> dict[str, np.ndarray]:
    """{variable path: value} of the model's weights (or `section="optimizer"`) in a checkpoint folder, or in a
    workdir's newest checkpoint."""
    prefix = section + "/"
    return {key[len(prefix):]: value for key, value in checkpoint_arrays(folder).items() if key.startswith(prefix)}


def assert_same_weights(a: pathlib.Path, b: pathlib.Path, **tolerance) -> None:
    """The two checkpoints (folders or workdirs) hold the same non-empty set of model variables, equal within
    `tolerance` (numpy's rtol/atol)."""
    first, second = checkpoint_weights(a), checkpoint_weights(b)
    assert first, f"no model variables in {a}"
    assert sorted(first) == sorted(second), (sorted(first), sorted(second))
    for path, value in first.items():
        np.testing.assert_allclose(value, second[path], err_msg=path, **tolerance)


def prepare_metadata(name: str, data_dir, split_sizes: dict[str, int]) -> None:
    """Writes what `tfds build` leaves besides the records: dataset_info.json and features.json."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=str(data_dir))
    builder.info.set_splits(tfds.core.SplitDict(
        [tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0) for split, n in split_sizes.items()]))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
