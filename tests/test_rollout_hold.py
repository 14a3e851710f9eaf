"""Rollouts that hold (issue 25): every part of a heartbeat the cloud reads is typed, any error rolls back,
a rolled-back version stays rolled back, canaries decide on tests sized for the effect, serve-only sites are
judged on serving, failed rollbacks are retried and named, freshness is the cloud's own clock.

The fleets are real sshd hosts (the module's three) whose agent roots are prepared in place (no provisioning:
the deploy and rollback go over SSH through the host worker), or real agents where the item touches them."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent_helpers import latest_table, serving_site, write_config

from edge_agent.layout import AgentPaths
from edge_agent.store import Store
from orchestrator.health import UnreadableHeartbeat, parse_heartbeat
from orchestrator.inventory import CanaryThresholds, load_inventory
from orchestrator.registry import ModelRegistry
from orchestrator.rollout import Watch, judge

pytestmark = pytest.mark.timeout(600)

HOSTS = ["host0", "host1", "host2"]


def _window(n: int = 100, defective: int = 20, **over) -> dict:
    entry = {"predictions": n, "class_rates": {"defective": defective / n, "functional": 1 - defective / n},
             "class_counts": {"defective": defective, "functional": n - defective}, "mean_confidence": 0.9,
             "mean_disagreement": 0.05, "latency_p95_ms": 3.0, "errors": 0, "quarantined": 0}
    return {**entry, **over}


def _heartbeat(**over) -> dict:
    status = {"site": "a", "time": 1.0, "pid": 7, "state": "serving", "active_version": "e2",
              "base_versions": ["v2"], "window": {"e2": _window()},
              "last_run": {"run_id": "r2", "bases": ["v2"], "serving": "new",
                           "gate": {"accept": True, "n": 60, "challenger_only": 9, "incumbent_only": 1,
                                    "alpha": 0.05}}}
    return {**status, **over}


def _parse(status: dict) -> dict:
    return parse_heartbeat(json.dumps(status).encode(), "a")


@pytest.mark.parametrize("bad, why", [
    ({"window": {"e2": {k: v for k, v in _window().items() if k != "latency_p95_ms"}}}, "latency_p95_ms"),
    ({"window": "lots"}, "window"),
    ({"window": {"e2": _window(predictions="100")}}, "predictions"),
    ({"window": {"e2": _window(predictions=-5)}}, "predictions"),
    ({"window": {"e2": _window(class_rates={"defective": float("nan"), "functional": 0.5})}}, "class_rates"),
    ({"window": {"e2": _window(mean_confidence=float("nan"))}}, "mean_confidence"),
    ({"window": {"e2": _window(mean_confidence=1.5)}}, "mean_confidence"),
    ({"window": {"e2": _window(class_counts={"defective": 5, "functional": 5})}}, "class counts sum"),
    ({"last_run": {"bases": ["v2"], "gate": [1, 2]}}, "gate"),
    ({"last_run": {"bases": ["v2"], "gate": {"n": 5, "challenger_only": 9, "incumbent_only": 1}}}, "discordant"),
])
def test_a_malformed_window_or_gate_is_an_unreadable_heartbeat(bad, why):
    with pytest.raises(UnreadableHeartbeat, match=why):
        _parse(_heartbeat(**bad))
    assert _parse(_heartbeat())["window"]["e2"]["predictions"] == 100


def test_the_cloud_judges_with_its_own_alpha_and_bounds_what_a_window_claims():
    limits = CanaryThresholds(alpha=0.05)
    before = {"active_version": "e1", "window": {"e1": _window(500, 100)}}
    watch = Watch("a", 100.0, before, 30, limits=limits, inconclusive="halt")
    # the site says its alpha is 1e-300: 2 for / 20 against passes nothing here
    worse = _heartbeat(last_run={"run_id": "r2", "bases": ["v2"], "serving": "active",
                                 "gate": {"accept": False, "n": 60, "challenger_only": 2, "incumbent_only": 20,
                                          "alpha": 1e-300}})
    verdict = judge(watch, _parse(worse), 0.0, "v2", 1, 110)
    assert verdict[0] == "failed" and "alpha 0.05; the site's own alpha 1e-300 not used" in verdict[1]
    # a window claiming 10^9 predictions would dilute any error rate: refused, not believed
    diluted = _heartbeat(window={"e2": _window(10 ** 9, 2 * 10 ** 8, errors=5 * 10 ** 8)})
    watch = Watch("a", 100.0, before, 30, limits=limits, inconclusive="halt")
    assert judge(watch, _parse(diluted), 0.0, "v2", 0, 110)[1].startswith("unreadable heartbeat (window claims")
    fast = _heartbeat(window={"e2": _window(400, 80)})  # 400 in 10 s at 50/s at most: over 501
    watch = Watch("a", 100.0, before, 30, limits=limits, inconclusive="halt", max_rate=10)
    assert "rollout.max_predictions_per_s" in judge(watch, _parse(fast), 0.0, "v2", 0, 110)[1]
    # the judge never raises on a heartbeat that skipped the parser: that site fails, with why
    watch = Watch("a", 100.0, before, 30, limits=limits)
    state, why = judge(watch, {**_heartbeat(), "base_versions": 5}, 0.0, "v2", 0, 110)
    assert state == "failed" and why.startswith("unreadable heartbeat (TypeError")


def test_the_baseline_is_what_the_host_served_when_the_deploy_landed_not_a_stale_heartbeat():
    """Just after a rollback the last heartbeat can still name the version rolled back (``bad``, which called
    everything defective) while the host already serves ``e1`` again. The deploy's own record of what served
    (``served_before``) picks the baseline window, so the same model again is not failed against ``bad``."""
    limits = CanaryThresholds(alpha=0.05)
    stale = {"active_version": "bad", "window": {"e1": _window(400, 80), "bad": _window(400, 300)}}
    again = _parse(_heartbeat(window={"e2": _window(400, 80)}))
    by_host = Watch("a", 100.0, stale, 30, limits=limits, inconclusive="halt", served_before="e1")
    assert judge(by_host, again, 0.0, "v2", 0, 110)[0] == "passed"
    assert by_host.checks and not any(c.failed for c in by_host.checks)
    by_heartbeat = Watch("a", 100.0, stale, 30, limits=limits, inconclusive="halt")
    state, why = judge(by_heartbeat, again, 0.0, "v2", 0, 110)
    assert state == "failed" and "100/400 (25%) -> 320/400 (80%)" in why  # what the stale heartbeat alone would have said


# ---- a fleet of real sshd hosts with agent roots prepared in place ------------------------------------

def fleet_inventory(sshd_fleet, tmp_path: Path, rollout: str = "", sites: dict[str, str] | None = None,
                    canary: str = "[host0]", soak_s: float = 5) -> Path:
    """An inventory of the module's sshd hosts; ``sites`` adds keys per site (e.g. an edge-serve profile)."""
    roots = tmp_path / "roots"
    rows = "".join(f"  - {{name: {h.name}, connection: {{host: 127.0.0.1, port: {h.port}}}, root: {roots / h.name}"
                   f"{', ' + (sites or {}).get(h.name) if (sites or {}).get(h.name) else ''}}}\n"
                   for h in sshd_fleet.hosts)
    path = tmp_path / "fleet.yaml"
    path.write_text(f"""
cloud: {{store_url: "file://{tmp_path / 'store'}", registry: "{tmp_path / 'registry'}"}}
ssh: {{known_hosts: {sshd_fleet.known_hosts}}}
rollout: {{canary: {canary}, soak_s: {soak_s}, fresh_within_s: 4, timeout_s: 60, lease_s: 30, rollback_retry_s: 0.2{rollout}}}
defaults:
  connection: {{type: ssh, user: {sshd_fleet.user}, key_file: {sshd_fleet.client_key}, connect_timeout_s: 5}}
  python: {sys.executable}
  install: {{mode: system}}
  learning: {{image_size: 32, members: [{{arch: tiny_cnn, policy: flips}}]}}
  agent: {{heartbeat_interval_s: 0.5, serve: {{port: 0}}, service: process}}
sites:
{rows}""")
    return path


