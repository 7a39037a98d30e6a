"""Files that readers (TensorBoard, TF Serving, a resumed run) never see half done, and locks that keep two
runs from writing the same place at once."""
from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
import socket
import tempfile
import time
from typing import IO, Iterator

from kerasbig.errors import RunError


def write_atomically(path: pathlib.Path, content: str | bytes) -> None:
    """Writes `content` to a hidden sibling of a unique name, then renames it over `path` (atomic on one
    filesystem), so concurrent writers never share a temporary file."""
    with tempfile.NamedTemporaryFile("wb" if isinstance(content, bytes) else "w", dir=path.parent,
                                     prefix=f".{path.name}.", suffix=".tmp", delete=False) as tmp:
        tmp.write(content)
    os.replace(tmp.name, path)


@contextlib.contextmanager
def locked(path: pathlib.Path) -> Iterator[None]:
    """Holds an exclusive lock on the file `path` while the block runs, waiting for other holders first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_HELD: list[IO] = []  # handles of the locks this process holds until it ends


def hold_workdir(workdir: pathlib.Path) -> None:
    """Locks `workdir` for the rest of this process's life (the lock goes with the process however it ends), or
    raises RunError naming the run that holds it."""
    handle = open(workdir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunError(f"--workdir={workdir} is in use by {holder}; wait for that run to end or pass another "
                       "--workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"run {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _HELD.append(handle)


def remove_temporaries(folder: pathlib.Path) -> None:
    """Removes the `.tmp-*` folders that a killed save or export left in `folder` (call it holding the lock
    that writers of `folder` hold)."""
    for stale in folder.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
