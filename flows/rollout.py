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

from flows.retries import transient
from orchestrator import deploy
from orchestrator import rollout as waves
from orchestrator.health import FleetStatus
from orchestrator.inventory import Inventory, load_inventory
from orchestrator.registry import ModelRegistry


class RolloutRequest(BaseModel):
    """Which version goes out, and to which sites."""

    version: str | None = Field(None, description="registry version to roll out; default: the family's champion")
    family: str = Field("elpv-defects", description="model family whose champion goes out by default")
    limit: list[str] | None = Field(None, description="only these sites (default: the whole fleet)")


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
                version: str) -> dict[str, tuple[str, str]]:
    """Soak and analyse every site of one stage until each passed or failed (or the time is up)."""
    def report(verdicts: dict, status: dict) -> None:
        for site, (verdict, why) in verdicts.items():
            if site not in reported:
                reported.add(site)
                get_run_logger().info("%s %s: %s (%s)", stage, site, verdict, why)
    reported: set[str] = set()
    return waves.wait_for_canaries(reader, watches, version, inventory.rollout.soak_s, inventory.rollout.timeout_s,
                                   on_poll=report)


@task(cache_policy=NO_CACHE, task_run_name="rollback-{site}")
def rollback_task(inventory: Inventory, site: str, version: str) -> str:
    """What a site's rollback changed, in words (a refusal or failure is reported, not raised: the run is
    red anyway and every other site must still be rolled back)."""
    try:
        done = waves.rollback_site(inventory, site, version)
    except Exception as exc:
        return f"rollback failed: {inventory.mask(str(exc))}"
    if done.get("never_got"):
        return "never got it"
    return (", ".join(done["changed"]) or "nothing to undo") + f"; serving {done.get('serving') or 'nothing'}"


@flow(name="edgeloop-rollout", task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def rollout(inventory: str = "inventory/local.yaml", request: RolloutRequest = RolloutRequest()) -> dict:
    """Canaries, then ``rollout.waves``: each stage deployed, soaked and analysed; any failure rolls back
    every site that got the version and fails the run red with the table of sites and reasons.

    Args:
        inventory: path of the fleet's inventory YAML (sites, store, registry, rollout thresholds)
        request: which version goes out (default: the family's champion) and to which sites
    """
    logger = get_run_logger()
    fleet = load_inventory(inventory)
    registry = fleet.registry()
    version = request.version or _champion(registry, request.family)
    checkpoint = registry.artifact(version)
    plan = waves.plan(fleet, request.limit)
    reader = FleetStatus(fleet.store())
    logger.info("rollout of %s: %s", version, "; ".join(f"{n} {s}" for n, s in plan.stages()))
    rows: list[dict] = []
    checks: list[dict] = []
    got: list[str] = []  # every site a deploy reached (a rollback of one that never got it is a no-op)
    for number, (stage, sites) in enumerate(plan.stages()):
        before = reader.read(sites)
        started = time.time()
        deployed = _deploy_all(fleet, sites, checkpoint, version)
        got += sites
        verdicts = {s: ("failed", f"deploy failed: {r.reason}") for s, r in deployed.items() if r.status == "failed"}
        watches = [waves.watch(fleet, s, started, before.get(s), r.status == "changed")
                   for s, r in deployed.items() if r.status != "failed"]
        if watches:
            verdicts |= judge_stage(fleet, reader, stage, watches, version)
        checks += [c.row() for w in watches for c in w.checks]
        rows += [{"site": s, "stage": stage, "verdict": v, "reason": why, "rolled_back": ""}
                 for s, (v, why) in sorted(verdicts.items())]
        failed = [r for r in rows if r["verdict"] == "failed"]
        if not failed and stage == "canary" and fleet.rollout.require == "improve" \
                and not any(w.improved for w in watches):
            failed = [{"site": "(canaries)", "reason": f"{version} improved no canary's gate (rollout.require: "
                                                        "improve)"}]
            rows.append({"site": "(canaries)", "stage": stage, "verdict": "failed", "reason": failed[0]["reason"],
                         "rolled_back": ""})
        if failed:
            undone = {s: rollback_task.submit(fleet, s, version) for s in got}
            for row in rows:
                if row["site"] in undone:
                    row["rolled_back"] = undone[row["site"]].result()
            rows += [{"site": s, "stage": name, "verdict": "not deployed", "reason": "rollout stopped",
                      "rolled_back": ""} for name, later in plan.stages()[number + 1:] for s in later]
            _publish(rows, checks, version)
            raise RolloutHalted("; ".join(f"{r['site']} failed: {r['reason']}" for r in failed)
                                + f"; rolled back {', '.join(got)}")
    _publish(rows, checks, version)
    return {"version": version, "canaries": {r["site"]: r["verdict"] for r in rows if r["stage"] == "canary"},
            "rest": {r["site"]: r["verdict"] for r in rows if r["stage"] != "canary"}}


def _rollback(fleet: Inventory, site: str, version: str) -> str:
    try:
        done = waves.rollback_site(fleet, site, version)
        return ", ".join(done["changed"]) or "nothing to undo"
    except Exception as exc:  # the artifact says the rollback failed; the run fails red anyway
        return f"rollback failed: {fleet.mask(str(exc))}"


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
