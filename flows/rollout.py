"""The ``rollout`` flow: a registry version to the fleet, canaries first, then waves, each judged (soak,
fresh heartbeats, canary analysis); any failure rolls back every site that got the version and the run
ends red with the sites and reasons in its artifact.

Thin on purpose: the plan, the canary verdict and the rollback are in :mod:`orchestrator.rollout`; the
deploy is :func:`orchestrator.deploy.deploy_model` (over the provisioning connection). Deploys are
concurrent task runs; a deploy that failed for a transient reason (a host that did not answer) raises, so
Prefect retries it.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from flows.health import link_fleet_view
from flows.retries import transient
from flows.runs import FromInventory, Names, finish, run_name, tag_run
from orchestrator import deploy
from orchestrator import rollout as waves
from orchestrator.health import FleetStatus
from orchestrator.inventory import Inventory, load_inventory
from orchestrator.lease import Lease
from orchestrator.pictures import publish_canaries
from orchestrator.registry import ModelRegistry, operator


class RolloutRequest(BaseModel):
    """Which version goes out, and to which sites."""

    version: FromInventory = Field("", max_length=128, pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]*)?$",
                                   description="registry version to roll out; empty: the family's champion in the "
                                               "inventory's registry when the run starts")
    family: str = Field("elpv-defects", description="model family whose champion goes out by default")
    limit: Names = Field([], description="only these sites (empty: the whole fleet)")
    override: FromInventory = Field("", description="the reason to deploy a version that was rolled back "
                                    "(recorded in its registry record); empty: such a version is refused")


class RolloutHalted(RuntimeError):
    """A site failed (or the version improved no canary under ``require: improve``): every site that got the
    version was rolled back, the stages after it were not started."""


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3, retry_condition_fn=transient,
      task_run_name="deploy-{site}")
def deploy_site(inventory: Inventory, site: str, checkpoint: Path, version: str) -> deploy.DeployResult:
    """Deploy to one site; a host that did not answer raises :class:`~orchestrator.deploy.HostUnreachable`,
    which is retried; any other failure is returned (the stage fails on it, once)."""
    result = deploy.deploy_model(inventory.site(site), inventory, checkpoint, version)
    if result.transient:
        raise deploy.HostUnreachable(f"{site}: {result.reason}")
    get_run_logger().info("deploy %s to %s: %s %s", version, site, result.status, result.reason)
    return result


def _deploy_all(inventory: Inventory, sites: list[str], checkpoint: Path, version: str) -> dict[str, deploy.DeployResult]:
    futures = {site: deploy_site.submit(inventory, site, checkpoint, version) for site in sites}
    results = {}
    for site, future in futures.items():
        outcome = future.result(raise_on_failure=False)
        results[site] = outcome if isinstance(outcome, deploy.DeployResult) else \
            deploy.DeployResult(site, version, "failed", str(outcome))
    return results


@task(cache_policy=NO_CACHE, task_run_name="judge-{stage}")
def judge_stage(inventory: Inventory, reader: FleetStatus, stage: str, watches: list[waves.Watch],
                version: str, lease: Lease) -> dict[str, tuple[str, str]]:
    """Soak and analyse every site of one stage until each has a verdict (or the time is up), renewing the
    fleet's lease at every poll."""
    def report(verdicts: dict, status: dict) -> None:
        lease.renew()
        for site, (verdict, why) in verdicts.items():
            if site not in reported:
                reported.add(site)
                get_run_logger().info("%s %s: %s (%s)", stage, site, verdict, why)
    reported: set[str] = set()
    return waves.wait_for_canaries(reader, watches, version, inventory.rollout.soak_s, inventory.rollout.timeout_s,
                                   on_poll=report)


@task(cache_policy=NO_CACHE, task_run_name="rollback-{site}")
def rollback_task(inventory: Inventory, site: str, version: str) -> waves.RollbackOutcome:
    """One site's rollback, retried with back-off; a failure is reported, not raised: the run is red anyway
    and every other site must still be rolled back."""
    outcome = waves.rollback_with_retries(inventory, site, version)
    get_run_logger().log(40 if outcome.still_serving else 20, "rollback of %s at %s: %s", version, site,
                         outcome.text)
    return outcome


@flow(name="edgeloop-rollout", task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True,
      flow_run_name=run_name("rollout", ("request", "version", "champion"), ("request", "family", "elpv-defects")))
def rollout(inventory: str = "inventory/local.yaml", request: RolloutRequest = RolloutRequest()) -> dict:
    """Canaries, then ``rollout.waves``: each stage deployed, soaked and analysed; any failure (or an
    inconclusive canary, unless ``rollout.inconclusive: proceed``) rolls back every site that got the
    version and fails the run red with the table of sites and reasons. So does any error on the way.

    Args:
        inventory: path of the fleet's inventory YAML (sites, store, registry, rollout thresholds)
        request: which version goes out (default: the family's champion) and to which sites
    """
    return finish(_rollout, inventory, request, expected=(RolloutHalted,))


