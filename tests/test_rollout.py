"""Rollout on three real sshd sites: provision, a rollout whose canary passes, then one whose canary fails
(its agent stopped): that canary is rolled back over SSH, the other sites are untouched and still serving,
and the artifact names the site and the reason."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from agent_helpers import latest_table

from edge_agent.layout import AgentPaths
from flows.rollout import RolloutHalted, RolloutRequest, rollout
from orchestrator import deploy
from orchestrator.health import read_fleet_status
from orchestrator.inventory import load_inventory
from orchestrator.provision import provision
from orchestrator.registry import ModelRegistry
from orchestrator.rollout import Watch, judge, plan
from orchestrator.sshfleet import stop_agents

pytestmark = pytest.mark.timeout(900)


def _inventory(fleet, path: Path, roots: Path, registry: Path) -> Path:
    sites = "".join(f"  - {{name: {h.name}, connection: {{host: 127.0.0.1, port: {h.port}}}, root: {roots / h.name}}}\n"
                    for h in fleet.hosts)
    path.write_text(f"""
cloud: {{store_url: "file://{roots / 'store'}", registry: "{registry}"}}
ssh: {{known_hosts: {fleet.known_hosts}}}
rollout: {{canary: [host0], soak_s: 1, timeout_s: 25}}
defaults:
  connection: {{type: ssh, user: {fleet.user}, key_file: {fleet.client_key}, connect_timeout_s: 5}}
  python: {sys.executable}
  install: {{mode: system}}   # reuse this interpreter's torch & co. (the SSH default would ship a wheelhouse)
  learning:
    image_size: 32
    members: [{{arch: tiny_cnn, policy: flips}}, {{arch: tiny_cnn, policy: noise}}]
    finetune: {{epochs: 1, batch_size: 16}}
    thresholds: {{min_new_labelled: 1000}}
  agent: {{heartbeat_interval_s: 1, poll_interval_s: 0.5, serve: {{port: 0}}, service: process, health_timeout_s: 60}}
