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


def test_assess_marks_stale_degraded_and_missing_sites():
    now = 1000.0
    status = {"a": {"time": 995, "state": "serving"},
              "b": {"time": 990, "state": "serving-fallback", "serving_problem": "v7 does not load"},
              "c": {"time": 100, "state": "serving"},
              "d": {"time": 999, "state": "stopped"}}
    rows = {r.site: r for r in health.assess(status, ["a", "b", "c", "d", "e"], stale_after_s=60, now=now)}
    assert [rows[s].verdict for s in "abcde"] == ["ok", "degraded", "stale", "stale", "stale"]
    assert "v7 does not load" in rows["b"].reason and "900 s ago" in rows["c"].reason
    assert rows["e"].reason == "no heartbeat in the store" and rows["a"].heartbeat_age_s == 5
    assert health.summary(list(rows.values())).startswith("1 ok, 1 degraded (b: serving a fallback")


def test_the_flow_fails_red_while_a_site_is_stale_and_names_it(prefect_harness, tmp_path):
    store = tmp_path / "store"
    agents = [AgentProcess(write_config(tmp_path / name, store.as_uri(), site=name, heartbeat_interval_s=0.3))
              for name in ("site-1", "site-2")]
    try:
        for agent, name in zip(agents, ("site-1", "site-2")):
            wait_for(lambda: (store / "status" / f"{name}.json").is_file(), 60, f"{name} heartbeat", agent)
        agents[1].kill()  # site-2's agent dies without a word; site-3 never ran
        time.sleep(2.5)
        with pytest.raises(FleetUnhealthy) as failure:
            fleet_health(str(_inventory(tmp_path, store, stale_after_s=2)))
    finally:
        for agent in agents:
            agent.close()
    message = str(failure.value)
    assert message.startswith("1 ok") and "site-2: last heartbeat" in message and "site-3: no heartbeat" in message
    rows = latest_table("fleet-health")
    assert {r["site"]: r["verdict"] for r in rows} == {"site-1": "ok", "site-2": "stale", "site-3": "stale"}
    assert rows[0]["state"] == "no-model" and rows[0]["heartbeat_age_s"] < 2


