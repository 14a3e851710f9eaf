"""The fleet-health flow: the fleet view (artifact ``fleet``), every site's latest heartbeat as a table, and each
site's history; the run fails (red) while any site is not ok, naming them.

Schedule it every few minutes and the Prefect UI's run list is the fleet's alarm panel. Ages are the
cloud's (the store's listing), never the edge's clock. Not ok is any of: degraded, not serving (a live agent with
no model), stale, unreadable, and not provisioned (no heartbeat in the store at all, said as such).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from edge_agent.store import StoreError
from flows.retries import transient
from flows.runs import run_name
from orchestrator import fleetview, health
from orchestrator.inventory import Inventory, load_inventory


class FleetUnhealthy(RuntimeError):
    """Raised so the run ends Failed: some site needs a person."""


@task(name="read-heartbeats", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=transient)
def read_heartbeats(fleet: Inventory) -> fleetview.FleetView:
    """Every site's heartbeat in one listing of the store, aged by the store's clock, and the histories updated
    with what is new (a store that does not answer is retried here, not by rerunning the flow)."""
    return fleetview.look(fleet.store(), fleet.names(), fleet.cloud.stale_after_s, record=True)


def ui_url() -> str:
    """The Prefect UI's address for links in artifacts ('' where unknown: the link is then site-relative)."""
    from prefect.settings import PREFECT_UI_URL

    return str(PREFECT_UI_URL.value() or "").rstrip("/")


def publish_histories(view: fleetview.FleetView) -> dict[str, str]:
    """A picture of each site's history that changed in this look, or that the Prefect API has none of yet (a new
    server); returns ``{key: latest artifact id}`` of every site's picture there is (what the fleet view links to)."""
    from orchestrator.pictures import publish_picture

    keys = {site: fleetview.history_artifact_key(site) for site, h in view.histories.items() if fleetview.runs(h)}
    there = _published(list(keys.values()))
    for site, key in keys.items():
        if site in view.changed or key not in there:
            figure = fleetview.history_figure(site, view.histories[site])
            published = figure is not None and publish_picture(
                key, figure, f"{site}: accuracy on its own test split per served version, beside the base as-is")
            if published:
                there[key] = published
    return there


def _published(keys: list[str]) -> dict[str, str]:
    """``{key: latest artifact id}`` for those of ``keys`` that have an artifact on the Prefect API (one request
    per 200 keys)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    found: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for start in range(0, len(keys), 200):  # the API's page size
            chunk = keys[start:start + 200]
            found |= {a.key: str(a.latest_id) for a in client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(
                key=ArtifactCollectionFilterKey(any_=chunk)), limit=len(chunk))}
    return found


def link_fleet_view(logger=None) -> None:
    """Point a run (rollout, retrain) at the fleet view: a small markdown artifact of the run, and a log line."""
    url = f"{ui_url()}/artifacts/key/{fleetview.FLEET_KEY}"
    create_markdown_artifact(markdown=f"The fleet after this run: [fleet view]({url}) (artifact `{fleetview.FLEET_KEY}`, "
                             "refreshed by every fleet-health run; each site's history is linked from its row).",
                             description="where the fleet stands: the fleet view")
    (logger or get_run_logger()).info("fleet view: artifact %r (%s), refreshed by fleet-health", fleetview.FLEET_KEY, url)


@flow(name="edgeloop-fleet-health", log_prints=True,
      flow_run_name=run_name("fleet-health", ("inventory", None, "", lambda p: Path(str(p)).stem)))
def fleet_health(inventory: str = "inventory/local.yaml") -> list[dict]:
    """The fleet view and the heartbeat table; any site not ok fails the run, naming it.

    Args:
        inventory: path of the fleet's inventory YAML (sites, store, stale limit) where the flow runs
    """
    fleet = load_inventory(inventory)
    try:
        view = read_heartbeats(fleet)
    except StoreError as exc:  # after the task's retries: red, and not "every site unprovisioned"
        get_run_logger().error("fleet health unknown: %s", exc)
        return Failed(message=f"fleet health unknown: {exc}"[:2000], data=exc)
    stale = fleet.cloud.stale_after_s
    rows = view.health
    create_table_artifact(key="fleet-health", table=[r.row() for r in rows],
                          description=f"latest heartbeat per site; stale after {stale:.0f} s")
    published = publish_histories(view)
    create_markdown_artifact(key=fleetview.FLEET_KEY, markdown=fleetview.markdown(view, stale, ui_url(), published),
                             description="the fleet view: a row per site (serving, base, since, evidence, history)")
    line = health.summary(rows)
    logger = get_run_logger()
    if view.history_error:
        logger.warning("site histories not updated: %s", view.history_error)
    if view.not_ok:  # red, one line naming each site not ok, no engine traceback; calling the flow raises it
        logger.error("fleet unhealthy: %s", line)
        return Failed(message=f"fleet unhealthy: {line}"[:2000], data=FleetUnhealthy(line))
    logger.info("fleet health: %s", line)
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
    except StoreError as exc:
        print(f"fleet health unknown: {exc}")
        return 1
    print(health.summary([health.SiteHealth(**r) for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
