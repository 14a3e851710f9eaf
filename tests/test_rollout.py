"""Rollout on three real sshd sites: provision, a rollout whose canary passes, then one whose canary fails
(its agent stopped): that canary is rolled back over SSH, the other sites are untouched and still serving,
and the artifact names the site and the reason."""

from __future__ import annotations

import os
import shutil
import sys
import threading
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
rollout: {{canary: [host0], soak_s: 7, fresh_within_s: 6, timeout_s: 300, inconclusive: proceed}}
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


def _kill_after_first_heartbeat(root: Path, since: float) -> None:
    """SIGKILL a provisioned agent and its supervisor once the store has its first heartbeat written after
    the deploy of the version reached the site (by the store's clock)."""
    import signal

    status, base = root.parent / "store" / "status" / f"{root.name}.json", None
    deadline = time.time() + 60
    while time.time() < deadline:
        base = next((p for p in AgentPaths(root).base_models.glob("*/model.pt.sha256")
                     if p.stat().st_mtime >= since), None)
        if base is not None and status.stat().st_mtime > base.stat().st_mtime:
            break
        time.sleep(0.1)
    for pidfile in (root / "supervisor.pid", root / "agent.pid"):
        os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
    threading.current_thread().killed_after_deploy = base is not None


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
        # nothing served before and no traffic: no live evidence, so inconclusive (rollout.inconclusive: proceed)
        assert done["canaries"] == {"host0": "inconclusive"}
        assert done["rest"] == {"host1": "inconclusive", "host2": "inconclusive"}
        store = inventory.store()
        ready, status = deploy.wait_for_sites(
            store, ["host1", "host2"], lambda s: (s.get("last_run") or {}).get("bases", [None])[0] == first, 120)
        assert sorted(ready) == ["host1", "host2"], status
        active_before = {h: status[h]["active_version"] for h in ready}
        canary_active = read_fleet_status(store, ["host0"])[0]["host0"]["active_version"]

        killer = threading.Thread(target=_kill_after_first_heartbeat, args=(roots / "host0", time.time()))
        killer.start()  # the canary's agent dies (kill -9, its supervisor too) after one post-deploy heartbeat
        began = time.monotonic()
        with pytest.raises(RolloutHalted, match=r"host0 failed: no heartbeat for \d+ s \(limit 6 s\)"):
            rollout(str(inventory.path), RolloutRequest(version=second, family="elpv"))
        killer.join()
        assert killer.killed_after_deploy and time.monotonic() - began < 150  # on freshness, not the timeout

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
            latest = read_fleet_status(store, [host])[0][host]
            assert latest["state"] == "serving" and time.time() - latest["time"] < 10
            assert latest["active_version"] == active_before[host]
        rows = {r["site"]: r for r in latest_table("rollout")}
        assert rows["host0"]["verdict"] == "failed" and "no heartbeat for" in rows["host0"]["reason"]
        assert rows["host0"]["rolled_back"].startswith("fence, base; serving")  # it never switched
        assert rows["host1"]["verdict"] == rows["host2"]["verdict"] == "not deployed"
    finally:
        stop_agents(roots)


