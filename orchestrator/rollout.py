"""Rolling a model version out to a fleet: canary sites first, then waves, each judged on what it reports.

A site *passes* when, after the deploy, its agent heartbeats, has verified the version (its checksum held),
finished a fine-tune on it whose gate evidence shows no regression (an ``edge-serve`` site: serves the version as
it came), stays that way, heartbeating, for ``rollout.soak_s``, and its live window on the new model passes the
canary tests (:mod:`orchestrator.canary`) against its window before the deploy, with the traffic the tests need.
It *fails* on silence (no heartbeat for ``rollout.fresh_within_s``), an unreadable heartbeat, an agent that
stopped and did not come back within ``restart_grace_s``, a crash loop, a failed fine-tune, a fallback model, a
version the site never accepted, or a test that rejects. It is *inconclusive* when the soak ended without live
evidence (no baseline, the site's gate kept what served, too little traffic): never passed. Every time here is
the cloud's: a heartbeat counts from when the cloud first saw it change (:meth:`FleetStatus.age`), never from
an edge's or the store's clock. A failed canary is rolled back over the provisioning connection and the rollout
stops.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.candidates import base_folder_name
from edge_agent.layout import AgentPaths
from orchestrator.canary import Check, analyse_windows, gate_evidence, implausible, live_window, predictions
from orchestrator.canary import plan as test_plan
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
    version must be another one, unless the version was already there); ``serves_only``: an ``edge-serve``
    site, judged on serving the version as it came, never on a fine-tune.
    """

    site: str
    since: float
    before: dict | None = None  # the heartbeat before the deploy (its live window is the baseline)
    fresh_within_s: float = 60.0
    before_run: str | None = None
    limits: CanaryThresholds = field(default_factory=CanaryThresholds)
    inconclusive: str = "extend"  # rollout.inconclusive: halt | extend | proceed
    max_rate: float = 50.0  # rollout.max_predictions_per_s
    restart_grace_s: float | None = None  # default: fresh_within_s
    serves_only: bool = False
    served_before: str | None = None  # what the host served when the deploy landed (default: what ``before`` says)
    pids: set[int] = field(default_factory=set)
    healthy_since: float | None = None
    stopped_since: float | None = None  # the agent said it stopped: restarting, until the grace runs out
    checks: list[Check] = field(default_factory=list)  # the analysis, once judged
    improved: bool = False  # the version's gate evidence at the site found an improvement


CRASH_LOOP_RESTARTS = 3
VERDICTS = ("passed", "failed", "inconclusive")


def watch(inventory: Inventory, site: str, since: float, before: dict | None, changed: bool,
          served_before: str | None = None) -> Watch:
    """A :class:`Watch` for ``site`` deployed at ``since``, from the heartbeat it sent before the deploy and
    what the host itself said it served when the deploy landed."""
    target, settings = inventory.site(site), inventory.rollout
    return Watch(site, since, before, settings.fresh_limit(target.agent.heartbeat_interval_s),
                 ((before or {}).get("last_run") or {}).get("run_id") if changed else None,
                 settings.thresholds, settings.inconclusive, settings.max_predictions_per_s,
                 settings.restart_grace_s, target.install.profile == "edge-serve", served_before)


def judge(watch: Watch, status: dict | None, age: float | None, version: str, soak_s: float, now: float
          ) -> tuple[str, str]:
    """("waiting" | "passed" | "failed" | "inconclusive", why) for one canary from its latest heartbeat, first
    seen by the cloud ``age`` seconds ago (None: none in the store). A heartbeat whose parts do not add up
    is "failed: unreadable heartbeat (why)", never an exception."""
    try:
        return _judge(watch, status, age, version, soak_s, now)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
        watch.healthy_since = None
        return "failed", f"unreadable heartbeat ({type(exc).__name__}: {str(exc)[:200]})"


