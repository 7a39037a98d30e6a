"""Multi-worker runs as schedulers start them: the cluster built from a SLURM step's variables (checked against
SLURM's own `scontrol show hostnames`), Kubeflow TFJob's TF_CONFIG as it is, clear refusals of inconsistent
steps and missing peers, and a real single-node SLURM cluster running `srun` and a preempted `sbatch` job."""
import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, assert_same_weights, checkpoint_arrays, free_port, stop
from kerasbig import cluster
from kerasbig.errors import PREEMPTED_EXIT_CODE, UsageError

HOSTLISTS = {
    "node[9-10]": ["node9", "node10"],
    "rack[0-1]_blade[0-1]": ["rack0_blade0", "rack0_blade1", "rack1_blade0", "rack1_blade1"],
    "a[1-2]_b[1-2]_c[1-2]": ["a1_b1_c1", "a1_b1_c2", "a2_b1_c1", "a2_b1_c2",
                             "a1_b2_c1", "a1_b2_c2", "a2_b2_c1", "a2_b2_c2"],
    "gpu[08-11],login,cpu[7,2-3]": ["gpu08", "gpu09", "gpu10", "gpu11", "login", "cpu7", "cpu2", "cpu3"],
    "n[1-02],x[001-3]": ["n1", "n2", "x001", "x002", "x003"],
    "n1,,n2": ["n1", "n2"],
}
# SLURM 22.05 refuses the first three and misreads the others ('n[1-2' -> 'n]'), which kerasbig refuses too.
MLP = ["--config=configs/digits_mlp.py", "--config.model.hidden=(16,)", "--config.model.dropout=0.0", "--mode=train"]
BAD_HOSTLISTS = ["n[3-1]", "n[a-b]", "n[]", "n[1-2", "n1]", "n[[1]]"]


def slurm_step(**variables: str) -> dict[str, str]:
    """The variables srun gives task 0 of a two-node step of three tasks, updated with `variables`."""
    return {"SLURM_JOB_ID": "4321", "SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_NODELIST": "node[9-10]",
            "SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_STEP_RESV_PORTS": "12000-12001", "SLURM_PROCID": "0",
            "SLURM_NODEID": "0", "SLURM_LOCALID": "0", **variables}


@pytest.mark.parametrize("hostlist", HOSTLISTS)
def test_hostlists_expand_in_slurms_order(hostlist):
    assert cluster.expand_hostlist(hostlist) == HOSTLISTS[hostlist]


@pytest.mark.parametrize("hostlist", BAD_HOSTLISTS)
def test_bad_hostlists_are_refused_naming_the_variable(hostlist):
    with pytest.raises(UsageError, match=r"^SLURM_STEP_NODELIST=.*"):
        cluster.expand_hostlist(hostlist, "SLURM_STEP_NODELIST")


@pytest.mark.skipif(not shutil.which("scontrol"), reason="SLURM is not installed (make test installs it with apt-get)")
def test_hostlists_agree_with_scontrol(tmp_path):
    """SLURM's own expansion, which decides which task runs where, gives the same hosts in the same order."""
    conf = tmp_path / "slurm.conf"  # scontrol reads a config even to expand names
    conf.write_text("ClusterName=test\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n")
    for hostlist, hosts in HOSTLISTS.items():
        result = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True,
                                env={**os.environ, "SLURM_CONF": str(conf)})
        assert result.returncode == 0 and result.stdout.split() == hosts == cluster.expand_hostlist(hostlist)


def test_tasks_per_node():
    assert cluster.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert cluster.tasks_per_node("4") == [4]
    with pytest.raises(UsageError, match="^SLURM_STEP_TASKS_PER_NODE=2x3 is not a list like 2"):
        cluster.tasks_per_node("2x3")


