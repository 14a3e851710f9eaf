"""The pretrain flow on ``cloud.trainers``: one DDP job across two real sshd hosts, started over SSH."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent_helpers import free_port
from edge_agent.models import load_checkpoint
from orchestrator.inventory import InventoryError, load_inventory
from orchestrator.registry import ModelRegistry

pytestmark = pytest.mark.timeout(600)


def _inventory(fleet, tmp_path: Path, trainers: list, port: int) -> Path:
    entries = "".join(
        f"    - {{name: {host.name}, workdir: {tmp_path / host.name}, python: {sys.executable},\n"
        f"       connection: {{host: 127.0.0.1, port: {host.port}, user: {fleet.user},\n"
        f"                     key_file: {fleet.client_key}}}}}\n"
        for host in trainers)
    path = tmp_path / "inventory.yaml"
    path.write_text(f"""
cloud:
  store_url: "file://{tmp_path / 'store'}"
  registry: "{tmp_path / 'registry'}"
  rendezvous_port: {port}
  trainers:
{entries}
ssh: {{known_hosts: {fleet.known_hosts}}}
defaults: {{connection: {{type: local}}}}
sites: [{{name: only, root: "{tmp_path / 'only'}"}}]
""")
    return path


def test_pretrain_runs_one_ddp_job_across_the_trainers(prefect_harness, sshd_fleet, elpv_small, tmp_path):
    from flows.stages import PretrainSettings, pretrain

    inventory = _inventory(sshd_fleet, tmp_path, sshd_fleet.hosts[:2], free_port())
    settings = PretrainSettings(data=str(elpv_small / "generic"), family="ddp", arch="tiny_cnn", epochs=2,
                                batch_size=16)
    result = pretrain(str(inventory), settings)

    registry = ModelRegistry(tmp_path / "registry")
    version = registry.get(result["candidate"])
    assert "by host0, host1" in version.note
    load_checkpoint(registry.artifact(version.version))  # what the edge will load
    # rank 0 wrote on one trainer; the other holds an empty run folder: one job, two nodes
    outputs = [p for host in ("host0", "host1") for p in (tmp_path / host).glob("*/metrics.json")]
    assert len(outputs) == 1
    assert json.loads(outputs[0].read_text())["ranks"] == 2


def test_a_trainer_that_cannot_be_reached_fails_the_job_by_name(prefect_harness, sshd_fleet, elpv_small, tmp_path):
    from flows.stages import PretrainSettings, pretrain
    from orchestrator.trainers import TrainersFailed

    sshd_fleet.hosts[2].kill()
    try:
        inventory = _inventory(sshd_fleet, tmp_path, [sshd_fleet.hosts[0], sshd_fleet.hosts[2]], free_port())
        settings = PretrainSettings(data=str(elpv_small / "generic"), family="ddp", arch="tiny_cnn", epochs=1,
                                    batch_size=16)
        with pytest.raises(TrainersFailed, match=r"host2: ConnectError: .*cannot connect"):
            pretrain(str(inventory), settings)
    finally:
        sshd_fleet.hosts[2].start()
    assert list(ModelRegistry(tmp_path / "registry").versions("ddp")) == []
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "host0")], capture_output=True, text=True, check=False)
    assert not left.stdout.strip(), "host0's half of the job was left waiting at the rendezvous"


def test_a_trainer_needs_an_ssh_host(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("""
cloud: {store_url: "file:///tmp/s", trainers: [{name: t1, workdir: /tmp/w, connection: {type: local}}]}
sites: [{name: only, root: /tmp/only, connection: {type: local}}]
""")
    with pytest.raises(InventoryError, match="a trainer is reached over SSH"):
        load_inventory(path)


CANCELLED_PRETRAIN = """
import sys
from flows.stages import PretrainSettings, pretrain
pretrain(sys.argv[1], PretrainSettings(data=sys.argv[2], family="ddp", arch="tiny_cnn", epochs=500, batch_size=4))
"""


def test_a_pretrain_cancelled_mid_training_leaves_no_remote_process(sshd_fleet, elpv_small, tmp_path):
    """The pretrain flow runs a long job on two trainers; the flow's process gets SIGTERM (what Prefect sends
    to cancel a run) mid-training: it stops the job through each trainer's pidfile before it ends, and no
    process of the job is left on either trainer."""
    import os
    import signal
    import time

    from agent_helpers import agent_env

    from edgeloop.cli import PREFECT_DEFAULTS

    inventory = _inventory(sshd_fleet, tmp_path, sshd_fleet.hosts[:2], free_port())
    env = {**agent_env(), "PREFECT_HOME": str(tmp_path / "prefect"), **PREFECT_DEFAULTS}  # its own ephemeral API
    log = tmp_path / "flow.log"
    # its own session: the ephemeral API server it starts is ended with it at the end
    flow = subprocess.Popen([sys.executable, "-c", CANCELLED_PRETRAIN, str(inventory), str(elpv_small / "generic")],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def job() -> list[str]:
        found = subprocess.run(["pgrep", "-f", "--", f"--out {tmp_path}"], capture_output=True, text=True, check=False)
        return found.stdout.split()

    try:
        deadline = time.time() + 400
        while not (len(list(tmp_path.glob("host*/*.pid"))) == 2 and job()) and time.time() < deadline \
                and flow.poll() is None:
            time.sleep(0.5)
        assert flow.poll() is None and len(list(tmp_path.glob("host*/*.pid"))) == 2 and job(), \
            "the job never ran on both trainers: " + log.read_text()[-3000:]
        time.sleep(5)  # mid-training (500 epochs would take many minutes)
        flow.send_signal(signal.SIGTERM)
        try:
            flow.wait(timeout=120)
        except subprocess.TimeoutExpired:
            left = subprocess.run(["pgrep", "-af", "--", str(tmp_path)], capture_output=True, text=True).stdout
            pytest.fail(f"the cancelled flow did not end:\n{log.read_text()[-3000:]}\nstill running:\n{left}")
    finally:
        try:
            os.killpg(flow.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        flow.wait(10)
    output = log.read_text()
    assert flow.returncode != 0, output
    deadline = time.time() + 10
    while job() and time.time() < deadline:
        time.sleep(0.5)
    assert not job(), f"left on the trainers: {job()}\n{output[-2000:]}"
    assert not list(tmp_path.glob("host*/*.pid"))
    assert os.path.exists(tmp_path / "host0")