def prepared_roots(tmp_path: Path, store: str) -> dict[str, AgentPaths]:
    """Each host's agent root as a provisioned, serving site leaves it: ensemble v1 active, a config."""
    out = {}
    for name in HOSTS:
        root = tmp_path / "roots" / name
        out[name] = serving_site(root, 32)
        shutil.copy(write_config(root, store, site=name), out[name].config_file)
    return out


def test_an_error_inside_the_judge_rolls_back_every_site_that_got_the_version(
        prefect_harness, sshd_fleet, tmp_path, tiny_base_model, monkeypatch):
    from flows.rollout import rollout, RolloutRequest
    from orchestrator import rollout as waves

    inventory = load_inventory(fleet_inventory(sshd_fleet, tmp_path))
    paths = prepared_roots(tmp_path, (tmp_path / "store").as_uri())
    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register("elpv", tiny_base_model, arch="tiny_cnn", dataset_id=None, hyperparameters={},
                                metrics={}).version

    def broken(*args, **kwargs):
        assert (paths["host0"].base_models / version / "model.pt").is_file()  # the canary got it
        raise RuntimeError("the judge broke")

    monkeypatch.setattr(waves, "judge", broken)
    with pytest.raises(RuntimeError, match="the judge broke"):
        rollout(str(inventory.path), RolloutRequest(version=version, family="elpv"))
    canary = paths["host0"]
    assert not (canary.base_models / version).exists()  # set aside, fenced, v1 still serving
    assert version in json.loads(canary.fence_file.read_text())["versions"]
    assert os.readlink(canary.active_link) == "ensembles/v1"
    assert not any((paths[h].base_models / version).exists() for h in HOSTS[1:])  # never deployed there
    rows = {r["site"]: r for r in latest_table("rollout")}
    assert rows["(rollout)"]["verdict"] == "failed" and "the judge broke" in rows["(rollout)"]["reason"]
    assert rows["host0"]["rolled_back"].startswith("fence, base")
    record = registry.get(version)  # the abort marks it rolled back: who, when, why
    assert record.stage == "rolled_back" and "the judge broke" in record.rolled_back.why
    assert record.rolled_back.by and record.rolled_back.still_serving == []


