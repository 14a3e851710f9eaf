"""The ``provision`` flow: provision every site of an inventory, one task per site, results as a table.

Thin on purpose: the steps live in :mod:`orchestrator.provision`. The flow adds what Prefect is good
at: a task run per host in the UI, retries with backoff when a host could not be *reached* (a reboot, a
flaky link), no retry when its host key was refused (retrying cannot make a wrong key right), and a
table artifact of per-host, per-step results.

Run it: ``python -m flows.provision -i inventory/lab.yaml [--limit a,b] [--check] [--accept-new-host-keys]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from orchestrator.inventory import load_inventory
from orchestrator.provision import (FAILED, SKIPPED, STEPS, HostResult, RunReport, StepResult, Wheel, build_wheel,
                                    provision_site)


class HostUnreachable(Exception):
    """The host could not be reached; raised so that Prefect retries the task."""


def retry_when_unreachable(task, task_run, state) -> bool:
    """Retry only connection failures: a refused host key or a failed step fails at once."""
    try:
        state.result()
    except HostUnreachable:
        return True
    except Exception:
        return False
    return False


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.2,
      retry_condition_fn=retry_when_unreachable, cache_policy=NO_CACHE, task_run_name="provision-{site}")
def provision_host(inventory_path: str, site: str, wheel_path: str, wheel_sha256: str, check: bool,
                   accept_new_host_keys: bool) -> HostResult:
    """Provision one site; raises :class:`HostUnreachable` (retried) when it cannot be reached."""
    inventory = load_inventory(inventory_path)
    result = provision_site(inventory.site(site), inventory, Wheel(Path(wheel_path), wheel_sha256), check,
                            accept_new_host_keys)
    if result.error_kind == "connect":
        raise HostUnreachable(result.reason)
    return result


def _unreachable(site: str, reason: str) -> HostResult:
    steps = [StepResult("connect", FAILED, reason)] + [StepResult(s, SKIPPED, "host unreachable") for s in STEPS[1:]]
    return HostResult(site, steps, error_kind="connect")


@flow(name="provision", task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def provision_flow(inventory: str, limit: list[str] | None = None, check: bool = False,
                   accept_new_host_keys: bool = False, retry_delays_s: list[float] | None = None) -> dict:
    """Provision the inventory's sites (all, or those in ``limit``); ``check`` changes nothing.

    Returns a summary (per-host status and reason); hosts that failed do not fail the flow: the
    fleet goes on without them and the summary and artifact say which failed and why.
    """
    logger = get_run_logger()
    inv = load_inventory(inventory)
    sites = inv.select(limit)
    wheel = build_wheel()
    task_fn = provision_host if retry_delays_s is None else \
        provision_host.with_options(retries=len(retry_delays_s), retry_delay_seconds=retry_delays_s)
    futures = [task_fn.submit(inventory, site.name, str(wheel.path), wheel.sha256, check, accept_new_host_keys)
               for site in sites]
    hosts = []
    for site, future in zip(sites, futures):
        future.wait()
        if future.state.is_completed():
            hosts.append(future.result())
        else:
            try:
                future.result()
                reason = "task failed"
            except Exception as exc:  # the last retry's error, already masked
                reason = str(exc).removeprefix("connect: ")
            hosts.append(_unreachable(site.name, reason))
    report = RunReport(hosts, check=check)
    create_table_artifact(key="provision-results", table=report.rows(),
                          description=f"Per-host, per-step provisioning results for {inventory}"
                                      + (" (check mode)" if check else ""))
    create_markdown_artifact(key="provision-recap", markdown=f"```\n{report.recap()}\n```",
                             description="Provisioning recap")
    logger.info("%s", report.recap())
    return {"check": check, "changed": report.changed, "failed": [h.site for h in report.failed],
            "hosts": {h.site: {"status": h.status, "reason": h.reason, "changed": h.changed} for h in hosts}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.provision", description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--inventory", required=True)
    parser.add_argument("--limit", default="")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--accept-new-host-keys", action="store_true")
    args = parser.parse_args(argv)
    inv = load_inventory(args.inventory)
    runner = ThreadPoolTaskRunner(max_workers=inv.ssh.concurrency)  # the inventory's limit on hosts at once
    summary = provision_flow.with_options(task_runner=runner)(
        args.inventory, [s for s in args.limit.split(",") if s] or None, args.check, args.accept_new_host_keys)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