def test_plan_and_verdicts():
    class Fleet:
        rollout = type("R", (), {"canary": 0.34, "waves": [0.5, 1.0]})()

        @staticmethod
        def names():
            return ["a", "b", "c", "d"]

    assert plan(Fleet(), None).canaries == ["a", "b"]
    assert plan(Fleet(), None).waves == [["c"], ["d"]]
    watch = Watch("a", since=100.0, before=None, fresh_within_s=30)
    run = {"run_id": "r2", "finished": 150.0, "bases": ["v2"], "serving": "new",
           "candidates": {"active": {"gate": {"accuracy": 0.8}}, "new": {"gate": {"accuracy": 0.85}}}}
    status = {"time": 160.0, "pid": 1, "state": "serving", "base_versions": ["v1", "v2"], "last_run": run,
              "active_version": "e2"}
    assert judge(watch, None, None, "v2", 5, 110)[0] == "waiting"
    assert judge(watch, status, 0.0, "v2", 5, 160) == ("waiting", "healthy on v2; soaking (0/5 s)")
    # soaked, but nothing served before and no window: no live evidence, never "passed"
    assert judge(watch, status, 1.0, "v2", 5, 166) == (
        "inconclusive", "nothing served before the deploy: no window to compare the new model with")
    # ages are the store's: an edge clock 10 minutes slow passes, and a heartbeat the store wrote 40 s ago fails
    slow = {**status, "time": 160.0 - 600}
    assert judge(Watch("a", 100.0, None, 30), slow, 0.0, "v2", 5, 160)[0] == "waiting"
    dead = judge(Watch("a", 100.0, None, 30), {**status, "time": 10 ** 10}, 40.0, "v2", 5, 200)
    assert dead[0] == "failed" and dead[1].startswith("no heartbeat for 40 s (limit 30 s)")
    assert judge(Watch("a", 100.0, None, 30), None, None, "v2", 5, 131)[0] == "failed"  # silent since the deploy
    assert judge(Watch("a", 100.0, None, 30), status, 30.0, "v2", 5, 120)[1] == "no heartbeat since the deploy"
    assert judge(Watch("a", 100.0, None, 30, before_run="r2"), status, 0.0, "v2", 5, 160)[1].startswith("waiting for")
    # the shared gate's evidence: the challenger on v2 was right on 2 gate images the incumbent missed and
    # wrong on 15 it got right: significantly worse, so the version fails at this site though it never served
    evidence = {"accept": False, "n": 60, "challenger_only": 2, "incumbent_only": 15, "alpha": 0.05,
                "incumbent_accuracy": 0.8, "challenger_accuracy": 0.5833}
    worse = {**status, "last_run": {**run, "serving": "active", "gate": evidence}}
    verdict = judge(Watch("a", 100.0, None, 30), worse, 0.0, "v2", 5, 160)
    assert verdict[0] == "failed" and verdict[1].startswith("the version's gate evidence: gate accuracy")
    noise = {**evidence, "challenger_only": 7, "incumbent_only": 9}
    assert judge(Watch("a", 100.0, None, 30), {**worse, "last_run": {**run, "gate": noise}}, 0.0, "v2", 5, 160)[0] \
        == "waiting"  # two images apart is noise: no regression shown
    looping = Watch("a", 100.0, None, 30)
    for pid in range(1, 6):
        verdict = judge(looping, {**status, "pid": pid}, 0.0, "v2", 5, 160)
    assert verdict[0] == "failed" and "crash loop" in verdict[1]
    assert judge(Watch("a", 100.0, None, 30), {**status, "finetune_failures": 2}, 0.0, "v2", 5, 160)[0] == "failed"


