"""Picks the tf.distribute strategy behind `--strategy`, and says which worker is the chief.

Multi-worker runs take their cluster from `kerasbig.cluster` (TF_CONFIG, or the tasks of a SLURM step). The
workers must all start within `cluster.START_TIMEOUT_S`, else each stops with one line naming the missing ones.
A failed or frozen worker of a multi-worker run stops the others within a bounded time, in two ways:
- TensorFlow's coordination service (which MultiWorkerMirroredStrategy starts) takes heartbeats from every
  worker; when one dies, freezes or becomes unreachable, the others' collectives are aborted within its
  heartbeat timeout (10 s by default), or at once when the dead worker's port refuses connections.
- every collective has a deadline, `COLLECTIVE_TIMEOUT_S`, for a worker that is alive but stuck.
The trainer turns either into a RunError naming the step (see docs/distributed.md).
"""
from __future__ import annotations

import socket
import urllib.parse

import tensorflow as tf

from kerasbig import cluster
from kerasbig.errors import RunError, UsageError, first_line

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
# Longer than any pause between two collectives of a healthy run (a checkpoint write, an evaluation).
COLLECTIVE_TIMEOUT_S = 600
TPU_CONNECT_TIMEOUT_S = 10


def split_cpu(replicas: int) -> None:
    """Splits the CPU into `replicas` logical devices, so MirroredStrategy can replicate without GPUs.
    Must run before TensorFlow initialises its devices."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)


def resolve(name: str, *, tpu: str = "", num_cpu_replicas: int = 0) -> str:
    """The concrete strategy `auto` means on this machine."""
    if name != "auto":
        return name
    if tpu:
        return "tpu"
    found = cluster.from_environment()
    if found and found.size > 1:
        return "multi_worker"
    several_devices = len(tf.config.list_logical_devices("GPU")) > 1 or num_cpu_replicas > 1
    return "mirrored" if several_devices else "one_device"


def make(name: str, *, tpu: str = "", num_cpu_replicas: int = 0) -> tf.distribute.Strategy:
    """Builds the strategy. `num_cpu_replicas` > 1 (see `split_cpu`) makes `auto` and `mirrored` replicate
    over logical CPUs when there are no GPUs."""
    name = resolve(name, tpu=tpu, num_cpu_replicas=num_cpu_replicas)
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        return _multi_worker_strategy()
    if name == "tpu":
        return _tpu_strategy(tpu)
    raise UsageError(f"--strategy={name!r} is not one of {list(STRATEGIES)}")


def _multi_worker_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    """MultiWorkerMirroredStrategy over the cluster of TF_CONFIG or of the SLURM step, once every worker is up
    (TensorFlow itself would wait an hour or more for a missing one)."""
    found = cluster.from_environment()
    if found is None:
        raise UsageError("--strategy=multi_worker needs the workers started by srun (a SLURM step of several tasks) "
                         "or TF_CONFIG naming them, e.g. {\"cluster\": {\"worker\": [\"host1:2222\", "
                         "\"host2:2222\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}")
    found.wait_for_peers()
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(found.tasks), task_type=found.task_type, task_id=found.task_index, rpc_layer="grpc")
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_S)
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)


def _tpu_strategy(tpu: str) -> tf.distribute.TPUStrategy:
    """TPUStrategy for a TPU name, `local` (on a TPU VM) or a grpc://host:port address."""
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
        _check_reachable(resolver.master())
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, OSError, RuntimeError, tf.errors.OpError) as err:
        raise RunError(f"cannot reach TPU {tpu or '(default)'}: {first_line(err)}; check --tpu (a TPU name, 'local' "
                       "on a TPU VM, or grpc://host:8470) and that this machine can reach it") from None
    return tf.distribute.TPUStrategy(resolver)


def _check_reachable(master: str) -> None:
    """Fails within TPU_CONNECT_TIMEOUT_S when a remote TPU worker does not accept connections:
    TensorFlow's own connection to the cluster waits for it forever."""
    address = urllib.parse.urlparse(master)
    if address.scheme == "grpc" and address.hostname:
        with socket.create_connection((address.hostname, address.port or 8470), timeout=TPU_CONNECT_TIMEOUT_S):
            pass


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Only the chief writes logs, checkpoints and exports: the 'chief' task, or worker 0 without one."""
    return strategy.extended.should_checkpoint
