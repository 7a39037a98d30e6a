"""Picks the tf.distribute strategy behind `--strategy`, and says which worker is the chief."""
from __future__ import annotations

import json
import os

import tensorflow as tf

from kerasbig.errors import RunError, UsageError

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


def split_cpu(replicas: int) -> None:
    """Splits the CPU into `replicas` logical devices, so MirroredStrategy can replicate without GPUs.
    Must run before TensorFlow initialises its devices."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)


def _cluster() -> dict:
    try:
        return json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except json.JSONDecodeError as err:
        raise UsageError(f"TF_CONFIG is not valid JSON ({err}); see docs on multi-worker training") from None


def _workers() -> int:
    cluster = _cluster()
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def resolve(name: str, *, tpu: str = "") -> str:
    """The concrete strategy `auto` means on this machine."""
    if name != "auto":
        return name
    if tpu:
        return "tpu"
    if _workers() > 1:
        return "multi_worker"
    return "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "one_device"


def make(name: str, *, tpu: str = "", num_cpu_replicas: int = 0) -> tf.distribute.Strategy:
    """Builds the strategy. `num_cpu_replicas` > 1 with `mirrored` replicates over logical CPUs."""
    name = resolve(name, tpu=tpu)
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if _workers() < 1:
            raise UsageError("--strategy=multi_worker needs TF_CONFIG naming the cluster's workers and this "
                             "worker's task, e.g. {\"cluster\": {\"worker\": [\"host1:2222\", \"host2:2222\"]}, "
                             "\"task\": {\"type\": \"worker\", \"index\": 0}}")
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO, timeout_seconds=None)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if name == "tpu":
        return _tpu_strategy(tpu)
    raise UsageError(f"--strategy={name!r} is not one of {list(STRATEGIES)}")


def _tpu_strategy(tpu: str) -> tf.distribute.TPUStrategy:
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError, RuntimeError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RunError(f"cannot reach TPU {tpu or '(default)'}: {first_line}; check --tpu (a TPU name or "
                       "grpc://host:8470) and that this VM can reach it") from None
    return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Only the chief writes logs, checkpoints and exports: worker 0 when there is no 'chief' task."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0 and "chief" not in _cluster())