def test_rollback_restores_what_served_before_the_version_and_refuses_before_touching_anything(
        tmp_path, tiny_base_model):
    """Three local sites: s1 got the version (its fine-tune on it serves), s2 never did, s3 got it but the
    ensemble that served before is now corrupt. ``rollback --version V`` restores s1 exactly, leaves s2
    untouched, refuses s3 without changing it and names what serves there; a second run changes nothing;
    a fine-tune built on V can no longer activate at s1; an unknown version is refused at once."""
    import os
    import subprocess

    from agent_helpers import serving_site, write_config

    from edge_agent.activation import Fenced, activate
    from orchestrator.rollout import rollback_site

    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register("elpv", tiny_base_model, arch="tiny_cnn", dataset_id=None, hyperparameters={},
                                metrics={}).version
    inventory_file = tmp_path / "inv.yaml"
    inventory_file.write_text(f"""
cloud: {{store_url: "file://{tmp_path}/store", registry: "{tmp_path / 'registry'}"}}
rollout: {{rollback_retries: 1, rollback_retry_s: 0.1}}
defaults: {{connection: {{type: local}}, python: {sys.executable}}}
sites: [{{name: s1, root: "{tmp_path / 's1'}"}}, {{name: s2, root: "{tmp_path / 's2'}"}},
        {{name: s3, root: "{tmp_path / 's3'}"}}]
""")
    inventory = load_inventory(inventory_file)
    paths = {}
    for name in ("s1", "s2", "s3"):
        paths[name] = serving_site(tmp_path / name, 32)  # ensemble v1 serves
        shutil.copy(write_config(tmp_path / name, "file:///nowhere", site=name), paths[name].config_file)
    for name in ("s1", "s3"):  # the deploy records v1, then the site's fine-tune on the version activates
        assert deploy.deploy_model(inventory.site(name), inventory, tiny_base_model, version).status == "changed"
        shutil.copytree(paths[name].ensembles / "v1", paths[name].ensembles / "on-new")
        activate(paths[name], "on-new")
    (paths["s3"].ensembles / "v1" / "ensemble.onnx").write_bytes(b"truncated")

    done = rollback_site(inventory, "s1", version)
    assert done["changed"] == ["fence", "active", "base"] and done["serving"] == "v1"
    assert os.readlink(paths["s1"].active_link) == "ensembles/v1" and not (paths["s1"].base_models / version).exists()
    with pytest.raises(Fenced, match="was rolled back"):  # the fine-tune that was running on it
        activate(paths["s1"], "on-new", bases=[version])
    assert os.readlink(paths["s1"].active_link) == "ensembles/v1"
    assert rollback_site(inventory, "s1", version)["changed"] == []
    assert rollback_site(inventory, "s2", version) == {"changed": [], "never_got": True, "serving": "v1"}
    with pytest.raises(Exception, match=r"cannot restore v1: .*nothing changed; serving on-new"):
        rollback_site(inventory, "s3", version)
    assert (paths["s3"].base_models / version / "model.pt").is_file() and not paths["s3"].fence_file.exists()
    assert os.readlink(paths["s3"].active_link) == "ensembles/on-new"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edgeloop", "rollback", "-i", str(inventory_file), *args],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    unknown = cli("--version", "no-such-version")
    assert unknown.returncode == 2 and "rollback refused, nothing changed" in unknown.stdout
    again = cli("--version", version, "--verify-timeout-s", "0")
    assert again.returncode == 1, again.stdout + again.stderr
    assert "s1: ok (already rolled back; serving v1)" in again.stdout
    assert "s2: ok (never got" in again.stdout and "s3: failed (rollback failed after 2 attempts: cannot restore v1" \
        in again.stdout
    record = registry.get(version)  # the registry says who rolled it back, and where it still is
    assert record.stage == "rolled_back" and record.rolled_back.still_serving == ["s3"]
    assert os.readlink(paths["s3"].active_link) == "ensembles/on-new"
    assert cli("--limit", "s1").returncode == 2  # --version is required


def test_canary_analysis_fails_a_jump_in_the_defect_rate_and_reads_a_real_live_window():
    """The window is the agent's own (:class:`LiveWindow` fed real predictions); the analysis fails the
    defect rate that jumps from 30 % to 100 % and passes what stayed within the inventory's limits."""
    import numpy as np

    from edge_agent.serving import Prediction
    from edge_agent.window import LiveWindow
    from orchestrator.canary import analyse
    from orchestrator.inventory import CanaryThresholds

    def served(model: str, defective: int, total: int = 20) -> dict:
        window = LiveWindow()
        for i in range(total):
            p = np.array([0.1, 0.9]) if i < defective else np.array([0.8, 0.2])
            label = "defective" if i < defective else "functional"
            window.record(Prediction(label, {}, p, np.stack([p, p]), model), 2.0)
        window.failure(model, "quarantined")
        return {"active_version": model, "window": window.summary()}

    before, jumped, steady = served("e1", 6), served("e2", 20), served("e2", 7)
    assert before["window"]["e1"]["class_rates"] == {"defective": 0.3, "functional": 0.7}
    assert before["window"]["e1"]["quarantined"] == 1 and before["window"]["e1"]["latency_p95_ms"] == 2.0
    limits = CanaryThresholds()
    checks = {c.metric: c for c in analyse("a", before, jumped, limits)}
    assert checks["rate of defective"].failed and checks["rate of defective"].after == "20/20 (100%)"
    assert not checks["latency p95 growth (%)"].failed
    assert not any(c.failed for c in analyse("a", before, steady, limits))
    assert analyse("a", None, jumped, limits) == []  # nothing served before: no baseline to compare with


