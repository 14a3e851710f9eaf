"""Freshness by one clock no writer sets (issue 25, item 8): a heartbeat is as old as the cloud's time since it
first saw it change. Real files in a file:// store whose mtimes are set with os.utime, as a store clock 10 minutes
ahead, 2 minutes behind, or a writer's utime a year ahead would set them."""

from __future__ import annotations

import json
import os
import time

import pytest

from edge_agent.store import Store
from orchestrator import health
from orchestrator import rollout as waves

SKEWS = {"10 min ahead": 600.0, "2 min behind": -120.0, "a year ahead": 365 * 86400.0}
LIMIT_S = 1.0  # stale_after_s / fresh_within_s: short, so the test sees a dead agent age


def _beat(store, site: str, seq: int | None, skew: float) -> None:
    """The agent's heartbeat (``seq`` None: the dead agent's file, content unchanged, only its mtime set
    again), stamped ``skew`` seconds off the cloud's clock as the store or a writer would."""
    path = store / "status" / f"{site}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if seq is not None:
        path.write_text(json.dumps({"site": site, "time": time.time(), "seq": seq, "state": "serving"}))
    stamp = time.time() + skew
    os.utime(path, (stamp, stamp))


def _verdicts(reader: health.FleetStatus) -> dict[str, str]:
    status, now = reader.read(["live", "dead"]), time.time()
    rows = health.assess(status, ["live", "dead"], LIMIT_S, {s: reader.age(s, now) for s in ("live", "dead")},
                         reader.unreadable)
    return {r.site: r.verdict for r in rows}


@pytest.mark.parametrize("skew", SKEWS.values(), ids=SKEWS.keys())
def test_a_dead_agent_turns_stale_and_a_live_one_stays_fresh_whatever_the_store_clock(tmp_path, skew):
    store = tmp_path / "store"
    _beat(store, "live", 0, skew)
    _beat(store, "dead", 0, skew)
    reader = health.FleetStatus(Store(store.as_uri()))
    first = _verdicts(reader)
    if skew > 0:  # stamped in the cloud's future: age unknown, never "ok" on the store's word alone
        assert first == {"live": "stale", "dead": "stale"}
        assert reader.age("dead") == health.UNKNOWN_AGE
    else:  # the store's mtime, never in the cloud's future: a store behind makes it look old
        assert first == {"live": "stale", "dead": "stale"} and reader.age("dead") >= 119
    _beat(store, "live", 1, skew)
    _beat(store, "dead", None, skew)  # touched, not rewritten: no heartbeat
    assert _verdicts(reader) == {"live": "ok", "dead": "stale"}
    for seq in range(2, 5):  # the live agent heartbeats well within the limit; the dead one only gets touched
        time.sleep(LIMIT_S / 2)
        _beat(store, "live", seq, skew)
        _beat(store, "dead", None, skew)
        assert _verdicts(reader) == {"live": "ok", "dead": "stale"}
    assert reader.age("live") < LIMIT_S


def test_a_dead_agent_seen_changing_once_turns_stale_by_the_clouds_clock(tmp_path):
    """Seen change once (fresh), then silent with its mtime set a year ahead: stale after the limit."""
    store = tmp_path / "store"
    _beat(store, "dead", 0, SKEWS["a year ahead"])
    reader = health.FleetStatus(Store(store.as_uri()))
    reader.read(["dead"])
    _beat(store, "dead", 1, SKEWS["a year ahead"])  # its last heartbeat before it died
    assert _verdicts(reader)["dead"] == "ok"
    time.sleep(LIMIT_S * 1.5)
    _beat(store, "dead", None, SKEWS["a year ahead"])
    assert _verdicts(reader)["dead"] == "stale" and reader.age("dead") > LIMIT_S


def test_fleet_health_in_one_look_never_reads_a_future_stamp_as_ok(tmp_path):
    """``edgeloop health`` looks once: a heartbeat stamped a year ahead is stale, saying why."""
    store = tmp_path / "store"
    _beat(store, "dead", 0, SKEWS["a year ahead"])
    row = health.fleet_health(Store(store.as_uri()), ["dead"], 60)[0]
    assert row.verdict == "stale" and "cloud's future" in row.reason and row.heartbeat_age_s is None


def test_a_dead_canary_stamped_a_year_ahead_fails_on_silence(tmp_path):
    """The rollout's judge: a canary whose agent died before the deploy, its mtime set a year ahead, fails
    for silence within the freshness limit (it once read fresh for a year and could pass)."""
    store = tmp_path / "store"
    _beat(store, "dead", 0, SKEWS["a year ahead"])
    reader = health.FleetStatus(Store(store.as_uri()))
    watch = waves.Watch("dead", time.time(), None, fresh_within_s=LIMIT_S)
    verdicts = waves.wait_for_canaries(reader, [watch], "v2", soak_s=0, timeout_s=10, poll_s=0.2)
    state, why = verdicts["dead"]
    assert state == "failed" and why.startswith("no heartbeat for"), why
