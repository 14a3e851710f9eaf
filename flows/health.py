"""The fleet-health flow: every site's latest heartbeat as a table; the run fails (red) while any is stale.

Schedule it every few minutes and the Prefect UI's run list is the fleet's alarm panel. Ages are the
cloud's (the store's listing), never the edge's clock. A site with no heartbeat at all is listed as "not
provisioned" and does not turn the run red by itself.
"""

from __future__ import annotations

import argparse

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.retries import transient
from orchestrator import health
from orchestrator.inventory import Inventory, load_inventory


class FleetUnhealthy(RuntimeError):
    """Raised so the run ends Failed: some site needs a person."""


@task(name="read-heartbeats", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=transient)
def read_heartbeats(fleet: Inventory) -> list[health.SiteHealth]:
    """Every site's heartbeat in one listing of the store, aged by the store's clock (a store that does not
    answer is retried here, not by rerunning the flow)."""
    return health.fleet_health(fleet.store(), fleet.names(), fleet.cloud.stale_after_s)


@flow(name="edgeloop-fleet-health", log_prints=True)
def fleet_health(inventory: str = "inventory/local.yaml") -> list[dict]:
    """Heartbeat age, state, versions, outbox and errors per site; stale or unreadable sites fail the run.

    Args:
        inventory: path of the fleet's inventory YAML (sites, store, stale limit) where the flow runs
    """
    fleet = load_inventory(inventory)
    rows = read_heartbeats(fleet)
    create_table_artifact(key="fleet-health", table=[r.row() for r in rows],
                          description=f"latest heartbeat per site; stale after {fleet.cloud.stale_after_s:.0f} s")
    line = health.summary(rows)
    get_run_logger().info("fleet health: %s", line)
    if any(r.verdict in ("stale", "unreadable") for r in rows):
        raise FleetUnhealthy(line)
    return [r.row() for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.health", description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--inventory", default="inventory/local.yaml")
    args = parser.parse_args(argv)
    try:
        rows = fleet_health(args.inventory)
    except FleetUnhealthy as exc:
        print(f"fleet unhealthy: {exc}")
        return 1
    print(health.summary([health.SiteHealth(**r) for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