sites:
{sites}""")
    return path


def _second_version(registry: ModelRegistry, base: Path, tmp_path: Path) -> str:
    """Another registered version (the same weights, other metadata: another checksum)."""
    payload = torch.load(base, map_location="cpu", weights_only=True)
    payload["meta"]["metrics"] = {"val_acc": 0.5, "round": 2.0}
    torch.save(payload, tmp_path / "v2.pt")
    return registry.register("elpv", tmp_path / "v2.pt", arch="tiny_cnn", dataset_id=None, hyperparameters={},
                             metrics={}, note="second").version


def test_canary_passes_then_a_failing_canary_is_rolled_back_and_the_fleet_untouched(
        prefect_harness, sshd_fleet, tmp_path, elpv_small, tiny_base_model):
    roots, registry_root = tmp_path / "roots", tmp_path / "registry"
    inventory = load_inventory(_inventory(sshd_fleet, tmp_path / "fleet.yaml", roots, registry_root))
    for host in sshd_fleet.hosts:  # each site's operator has labelled images
        shutil.copytree(elpv_small / "sites" / "site-1", AgentPaths(roots / host.name).labelled, dirs_exist_ok=True)
    registry = ModelRegistry(registry_root)
    first = registry.register("elpv", tiny_base_model, arch="tiny_cnn", dataset_id=None, hyperparameters={},
                              metrics={}).version
    registry.promote(first)
    second = _second_version(registry, tiny_base_model, tmp_path)
    try:
        report = provision(inventory)
        assert not report.failed, report.recap()

        done = rollout(str(inventory.path), RolloutRequest(version=first, family="elpv"))
        assert done["canaries"] == {"host0": "passed"} and done["rest"] == {"host1": "changed", "host2": "changed"}
        store = inventory.store()
        ready, status = deploy.wait_for_sites(
            store, ["host1", "host2"], lambda s: (s.get("last_run") or {}).get("bases", [None])[0] == first, 120)
        assert sorted(ready) == ["host1", "host2"], status
        active_before = {h: status[h]["active_version"] for h in ready}
        canary_active = read_fleet_status(store, ["host0"])["host0"]["active_version"]

        deploy.stop_agent(inventory.site("host0"), inventory)  # the canary's agent is down
        with pytest.raises(RolloutHalted, match="canary host0 failed: no heartbeat since the deploy"):
            rollout(str(inventory.path), RolloutRequest(version=second, family="elpv"))

        canary = AgentPaths(roots / "host0")
        assert not (canary.base_models / second).exists()
        assert [p.name.startswith(f".rolled-back-{second}-") for p in canary.base_models.iterdir()
                if p.name.startswith(".rolled")] == [True]
        assert (canary.base_models / first / "model.pt").is_file()
        assert canary.active_link.resolve().name == canary_active
        for host in ("host1", "host2"):  # never got the second version, still serving the first
            paths = AgentPaths(roots / host)
            assert not (paths.base_models / second).exists()
            time.sleep(1.5)
            latest = read_fleet_status(store, [host])[host]
            assert latest["state"] == "serving" and time.time() - latest["time"] < 10
            assert latest["active_version"] == active_before[host]
        rows = {r["site"]: r for r in latest_table("rollout")}
        assert rows["host0"]["verdict"] == "failed" and "no heartbeat" in rows["host0"]["reason"]
        assert rows["host0"]["rolled_back"] == "base"
        assert rows["host1"]["verdict"] == rows["host2"]["verdict"] == "not deployed"
    finally:
        stop_agents(roots)


def test_plan_and_verdicts():
    class Fleet:
        rollout = type("R", (), {"canary": 0.34})()

        @staticmethod
        def names():
            return ["a", "b", "c", "d"]

    assert plan(Fleet(), None).canaries == ["a", "b"]
    watch = Watch("a", since=100.0, before_active="e1")
    run = {"finished": 150.0, "bases": ["v2"], "serving": "new",
           "candidates": {"active": {"gate": {"accuracy": 0.8}}, "new": {"gate": {"accuracy": 0.85}}}}
    status = {"time": 160.0, "pid": 1, "state": "serving", "base_versions": ["v1", "v2"], "last_run": run}
    assert judge(watch, None, "v2", 5, 160)[0] == "waiting"
    assert judge(watch, status, "v2", 5, 160) == ("waiting", "healthy on v2; soaking (0/5 s)")
    assert judge(watch, status, "v2", 5, 166)[0] == "passed"
    worse = {**status, "last_run": {**run, "candidates": {**run["candidates"], "new": {"gate": {"accuracy": 0.7}}}}}
    assert judge(Watch("a", 100.0, None), worse, "v2", 5, 160)[1].startswith("serves a worse model")
    looping = Watch("a", 100.0, None)
    for pid in range(1, 6):
        verdict = judge(looping, {**status, "pid": pid}, "v2", 5, 160)
    assert verdict[0] == "failed" and "crash loop" in verdict[1]
    assert judge(Watch("a", 100.0, None), {**status, "finetune_failures": 2}, "v2", 5, 160)[0] == "failed"


def test_rollback_on_a_site_sets_the_newest_base_aside_and_serves_the_ensemble_before(tmp_path):
    """``edgeloop rollback`` with no version: the newest base goes aside, the ensemble before the serving one
    serves again; with a single base there is nothing to undo, and it says so."""
    import os
    import subprocess

    from orchestrator.rollout import rollback_site

    paths = AgentPaths(tmp_path / "s1")
    paths.ensure()
    for i, name in enumerate(("v1", "v2")):
        (paths.base_models / name).mkdir(parents=True)
        (paths.ensembles / f"e{i + 1}").mkdir(parents=True)
        os.utime(paths.base_models / name, (1000 + i, 1000 + i))
        os.utime(paths.ensembles / f"e{i + 1}", (1000 + i, 1000 + i))
    (paths.models / "active").symlink_to("ensembles/e2")
    inventory_file = tmp_path / "inv.yaml"
    inventory_file.write_text(f"""
cloud: {{store_url: "file://{tmp_path}/store"}}
defaults: {{connection: {{type: local}}}}
sites: [{{name: s1, root: "{tmp_path / 's1'}"}}]
""")
    done = rollback_site(load_inventory(inventory_file), "s1")
    assert done["changed"] == ["base", "active"] and done["version"] == "v2" and done["active"] == "e1"
    assert [p.name for p in paths.base_models.iterdir() if not p.name.startswith(".")] == ["v1"]
    assert os.readlink(paths.active_link) == "ensembles/e1"
    cli = subprocess.run([sys.executable, "-m", "edgeloop", "rollback", "-i", str(inventory_file)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert cli.returncode == 1 and "s1: failed" in cli.stdout and "at most one base model" in cli.stdout