# ---- (3) a rolled-back version stays rolled back; one rollout or rollback at a time ---------------------

def _resized(tiny_base_model: Path, tmp_path: Path, name: str, size: int | None = None, note: float = 0.0) -> Path:
    """The tiny base under another checksum (and, with ``size``, another input size: another contract)."""
    import torch

    payload = torch.load(tiny_base_model, map_location="cpu", weights_only=True)
    payload["meta"]["metrics"] = {"copy": note}
    if size:
        payload["meta"]["spec"]["image_size"] = size
    torch.save(payload, tmp_path / f"{name}.pt")
    return tmp_path / f"{name}.pt"


def test_a_rolled_back_champion_is_no_default_target_nor_parent_and_needs_an_override(tmp_path, tiny_base_model):
    from orchestrator.registry import ContractChanged, RolledBackVersion

    registry = ModelRegistry(tmp_path / "registry")
    v1, v2, v3 = (registry.register("elpv", _resized(tiny_base_model, tmp_path, n, note=i), arch="tiny_cnn",
                                    dataset_id=None, hyperparameters={}, metrics={}).version
                  for i, n in enumerate(("v1", "v2", "v3")))
    registry.promote(v1, expected=None)
    registry.promote(v2, expected=v1)
    assert registry.get(v2).replaced == v1
    after = registry.mark_rolled_back(v2, "rollout halted: site-a failed", ["site-b"], by="tester")
    assert after.version == v1 and registry.champion("elpv").version == v1  # the champion it replaced is back
    assert registry.default_parent("elpv").version == v1  # what the next retrain fine-tunes from
    record = registry.get(v2)
    assert record.stage == "rolled_back" and record.rolled_back.by == "tester"
    assert record.rolled_back.still_serving == ["site-b"] and record.rolled_back.at <= time.time()
    with pytest.raises(RolledBackVersion, match="rolled back by tester"):
        registry.check_deployable(v2)
    with pytest.raises(RolledBackVersion):
        registry.promote(v2, expected=v1)
    assert registry.check_deployable(v2, "fixed the camera driver; retry", by="ops").overrides[-1].reason \
        == "fixed the camera driver; retry"
    assert registry.get(v2).overrides[0].action == "deploy"
    # every flow's promotion keeps the serving contract unless allowed
    wide = registry.register("elpv", _resized(tiny_base_model, tmp_path, "wide", size=48), arch="tiny_cnn",
                             dataset_id=None, hyperparameters={}, metrics={}).version
    with pytest.raises(ContractChanged, match="serving contract"):
        registry.promote(wide, expected=v1)
    registry.promote(v3, expected=v1)
    registry.mark_rolled_back(v3, "again", by="tester")
    assert registry.champion("elpv").version == v1  # v3 replaced v1 (v2 was rolled back meanwhile)
    registry.mark_rolled_back(v1, "the first one too", by="tester")
    assert registry.champion("elpv") is None  # nothing standing: the rollout needs a --version


