"""The Prefect ``provision`` flow over real sshd hosts: per-host tasks, retries only for unreachable hosts,
and a table artifact of per-host, per-step results."""

from __future__ import annotations

import asyncio
import json

import pytest

from flows.provision import provision_flow, summary_of
from orchestrator.provision import STEPS
from orchestrator.sshfleet import fleet_inventory, stop_agents

pytestmark = pytest.mark.timeout(300)


async def _artifact_and_task_runs(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async with get_client() as client:  # newest first: other flows in this session publish the same key
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                                sort=ArtifactSort.CREATED_DESC)
        task_runs = await client.read_task_runs()
    return artifacts, task_runs


def test_provision_flow_maps_sites_retries_unreachable_and_publishes_a_table(prefect_harness, sshd_fleet,
                                                                             tmp_path):
    roots = tmp_path / "roots"
    fleet = sshd_fleet
    # host2 unreachable (down): retried; host1's key unknown to this known_hosts: refused, never retried
    known = tmp_path / "known_hosts"
    known.write_text("".join(f"[127.0.0.1]:{h.port} {h.host_pub}\n" for h in (fleet.hosts[0], fleet.hosts[2])))
    path = fleet_inventory(fleet, tmp_path / "inv.yaml", roots, known_hosts=known)
    fleet.hosts[2].kill()
    try:
        state = provision_flow(str(path), retry_delays_s=[0.1, 0.1], return_state=True)
    finally:
        stop_agents(roots)
        fleet.hosts[2].start()

    # hosts failed: the run is red, naming them; the others were provisioned all the same
    assert state.is_failed() and "2 of 3 host(s) failed: host1: " in state.message and "; host2: " in state.message
    summary = summary_of(state)
    assert summary["hosts"]["host0"]["status"] == "changed" and summary["changed"] >= 6
    assert sorted(summary["failed"]) == ["host1", "host2"]
    assert "--accept-new-host-keys" in summary["hosts"]["host1"]["reason"]
    assert "cannot connect" in summary["hosts"]["host2"]["reason"]
    attempts = {name: host["attempts"] for name, host in summary["hosts"].items()}
    assert attempts == {"host0": 1, "host1": 1, "host2": 3}  # a host that is down: first try + 2 retries;
    # a refused host key is never retried
    assert not (roots / "host1").exists() and (roots / "host0" / "status.json").exists()

    artifacts, task_runs = asyncio.run(_artifact_and_task_runs("provision-results"))
    assert artifacts, "no table artifact"
    rows = json.loads(artifacts[0].data) if isinstance(artifacts[0].data, str) else artifacts[0].data
    assert {(r["site"], r["step"]) for r in rows} == {(f"host{i}", s) for i in range(3) for s in STEPS}
    assert {r["status"] for r in rows if r["site"] == "host0"} == {"ok", "changed"}
    assert {tr.name for tr in task_runs} >= {"provision-host0", "provision-host1", "provision-host2"}
