"""Multi-worker runs as schedulers start them: the cluster built from a SLURM step's variables (checked against
SLURM's own `scontrol show hostnames`), Kubeflow TFJob's TF_CONFIG as it is, clear refusals of inconsistent
steps and missing peers, and a real single-node SLURM cluster running `srun` and a preempted `sbatch` job."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_port
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


@pytest.mark.parametrize("tf_config, named", [
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}}', "TF_CONFIG's cluster has ['ps'] tasks"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}', "TF_CONFIG's task"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator", "index": 0}}', "TF_CONFIG's task"),
    ('{"cluster": ["a:1"]}', "TF_CONFIG must be"),
    ("{", "TF_CONFIG is not valid JSON"),
])
def test_bad_tf_config_is_refused_naming_it(tf_config, named):
    with pytest.raises(UsageError) as refused:
        cluster.from_tf_config(tf_config)
    assert str(refused.value).startswith(named)