def test_a_slurm_step_of_several_tasks_is_a_cluster_in_block_order():
    """Tasks 0 and 1 on node9, task 2 on node10; each task listens on its local id's reserved port."""
    workers = ["node9:12000", "node9:12001", "node10:12000"]
    for rank, node, local in [(0, 0, 0), (1, 0, 1), (2, 1, 0)]:
        found = cluster.from_slurm(slurm_step(SLURM_PROCID=str(rank), SLURM_NODEID=str(node),
                                              SLURM_LOCALID=str(local)))
        assert found == cluster.Cluster({"worker": workers}, "worker", rank, "SLURM")
    many = cluster.from_slurm(slurm_step(SLURM_STEP_NUM_TASKS="7", SLURM_STEP_NODELIST="rack[0-1]_blade[0-1]",
                                         SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_STEP_RESV_PORTS="500,502"))
    assert many.tasks["worker"] == ["rack0_blade0:500", "rack0_blade0:502", "rack0_blade1:500", "rack0_blade1:502",
                                    "rack1_blade0:500", "rack1_blade0:502", "rack1_blade1:500"]


def test_without_reserved_ports_the_job_id_picks_a_documented_block():
    found = cluster.from_slurm({k: v for k, v in slurm_step(SLURM_JOB_ID="1005").items()
                                if k != "SLURM_STEP_RESV_PORTS"})
    first = cluster.BASE_PORT + 5 * cluster.PORTS_PER_JOB
    assert found.tasks["worker"] == [f"node9:{first}", f"node9:{first + 1}", f"node10:{first}"]


@pytest.mark.parametrize("environ", [
    {},  # not under SLURM
    {"SLURM_JOB_ID": "7", "SLURM_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"},  # sbatch script
    slurm_step(SLURM_STEP_NUM_TASKS="1", SLURM_STEP_TASKS_PER_NODE="1", SLURM_STEP_NODELIST="node9"),  # srun -n1
])
def test_outside_a_multi_task_step_there_is_no_cluster(environ):
    assert cluster.from_slurm(environ) is None


@pytest.mark.parametrize("variables, named", [
    ({"SLURM_STEP_TASKS_PER_NODE": "2,2"}, "SLURM_STEP_TASKS_PER_NODE=2,2 does not place SLURM_STEP_NUM_TASKS=3"),
    ({"SLURM_STEP_TASKS_PER_NODE": "3"}, "SLURM_STEP_TASKS_PER_NODE=3 does not place"),
    ({"SLURM_STEP_RESV_PORTS": "12000"}, "SLURM_STEP_RESV_PORTS=12000 has 1 port(s) for 2 tasks per node"),
    ({"SLURM_STEP_RESV_PORTS": "12001-12000"}, "SLURM_STEP_RESV_PORTS=12001-12000: '12001-12000' is not"),
    ({"SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not task 0 of node 0 in block order"),
    ({"SLURM_LOCALID": "x"}, "SLURM_LOCALID=x is not a number"),
    ({"SLURM_STEP_NODELIST": "node[9-10"}, "SLURM_STEP_NODELIST=node[9-10 is not a SLURM hostlist"),
    ({"SLURM_STEP_NODELIST": ""}, "SLURM_STEP_NODELIST is not set"),
])
def test_inconsistent_slurm_variables_are_refused_naming_them(variables, named):
    with pytest.raises(UsageError) as refused:
        cluster.from_slurm(slurm_step(**variables))
    assert str(refused.value).startswith(named)


def tfjob_tf_config(job: str, role: str, index: int) -> str:
    """TF_CONFIG exactly as Kubeflow's training operator injects it into the pods of a TFJob with one chief and
    one worker."""
    cluster_spec = {"chief": [f"{job}-chief-0.default.svc:2222"], "worker": [f"{job}-worker-0.default.svc:2222"]}
    return json.dumps({"cluster": cluster_spec, "task": {"type": role, "index": index}, "environment": "cloud"})


def test_tfjob_tf_config_is_taken_as_it_is():
    found = cluster.from_tf_config(tfjob_tf_config("mnist", "worker", 0))
    assert found == cluster.Cluster({"chief": ["mnist-chief-0.default.svc:2222"],
                                     "worker": ["mnist-worker-0.default.svc:2222"]}, "worker", 0, "TF_CONFIG")
    assert found.size == 2 and found.address == "mnist-worker-0.default.svc:2222"
    # As JAX processes: the chief is rank 0 and coordinates, workers follow it.
    assert (found.rank, found.coordinator) == (1, "mnist-chief-0.default.svc:2222")
    assert cluster.from_tf_config(tfjob_tf_config("mnist", "chief", 0)).rank == 0


@pytest.mark.parametrize("tf_config, named", [
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}}', "TF_CONFIG's cluster has ['ps'] tasks"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}', "TF_CONFIG's task"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator", "index": 0}}', "TF_CONFIG's task"),
    ('{"cluster": ["a:1"]}', "TF_CONFIG must be"),
    ('{"cluster": {"worker": ["a:1", "b"]}, "task": {"type": "worker", "index": 0}}', "TF_CONFIG's cluster addresses ['b']"),
    ("{", "TF_CONFIG is not valid JSON"),
])
def test_bad_tf_config_is_refused_naming_it(tf_config, named):
    with pytest.raises(UsageError) as refused:
        cluster.from_tf_config(tf_config)
    assert str(refused.value).startswith(named)


