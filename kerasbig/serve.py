"""`python -m kerasbig.serve`: a local development server that speaks TF Serving's REST (and gRPC) API.

A client written against it works unchanged against TF Serving, and the flags are TF Serving's
(docs/serving.md has the production setup and the few deliberate differences):

    python -m kerasbig.serve --model_base_path=saved_models --rest_api_port=8501
    python -m kerasbig.serve --model_name=digits_cnn --model_base_path=saved_models/digits_cnn
    python -m kerasbig.serve --model_config_file=saved_models/models.config
    curl localhost:8501/v1/models/digits_cnn                     # version status
    curl -d '{"instances": [[[0, 3, ...], ...]]}' localhost:8501/v1/models/digits_cnn:predict

Which models: `--model_config_file` (TF Serving's ModelServerConfig, such as kerasbig's models.config: version
policies and labels); or `--model_base_path` holding version folders `<N>/saved_model.pb`, one model named
`--model_name` serving its latest version, as in TF Serving; or, kerasbig's own shortcut, `--model_base_path`
holding model folders (kerasbig's `saved_models/`): every model with every version on disk, labels from
`<model_base_path>/models.config`. Folders are polled every `--file_system_poll_wait_seconds`: new, replaced
and removed versions are loaded and dropped without a restart; a version that fails to load shows its error
in the model status while the newest loadable version serves.
"""
from __future__ import annotations

import asyncio
import functools
import os
import pathlib
import resource
from typing import Callable

from absl import flags

from kerasbig import cli, versions
from kerasbig.errors import RunError, UsageError
from kerasbig.serving import grpc_api
from kerasbig.serving.repository import ModelConfig, Repository, read_model_config_file
from kerasbig.serving.rest import HttpServer, Limits, RestApi

FLAGS = flags.FLAGS
DEFAULT_MODEL_NAME = "default"  # TF Serving's --model_name default
log = functools.partial(print, flush=True)


def define_flags() -> None:
    """The command line, TF Serving's flag names first; only the `__main__` entry defines them."""
    flags.DEFINE_string("model_name", None, "Model name; with a --model_base_path of version folders, the name it "
                        f"is served under ('{DEFAULT_MODEL_NAME}' when unset); with a folder of models, the only "
                        "one to serve.")
    flags.DEFINE_string("model_base_path", "saved_models", "Version folders of one model, or a folder of models.")
    flags.DEFINE_string("model_config_file", None, "TF Serving ModelServerConfig text file (kerasbig writes "
                        "saved_models/models.config); replaces --model_base_path.")
    flags.DEFINE_integer("port", None, "gRPC port (TF Serving's PredictionService and ModelService); 0 picks a "
                         "free one; unset: no gRPC.", lower_bound=0, upper_bound=65535)
    flags.DEFINE_integer("rest_api_port", 8501, "HTTP port; 0 picks a free one.", lower_bound=0, upper_bound=65535)
    flags.DEFINE_float("file_system_poll_wait_seconds", 1.0, "Seconds between looks at the version folders; "
                       "0 looks once, at start.", lower_bound=0)
    flags.DEFINE_integer("rest_api_num_threads", 4 * (os.cpu_count() or 1), "Threads that answer requests.",
                         lower_bound=1)
    flags.DEFINE_integer("rest_api_timeout_in_ms", 30_000, "Milliseconds a client has to send a whole request.",
                         lower_bound=1)
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on; 0.0.0.0 opens the server to the network.")
    flags.DEFINE_integer("max_request_bytes", 16 << 20, "Larger request bodies are refused with HTTP 413.",
                         lower_bound=1)
    flags.DEFINE_integer("max_request_elements", 1 << 22, "Requests holding more values are refused with 413.",
                         lower_bound=1)


def _folder_of_models(base: pathlib.Path, only: str | None) -> list[ModelConfig]:
    """kerasbig's `saved_models/`: every model folder with versions, every version served; labels from
    `models.config` there when it exists."""
    labels = {}
    if (base / "models.config").is_file():
        try:
            labels = {model.name: model.labels for model in read_model_config_file(base / "models.config")}
        except ValueError:
            labels = {}  # an export rewriting it right now; the next poll reads it
    names = [only] if only else sorted(p.name for p in base.iterdir() if not p.name.startswith("."))
    return [ModelConfig(name, base / name, latest=None, labels=labels.get(name, {}))
            for name in names if versions.folders(base / name)]