def test_the_writers_of_the_champion_pointer_go_through_the_compare_and_swap():
    """Every call that writes the champion pointer in the cloud's code, found by grepping it: each passes the
    champion it was gated against, and the lifecycle demo promotes nothing itself."""
    import re

    repo = Path(__file__).resolve().parents[1]
    writers = {}
    for folder in ("flows", "orchestrator", "edgeloop"):
        for path in sorted((repo / folder).rglob("*.py")):
            text = path.read_text()
            for match in re.finditer(r"\.promote\((.*)", text):
                writers[f"{path.relative_to(repo)}:{text[:match.start()].count(chr(10)) + 1}"] = match.group(1)
            assert ".champion-" not in text or path.name == "registry.py", path  # only the registry names it
    assert [w.split(":")[0] for w in writers] == ["orchestrator/retrain.py"], writers
    assert all("expected=" in call for call in writers.values()), writers
    assert "promote(" not in (repo / "flows" / "lifecycle.py").read_text()


def test_one_rollout_at_a_time_and_a_rolled_back_version_is_refused(prefect_harness, sshd_fleet, tmp_path,
                                                                     tiny_base_model):
    from flows.lifecycle import _demo_fleet_only
    from flows.rollout import RolloutRequest, rollout
    from orchestrator.lease import Lease, LeaseHeld
    from orchestrator.registry import RolledBackVersion

    inventory = load_inventory(fleet_inventory(sshd_fleet, tmp_path))
    paths = prepared_roots(tmp_path, (tmp_path / "store").as_uri())
    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register("elpv", tiny_base_model, arch="tiny_cnn", dataset_id=None, hyperparameters={},
                                metrics={}).version
    with Lease(inventory.store(), "rollback of v0 by ops@console", 30):
        with pytest.raises(LeaseHeld, match="rollback of v0 by ops@console holds"):
            rollout(str(inventory.path), RolloutRequest(version=version, family="elpv"))
        cli = _cli("rollback", "-i", str(inventory.path), "--version", version)
        assert cli.returncode == 2 and "rollback of v0 by ops@console holds" in cli.stdout
    registry.mark_rolled_back(version, "bad defect rate", by="tester")
    with pytest.raises(RolledBackVersion, match="give an override"):
        rollout(str(inventory.path), RolloutRequest(version=version, family="elpv"))
    assert not any((p.base_models / version).exists() for p in paths.values())  # nothing deployed
    assert not inventory.store().list("leases/fleet.json")  # the lease was given back
    with pytest.raises(ValueError, match="the lifecycle flow is the demo"):
        _demo_fleet_only(inventory)  # its ssh hosts get the stage flows, never the demo that stops every agent