def test_a_rollback_while_the_fine_tune_on_the_version_runs_fences_it(tmp_path, elpv_small, tiny_base_model):
    """A real agent fine-tunes on the version when the rollback comes: the rollback fences it, and when the
    fine-tune ends it does not activate; the site serves what it served before, the next heartbeat says so,
    and the fenced run counts as no failure."""
    from agent_helpers import AgentProcess, copy_labelled, serving_site, wait_for, write_config

    from orchestrator.rollout import rollback_site, rolled_back

    root = tmp_path / "s1"
    paths = serving_site(root, 32)  # ensemble v1 serves
    copy_labelled(elpv_small / "sites" / "site-1", root)
    config = write_config(root, (tmp_path / "store").as_uri(), site="s1", finetune={"epochs": 4},
                          members=[{"arch": "tiny_cnn", "policy": "flips"}, {"arch": "tiny_cnn", "policy": "noise"}])
    shutil.copy(config, paths.config_file)
    inventory_file = tmp_path / "inv.yaml"
    inventory_file.write_text(f"""
cloud: {{store_url: "{(tmp_path / 'store').as_uri()}"}}
defaults: {{connection: {{type: local}}, python: {sys.executable}}}
sites: [{{name: s1, root: "{root}"}}]
""")
    inventory = load_inventory(inventory_file)
    agent = AgentProcess(config)
    try:
        wait_for(lambda: (agent.status() or {}).get("state") == "serving", 60, "the agent serving", agent)
        assert deploy.deploy_model(inventory.site("s1"), inventory, tiny_base_model, "v2").status == "changed"
        wait_for(lambda: (((agent.status() or {}).get("finetune") or {}).get("progress") or {}).get("phase") == "training",
                 120, "the fine-tune on v2 training", agent)
        done = rollback_site(inventory, "s1", "v2")
        assert done["changed"] == ["fence", "base"] and done["serving"] == "v1"  # v1 still served: no switch
        wait_for(lambda: not ((agent.status() or {}).get("finetune") or {}).get("running"), 180,
                 "the fenced fine-tune to end", agent, interval=0.5)
        status = wait_for(lambda: rolled_back(agent.status(), "v2", "v1") and agent.status(), 30,
                          "a heartbeat showing the rollback", agent)
        assert status["finetune_failures"] == 0 and status["pending_finetune"] is None
        assert os.readlink(paths.active_link) == "ensembles/v1"
        assert [p.name for p in paths.ensembles.iterdir() if not p.name.startswith(".")] == ["v1"]
        assert "was fenced by a rollback" in (root / "agent.log").read_text()
    finally:
        agent.close()


HOSTS = ["host0", "host1", "host2"]


def _biased_version(registry: ModelRegistry, base: Path, tmp_path: Path, towards: str) -> str:
    """A base that calls every cell ``towards`` (its output bias pushed 20 logits that way)."""
    payload = torch.load(base, map_location="cpu", weights_only=True)
    bias = [k for k in payload["state_dict"] if k.endswith(".bias")][-1]
    payload["state_dict"][bias][payload["meta"]["class_names"].index(towards)] += 20.0
    torch.save(payload, tmp_path / f"{towards}.pt")
    return registry.register("elpv", tmp_path / f"{towards}.pt", arch="tiny_cnn", dataset_id=None,
                             hyperparameters={}, metrics={}, note=f"calls every cell {towards}").version