@pytest.mark.slow
def test_bad_steps_taken_ports_and_missing_peers_stop_with_one_line_writing_nothing(train, tmp_path):
    """Inconsistent SLURM variables exit 2 and a task whose port is held exits 1, both at once; one whose peer
    never starts exits 1 after $KERASBIG_START_TIMEOUT_S naming that peer (TensorFlow alone would wait an hour).
    None writes anything."""
    result = train(*MLP, f"--workdir={tmp_path / 'bad'}", check=False, env=slurm_step(SLURM_STEP_TASKS_PER_NODE="2,2"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: SLURM_STEP_TASKS_PER_NODE=2,2 does not place SLURM_STEP_NUM_TASKS=3 tasks on the 2 node(s) of "
        "SLURM_STEP_NODELIST=node[9-10]")

    with socket.create_server(("127.0.0.1", 0)) as holder:
        taken = holder.getsockname()[1]
        result = train(*MLP, f"--workdir={tmp_path / 'taken'}", check=False, env=slurm_step(
            SLURM_STEP_NODELIST="localhost", SLURM_STEP_TASKS_PER_NODE="3", SLURM_STEP_RESV_PORTS=f"{taken}-{taken + 2}"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: port {taken} of worker 0 (localhost:{taken}) from SLURM is taken on this host (Address already in "
        "use); stop what holds it or give the task another port (srun --resv-ports reserves free ones)")

    missing = f"127.0.0.1:{free_port()}"
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{free_port()}", missing]}, "task": {"type": "worker", "index": 0}}
    started = time.time()
    result = train(*MLP, f"--workdir={tmp_path / 'alone'}", check=False,
                   env={"TF_CONFIG": json.dumps(tf_config), "KERASBIG_START_TIMEOUT_S": "3"})
    assert result.returncode == 1 and time.time() - started < 120
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: worker 1 ({missing}) of the 2 tasks from TF_CONFIG did not answer within 3 s")
    assert not list(tmp_path.iterdir())


SLURM_COMMANDS = ("mungekey", "munged", "slurmctld", "slurmd", "srun", "sbatch", "scancel")
# Enough steps that a SIGTERM sent at the first checkpoint arrives mid-run; validation only at the end.
RUN = [*MLP, "--deterministic", "--config.train.steps=200", "--config.train.checkpoint_every_steps=20",
       "--config.train.eval_every_epochs=1000"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """A real single-node SLURM cluster private to this module: munged, slurmctld and slurmd in the foreground with
    their config, state and logs in a temporary folder, listening on 127.0.0.1 only. Yields the environment that
    points SLURM's commands at it; the daemons are stopped by their pids at the end."""
    missing = [command for command in SLURM_COMMANDS if not shutil.which(command)]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing); `make test` installs it with apt-get")
    if os.geteuid() != 0:
        pytest.skip("the private SLURM cluster needs root (slurmd starts tasks as their user)")
    folder = tmp_path_factory.mktemp("slurm")
    (folder / "munge").mkdir(mode=0o700)
    subprocess.run(["mungekey", "--create", f"--keyfile={folder / 'munge' / 'key'}"], check=True)
    conf = folder / "slurm.conf"
    conf.write_text(SLURM_CONF.format(folder=folder, ctld_port=free_port(), slurmd_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = []
    try:
        for command in ([shutil.which("munged"), "--foreground", "--force", f"--socket={folder / 'munge' / 'socket'}",
                         f"--key-file={folder / 'munge' / 'key'}", f"--log-file={folder / 'munge' / 'log'}",
                         f"--pid-file={folder / 'munge' / 'pid'}", f"--seed-file={folder / 'munge' / 'seed'}"],
                        ["slurmctld", "-D"], ["slurmd", "-D"]):
            with open(folder / f"{pathlib.Path(command[0]).name}.out", "w") as out:
                daemons.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
            time.sleep(0.5)
        deadline = time.time() + 60
        while subprocess.run(["srun", "-n2", "true"], env=env, capture_output=True, timeout=60).returncode:
            assert time.time() < deadline, (folder / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)
        yield env
    finally:
        for daemon in reversed(daemons):
            stop(daemon)


SLURM_CONF = """\
ClusterName=kerasbig
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge/socket
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiParams=ports=12000-12999
MailProg=/bin/true
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> pathlib.Path:
    """The workdir of RUN on one device, the reference for the SLURM runs."""
    workdir = tmp_path_factory.mktemp("one_device")
    subprocess.run([sys.executable, "-m", "kerasbig.train", *RUN, "--strategy=one_device", f"--workdir={workdir}"],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    return workdir


@pytest.mark.slow
def test_srun_tasks_train_as_one_device_with_only_the_chief_writing(slurm, one_device, tmp_path):
    """`srun -n2` with no TF_CONFIG: `--strategy=auto` finds the two tasks, and they reach the one-device test
    loss. Each task gets its own --workdir and TMPDIR here, so what each writes can be told apart."""
    command = (f"mkdir -p {tmp_path}/tmp$SLURM_PROCID && TMPDIR={tmp_path}/tmp$SLURM_PROCID exec {sys.executable} "
               f"-m kerasbig.train {shlex.join(RUN)} --workdir={tmp_path}/task$SLURM_PROCID")
    result = subprocess.run(["srun", "-n2", "--resv-ports=2", "--kill-on-bad-exit=1", "bash", "-c", command],
                            cwd=REPO, env=slurm, capture_output=True, text=True, errors="replace", timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # MultiWorkerMirroredStrategy's class name
    assert result.stdout.count("Strategy CollectiveAllReduceStrategy with 2 replica(s)") == 2
    loss = json.loads((tmp_path / "task0" / "metrics.json").read_text())["loss"]
    assert loss == pytest.approx(json.loads((one_device / "metrics.json").read_text())["loss"], rel=1e-6)
    assert not (tmp_path / "task1").exists() and not list((tmp_path / "tmp1").iterdir())


@pytest.mark.slow
def test_preempted_sbatch_job_exits_75_and_resumes_on_resubmission(slurm, one_device, tmp_path):
    """`scancel --signal=TERM` (what SLURM's preemption sends) stops both tasks at the same step with a checkpoint
    in the shared workdir and the job exits 75; the same script submitted again resumes and ends with the
    weights of the uninterrupted one-device run."""
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --ntasks=2 --output={tmp_path}/slurm-%j.out --chdir={REPO}\n"
                      f"srun --resv-ports=2 --kill-on-bad-exit=1 {sys.executable} -m kerasbig.train {shlex.join(RUN)} "
                      f"--workdir={tmp_path}/run\n")
    checkpoints = tmp_path / "run" / "checkpoints"
    job = subprocess.Popen(["sbatch", "--wait", "--parsable", str(script)], env=slurm, stdout=subprocess.PIPE,
                           text=True)
    job_id = job.stdout.readline().strip()
    deadline = time.time() + 300
    while not list(checkpoints.glob("step-*")):
        assert job.poll() is None and time.time() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=TERM", job_id], env=slurm, check=True)
    assert job.wait(timeout=300) == PREEMPTED_EXIT_CODE, (tmp_path / f"slurm-{job_id}.out").read_text()[-3000:]
    output = (tmp_path / f"slurm-{job_id}.out").read_text(errors="replace")
    assert output.count("Preempted: saved step") == 2 and len(set(re.findall(r"saved step (\d+)", output))) == 1
    stopped = int(re.search(r"saved step (\d+)", output)[1])
    assert stopped < 200

    rerun = subprocess.run(["sbatch", "--wait", "--parsable", str(script)], env=slurm, capture_output=True,
                           text=True, timeout=600)
    output = (tmp_path / f"slurm-{rerun.stdout.strip()}.out").read_text(errors="replace")
    assert rerun.returncode == 0, output[-3000:]
    assert output.count(f"Resuming from step {stopped} ") == 2
    assert_same_weights(tmp_path / "run", one_device, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tfjob_tf_config_trains_a_chief_and_a_worker_as_one_device(one_device, tmp_path):
    """Kubeflow's TF_CONFIG for a chief and a worker, only its service addresses rewritten to local ports: the
    two reach the one-device test loss and only the chief writes."""
    local = {f"mnist-{role}-0.default.svc:2222": f"127.0.0.1:{free_port()}" for role in ("chief", "worker")}
    processes = []
    for role in ("chief", "worker"):
        tf_config = tfjob_tf_config("mnist", role, 0)
        for service, address in local.items():
            tf_config = tf_config.replace(service, address)
        (tmp_path / f"{role}-tmp").mkdir()
        with open(tmp_path / f"{role}.txt", "w") as out:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "kerasbig.train", *RUN, f"--workdir={tmp_path / role}"], cwd=REPO,
                env={**os.environ, "TF_CONFIG": tf_config, "TMPDIR": str(tmp_path / f"{role}-tmp")},
                stdout=out, stderr=subprocess.STDOUT))
    try:
        returncodes = [process.wait(timeout=600) for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert returncodes == [0, 0], (tmp_path / "chief.txt").read_text()[-2000:] + (tmp_path / "worker.txt").read_text()[-2000:]
    loss = json.loads((tmp_path / "chief" / "metrics.json").read_text())["loss"]
    assert loss == pytest.approx(json.loads((one_device / "metrics.json").read_text())["loss"], rel=1e-6)
    assert not (tmp_path / "worker").exists() and not list((tmp_path / "worker-tmp").iterdir())


JAX_RUN = ["--config=configs/gpt_small.py", "--config.model.width=32", "--config.model.depth=2",
           "--config.model.heads=4", "--config.data.seq_len=32", "--config.data.batch_size=16",
           "--config.data.max_tokens=20000", "--config.optimizer.learning_rate=0.01",
           "--config.schedule.warmup_steps=2", "--config.train.steps=6", "--config.train.eval_every_steps=3",
           "--config.train.steps_per_execution=2", "--mode=train", "--strategy=data_parallel"]


@pytest.mark.slow
def test_srun_tasks_form_one_jax_runtime_that_trains_as_one_process(slurm, tmp_path):
    """On JAX the same step variables start `jax.distributed`: the two tasks' devices form one data-parallel mesh
    whose run equals one process over two devices (same batches, same all-reduced updates); only rank 0 writes."""
    reference = tmp_path / "one_process"
    subprocess.run([sys.executable, "-m", "kerasbig.train", *JAX_RUN, f"--workdir={reference}"], cwd=REPO,
                   env={**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                   check=True, capture_output=True, timeout=600)
    command = (f"mkdir -p {tmp_path}/tmp$SLURM_PROCID && TMPDIR={tmp_path}/tmp$SLURM_PROCID exec {sys.executable} "
               f"-m kerasbig.train {shlex.join(JAX_RUN)} --workdir={tmp_path}/task$SLURM_PROCID")
    result = subprocess.run(["srun", "-n2", "--resv-ports=2", "--kill-on-bad-exit=1", "bash", "-c", command],
                            cwd=REPO, env={**slurm, "KERAS_BACKEND": "jax"}, capture_output=True, text=True,
                            errors="replace", timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("Strategy DataParallel with 2 replica(s) on jax") == 2  # one device per process
    metrics = lambda workdir: json.loads((workdir / "metrics.json").read_text())
    assert metrics(tmp_path / "task0")["loss"] == pytest.approx(metrics(reference)["loss"], rel=1e-5)
    got, want = checkpoint_arrays(tmp_path / "task0"), checkpoint_arrays(reference)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert not (tmp_path / "task1").exists() and not list((tmp_path / "tmp1").iterdir())
