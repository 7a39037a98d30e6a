"""Shared helpers: run kerasbig's real command line in a subprocess, as a user would."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

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
