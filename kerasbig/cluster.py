"""Who is who in a multi-worker run, from what the scheduler already says; no TensorFlow here.

- `TF_CONFIG`, written by hand or injected into each pod by Kubeflow's TFJob (`"environment": "cloud"`, `chief`
  and `worker` tasks at service addresses): taken as it is.
- Else the tasks of one SLURM step (`srun -n N`, N > 1): hosts in SLURM's order from `SLURM_STEP_NODELIST`,
  `SLURM_STEP_TASKS_PER_NODE` tasks on each, block-distributed so that task `SLURM_PROCID` is the
  `SLURM_LOCALID`-th task of node `SLURM_NODEID`, each listening on the `SLURM_LOCALID`-th port of
  `SLURM_STEP_RESV_PORTS` (`srun --resv-ports`), else on `BASE_PORT + (job id % JOB_SLOTS) * PORTS_PER_JOB +
  SLURM_LOCALID`. A batch script outside `srun`, or a one-task step, is not a cluster.

TensorFlow's SlurmClusterResolver is not used: it needs `nvidia-smi`, sorts host names as strings (`node10`
before `node9`, so ranks and addresses disagree) and always starts at port 8888 (two jobs on a node collide).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import time
from typing import Mapping

from kerasbig.errors import RunError, UsageError

ROLES = ("chief", "worker")  # the tasks MultiWorkerMirroredStrategy trains with
# Ports when the step reserved none: below Linux's ephemeral range (32768 and up), so no client socket holds
# them; two jobs on one node collide only when their ids are JOB_SLOTS apart, and that is refused at start.
BASE_PORT = 16000
PORTS_PER_JOB = 16
JOB_SLOTS = 1000
# How long the tasks of a cluster may take to all start.
START_TIMEOUT_S = 300
START_TIMEOUT_VARIABLE = "KERASBIG_START_TIMEOUT_S"
_HOST = r"(?:[^,\[\]]|\[[^\[\]]+\])+"  # one host of a hostlist: text and bracketed ranges


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The addresses (`host:port`) of the cluster's tasks by role, and which task this process is."""
    tasks: dict[str, list[str]]
    task_type: str
    task_index: int
    source: str  # where it came from, for messages: "TF_CONFIG" or "SLURM"

    @property
    def size(self) -> int:
        return sum(len(addresses) for addresses in self.tasks.values())

    @property
    def address(self) -> str:
        return self.tasks[self.task_type][self.task_index]

    @property
    def rank(self) -> int:
        """This task's place among all tasks, the chief first: its process id in a JAX cluster."""
        order = [(role, i) for role in ROLES for i in range(len(self.tasks.get(role, [])))]
        return order.index((self.task_type, self.task_index))

    @property
    def coordinator(self) -> str:
        """The address of rank 0, where a JAX cluster's coordination service listens."""
        return (self.tasks.get("chief") or self.tasks["worker"])[0]

    def describe(self, task_type: str, index: int) -> str:
        """A task as a person looks for it: 'worker 1 (node2:12001)'."""
        return f"{task_type} {index} ({self.tasks[task_type][index]})"

    def wait_for_peers(self) -> None:
        """Listens on this task's port until every other task answers on its own, or START_TIMEOUT_S passes.

        TensorFlow would wait an hour or more for a worker that never starts; this names it within the bound. A
        task that has already moved on answers from its TensorFlow server on the same port. Binding the port
        also refuses one that is taken, instead of failing obscurely later (gRPC shares ports with
        SO_REUSEPORT, so another job's server there would receive half of our messages)."""
        port = int(self.address.rsplit(":", 1)[1])
        try:
            server = socket.create_server(("", port))  # every interface, as TensorFlow's server then listens
        except OSError as err:
            hint = " (srun --resv-ports reserves free ones)" if self.source == "SLURM" else ""
            raise RunError(f"port {port} of {self.describe(self.task_type, self.task_index)} from {self.source} "
                           f"is taken on this host ({os.strerror(err.errno)}); stop what holds it or give the task "
                           f"another port{hint}") from None
        timeout = start_timeout_s()
        deadline = time.monotonic() + timeout
        silent = [(role, i) for role, addresses in self.tasks.items() for i in range(len(addresses))
                  if (role, i) != (self.task_type, self.task_index)]
        with server:
            server.setblocking(False)
            while silent:
                _close_accepted(server)
                silent = [task for task in silent if not _answers(self.tasks[task[0]][task[1]])]
                if silent and time.monotonic() > deadline:
                    raise RunError(f"{', '.join(self.describe(*task) for task in silent)} of the {self.size} tasks "
                                   f"from {self.source} did not answer within {timeout:g} s "
                                   f"(${START_TIMEOUT_VARIABLE}); check that every task was started and that "
                                   "their hosts reach each other")
                time.sleep(0.5)


