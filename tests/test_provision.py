"""Provisioning against real OpenSSH servers: three sshd processes on loopback ports act as edge hosts.

The first run changes every host and ends with each agent's heartbeat seen; the second run changes
nothing. Fault tests: a host killed mid-run fails alone, a host presenting another key is refused
before anything is written, unknown keys need --accept-new-host-keys, and --check changes no file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from edge_agent.config import dump_config
from edgeloop.cli import main as cli_main
from orchestrator.inventory import load_inventory
from orchestrator.provision import CHANGED, FAILED, OK, SKIPPED, STEPS, HostResult, build_wheel, provision
from orchestrator.provision.steps import SiteProvisioner
from orchestrator.sshfleet import fleet_inventory, stop_agents

pytestmark = pytest.mark.timeout(240)

DYNAMIC = {"status.json", "state.json", "state.json.prev", "agent.log", "agent.out", "agent.pid"}


@pytest.fixture(scope="module")
def wheel():
    return build_wheel()


@pytest.fixture(scope="module")
def fleet_env(sshd_fleet, tmp_path_factory, wheel):
    """The three sshd hosts provisioned once (the first run's report is kept for the first test)."""
    work = tmp_path_factory.mktemp("provision")
    roots = work / "roots"
    inventory = load_inventory(fleet_inventory(sshd_fleet, work / "fleet.yaml", roots))
    try:
        first = provision(inventory, wheel=wheel)
        yield {"work": work, "roots": roots, "inventory": inventory, "first": first, "fleet": sshd_fleet}
    finally:
        stop_agents(roots)


def statuses(report) -> dict[str, dict[str, str]]:
    return {h.site: {s.step: s.status for s in h.steps} for h in report.hosts}


def is_dynamic(rel: Path) -> bool:
    """A file the running agent writes by itself, including the temp file of an atomic rewrite in flight."""
    top = rel.parts[0]
    in_flight = top.startswith(".") and top.endswith(".tmp") and top[1:].rsplit(".", 2)[0] in DYNAMIC
    return top in DYNAMIC or in_flight or top in {"outbox", "runs"} or "__pycache__" in rel.parts


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, leaving out what a running agent rewrites by itself."""
    out = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_dir() or is_dynamic(rel):
            continue
        out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "link"
    return out


def test_first_run_changes_every_host_and_sees_each_heartbeat(fleet_env):
    report, inventory = fleet_env["first"], fleet_env["inventory"]
    assert not report.failed, report.recap()
    for host in report.hosts:
        steps = {s.step: s for s in host.steps}
        assert [s.step for s in host.steps] == list(STEPS)
        for name in ("folders", "wheel", "install", "config", "service", "restart"):
            assert steps[name].status == CHANGED, (host.site, name, steps[name].message)
        assert steps["health"].status == OK and "heartbeat" in steps["health"].message
        assert host.facts["cores"] >= 1 and host.facts["python"].startswith("3.")
        root = fleet_env["roots"] / host.site
        status = json.loads((root / "status.json").read_text())
        assert status["site"] == host.site and time.time() - status["time"] < 30
        os.kill(int(status["pid"]), 0)  # the agent process is alive
        expected = dump_config(inventory.site(host.site).agent_config(inventory.cloud))
        assert (root / "config" / "agent.yaml").read_text() == expected
        assert (root / "config" / "agent.yaml").stat().st_mode & 0o777 == 0o600  # may hold store credentials
        # the venv reuses the base interpreter's packages instead of installing its own torch
        venv_site = next((root / "venv" / "lib").glob("python3*/site-packages"))
        assert (venv_site / "edge_agent").is_dir() and not (venv_site / "torch").exists()
        assert not list(root.rglob("*.tmp-*")), "temporary files left behind"


def test_second_run_on_unchanged_hosts_reports_zero_changes(fleet_env, wheel):
    pids = {h.name: (fleet_env["roots"] / h.name / "supervisor.pid").read_text() for h in fleet_env["fleet"].hosts}
    report = provision(fleet_env["inventory"], wheel=wheel)
    assert report.changed == 0 and not report.failed, report.recap()
    assert all(status == OK for host in statuses(report).values() for status in host.values())
    assert pids == {h: (fleet_env["roots"] / h / "supervisor.pid").read_text() for h in pids}  # not restarted


def test_check_changes_nothing_then_a_real_run_changes_only_the_config(fleet_env, wheel, tmp_path):
    fleet, roots = fleet_env["fleet"], fleet_env["roots"]
    changed_path = fleet_inventory(fleet, tmp_path / "changed.yaml", roots)
    changed_path.write_text(changed_path.read_text().replace("agent: {heartbeat_interval_s: 1,",
                                                             "learning: {thresholds: {uncertainty: 0.7}}\n"
                                                             "  agent: {heartbeat_interval_s: 1,"))
    changed = load_inventory(changed_path)
    # a never-provisioned root on the same hosts: check mode must not even create its folder
    fresh_path = fleet_inventory(fleet, tmp_path / "fresh.yaml", tmp_path / "fresh-roots")
    before = {h.name: tree_hashes(roots / h.name) for h in fleet.hosts}

    report = provision(changed, wheel=wheel, check=True)
    fresh = provision(load_inventory(fresh_path), wheel=wheel, check=True)

    assert not report.failed and not fresh.failed, report.recap() + fresh.recap()
    for host in statuses(report).values():
        assert host["config"] == CHANGED and host["restart"] == CHANGED
        assert host["wheel"] == host["install"] == host["service"] == OK
    for host in fresh.hosts:
        assert {s.step: s.status for s in host.steps}["install"] == CHANGED
        assert all(s.message.startswith("would") for s in host.steps if s.status == CHANGED)
    assert before == {h.name: tree_hashes(roots / h.name) for h in fleet.hosts}
    assert not (tmp_path / "fresh-roots").exists()
    recap = report.recap()  # what a person reads says what would change, never that something changed
    assert "would change" in recap and "would_change=" in recap and " changed=" not in recap
    assert {r["status"] for r in report.rows()} <= {"ok", "would change"}

    try:
        real = provision(changed, wheel=wheel)  # now apply: only the config changes, so the agent restarts
        assert not real.failed, real.recap()
        for host in statuses(real).values():
            assert {k for k, v in host.items() if v == CHANGED} == {"config", "restart"}
            assert host["health"] == OK
        assert "uncertainty: 0.7" in (roots / "host0" / "config" / "agent.yaml").read_text()
    finally:  # back to the module's inventory for the tests after this one
        assert not provision(fleet_env["inventory"], wheel=wheel).failed


def test_a_host_killed_during_the_run_fails_alone(fleet_env, wheel):
    fleet = fleet_env["fleet"]
    victim = fleet.hosts[2]

    def kill_before_install(site: str, step: str) -> None:
        if site == victim.name and step == "install":
            victim.kill()

    try:
        report = provision(fleet_env["inventory"], wheel=wheel, on_step=kill_before_install)
        by_site = {h.site: h for h in report.hosts}
        assert [h.site for h in report.failed] == [victim.name], report.recap()
        dead = {s.step: s for s in by_site[victim.name].steps}
        assert dead["install"].status == FAILED and "host" in dead["install"].message, dead["install"].message
        print("killed host:", dead["install"].message)
        assert dead["health"].status == SKIPPED
        assert victim.name in report.recap() and "install" in report.recap()
        assert all(not by_site[h.name].failed for h in fleet.hosts[:2])

        down = provision(fleet_env["inventory"], wheel=wheel, limit=[victim.name], retry_delays_s=(0.1, 0.1))
        host = down.hosts[0]  # still down: tried again after each delay, then refused
        assert host.failed and host.error_kind == "connect" and "cannot connect" in host.reason
        assert host.attempts == 3
    finally:
        victim.start()
    assert not provision(fleet_env["inventory"], wheel=wheel, limit=[victim.name]).failed


def test_a_change_whose_restart_was_cut_off_is_restarted_by_the_next_run(fleet_env, wheel, tmp_path):
    """The restart decision lives on the host: a run that changed the config and lost the link before
    restarting leaves a marker, and the next run restarts the agent although nothing differs any more."""
    fleet, roots = fleet_env["fleet"], fleet_env["roots"]
    victim = fleet.hosts[0]
    changed_path = fleet_inventory(fleet, tmp_path / "changed.yaml", roots)
    changed_path.write_text(changed_path.read_text().replace("agent: {heartbeat_interval_s: 1,",
                                                             "learning: {thresholds: {uncertainty: 0.66}}\n"
                                                             "  agent: {heartbeat_interval_s: 1,"))
    changed = load_inventory(changed_path)
    pidfile = roots / victim.name / "supervisor.pid"
    pid_before = pidfile.read_text()

    def cut_before_restart(site: str, step: str) -> None:
        if site == victim.name and step == "restart":
            victim.kill()

    try:
        cut = provision(changed, wheel=wheel, limit=[victim.name], on_step=cut_before_restart, retry_delays_s=())
        steps = {s.step: s.status for s in cut.hosts[0].steps}
        assert steps["config"] == CHANGED and steps["restart"] == FAILED, cut.recap()
        assert (roots / victim.name / ".restart-pending").is_file()
        assert pidfile.read_text() == pid_before  # the agent still runs the old config
    finally:
        victim.start()
    try:
        again = provision(changed, wheel=wheel, limit=[victim.name])
        steps = {s.step: s.status for s in again.hosts[0].steps}
        assert steps["config"] == OK and steps["restart"] == CHANGED and steps["health"] == OK, again.recap()
        assert pidfile.read_text() != pid_before
        assert not (roots / victim.name / ".restart-pending").exists()
    finally:  # back to the module's inventory for the tests after this one
        assert not provision(fleet_env["inventory"], wheel=wheel, limit=[victim.name]).failed


def test_a_pending_restart_under_systemd_reloads_the_unit_first(tmp_path):
    """A run cut off after writing the unit but before ``daemon-reload`` leaves only the marker: the
    restart that the marker triggers must reload, or systemd would start the old unit."""
    path = tmp_path / "inv.yaml"
    path.write_text("cloud: {store_url: 'file:///srv/store'}\n"
                    "sites:\n  - {name: s1, root: /srv/s1, connection: {type: local}, agent: {service: systemd}}\n")
    inventory = load_inventory(path)
    calls = []

    class Worker:  # the host worker's answers for a running unit with a restart pending
        started = True

        def call(self, op: str, timeout_s: float | None = None, **req) -> dict:
            calls.append((op, req))
            return {"pending": True} if op == "restart_pending" else {"active": True, "time": 1.0}

    steps = SiteProvisioner(inventory.site("s1"), inventory, None, None, False, HostResult("s1"))
    steps.mode, steps.worker = "systemd", Worker()
    assert steps.restart() == (CHANGED, "restarted edgeloop-agent-s1.service")
    assert calls[-1] == ("systemd", {"unit": "edgeloop-agent-s1.service", "reload": True, "restart": True,
                                     "restart_marker": "/srv/s1/.restart-pending"})


def test_a_host_presenting_a_different_key_is_refused_and_nothing_written(fleet_env, wheel, tmp_path):
    fleet = fleet_env["fleet"]
    impostor = fleet.hosts[1]
    roots = tmp_path / "roots"
    inventory = load_inventory(fleet_inventory(fleet, tmp_path / "inv.yaml", roots))
    known_before = fleet.known_hosts.read_text()
    impostor.rekey()
    try:
        report = provision(inventory, wheel=wheel, accept_new_host_keys=True)  # TOFU never covers a change
        by_site = {h.site: h for h in report.hosts}
        refused = by_site[impostor.name]
        assert refused.failed and refused.error_kind == "hostkey"
        assert "CHANGED" in refused.reason and "refusing" in refused.reason
        assert all(s.status == SKIPPED for s in refused.steps[1:])
        assert not (roots / impostor.name).exists()
        assert fleet.known_hosts.read_text() == known_before  # the wrong key was not recorded
        assert [h.site for h in report.failed] == [impostor.name]
    finally:
        stop_agents(roots)
        fleet.write_known_hosts()  # trust the new key again, for the tests after this one


def test_unknown_host_keys_need_accept_new_and_are_recorded(fleet_env, wheel, tmp_path):
    fleet = fleet_env["fleet"]
    known = tmp_path / "known_hosts"
    path = fleet_inventory(fleet, tmp_path / "inv.yaml", tmp_path / "roots", known_hosts=known)
    inventory = load_inventory(path)

    refused = provision(inventory, wheel=wheel, check=True)
    assert len(refused.failed) == 3
    assert all(h.error_kind == "hostkey" and "--accept-new-host-keys" in h.reason for h in refused.hosts)
    assert not known.exists()

    accepted = provision(inventory, wheel=wheel, check=True, accept_new_host_keys=True)
    assert not accepted.failed, accepted.recap()
    lines = known.read_text().splitlines()
    assert sorted(lines) == sorted(f"[127.0.0.1]:{h.port} {h.host_pub}" for h in fleet.hosts)

    again = provision(inventory, wheel=wheel, check=True)  # now known: no flag needed
    assert not again.failed and known.read_text().splitlines() == lines
    assert not (tmp_path / "roots").exists()


def test_a_missing_python_fails_at_facts_with_a_reason(fleet_env, wheel, tmp_path):
    path = fleet_inventory(fleet_env["fleet"], tmp_path / "inv.yaml", tmp_path / "roots",
                           python="/nonexistent/python3")
    report = provision(load_inventory(path), wheel=wheel, limit=["host0"])
    host = report.hosts[0]
    assert host.failed and host.error_kind == "step"
    assert host.reason.startswith("facts:") and "/nonexistent/python3" in host.reason
    assert not (tmp_path / "roots").exists()


def test_cli_provision_check_and_bad_inventory(fleet_env, capsys, tmp_path):
    inventory = str(fleet_env["inventory"].path)
    assert cli_main(["provision", "-i", inventory, "--limit", "host0,host1", "--check"]) == 0
    out = capsys.readouterr().out
    assert "PROVISION RECAP (check mode" in out and "host0" in out and "host2" not in out
    assert cli_main(["provision", "-i", inventory, "--limit", "host1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [h["site"] for h in data["hosts"]] == ["host1"] and data["check"] is False
    steps = {s["step"]: s for s in data["hosts"][0]["steps"]}
    # the CLI builds the wheel from the working tree, which may have moved on since the module's wheel
    assert steps["health"]["status"] == OK and "heartbeat" in steps["health"]["message"]
    typo = tmp_path / "typo.yaml"
    typo.write_text(Path(inventory).read_text().replace("heartbeat_interval_s", "heartbeat_interval"))
    assert cli_main(["provision", "-i", str(typo)]) == 2
    err = capsys.readouterr().err
    assert "site 'host0'" in err and "'agent.heartbeat_interval'" in err and "heartbeat_interval_s" in err


def test_sshd_is_installed_for_ci():
    """These tests must run, not skip, in CI: `make test` installs openssh-server."""
    assert shutil.which("sshd") or Path("/usr/sbin/sshd").exists()


def test_local_sites_provision_the_same_way_and_env_values_stay_masked(tmp_path, wheel, monkeypatch):
    """``connection: local`` (the demo's sites) runs the same steps without SSH; values that came from
    ``${VAR}`` never appear in the step messages."""
    import sys

    secret_root = tmp_path / "s3cr3t-root"
    monkeypatch.setenv("EDGE_TEST_ROOT", str(secret_root))
    path = tmp_path / "local.yaml"
    path.write_text(
        "cloud: {store_url: 'file://${EDGE_TEST_ROOT}/store'}\n"
        f"defaults: {{connection: {{type: local}}, python: {sys.executable},\n"
        "  agent: {heartbeat_interval_s: 1, serve: {port: 0}, service: process}}\n"
        "sites:\n  - {name: solo, root: '${EDGE_TEST_ROOT}/solo'}\n")
    inventory = load_inventory(path)
    try:
        report = provision(inventory, wheel=wheel)
        assert not report.failed, report.recap()
        assert report.hosts[0].count(CHANGED) == 6
        messages = " ".join(s.message for s in report.hosts[0].steps)
        assert "${EDGE_TEST_ROOT}/solo" in messages and "s3cr3t-root" not in messages
        assert json.loads((secret_root / "solo" / "status.json").read_text())["site"] == "solo"
        assert provision(inventory, wheel=wheel).changed == 0
    finally:
        stop_agents(secret_root)
