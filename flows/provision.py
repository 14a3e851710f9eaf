"""The ``provision`` flow: provision every site of an inventory, one task per site, results as a table.

Thin on purpose: the steps, and the retry policy for hosts that could not be reached, live in
:mod:`orchestrator.provision` (the CLI and the demo run the same driver). The flow adds what Prefect is
good at: a task run per host in the UI and a table artifact of per-host, per-step results.

Run it: ``python -m flows.provision -i inventory/lab.yaml [--limit a,b] [--check] [--accept-new-host-keys]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runs import StageFailed, finish, run_name, tag_run
from orchestrator.inventory import Inventory, load_inventory
from orchestrator.progress import Progress, size_text
from orchestrator.provision import (
    DEFAULT_RETRY_DELAYS_S,
    HostResult,
    RunReport,
    Wheel,
    build_wheel,
    provision_host,
)
from orchestrator.provision.report import shown


@task(cache_policy=NO_CACHE, task_run_name="provision-{site}")
def provision_site_task(inventory: Inventory, site: str, wheel: Wheel, check: bool, accept_new_host_keys: bool,
                        retry_delays_s: tuple[float, ...]) -> HostResult:
    """Provision one site (unreachable hosts are tried again by the driver); never raises for a host problem."""
    result = provision_host(inventory.site(site), inventory, wheel, check, accept_new_host_keys, retry_delays_s)
    get_run_logger().info("%s: %s after %d attempt(s) %s", site, shown(result.status, check), result.attempts,
                          result.reason)
    return result


def publish(report: RunReport, title: str) -> None:
    """The table (one row per host and step) and the recap, as artifacts of the running flow."""
    create_table_artifact(key="provision-results", table=report.rows(),
                          description=f"Per-host, per-step provisioning results for {title}")
    create_markdown_artifact(key="provision-recap", markdown=f"```\n{report.recap()}\n```",
                             description="Provisioning recap")


@flow(name="provision", task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True,
      flow_run_name=run_name("provision", ("inventory", None, "", lambda p: Path(str(p)).stem),
                             ("check", None, False, lambda check: "check" if check else "")))
def provision_flow(inventory: str, limit: list[str] = [], check: bool = False,  # noqa: B006 - the form's default
                   accept_new_host_keys: bool = False,
                   retry_delays_s: list[float] = list(DEFAULT_RETRY_DELAYS_S)) -> dict:
    """Provision the inventory's sites (all, or those in ``limit``); ``check`` changes nothing.

    Every host is tried (one host's failure never stops the others); the run ends Failed (red), naming the
    hosts that failed and why, when any did. Its result (the summary: per-host status and reason) is the
    Failed state's ``StageFailed.summary``; calling the flow raises that ``StageFailed``.

    Args:
        inventory: path of the fleet's inventory YAML (sites, connections, agent settings) where the flow runs
        limit: only these sites (empty: every site in the inventory)
        check: connect and report what would change, changing nothing
        accept_new_host_keys: trust and record host keys seen for the first time (else they are refused)
        retry_delays_s: seconds to wait before each new try of a host that did not answer
    """
    return finish(_provision, inventory, limit, check, accept_new_host_keys, retry_delays_s)


def _provision(inventory: str, limit: list[str] | None, check: bool, accept_new_host_keys: bool,
               retry_delays_s: list[float]) -> dict:
    tag_run("provision", None, "check" if check else "apply")
    inv = load_inventory(inventory)
    limit = limit or None
    wheel = build_wheel()
    futures = [provision_site_task.submit(inv, site.name, wheel, check, accept_new_host_keys, tuple(retry_delays_s))
               for site in inv.select(limit)]
    with Progress(len(futures), "hosts", "provisioning", key="provision-progress") as progress:
        shipped = 0
        for future in as_completed(futures):  # hosts done of N (and the bytes they shipped) as each ends
            shipped += future.result().shipped_bytes
            progress.advance(detail=f"{size_text(shipped)} shipped")
    report = RunReport([future.result() for future in futures], check=check)
    publish(report, inventory + (" (check mode)" if check else ""))
    get_run_logger().info("%s", report.recap())
    summary = {"check": check, "changed": report.changed, "failed": [h.site for h in report.failed],
               "hosts": {h.site: {"status": h.status, "reason": h.reason, "changed": h.changed,
                                  "attempts": h.attempts} for h in report.hosts}}
    if report.failed:  # red in the run list, naming each host and why (the others were provisioned all the same)
        raise StageFailed(f"{len(report.failed)} of {len(report.hosts)} host(s) failed: " + "; ".join(
            f"{h.site}: {' '.join(h.reason.split())[:200]}" for h in report.failed), summary)
    return summary


def summary_of(state) -> dict:
    """A finished provision run's summary, whether the run completed or failed on some hosts (an error that
    stopped the whole run is raised)."""
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, StageFailed):
        return outcome.summary
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.provision", description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--inventory", required=True)
    parser.add_argument("--limit", default="")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--accept-new-host-keys", action="store_true")
    args = parser.parse_args(argv)
    inv = load_inventory(args.inventory)
    runner = ThreadPoolTaskRunner(max_workers=inv.ssh.concurrency)  # the inventory's limit on hosts at once
    state = provision_flow.with_options(task_runner=runner)(
        args.inventory, [s for s in args.limit.split(",") if s], args.check, args.accept_new_host_keys,
        return_state=True)
    return 1 if summary_of(state)["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