def start_timeout_s() -> float:
    """START_TIMEOUT_S, or the seconds in $KERASBIG_START_TIMEOUT_S (pods that pull large images start late)."""
    value = os.environ.get(START_TIMEOUT_VARIABLE, str(START_TIMEOUT_S))
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"{START_TIMEOUT_VARIABLE}={value} is not a number of seconds") from None


def _close_accepted(server: socket.socket) -> None:
    """Closes the peers' probes waiting on the listening socket, so its backlog never fills."""
    with contextlib.suppress(BlockingIOError):
        while True:
            server.accept()[0].close()


def _answers(address: str) -> bool:
    """Whether a task's host resolves and its port accepts connections."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
            return True
    except (OSError, ValueError):
        return False


def from_environment(environ: Mapping[str, str] = os.environ) -> Cluster | None:
    """The cluster this process belongs to, or None when it trains alone."""
    if "TF_CONFIG" in environ:
        return from_tf_config(environ["TF_CONFIG"])
    return from_slurm(environ)


def from_tf_config(text: str) -> Cluster | None:
    """TF_CONFIG's cluster and task; None when it names no chief or worker."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"TF_CONFIG is not valid JSON ({err}); see docs/distributed.md") from None
    cluster = config.get("cluster", {}) if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not all(isinstance(a, list) for a in cluster.values()):
        raise UsageError('TF_CONFIG must be {"cluster": {...}, "task": {...}}; see docs/distributed.md')
    others = sorted(set(cluster) - set(ROLES))
    if others:
        raise UsageError(f"TF_CONFIG's cluster has {others} tasks; kerasbig trains with 'chief' and 'worker' tasks "
                         "only (MultiWorkerMirroredStrategy)")
    tasks = {role: list(cluster[role]) for role in ROLES if cluster.get(role)}
    if not tasks:
        return None
    malformed = [address for addresses in tasks.values() for address in addresses
                 if not re.fullmatch(r"[^:\s]+:\d+|\[[0-9a-fA-F:.]+\]:\d+", str(address))]
    if malformed:
        raise UsageError(f"TF_CONFIG's cluster addresses {malformed} are not host:port")
    task = config.get("task") or {}
    task_type, index = task.get("type"), task.get("index", 0)
    if task_type not in tasks or not isinstance(index, int) or not 0 <= index < len(tasks[task_type]):
        raise UsageError(f"TF_CONFIG's task {json.dumps(task)} is not one of its cluster's tasks "
                         f"{json.dumps(tasks)}; set task.type to one of {list(tasks)} and task.index to its position")
    return Cluster(tasks, task_type, index, "TF_CONFIG")


def from_slurm(environ: Mapping[str, str]) -> Cluster | None:
    """The tasks of this SLURM step; None outside `srun` or in a one-task step."""
    if "SLURM_STEP_NUM_TASKS" not in environ:
        return None
    num_tasks = _integer(environ, "SLURM_STEP_NUM_TASKS")
    if num_tasks < 2:
        return None
    hosts = expand_hostlist(_variable(environ, "SLURM_STEP_NODELIST"), "SLURM_STEP_NODELIST")
    per_node = tasks_per_node(_variable(environ, "SLURM_STEP_TASKS_PER_NODE"))
    if len(per_node) != len(hosts) or sum(per_node) != num_tasks:
        raise UsageError(f"SLURM_STEP_TASKS_PER_NODE={environ['SLURM_STEP_TASKS_PER_NODE']} does not place "
                         f"SLURM_STEP_NUM_TASKS={num_tasks} tasks on the {len(hosts)} node(s) of "
                         f"SLURM_STEP_NODELIST={environ['SLURM_STEP_NODELIST']}")
    rank, node, local = (_integer(environ, name) for name in ("SLURM_PROCID", "SLURM_NODEID", "SLURM_LOCALID"))
    if not (0 <= node < len(hosts) and 0 <= local < per_node[node] and rank == sum(per_node[:node]) + local):
        raise UsageError(f"SLURM_PROCID={rank} is not task {local} of node {node} in block order; run srun with "
                         "--distribution=block (the default), so that ranks follow SLURM_STEP_NODELIST")
    ports = _ports(environ, max(per_node))
    workers = [f"{host}:{ports[i]}" for host, count in zip(hosts, per_node) for i in range(count)]
    return Cluster({"worker": workers}, "worker", rank, "SLURM")