def _operator_labels(dataset: Path, labelled: Path) -> int:
    """An operator who labelled defects: every defective cell of ``dataset`` (split by content hash, as the
    agent does) and two functional ones kept for training; returns how many defects are gate images."""
    from edge_agent.sitedata import _split_of

    gate = 0
    for cls, keep in (("defective", None), ("functional", 2)):
        (labelled / cls).mkdir(parents=True, exist_ok=True)
        kept = 0
        for image in sorted(dataset.rglob(f"{cls}/*.png")):
            split = _split_of(image.read_bytes(), None)
            if keep is not None and (split != "train" or kept >= keep):
                continue
            shutil.copy(image, labelled / cls / f"{image.parent.parent.name}-{image.name}")
            kept += 1
            gate += split == "gate" and cls == "defective"
    return gate


class _Traffic(threading.Thread):
    """A camera: functional cells into a site's inbox, two a second, until stopped."""

    def __init__(self, images: list[Path], inbox: Path):
        super().__init__(daemon=True)
        self.images, self.inbox, self.stop = images, inbox, threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.wait(0.5):
            for _ in range(2):  # written as a camera should: under a .part name, then renamed whole
                partial = self.inbox / f"cam-{n:05d}.png.part"
                shutil.copyfile(self.images[n % len(self.images)], partial)
                partial.rename(self.inbox / f"cam-{n:05d}.png")
                n += 1


HOSTS = ["host0", "host1", "host2"]


