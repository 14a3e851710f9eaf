"""Fleet health: real agents' heartbeats in a real store, one agent killed, one site never started."""

from __future__ import annotations

import time

import pytest
from agent_helpers import AgentProcess, latest_table, wait_for, write_config

from flows.health import FleetUnhealthy, fleet_health
from orchestrator import health


def _inventory(tmp_path, store, stale_after_s: float):
    path = tmp_path / "fleet.yaml"
    path.write_text(f"""
cloud: {{store_url: "{store.as_uri()}", stale_after_s: {stale_after_s}}}
defaults: {{connection: {{type: local}}}}
sites:
  - {{name: site-1, root: "{tmp_path / 'site-1'}"}}
  - {{name: site-2, root: "{tmp_path / 'site-2'}"}}
  - {{name: site-3, root: "{tmp_path / 'site-3'}"}}
""")
    return path


def test_assess_marks_stale_degraded_and_missing_sites_by_the_clouds_clock():
    """Ages are the store's (listing mtime), so an edge ``time`` far in the past or future changes nothing."""
    status = {"a": {"time": 0, "state": "serving"},  # an edge clock decades slow: still ok
              "b": {"time": 990, "state": "serving-fallback", "serving_problem": "v7 does not load"},
              "c": {"time": 10 ** 10, "state": "serving"},  # a fast clock does not keep a dead site ok
              "d": {"time": 999, "state": "stopped"},
              "f": {"time": 999, "state": "no-model"},  # a live agent serving nothing is not ok
              "g": {"time": 999, "state": "finetuning", "base_versions": ["v1"], "finetune": {"running": True}}}
    ages = {"a": 5.0, "b": 10.0, "c": 900.0, "d": 1.0, "f": 1.0, "g": 1.0}
    rows = {r.site: r for r in health.assess(status, list("abcdefg"), stale_after_s=60, ages=ages)}
    assert [rows[s].verdict for s in "abcdefg"] == ["ok", "degraded", "stale", "stale", "not provisioned",
                                                     "not serving", "not serving"]
    assert "v7 does not load" in rows["b"].reason and "900 s ago" in rows["c"].reason
    assert rows["e"].reason == health.NOT_PROVISIONED and rows["a"].heartbeat_age_s == 5
    assert "no base model deployed" in rows["f"].reason and "first fine-tune is running" in rows["g"].reason
    assert health.summary(list(rows.values())).startswith("1 ok, 1 degraded (b: serving a fallback")


def test_a_dead_site_with_a_fast_clock_is_stale_and_a_slow_clock_is_ok(tmp_path):
    """Real files in a real store: the heartbeats' own times lie by 10 minutes either way; the listing does not."""
    import json
    import os

    from edge_agent.store import Store

    status = tmp_path / "store" / "status"
    status.mkdir(parents=True)
    now = time.time()
    (status / "slow.json").write_text(json.dumps({"site": "slow", "time": now - 600, "state": "serving"}))
    (status / "fast.json").write_text(json.dumps({"site": "fast", "time": now + 600, "state": "serving"}))
    os.utime(status / "fast.json", (now - 120, now - 120))  # written two minutes ago, then silence
    rows = {r.site: r for r in health.fleet_health(Store((tmp_path / "store").as_uri()), ["slow", "fast", "new"], 60)}
    assert rows["slow"].verdict == "ok" and rows["slow"].heartbeat_age_s < 30
    assert rows["fast"].verdict == "stale" and 119 <= rows["fast"].heartbeat_age_s < 150
    assert rows["new"].verdict == "not provisioned"


def test_the_flow_fails_red_while_a_site_is_stale_and_names_it(prefect_harness, tmp_path):
    store = tmp_path / "store"
    agents = [AgentProcess(write_config(tmp_path / name, store.as_uri(), site=name, heartbeat_interval_s=0.3))
              for name in ("site-1", "site-2")]
    try:
        for agent, name in zip(agents, ("site-1", "site-2")):
            wait_for(lambda: (store / "status" / f"{name}.json").is_file(), 60, f"{name} heartbeat", agent)
        agents[1].kill()  # site-2's agent dies without a word; site-3 never ran
        time.sleep(5.5)  # past the limit below: site-2 is stale; site-1 (a beat every 0.3 s) stays fresh under load
        with pytest.raises(FleetUnhealthy) as failure:
            fleet_health(str(_inventory(tmp_path, store, stale_after_s=5)))
    finally:
        for agent in agents:
            agent.close()
    message = str(failure.value)  # site-1 lives but serves nothing: not ok either (issue 26)
    assert message.startswith("0 ok, 1 not serving (site-1: serves no model") and "site-2: last heartbeat" in message
    assert "site-3: no heartbeat in the store: never provisioned" in message
    rows = latest_table("fleet-health")
    assert {r["site"]: r["verdict"] for r in rows} == {"site-1": "not serving", "site-2": "stale",
                                                        "site-3": "not provisioned"}
    assert rows[0]["state"] == "no-model" and rows[0]["heartbeat_age_s"] < 5




def test_flows_health_reads_its_inventory_argument_and_a_never_provisioned_site_is_no_traceback(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from edgeloop.cli import PREFECT_DEFAULTS

    inventory = _inventory(tmp_path, tmp_path / "store", stale_after_s=60)
    env = {**os.environ, **PREFECT_DEFAULTS, "PREFECT_HOME": str(tmp_path / "prefect")}  # its own ephemeral API
    env.pop("PREFECT_API_URL", None)
    run = subprocess.run([sys.executable, "-m", "flows.health", "-i", str(inventory)], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], timeout=300, env=env)
    assert run.returncode == 1, run.stdout + run.stderr  # no site is ok: the run is red, said in one line
    assert "fleet unhealthy: 0 ok, 3 not provisioned (site-1: no heartbeat in the store" in run.stdout
    assert "flows/health.py" not in run.stderr  # no traceback of ours


def test_a_heartbeat_carrying_megabytes_in_a_name_is_unreadable_not_reported():
    """A version or state name is a name: one of 300 characters (or 20 MB) makes the heartbeat unreadable, so no
    report or table carries it; the same heartbeat with a proper name reads."""
    import json

    from flows.rollout import RolloutRequest
    from orchestrator.health import UnreadableHeartbeat, parse_heartbeat

    good = {"site": "a", "time": time.time(), "active_version": "20261204T000000-abc", "state": "serving"}
    assert parse_heartbeat(json.dumps(good).encode(), "a")["active_version"] == good["active_version"]
    for field in ("active_version", "state"):
        with pytest.raises(UnreadableHeartbeat, match=field):
            parse_heartbeat(json.dumps({**good, field: "v" * 300}).encode(), "a")
    with pytest.raises(ValueError, match="version"):
        RolloutRequest(version="v" * 20_000_000)
    with pytest.raises(ValueError, match="version"):
        RolloutRequest(version="../../etc")
