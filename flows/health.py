"""The fleet-health flow: every site's latest heartbeat as a table; the run fails (red) while any is stale.

Schedule it every few minutes and the Prefect UI's run list is the fleet's alarm panel.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from orchestrator import health
from orchestrator.inventory import load_inventory


class FleetUnhealthy(RuntimeError):
    """Raised so the run ends Failed: some site needs a person."""


@flow(name="edgeloop-fleet-health", log_prints=True)
def fleet_health(inventory: str = "inventory/local.yaml") -> list[dict]:
    """Heartbeat age, state, versions, outbox and errors per site; stale or unreadable sites fail the run."""
    fleet = load_inventory(inventory)
    status, unreadable = health.read_fleet_status(fleet.store(), fleet.names())
    rows = health.assess(status, fleet.names(), fleet.cloud.stale_after_s, unreadable=unreadable)
    create_table_artifact(key="fleet-health", table=[r.row() for r in rows],
                          description=f"latest heartbeat per site; stale after {fleet.cloud.stale_after_s:.0f} s")
    line = health.summary(rows)
    get_run_logger().info("fleet health: %s", line)
    if any(r.verdict in ("stale", "unreadable") for r in rows):
        raise FleetUnhealthy(line)
    return [r.row() for r in rows]


if __name__ == "__main__":
    fleet_health()