def test_a_defect_rate_jump_fails_the_canary_and_an_abort_in_a_later_wave_rolls_back_every_site(
        prefect_harness, sshd_fleet, tmp_path, elpv_small, tiny_base_model):
    """Canary host0 (live traffic: functional cells), then waves [host1], [host2].

    The fleet serves a model that calls every cell functional. A version that calls every cell defective
    wins host0's own gate (its operator labelled defects, so its gate split is all defective) but the live
    defect rate jumps from 0 to 100 %: the analysis fails it and host0 serves what it served before. Then a
    version that changes nothing goes through the canary and wave 1 (inconclusive: no live evidence on it, and
    ``inconclusive: proceed``), and wave 2's agent is dead: every site that got it is rolled back and the run is
    red with the table of sites and reasons.
    """
    roots, registry_root = tmp_path / "roots", tmp_path / "registry"
    path = _inventory(sshd_fleet, tmp_path / "fleet.yaml", roots, registry_root)
    path.write_text(path.read_text().replace(
        "rollout: {canary: [host0], soak_s: 7, fresh_within_s: 6, timeout_s: 300, inconclusive: proceed}",
        "rollout: {canary: [host0], waves: [0.5, 1.0], soak_s: 7, fresh_within_s: 6, timeout_s: 300,\n"
        "          thresholds: {min_change_points: 30}, inconclusive: proceed}").replace(
        "    thresholds: {min_new_labelled: 1000}",
        "    thresholds: {min_new_labelled: 1000, min_gate_images: 4}"))
    inventory = load_inventory(path)
    assert inventory.rollout.waves == [0.5, 1.0]
    canary = AgentPaths(roots / "host0")
    assert _operator_labels(elpv_small, canary.labelled) >= 4
    for host in HOSTS[1:]:
        shutil.copytree(elpv_small / "sites" / "site-1", AgentPaths(roots / host).labelled, dirs_exist_ok=True)
    registry = ModelRegistry(registry_root)
    steady = _biased_version(registry, tiny_base_model, tmp_path, "functional")
    time.sleep(1.1)  # version ids are timestamps to the second; a site fine-tunes from the newest it holds
    bad = _biased_version(registry, tiny_base_model, tmp_path, "defective")
    time.sleep(1.1)
    payload = torch.load(tmp_path / "functional.pt", weights_only=True)
    payload["meta"]["metrics"] = {"round": 3.0}  # the same model again, under another checksum
    torch.save(payload, tmp_path / "again.pt")
    again = registry.register("elpv", tmp_path / "again.pt", arch="tiny_cnn", dataset_id=None, hyperparameters={},
                              metrics={}).version
    traffic = _Traffic(sorted((elpv_small / "generic" / "functional").glob("*.png")), canary.inbox)
    store = inventory.store()
    try:
        report = provision(inventory)
        assert not report.failed, report.recap()
        traffic.start()
        done = rollout(str(inventory.path), RolloutRequest(version=steady, family="elpv"))
        assert done["canaries"] == {"host0": "inconclusive"}  # nothing served before: nothing to compare with
        assert done["rest"] == {"host1": "inconclusive", "host2": "inconclusive"}
        serving = {h: s["active_version"] for h, s in read_fleet_status(store, HOSTS)[0].items()}

        with pytest.raises(RolloutHalted, match=r"host0 failed: canary analysis: rate of defective"):
            rollout(str(inventory.path), RolloutRequest(version=bad, family="elpv"))
        checks = {r["metric"]: r for r in latest_table("rollout-analysis")}
        assert checks["rate of defective"]["before"].endswith("(0%)")
        assert checks["rate of defective"]["after"].endswith("(100%)")
        assert checks["rate of defective"]["result"] == "fail"
        assert os.readlink(canary.active_link) == f"ensembles/{serving['host0']}"
        assert not (canary.base_models / bad).exists()
        assert not any((AgentPaths(roots / h).base_models / bad).exists() for h in HOSTS[1:])

        deploy.stop_agent(inventory.site("host2"), inventory)  # wave 2's site is down
        with pytest.raises(RolloutHalted, match=r"host2 failed: no heartbeat for .*rolled back host0, host1, host2"):
            rollout(str(inventory.path), RolloutRequest(version=again, family="elpv"))
        rows = {r["site"]: r for r in latest_table("rollout")}
        # host0's gate kept what served (the same model again) and host1 has no traffic: no live evidence, so
        # inconclusive (never "passed"), and the rollout goes on under rollout.inconclusive: proceed
        assert [rows[h]["verdict"] for h in HOSTS] == ["inconclusive", "inconclusive", "failed"]
        assert [rows[h]["stage"] for h in HOSTS] == ["canary", "wave 1", "wave 2"]
        for host in HOSTS:
            paths = AgentPaths(roots / host)
            assert not (paths.base_models / again).exists() and (paths.base_models / steady).is_dir()
            assert os.readlink(paths.active_link) == f"ensembles/{serving[host]}", host
            assert rows[host]["rolled_back"].endswith(f"serving {serving[host]}")
    finally:
        traffic.stop.set()
        stop_agents(roots)



def test_gate_evidence_at_a_canary_fails_only_a_significantly_worse_version_and_says_when_it_improved():
    """The gate row of a canary's analysis, from the paired gate its fine-tune ran on the version: a
    significant improvement that now serves counts for ``rollout.require: improve``; a significantly worse
    challenger fails the canary; noise does neither."""
    from orchestrator.canary import gate_evidence

    def run(accept: bool, b: int, c: int, serving: str | None) -> dict:
        return {"serving": serving, "gate": {"accept": accept, "n": 60, "challenger_only": b, "incumbent_only": c,
                                             "alpha": 0.1, "challenger_accuracy": 0.8, "incumbent_accuracy": 0.7}}

    check, improved = gate_evidence("s1", run(True, 9, 1, "new"), 0.1)
    assert check.result == "pass" and improved
    check, improved = gate_evidence("s1", run(False, 9, 1, "active"), 0.1)  # the site kept what served: no gain
    assert check.result == "pass" and not improved
    check, improved = gate_evidence("s1", run(False, 1, 9, "active"), 0.1)  # p(worse) = 11/1024
    assert check.result == "fail" and not improved and "1 for / 9 against" in check.metric
    check, improved = gate_evidence("s1", run(False, 2, 4, "active"), 0.1)  # worse by two images: noise
    assert check.result == "pass" and not improved
