"""Rolling a model version out to a fleet: canary sites first, judged on what they report, then the rest.

A canary passes when, after the deploy, its agent heartbeats, has verified the version (its checksum held),
finished a fine-tune on it, serves a model no worse on its gate split than what served before, and stays
that way for ``rollout.soak_s``. It fails on silence, a stopped or crash-looping agent, a failed fine-tune,
a fallback model, or a version the site never accepted. A failed canary is rolled back over the
provisioning connection (the version set aside, the previous ensemble active again) and the rollout stops.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from orchestrator.inventory import Inventory
from orchestrator.provision.remote import HostWorker, open_remote


@dataclass(frozen=True)
class Plan:
    canaries: list[str]
    rest: list[str]


def plan(inventory: Inventory, sites: list[str] | None = None) -> Plan:
    """Canaries from ``rollout.canary`` (names, or a fraction of the fleet in inventory order), then the rest."""
    names = sites or inventory.names()
    wanted = inventory.rollout.canary
    if isinstance(wanted, list):
        canaries = [n for n in names if n in wanted]
    else:
        canaries = names[:max(1, math.ceil(wanted * len(names)))]
    return Plan(canaries, [n for n in names if n not in canaries])


@dataclass
class Watch:
    """What the cloud has seen of one canary since its deploy (agent pids tell a crash loop)."""

    site: str
    since: float
    before_active: str | None
    pids: set[int] = field(default_factory=set)
    healthy_since: float | None = None


CRASH_LOOP_RESTARTS = 3


def judge(watch: Watch, status: dict | None, version: str, soak_s: float, now: float) -> tuple[str, str]:
    """("waiting" | "passed" | "failed", why) for one canary from its latest heartbeat."""
    if not status or float(status.get("time", 0)) < watch.since:
        return "waiting", "no heartbeat since the deploy"
    if status.get("pid"):
        watch.pids.add(int(status["pid"]))
    if len(watch.pids) > CRASH_LOOP_RESTARTS:
        return "failed", f"crash loop: the agent restarted {len(watch.pids) - 1} times since the deploy"
    if status.get("state") in ("stopped", "stopping"):
        return "failed", "the agent stopped"
    if status.get("serving_problem"):
        return "failed", f"serving a fallback: {status['serving_problem']}"
    if status.get("finetune_failures"):
        return "failed", f"the fine-tune on {version} failed"
    run = status.get("last_run") or {}
    if version not in (status.get("base_versions") or []) or float(run.get("finished") or 0) < watch.since \
            or version not in (run.get("bases") or []):
        watch.healthy_since = None
        return "waiting", f"waiting for a finished fine-tune on {version}"
    candidates = run.get("candidates") or {}
    served = (candidates.get(run.get("serving")) or {}).get("gate", {}).get("accuracy")
    before = (candidates.get("active") or candidates.get("base") or {}).get("gate", {}).get("accuracy")
    if served is not None and before is not None and served < before:
        return "failed", f"serves a worse model on its gate split ({served:.3f} < {before:.3f})"
    watch.healthy_since = watch.healthy_since or now
    if now - watch.healthy_since < soak_s:
        return "waiting", f"healthy on {version}; soaking ({now - watch.healthy_since:.0f}/{soak_s:.0f} s)"
    return "passed", f"serves {run.get('serving')} on {version} (gate {served}), healthy for {soak_s:.0f} s"


def timed_out(watch: Watch, status: dict | None, version: str) -> str:
    """Why a canary that never passed failed: the most specific thing it did not do."""
    if not status or float(status.get("time", 0)) < watch.since:
        return "no heartbeat since the deploy (agent down or store unreachable)"
    if version not in (status.get("base_versions") or []):
        return f"the site never accepted {version} (checksum refused or the deploy did not land)"
    return f"no finished fine-tune on {version} in time"


def rollback_site(inventory: Inventory, site: str, version: str | None = None,
                  previous_active: str | None = "previous") -> dict:
    """Set ``version`` (default: the site's newest base) aside and make ``previous_active`` serve again
    (default ``"previous"``: the newest ensemble before the one serving); returns what changed."""
    target = inventory.site(site)
    remote = open_remote(target, inventory, False)
    try:
        return HostWorker(remote, target.python).call("rollback", root=target.root, version=version,
                                                      active=previous_active)
    finally:
        remote.close()


def wait_for_canaries(read_status, watches: list[Watch], version: str, soak_s: float, timeout_s: float,
                      poll_s: float = 2.0, on_poll=None) -> dict[str, tuple[str, str]]:
    """Judge every canary until each passed or failed, or the time is up (then it failed, with why)."""
    deadline = time.monotonic() + timeout_s
    verdicts: dict[str, tuple[str, str]] = {}
    status: dict[str, dict] = {}
    while True:
        status = read_status([w.site for w in watches if w.site not in verdicts])
        for watch in watches:
            if watch.site not in verdicts:
                state, why = judge(watch, status.get(watch.site), version, soak_s, time.time())
                if state != "waiting":
                    verdicts[watch.site] = (state, why)
        if on_poll:
            on_poll(verdicts, status)
        if len(verdicts) == len(watches):
            return verdicts
        if time.monotonic() >= deadline:
            for watch in watches:
                verdicts.setdefault(watch.site, ("failed", timed_out(watch, status.get(watch.site), version)))
            return verdicts
        time.sleep(poll_s)