def _rollout(inventory: str, request: RolloutRequest) -> dict:
    tag_run("rollout", request.family)
    link_fleet_view()  # where the fleet stands: the fleet view
    logger = get_run_logger()
    fleet = load_inventory(inventory)
    registry = fleet.registry()
    version = request.version or _champion(registry, request.family)
    plan = waves.plan(fleet, request.limit)
    with Lease(fleet.store(), f"rollout of {version} by {operator()}", fleet.rollout.lease_s) as lease:
        registry.check_deployable(version, request.override)  # a rolled-back version only with a reason
        checkpoint = registry.artifact(version)
        reader = FleetStatus(fleet.store())
        logger.info("rollout of %s: %s", version, "; ".join(f"{n} {s}" for n, s in plan.stages()))
        run = _Run(fleet, version, plan, registry, lease)
        try:
            return _stages(run, reader, checkpoint)
        except RolloutHalted:
            raise
        except BaseException as exc:  # any error on the way: whatever got the version is rolled back first
            logger.error("rollout of %s broke (%s: %s); rolling back %s", version, type(exc).__name__, exc,
                         ", ".join(run.got) or "nothing")
            run.rows.append({"site": "(rollout)", "stage": run.stage, "verdict": "failed",
                             "reason": f"{type(exc).__name__}: {fleet.mask(str(exc))[:300]}", "rolled_back": ""})
            _halt(run, [run.rows[-1]])
            raise


class _Run:
    """What one rollout has done so far: the table, the analysis rows, and every site a deploy reached."""

    def __init__(self, fleet: Inventory, version: str, plan: waves.Plan, registry: ModelRegistry, lease: Lease):
        self.fleet, self.version, self.plan, self.registry, self.lease = fleet, version, plan, registry, lease
        self.rows: list[dict] = []
        self.checks: list[dict] = []
        self.got: list[str] = []  # every site a deploy was sent to (a rollback of one that never got it is a no-op)
        self.stage, self.number = "", 0


def _stages(run: _Run, reader: FleetStatus, checkpoint: Path) -> dict:
    fleet, version = run.fleet, run.version
    for run.number, (run.stage, sites) in enumerate(run.plan.stages()):
        before = reader.read(sites)
        started = time.time()
        run.got += [s for s in sites if s not in run.got]  # before the deploy: one cut short may have landed
        deployed = _deploy_all(fleet, sites, checkpoint, version)
        verdicts = {s: ("failed", f"deploy failed: {r.reason}") for s, r in deployed.items() if r.status == "failed"}
        watches = [waves.watch(fleet, s, started, before.get(s), r.status == "changed", r.served_before)
                   for s, r in deployed.items() if r.status != "failed"]
        if watches:
            verdicts |= judge_stage(fleet, reader, run.stage, watches, version, run.lease)
            publish_canaries(run.stage, watches, reader, version)  # before and after, as a picture
        run.checks += [c.row() for w in watches for c in w.checks]
        run.rows += [{"site": s, "stage": run.stage, "verdict": v, "reason": why, "rolled_back": ""}
                     for s, (v, why) in sorted(verdicts.items())]
        stopping = [r for r in run.rows if r["verdict"] == "failed"
                    or (r["verdict"] == "inconclusive" and fleet.rollout.inconclusive != "proceed")]
        if not stopping and run.stage == "canary" and fleet.rollout.require == "improve" \
                and not any(w.improved for w in watches):
            run.rows.append({"site": "(canaries)", "stage": run.stage, "verdict": "failed", "rolled_back": "",
                             "reason": f"{version} improved no canary's gate (rollout.require: improve)"})
            stopping = [run.rows[-1]]
        if stopping:
            _halt(run, stopping)
    _publish(run.rows, run.checks, version)
    return {"version": version, "canaries": {r["site"]: r["verdict"] for r in run.rows if r["stage"] == "canary"},
            "rest": {r["site"]: r["verdict"] for r in run.rows if r["stage"] != "canary"}}


def _halt(run: _Run, stopping: list[dict]) -> None:
    """Roll back every site that got the version (each retried with back-off), mark the version rolled back
    in the registry with the sites that still serve it, publish the table, raise :class:`RolloutHalted`."""
    undone = {s: rollback_task.submit(run.fleet, s, run.version) for s in run.got}
    done: dict[str, waves.RollbackOutcome] = {}
    for site, future in undone.items():
        outcome = future.result(raise_on_failure=False)
        done[site] = outcome if isinstance(outcome, waves.RollbackOutcome) else \
            waves.RollbackOutcome(site, "failed", f"rollback failed: {outcome}")
    for row in run.rows:
        if row["site"] in done:
            row["rolled_back"] = done[row["site"]].text
    listed = {r["site"] for r in run.rows}
    run.rows += [{"site": s, "stage": run.stage, "verdict": "not judged", "reason": "rollout stopped",
                  "rolled_back": done[s].text} for s in run.got if s not in listed]
    run.rows += [{"site": s, "stage": name, "verdict": "not deployed", "reason": "rollout stopped",
                  "rolled_back": ""} for name, later in run.plan.stages()[run.number + 1:] for s in later]
    _publish(run.rows, run.checks, run.version)
    why = "; ".join(f"{r['site']} {r['verdict']}: {r['reason']}" for r in stopping)
    still = sorted(s for s, o in done.items() if o.still_serving)
    back = sorted(s for s, o in done.items() if o.state == "rolled back")
    run.registry.mark_rolled_back(run.version, f"rollout halted: {why}"[:2000], still)
    raise RolloutHalted(why + f"; rolled back {', '.join(back) or 'nothing'}"
                        + (f"; STILL SERVING {run.version} (rollback failed): {', '.join(still)}" if still else ""))


def _publish(rows: list[dict], checks: list[dict], version: str) -> None:
    create_table_artifact(key="rollout", table=rows, description=f"rollout of {version}: every site, its stage, "
                                                                 "verdict and reason, and what a rollback changed")
    if checks:
        create_table_artifact(key="rollout-analysis", table=checks,
                              description=f"canary analysis of {version}: site, metric, before, after, threshold")


def _champion(registry: ModelRegistry, family: str) -> str:
    champion = registry.champion(family)
    if champion is None:
        raise ValueError(f"no champion of family {family!r} in {registry.root}; name a --version")
    return champion.version