def _judge(watch: Watch, status: dict | None, age: float | None, version: str, soak_s: float, now: float
           ) -> tuple[str, str]:
    written = None if age is None else now - age
    silent_for = now - max(written or 0.0, watch.since)
    if silent_for > watch.fresh_within_s:
        watch.healthy_since = None
        return "failed", (f"no heartbeat for {silent_for:.0f} s (limit {watch.fresh_within_s:.0f} s): "
                          "agent down or store unreachable")
    if not status or written is None or written < watch.since:
        return "waiting", "no heartbeat since the deploy"
    if (restarting := _restarting(watch, status, now)) is not None:
        return restarting
    if len(watch.pids) > CRASH_LOOP_RESTARTS:
        return "failed", f"crash loop: the agent restarted {len(watch.pids) - 1} times since the deploy"
    if status.get("serving_problem"):
        return "failed", f"serving a fallback: {status['serving_problem']}"
    if status.get("finetune_failures"):
        return "failed", f"the fine-tune on {version} failed"
    waiting = _serves_version(watch, status, version)
    if waiting:
        watch.healthy_since = None
        return "waiting", waiting
    gate = None
    if not watch.serves_only:
        gate, watch.improved = gate_evidence(watch.site, status.get("last_run") or {}, watch.limits.alpha)
        if gate.failed:
            watch.checks = [gate]
            return "failed", f"the version's gate evidence: {gate.why()}"
    watch.healthy_since = watch.healthy_since or now
    if now - watch.healthy_since < soak_s:
        return "waiting", f"healthy on {version}; soaking ({now - watch.healthy_since:.0f}/{soak_s:.0f} s)"
    return _live_verdict(watch, status, version, [gate] if gate else [], now)


def _restarting(watch: Watch, status: dict, now: float) -> tuple[str, str] | None:
    """A stopped agent is restarting for ``restart_grace_s``: its next heartbeat (another pid) judges it."""
    pid = status.get("pid")
    if status.get("state") in ("stopped", "stopping"):
        watch.stopped_since = watch.stopped_since or now
        grace = watch.restart_grace_s or watch.fresh_within_s
        if now - watch.stopped_since > grace:
            return "failed", f"the agent stopped and did not restart within {grace:.0f} s"
        watch.healthy_since = None
        return "waiting", f"restarting (the agent stopped {now - watch.stopped_since:.0f} s ago; grace {grace:.0f} s)"
    if pid:
        watch.pids.add(int(pid))
    watch.stopped_since = None
    return None


def _serves_version(watch: Watch, status: dict, version: str) -> str:
    """Why the site is not yet on ``version`` (empty: it is): a fine-tuning site has finished a fine-tune on
    it; a serve-only site serves it as it came."""
    if version not in (status.get("base_versions") or []):
        return f"waiting for the site to accept {version}"
    if watch.serves_only:
        served = base_folder_name(version)
        return "" if status.get("active_version") == served else f"waiting for the site to serve {served}"
    run = status.get("last_run") or {}
    if version not in (run.get("bases") or []) or (watch.before_run is not None
                                                     and run.get("run_id") == watch.before_run):
        return f"waiting for a finished fine-tune on {version}"
    return ""


def _model_before(watch: Watch) -> str | None:
    """What served when the deploy landed: the host's own word, else the heartbeat before it. The host's word
    wins because a heartbeat read just after a rollback can still name the version rolled back."""
    return watch.served_before or (watch.before or {}).get("active_version")


def _baseline(watch: Watch) -> dict | None:
    """The live window of :func:`_model_before` (the heartbeat keeps one per model it served lately)."""
    return ((watch.before or {}).get("window") or {}).get(_model_before(watch))


def _live_verdict(watch: Watch, status: dict, version: str, rows: list[Check], now: float) -> tuple[str, str]:
    """After the soak: the live tests when there is a baseline and enough traffic on the new model, else
    inconclusive (or waiting, while ``rollout.inconclusive: extend`` lets the soak run on)."""
    before, after = _baseline(watch), live_window(status)
    if (claim := implausible(after, watch.since, now, watch.max_rate)) is not None:
        return "failed", f"unreadable heartbeat ({claim})"
    served = status.get("active_version")
    if served is None:
        return "failed", "nothing serves at the site"
    if _model_before(watch) == served:
        return _short(watch, f"the site serves {served} as before (its gate kept what served): no live evidence "
                             f"on {version}")
    if _model_before(watch) is None:
        return _short(watch, "nothing served before the deploy: no window to compare the new model with")
    if not before:
        return _short(watch, "no predictions in the window before the deploy: nothing to compare with")
    needed = test_plan(before, watch.limits, list((after or {}).get("class_rates") or ()))
    if needed.needed is None:
        return _short(watch, needed.why)
    got = (after or {}).get("predictions", 0)
    if got < needed.needed:
        return _short(watch, f"{got} of the {needed.needed} predictions on the new model that the tests need "
                             f"(power {watch.limits.power:g} to catch a rate x{watch.limits.rate_ratio:g} or "
                             f"/{watch.limits.rate_ratio:g})", extend=True)
    watch.checks = rows + analyse_windows(watch.site, before, after, watch.limits)
    failing = [c for c in watch.checks if c.failed]
    if failing:
        return "failed", "canary analysis: " + "; ".join(c.why() for c in failing)
    return "passed", (f"serves {served} on {version}; {got} predictions, {len(watch.checks)} check(s) passed "
                      f"(alpha {watch.limits.alpha:g}, power {watch.limits.power:g} at {needed.needed})")


