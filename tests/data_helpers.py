"""Helpers the data tests share: configs for a data kind, a real kerasbig.serve to ask, checks of exports and
of bad-data refusals, a corpus made of CPython's docs."""
import contextlib
import json
import pathlib
import subprocess
import sys
import urllib.request

import ml_collections

from conftest import REPO, kerasbig, stop
from kerasbig import config as config_lib, export
from kerasbig.data import text


def write_corpus(root: pathlib.Path, copies: int = 1) -> pathlib.Path:
    """pydoc's help topics and the json package's sources, one file each (`copies` times over)."""
    documents = {f"{name}.txt": page for name, page in text.pydoc_topics().items()}
    documents.update({name.replace("/", "_") + ".txt": source for name, source in text.stdlib_sources(("json",)).items()})
    root.mkdir(parents=True)
    for copy in range(copies):
        for name, document in documents.items():
            (root / f"{copy}-{name.replace('pydoc/', '')}").write_text(document, encoding="utf-8")
    return root


def data_config(name: str, **overrides) -> ml_collections.ConfigDict:
    config = config_lib.base().data
    config.name = name
    config.update(overrides)
    return config


@contextlib.contextmanager
def serving(base: pathlib.Path):
    """`kerasbig.serve` over the models under `base`, on a free port; yields its base URL."""
    server = subprocess.Popen([sys.executable, "-m", "kerasbig.serve", f"--model_base_path={base}",
                               "--rest_api_port=0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        url = None
        while url is None:
            line = server.stdout.readline()
            assert line, "the server exited before it was ready"
            if "http://" in line:
                url = "http://" + line.split("http://")[1].split("/")[0]
        yield url
    finally:
        stop(server)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def assert_core_ops(version: pathlib.Path) -> None:
    """Every op in the SavedModel's graph is registered by core TensorFlow (no TF Text or custom ops), so the
    stock TF Serving image loads it."""
    ops = export.graph_ops(version)
    assert ops and export.unservable_ops(ops) == []


def assert_bad_data(*args: str, workdir: pathlib.Path, names: str) -> None:
    """The training command stops with exit 2, one line naming `names`, and writes nothing."""
    result = kerasbig("train", *args, f"--workdir={workdir}", f"--export_dir={workdir.parent / 'models'}",
                      check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and names in lines[0], result.stderr[-2000:]
    assert not workdir.exists() and not (workdir.parent / "models").exists()
