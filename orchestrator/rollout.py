"""Rolling a model version out to a fleet: canary sites first, then waves, each judged on what it reports.

A site passes when, after the deploy, its agent heartbeats, has verified the version (its checksum held),
finished a fine-tune on it whose gate evidence shows no regression, stays that way, heartbeating, for
``rollout.soak_s``, and its live window on the new model passes the canary analysis
(:mod:`orchestrator.canary`) against its window before the deploy. It fails on silence (no heartbeat for
``rollout.fresh_within_s``), a stopped or crash-looping agent, a failed fine-tune, a fallback model, or a
version the site never accepted. Every time here is the cloud's: a heartbeat counts from when the store
wrote it (:meth:`orchestrator.health.FleetStatus.age`), never from the edge's clock. A failed canary is rolled back over the
provisioning connection (the version set aside, the previous ensemble active again) and the rollout stops.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.layout import AgentPaths
from orchestrator.canary import Check, analyse, gate_evidence, predictions
from orchestrator.health import FleetStatus
from orchestrator.inventory import CanaryThresholds, Inventory
from orchestrator.provision.remote import HostWorker, open_remote


@dataclass(frozen=True)
class Plan:
    canaries: list[str]
    rest: list[str]
    waves: list[list[str]] = field(default_factory=list)  # the rest, wave by wave

    def stages(self) -> list[tuple[str, list[str]]]:
        """``[("canary", sites), ("wave 1", sites), ...]``: every stage is deployed, then judged."""
        return [("canary", self.canaries)] + [(f"wave {i}", w) for i, w in enumerate(self.waves, 1)]


def plan(inventory: Inventory, sites: list[str] | None = None) -> Plan:
    """Canaries from ``rollout.canary`` (names, or a fraction of the fleet in inventory order), then the rest
    in ``rollout.waves`` (cumulative shares of the rest; an empty wave is skipped)."""
    names = sites or inventory.names()
    wanted = inventory.rollout.canary
    if isinstance(wanted, list):
        canaries = [n for n in names if n in wanted]
    else:
        canaries = names[:max(1, math.ceil(wanted * len(names)))]
    rest = [n for n in names if n not in canaries]
    waves, done = [], 0
    for share in inventory.rollout.waves:
        upto = max(done, math.ceil(share * len(rest)))
        if upto > done:
            waves.append(rest[done:upto])
        done = upto
    return Plan(canaries, rest, waves)


@dataclass
class Watch:
    """What the cloud has seen of one canary since its deploy (agent pids tell a crash loop).

    ``since`` is when the deploy started and ``fresh_within_s`` how old a heartbeat may get, both by the
    cloud's clock; ``before_run`` is the fine-tune the site reported before the deploy (a fine-tune on the
    version must be another one, unless the version was already there).
    """

    site: str
    since: float
    before: dict | None = None  # the heartbeat before the deploy (its live window is the baseline)
    fresh_within_s: float = 60.0
    before_run: str | None = None
    limits: CanaryThresholds = field(default_factory=CanaryThresholds)
    pids: set[int] = field(default_factory=set)
    healthy_since: float | None = None
    checks: list[Check] = field(default_factory=list)  # the analysis, once judged
    improved: bool = False  # the version's gate evidence at the site found an improvement


CRASH_LOOP_RESTARTS = 3


def watch(inventory: Inventory, site: str, since: float, before: dict | None, changed: bool) -> Watch:
    """A :class:`Watch` for ``site`` deployed at ``since``, from the heartbeat it sent before the deploy."""
    return Watch(site, since, before,
                 inventory.rollout.fresh_limit(inventory.site(site).agent.heartbeat_interval_s),
                 ((before or {}).get("last_run") or {}).get("run_id") if changed else None,
                 inventory.rollout.thresholds)


def judge(watch: Watch, status: dict | None, age: float | None, version: str, soak_s: float, now: float
          ) -> tuple[str, str]:
    """("waiting" | "passed" | "failed", why) for one canary from its latest heartbeat, ``age`` seconds old
    by the store's clock (None: none in the store)."""
    written = None if age is None else now - age
    silent_for = now - max(written or 0.0, watch.since)
    if silent_for > watch.fresh_within_s:
        watch.healthy_since = None
        return "failed", (f"no heartbeat for {silent_for:.0f} s (limit {watch.fresh_within_s:.0f} s): "
                          "agent down or store unreachable")
    if not status or written is None or written < watch.since:
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
    if version not in (status.get("base_versions") or []) or version not in (run.get("bases") or []) \
            or (watch.before_run is not None and run.get("run_id") == watch.before_run):
        watch.healthy_since = None
        return "waiting", f"waiting for a finished fine-tune on {version}"
    gate, watch.improved = gate_evidence(watch.site, run)
    if gate.failed:
        watch.checks = [gate]
        return "failed", f"the version's gate evidence: {gate.why()}"
    watch.healthy_since = watch.healthy_since or now
    if now - watch.healthy_since < soak_s:
        return "waiting", f"healthy on {version}; soaking ({now - watch.healthy_since:.0f}/{soak_s:.0f} s)"
    served = predictions(status)
    if predictions(watch.before) and served < watch.limits.min_predictions:  # a baseline, so wait for evidence
        return "waiting", f"soaked; waiting for {watch.limits.min_predictions} predictions on the new model ({served})"
    watch.checks = [gate] + analyse(watch.site, watch.before, status, watch.limits)
    failing = [c for c in watch.checks if c.failed]
    if failing:
        return "failed", "canary analysis: " + "; ".join(c.why() for c in failing)
    return "passed", (f"serves {status.get('active_version')} on {version}, healthy for {soak_s:.0f} s; "
                      f"{len(watch.checks)} check(s) passed")