def _short(watch: Watch, why: str, extend: bool = False) -> tuple[str, str]:
    """Not enough evidence: waiting while the soak may be extended for traffic, else inconclusive."""
    if extend and watch.inconclusive == "extend":
        return "waiting", f"soaked; {why}"
    return "inconclusive", why


def timed_out(watch: Watch, status: dict | None, age: float | None, version: str, now: float
              ) -> tuple[str, str]:
    """The verdict of a canary that never got one in time, and the most specific thing it did not do."""
    if not status or age is None or now - age < watch.since:
        return "failed", "no heartbeat since the deploy (agent down or store unreachable)"
    if version not in (status.get("base_versions") or []):
        return "failed", f"the site never accepted {version} (checksum refused or the deploy did not land)"
    if watch.healthy_since is not None:
        return "inconclusive", (f"too few predictions on the new model in time ({predictions(status)}): "
                                "nothing to judge it on")
    if watch.serves_only:
        return "failed", f"the site never served {version} in time"
    return "failed", f"no finished fine-tune on {version} in time"


def rollback_site(inventory: Inventory, site: str, version: str, dry_run: bool = False) -> dict:
    """Fence ``version`` on ``site`` and make it serve what serves now when that is built on no fenced version,
    else the newest ensemble that served before a deploy and is built on none, then set the version aside
    (:func:`orchestrator.provision.hostworker.rollback`). Returns ``changed`` (fence, active, base: empty
    when there was nothing to do), ``serving`` and ``never_got``; raises ``StepFailed`` saying what serves
    now when it refuses (no clean ensemble to serve, or a record it cannot trust)."""
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


@dataclass
class RollbackOutcome:
    """What one site's rollback came to: ``state`` rolled back | never got it | failed (the site may still
    serve the version), with what it changed or why it failed, and how many attempts it took."""

    site: str
    state: str
    text: str
    attempts: int = 1

    @property
    def still_serving(self) -> bool:
        return self.state == "failed"


def rollback_with_retries(inventory: Inventory, site: str, version: str, sleep=time.sleep) -> RollbackOutcome:
    """:func:`rollback_site`, retried ``rollout.rollback_retries`` times with doubling back-off from
    ``rollout.rollback_retry_s`` (a host that did not answer, a lock, an ensemble briefly unreadable)."""
    settings, delay = inventory.rollout, inventory.rollout.rollback_retry_s
    for attempt in range(1, settings.rollback_retries + 2):
        try:
            done = rollback_site(inventory, site, version)
        except Exception as exc:  # noqa: BLE001 - any failure is this attempt's; the next may succeed
            why = inventory.mask(str(exc))
            if attempt > settings.rollback_retries:
                return RollbackOutcome(site, "failed", f"rollback failed after {attempt} attempts: {why}", attempt)
            sleep(delay)
            delay *= 2
            continue
        if done.get("never_got"):
            return RollbackOutcome(site, "never got it", "never got it", attempt)
        text = (", ".join(done["changed"]) or "nothing to undo") + f"; serving {done.get('serving') or 'nothing'}"
        return RollbackOutcome(site, "rolled back", text + (f" (attempt {attempt})" if attempt > 1 else ""), attempt)
    raise AssertionError("unreachable")


def rolled_back(status: dict | None, version: str, serving: str | None) -> bool:
    """A heartbeat that shows the rollback took: the version gone from the site's bases, ``serving`` active."""
    return bool(status) and version not in (status.get("base_versions") or []) \
        and status.get("active_version") == serving


def wait_for_canaries(reader: FleetStatus, watches: list[Watch], version: str, soak_s: float, timeout_s: float,
                      poll_s: float = 1.0, on_poll=None) -> dict[str, tuple[str, str]]:
    """Judge every canary until each has a verdict (passed, failed or inconclusive), or the time is up."""
    deadline = time.monotonic() + timeout_s
    verdicts: dict[str, tuple[str, str]] = {}
    status: dict[str, dict] = {}
    while True:
        status = reader.read([w.site for w in watches if w.site not in verdicts])
        now = time.time()
        for watch in watches:
            if watch.site in reader.unreadable and watch.site not in verdicts:  # a broken or hostile status file
                why = reader.unreadable[watch.site].removeprefix("unreadable heartbeat: ")
                verdicts[watch.site] = ("failed", f"unreadable heartbeat ({why})")
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
                if watch.site not in verdicts:
                    verdicts[watch.site] = timed_out(watch, status.get(watch.site), reader.age(watch.site, now),
                                                     version, now)
            return verdicts
        time.sleep(poll_s)