def _cli(*args: str):
    import subprocess

    return subprocess.run([sys.executable, "-m", "edgeloop", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)


# ---- (9) heartbeats on their own schedule, never behind the uploads' back-off ---------------------------

def test_failing_uploads_never_silence_the_heartbeat_and_it_says_why(tmp_path, elpv_small):
    """A real agent whose sample uploads keep failing (its samples folder in the store is a file) heartbeats on
    schedule all the same, and the heartbeat says "uploads failing (reason)"."""
    from agent_helpers import AgentProcess, wait_for

    from orchestrator.health import read_fleet_status

    store = tmp_path / "store"
    (store / "samples").mkdir(parents=True)
    (store / "samples" / "s1").write_text("not a folder")  # every upload of s1's samples fails
    root = tmp_path / "s1"
    paths = serving_site(root, 32)
    config = write_config(root, store.as_uri(), site="s1", upload={"random_share": 1.0, "retry_base_s": 5.0,
                                                                    "retry_max_s": 60.0})
    for image in sorted((elpv_small / "generic" / "functional").glob("*.png"))[:6]:
        shutil.copy(image, paths.inbox / image.name)
    agent = AgentProcess(config)
    try:
        wait_for(lambda: (agent.status() or {}).get("uploads", "").startswith("uploads failing ("), 60,
                 "a heartbeat saying uploads fail", agent)
        seen = read_fleet_status(Store(store.as_uri()), ["s1"])[0]["s1"]
        time.sleep(4)  # the uploads are in back-off now (5 s, doubling): the heartbeat is not
        latest = read_fleet_status(Store(store.as_uri()), ["s1"])[0]["s1"]
        assert latest["seq"] >= seen["seq"] + 4, (seen["seq"], latest["seq"])  # every 0.5 s
        assert latest["upload_backoff_failures"] >= 1 and "uploads failing (" in latest["uploads"]
    finally:
        agent.close()


# ---- (7) serve-only sites judged on serving: a lab-shaped fleet rolled through -------------------------

def test_a_lab_shaped_fleet_with_a_serve_only_site_in_wave_2_rolls_through(
        prefect_harness, sshd_fleet, tmp_path, elpv_small, tiny_base_model):
    """inventory/lab.yaml's shape on three sshd hosts with real agents and live traffic: a canary, wave 1, and an
    ``edge-serve`` site in wave 2. The serve-only site never fine-tunes: it is judged on serving the version as
    it came and on its live window (here it passes its tests), and the rollout reaches its end."""
    from agent_helpers import AgentProcess, wait_for
    from test_rollout import _Traffic

    from edge_agent.activation import activate
    from flows.rollout import RolloutRequest, rollout
    from orchestrator.canary import predictions
    from orchestrator.deploy import serving_artifact

    limits = ("{min_change_points: 40, latency_p95_growth_pct: 100000, confidence_drop_points: 100, "
              "disagreement_rise_points: 100}")
    inventory = load_inventory(fleet_inventory(
        sshd_fleet, tmp_path, rollout=f", waves: [0.5, 1.0], inconclusive: proceed, thresholds: {limits}",
        sites={"host2": "install: {profile: edge-serve}"}, soak_s=10))  # 4 images/s: the tests' traffic in the soak
    assert [s.install.profile for s in inventory.sites] == ["edge", "edge", "edge-serve"]
    store = (tmp_path / "store").as_uri()
    paths, agents, cams = {}, [], []
    images = sorted((elpv_small / "generic").rglob("*.png"))
    for name in HOSTS:
        root = tmp_path / "roots" / name
        paths[name] = serving_site(root, 32)
        profile = {"profile": "edge-serve"} if name == "host2" else {}
        shutil.copy(write_config(root, store, site=name, **profile), paths[name].config_file)
    # the serve-only site serves the same weights before (another name): its live rates stay, its tests pass
    before = paths["host2"].ensembles / "base-before"
    before.mkdir()
    shutil.copy(serving_artifact(tiny_base_model, 32, "before"), before / "ensemble.onnx")
    activate(paths["host2"], "base-before")
    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register("elpv", tiny_base_model, arch="tiny_cnn", dataset_id=None, hyperparameters={},
                                metrics={}).version
    try:
        for name in HOSTS:
            agents.append(AgentProcess(paths[name].config_file))
            cams.append(_Traffic(images, paths[name].inbox))
            cams[-1].start()
        for agent in agents:  # a window before the deploy: what the sites served
            wait_for(lambda: predictions(agent.status()) >= 40, 90, "40 predictions before the deploy", agent)
        done = rollout(str(inventory.path), RolloutRequest(version=version, family="elpv"))
        rows = {r["site"]: r for r in latest_table("rollout")}
        assert [rows[h]["stage"] for h in HOSTS] == ["canary", "wave 1", "wave 2"]
        assert done["rest"]["host2"] == "passed", rows["host2"]
        assert f"serves base-{version} on {version}" in rows["host2"]["reason"]
        # the fine-tuning sites had no labels: their gate kept v1, so no live evidence on the version
        assert done["canaries"] == {"host0": "inconclusive"} and done["rest"]["host1"] == "inconclusive"
        assert "as before" in rows["host0"]["reason"]
        assert os.readlink(paths["host2"].active_link) == f"ensembles/base-{version}"
    finally:
        for cam in cams:
            cam.stop.set()
        for agent in agents:
            agent.close()


# ---- (6) a rollback that fails is retried; the run names the sites that still serve the version ---------

def test_a_failed_rollback_is_retried_and_the_sites_still_serving_are_named(
        prefect_harness, sshd_fleet, tmp_path, tiny_base_model, monkeypatch):
    """Two canaries whose agents are down: both fail on silence and are rolled back. host1's first rollback
    attempt does not reach it (retried, then done); host0's fence cannot be written (by the time of the
    rollback a folder stands where fence.json belongs), every attempt fails: the run ends red naming host0 as still serving, and the registry says so."""
    from flows.rollout import RolloutHalted, RolloutRequest, rollout
    from orchestrator import rollout as waves

    inventory = load_inventory(fleet_inventory(sshd_fleet, tmp_path, canary="[host0, host1]"))
    paths = prepared_roots(tmp_path, (tmp_path / "store").as_uri())
    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register("elpv", tiny_base_model, arch="tiny_cnn", dataset_id=None, hyperparameters={},
                                metrics={}).version
    real, calls = waves.rollback_site, []

    def flaky(fleet, site, v, dry_run=False):
        calls.append(site)
        if site == "host0" and not paths["host0"].fence_file.is_dir():  # after the deploy landed
            paths["host0"].fence_file.unlink(missing_ok=True)
            paths["host0"].fence_file.mkdir()
        if site == "host1" and calls.count("host1") == 1:
            raise ConnectionError("host1 did not answer")
        return real(fleet, site, v, dry_run)

    monkeypatch.setattr(waves, "rollback_site", flaky)
    with pytest.raises(RolloutHalted, match=rf"rolled back host1; STILL SERVING {version} \(rollback failed\): host0"):
        rollout(str(inventory.path), RolloutRequest(version=version, family="elpv"))
    assert calls.count("host0") == 4 and calls.count("host1") == 2  # 3 retries for host0, one for host1
    rows = {r["site"]: r for r in latest_table("rollout")}
    assert not (paths["host1"].base_models / version).exists(), rows
    assert (paths["host0"].base_models / version).is_dir(), rows
    assert rows["host1"]["rolled_back"].endswith("(attempt 2)")
    assert rows["host0"]["rolled_back"].startswith("rollback failed after 4 attempts")
    assert registry.get(version).rolled_back.still_serving == ["host0"]


# ---- (10) a restart during the soak is "restarting"; every activation path checks the fence -----------

def test_a_restart_during_the_soak_is_restarting_and_judged_by_the_next_heartbeat():
    status = _heartbeat(last_run={"run_id": "r2", "bases": ["v2"], "serving": "new"})
    watch = Watch("a", 100.0, None, 30, restart_grace_s=20)
    assert judge(watch, status, 0.0, "v2", 5, 110)[0] == "waiting"
    stopped = {**status, "state": "stopped"}
    assert judge(watch, stopped, 0.0, "v2", 5, 112)[1].startswith("restarting (the agent stopped 0 s ago")
    assert judge(watch, {**status, "pid": 8}, 0.0, "v2", 5, 125)[1].startswith("healthy on v2; soaking")
    assert judge(watch, stopped, 0.0, "v2", 5, 126)[0] == "waiting"
    assert judge(watch, stopped, 0.0, "v2", 5, 147) == ("failed", "the agent stopped and did not restart within "
                                                                  "20 s")


def test_serving_a_base_as_it_came_checks_the_fence(tmp_path, tiny_base_model):
    """Both paths that serve a base unchanged (serve_base_only at a site too small to fine-tune, and an
    edge-serve site's serve_as_is) refuse a base a rollback fenced."""
    from edge_agent.activation import Fenced, activate
    from edge_agent.candidates import base_folder_name

    paths = serving_site(tmp_path / "s1", 32)
    paths.fence_file.write_text(json.dumps({"versions": ["v9"]}))
    shutil.copytree(paths.ensembles / "v1", paths.ensembles / base_folder_name("v9"))
    with pytest.raises(Fenced, match="v9 was rolled back"):
        activate(paths, base_folder_name("v9"), bases=["v9"])
    from edge_agent.config import load_config
    from edge_agent.daemon import Agent

    (paths.base_models / "v9").mkdir(parents=True)
    shutil.copy(paths.ensembles / "v1" / "ensemble.onnx", paths.base_models / "v9" / "ensemble.onnx")
    config = write_config(tmp_path / "s1", (tmp_path / "store").as_uri(), site="s1", profile="edge-serve")
    agent = Agent(load_config(config), config)
    with pytest.raises(Fenced):
        agent.serve_as_is("v9")  # an edge-serve site's activation path
    assert os.readlink(paths.active_link) == "ensembles/v1"
    repo = Path(__file__).resolve().parents[1]
    assert "activate(paths, final.name, expected=None, bases=[base_version])" in \
        (repo / "edge_agent" / "finetune.py").read_text()