def model_configs(base_path: pathlib.Path, model_name: str | None, model_config_file: pathlib.Path | None,
                  ) -> Callable[[], list[ModelConfig]]:
    """What to serve, as a function the repository calls on every poll; a UsageError when there is nothing."""
    if model_config_file is not None:
        try:
            configs = read_model_config_file(model_config_file)
        except ValueError as e:
            raise UsageError(f"--model_config_file: {e}") from e
        return lambda: configs
    try:
        list(base_path.iterdir())
    except OSError as e:
        raise UsageError(f"--model_base_path={base_path} is not a readable folder ({e.strerror})") from e
    if versions.folders(base_path):  # TF Serving's meaning: the versions of one model
        single = [ModelConfig(model_name or DEFAULT_MODEL_NAME, base_path)]
        return lambda: single
    if model_name and not versions.folders(base_path / model_name):
        raise UsageError(f"--model_name={model_name}: no version folders <N>/saved_model.pb under "
                         f"{base_path / model_name}")
    return lambda: _folder_of_models(base_path, model_name)


def _raise_open_file_limit(connections: int) -> None:
    """Slow clients each hold a socket: allow as many open files as connections, where the hard limit lets us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                    hard))


def load_at_start(repository: Repository) -> None:
    """The first poll; a model with versions but none loadable stops the server (exit 1), as in TF Serving."""
    repository.poll()
    failures = repository.unloadable()
    if failures:
        raise RunError(failures[0].splitlines()[0])


async def _serve(repository: Repository, host: str, rest_api_port: int, poll_seconds: float, limits: Limits) -> None:
    http = HttpServer(RestApi(repository, limits.max_request_elements, log), limits)
    try:
        server = await http.start(host, rest_api_port)
    except OSError as e:
        raise UsageError(f"--host={host} --rest_api_port={rest_api_port}: cannot listen there "
                         f"({os.strerror(e.errno) if e.errno else e})") from e
    host, port = server.sockets[0].getsockname()[:2]
    log(f"Serving {', '.join(repository.model_names()) or 'no models yet'} at http://{host}:{port}/v1/models/<name>")
    loop = asyncio.get_running_loop()
    async with server:
        while poll_seconds:
            await asyncio.sleep(poll_seconds)
            await loop.run_in_executor(None, repository.poll)  # loads off the event loop; requests go on
        await server.serve_forever()


def serve(repository: Repository, *, host: str, rest_api_port: int, grpc_port: int | None, poll_seconds: float,
          limits: Limits) -> None:
    """Loads the models, then answers REST (and gRPC, with a `grpc_port`) requests until interrupted."""
    _raise_open_file_limit(limits.max_connections)
    load_at_start(repository)
    grpc_server = None
    if grpc_port is not None:
        try:
            grpc_server, bound = grpc_api.start(repository, host, grpc_port, limits)
        except OSError as e:
            raise UsageError(f"--host={host} --port={grpc_port}: cannot listen there") from e
        log(f"Serving gRPC at {host}:{bound}")
    try:
        asyncio.run(_serve(repository, host, rest_api_port, poll_seconds, limits))
    except KeyboardInterrupt:
        pass
    finally:
        if grpc_server is not None:
            grpc_server.stop(grace=1)


def main() -> None:
    config_file = pathlib.Path(FLAGS.model_config_file) if FLAGS.model_config_file else None
    if config_file and FLAGS["model_base_path"].present:
        raise UsageError("--model_base_path and --model_config_file are mutually exclusive, as in TF Serving")
    configs = model_configs(pathlib.Path(FLAGS.model_base_path), FLAGS.model_name, config_file)
    limits = Limits(max_request_bytes=FLAGS.max_request_bytes, max_request_elements=FLAGS.max_request_elements,
                    num_threads=FLAGS.rest_api_num_threads, read_timeout=FLAGS.rest_api_timeout_in_ms / 1000)
    serve(Repository(configs, log), host=FLAGS.host, rest_api_port=FLAGS.rest_api_port, grpc_port=FLAGS.port,
          poll_seconds=FLAGS.file_system_poll_wait_seconds, limits=limits)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
