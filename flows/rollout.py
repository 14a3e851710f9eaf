"""The ``rollout`` flow: a registry version to the fleet in waves, canaries first; a failed canary is
rolled back and the rollout stops, red, with the site and the reason in its artifact.

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

from orchestrator import deploy
from orchestrator import rollout as waves
from orchestrator.health import FleetStatus
from orchestrator.inventory import Inventory, load_inventory
from orchestrator.registry import ModelRegistry

TRANSIENT = ("cannot connect", "timed out", "timeout", "connection reset", "no route", "refused")


class RolloutRequest(BaseModel):
    version: str | None = Field(None, description="registry version to roll out; default: the family's champion")
    family: str = Field("elpv-defects", description="model family whose champion goes out by default")
    limit: list[str] | None = Field(None, description="only these sites (default: the whole fleet)")


class RolloutHalted(RuntimeError):
    """A canary failed: it was rolled back, the rest of the fleet was not touched."""


class TransientDeployError(RuntimeError):
    """The site could not be reached this time; the task is retried."""


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3, task_run_name="deploy-{site}")
def deploy_site(inventory: Inventory, site: str, checkpoint: Path, version: str) -> deploy.DeployResult:
    result = deploy.deploy_model(inventory.site(site), inventory, checkpoint, version)
    if result.status == "failed" and any(word in result.reason.lower() for word in TRANSIENT):
        raise TransientDeployError(f"{site}: {result.reason}")
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


@flow(name="edgeloop-rollout", task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def rollout(inventory: str = "inventory/local.yaml", request: RolloutRequest = RolloutRequest()) -> dict:
    """Canaries (``rollout.canary`` in the inventory) first, judged; then the rest of the fleet at once."""
    logger = get_run_logger()
    fleet = load_inventory(inventory)
    registry = fleet.registry()
    version = request.version or _champion(registry, request.family)
    checkpoint = registry.artifact(version)
    plan = waves.plan(fleet, request.limit)
    fleet_status = FleetStatus(fleet.store())
    before = fleet_status.read(plan.canaries)
    started = time.time()
    logger.info("rollout of %s: canaries %s, then %s", version, plan.canaries, plan.rest)
    deployed = _deploy_all(fleet, plan.canaries, checkpoint, version)
    verdicts = {s: ("failed", f"deploy failed: {r.reason}") for s, r in deployed.items() if r.status == "failed"}
    watches = [waves.Watch(s, started if r.status == "changed" else 0.0, (before.get(s) or {}).get("active_version"))
               for s, r in deployed.items() if r.status != "failed"]
    verdicts |= waves.wait_for_canaries(fleet_status.read, watches, version, fleet.rollout.soak_s,
                                        fleet.rollout.timeout_s)
    rows = [{"site": s, "wave": "canary", "verdict": v, "reason": why, "rolled_back": ""} for s, (v, why)
            in sorted(verdicts.items())]
    failed = [row for row in rows if row["verdict"] == "failed"]
    if failed:
        previous = {w.site: w.before_active for w in watches}
        for row in failed:
            row["rolled_back"] = _rollback(fleet, row["site"], version, previous.get(row["site"]))
        rows += [{"site": s, "wave": "rest", "verdict": "not deployed", "reason": "rollout stopped", "rolled_back": ""}
                 for s in plan.rest]
        _publish(rows, version)
        raise RolloutHalted("; ".join(f"canary {r['site']} failed: {r['reason']} (rolled back: {r['rolled_back']})"
                                      for r in failed) + f"; {len(plan.rest)} other site(s) not touched")
    rest = _deploy_all(fleet, plan.rest, checkpoint, version)
    rows += [{"site": s, "wave": "rest", "verdict": r.status, "reason": r.reason, "rolled_back": ""}
             for s, r in sorted(rest.items())]
    _publish(rows, version)
    return {"version": version, "canaries": {s: v for s, (v, _) in verdicts.items()},
            "rest": {s: r.status for s, r in rest.items()}}


def _rollback(fleet: Inventory, site: str, version: str, previous_active: str | None) -> str:
    try:
        done = waves.rollback_site(fleet, site, version, previous_active)
        return ", ".join(done["changed"]) or "nothing to undo"
    except Exception as exc:  # the artifact says the rollback failed; the run fails red anyway
        return f"rollback failed: {fleet.mask(str(exc))}"


def _publish(rows: list[dict], version: str) -> None:
    create_table_artifact(key="rollout", table=rows, description=f"rollout of {version}: canaries, then the rest")


def _champion(registry: ModelRegistry, family: str) -> str:
    champion = registry.champion(family)
    if champion is None:
        raise ValueError(f"no champion of family {family!r} in {registry.root}; name a --version")
    return champion.version