def _variable(environ: Mapping[str, str], name: str) -> str:
    if not environ.get(name):
        raise UsageError(f"{name} is not set in this SLURM step; start the workers with srun")
    return environ[name]


def _integer(environ: Mapping[str, str], name: str) -> int:
    value = _variable(environ, name)
    if not value.isdigit():
        raise UsageError(f"{name}={value} is not a number")
    return int(value)


def _ports(environ: Mapping[str, str], needed: int) -> list[int]:
    """The ports of a node's tasks, by local task id: the step's reserved ones, else the job's default block."""
    if "SLURM_STEP_RESV_PORTS" not in environ:
        if needed > PORTS_PER_JOB:
            raise UsageError(f"{needed} tasks per node need srun --resv-ports (without it kerasbig has "
                             f"{PORTS_PER_JOB} ports per job)")
        first = BASE_PORT + _integer(environ, "SLURM_JOB_ID") % JOB_SLOTS * PORTS_PER_JOB
        return list(range(first, first + needed))
    reserved = environ["SLURM_STEP_RESV_PORTS"]
    ports = [port for part in reserved.split(",") for port in _numbers(part, "SLURM_STEP_RESV_PORTS", reserved)]
    if len(ports) < needed:
        raise UsageError(f"SLURM_STEP_RESV_PORTS={reserved} has {len(ports)} port(s) for {needed} tasks per node; "
                         f"pass srun --resv-ports={needed} or more")
    return ports


def tasks_per_node(text: str) -> list[int]:
    """SLURM's compressed counts, one per node: '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not match:
            raise UsageError(f"SLURM_STEP_TASKS_PER_NODE={text} is not a list like 2(x3),1")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def expand_hostlist(text: str, name: str = "hostlist") -> list[str]:
    """The hosts of a SLURM hostlist in SLURM's own order (`scontrol show hostnames`): 'node[9-10],gpu1' ->
    ['node9', 'node10', 'gpu1']; numbers keep the lower bound's zero padding. A host with several brackets,
    'rack[0-1]_blade[0-1]', expands as SLURM does: its last bracket fastest, then its first, second..."""
    if not re.fullmatch(rf"(?:{_HOST})?(?:,(?:{_HOST})?)*", text):
        raise UsageError(f"{name}={text} is not a SLURM hostlist like node[1-4,7],gpu1")
    hosts = []
    for host in re.findall(_HOST, text):
        if "[" not in host:
            hosts.append(host)
            continue
        head, numbers, tail = _last_bracket(host, name, text)
        hosts += [prefix + number + tail for prefix in _expand_prefix(head, name, text) for number in numbers]
    return hosts


def _expand_prefix(text: str, name: str, whole: str) -> list[str]:
    """The brackets before a host's last one; SLURM expands them from the last (slowest) to the first."""
    if "[" not in text:
        return [text]
    head, numbers, tail = _last_bracket(text, name, whole)
    return [host for number in numbers for host in _expand_prefix(head + number + tail, name, whole)]


def _last_bracket(host: str, name: str, whole: str) -> tuple[str, list[str], str]:
    head, _, rest = host.rpartition("[")
    ranges, _, tail = rest.partition("]")
    numbers = [f"{n:0{len(part.split('-')[0])}d}" for part in ranges.split(",") for n in _numbers(part, name, whole)]
    return head, numbers, tail


def _numbers(part: str, name: str, whole: str) -> range:
    """'12000-12003' or '7' as numbers; anything else is refused, naming the variable."""
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if not match or int(match[2] or match[1]) < int(match[1]):
        raise UsageError(f"{name}={whole}: {part!r} is not a number or a range like 12000-12003")
    return range(int(match[1]), int(match[2] or match[1]) + 1)