def timed_out(watch: Watch, status: dict | None, age: float | None, version: str, now: float) -> str:
    """Why a canary that never passed failed: the most specific thing it did not do."""
    if not status or age is None or now - age < watch.since:
        return "no heartbeat since the deploy (agent down or store unreachable)"
    if version not in (status.get("base_versions") or []):
        return f"the site never accepted {version} (checksum refused or the deploy did not land)"
    if watch.healthy_since is not None:
        return (f"too few predictions on the new model in time ({predictions(status)} of "
                f"{watch.limits.min_predictions}): nothing to judge it on")
    return f"no finished fine-tune on {version} in time"


def rollback_site(inventory: Inventory, site: str, version: str, dry_run: bool = False) -> dict:
    """Make ``site`` serve exactly what served before ``version`` was deployed, then set the version aside
    (:func:`orchestrator.provision.hostworker.rollback`). Returns ``changed`` (fence, active, base: empty
    when there was nothing to do), ``serving`` and ``never_got``; raises ``StepFailed`` saying what serves
    now when it refuses (no record, or the ensemble to restore is gone or would not serve)."""
    from orchestrator.deploy import host_facts

    target = inventory.site(site)
    remote = open_remote(target, inventory, False)
    try:
        worker = HostWorker(remote, target.python)
        facts = host_facts(worker, target)
        root = facts["root"]
        venv = target.venv.replace("~", facts.get("home", "~"), 1) if target.venv else f"{root}/venv"
        check = [f"{venv}/bin/python", "-m", "edge_agent", "check-ensemble", "--config",
                 str(AgentPaths(Path(root)).config_file)]
        return worker.call("rollback", root=root, version=version, check=check, dry_run=dry_run, timeout_s=600)
    finally:
        remote.close()


def rolled_back(status: dict | None, version: str, serving: str | None) -> bool:
    """A heartbeat that shows the rollback took: the version gone from the site's bases, ``serving`` active."""
    return bool(status) and version not in (status.get("base_versions") or []) \
        and status.get("active_version") == serving


def wait_for_canaries(reader: FleetStatus, watches: list[Watch], version: str, soak_s: float, timeout_s: float,
                      poll_s: float = 1.0, on_poll=None) -> dict[str, tuple[str, str]]:
    """Judge every canary until each passed or failed, or the time is up (then it failed, with why)."""
    deadline = time.monotonic() + timeout_s
    verdicts: dict[str, tuple[str, str]] = {}
    status: dict[str, dict] = {}
    while True:
        status = reader.read([w.site for w in watches if w.site not in verdicts])
        now = time.time()
        for watch in watches:
            if watch.site in reader.unreadable and watch.site not in verdicts:  # a broken or hostile status file
                verdicts[watch.site] = ("failed", reader.unreadable[watch.site])
            if watch.site not in verdicts:
                state, why = judge(watch, status.get(watch.site), reader.age(watch.site, now), version, soak_s, now)
                if state != "waiting":
                    verdicts[watch.site] = (state, why)
        if on_poll:
            on_poll(verdicts, status)
        if len(verdicts) == len(watches):
            return verdicts
        if time.monotonic() >= deadline:
            for watch in watches:
                verdicts.setdefault(watch.site, ("failed", timed_out(watch, status.get(watch.site),
                                                                     reader.age(watch.site, now), version, now)))
            return verdicts
        time.sleep(poll_s)
