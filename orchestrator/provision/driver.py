"""Provisioning a fleet: every selected site at once (up to a limit), each host failing alone.

The one driver, used by the CLI, the demo and the ``provision`` flow: a host that could not be *reached*
(a reboot, a flaky link) is tried again with backoff; a refused host key or a failed step is not
(retrying cannot make a wrong key right).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

from orchestrator.inventory import Inventory, Site
from orchestrator.provision.remote import Remote, open_remote
from orchestrator.provision.report import FAILED, OK, SKIPPED, STEPS, HostResult, RunReport, StepResult
from orchestrator.provision.steps import SiteProvisioner
from orchestrator.provision.wheel import Wheel, build_wheel


def _connect(site: Site, inventory: Inventory, accept_new_host_keys: bool, result: HostResult) -> Remote | None:
    """Open the transport and record the connect step; on failure also record why (that decides retries)."""
    from orchestrator.ssh import ConnectError, HostKeyRefused

    t0 = time.monotonic()
    try:
        remote = open_remote(site, inventory, accept_new_host_keys)
    except HostKeyRefused as exc:
        result.error_kind, message = "hostkey", str(exc)
    except ConnectError as exc:
        result.error_kind, message = "connect", str(exc)
    except Exception as exc:  # noqa: BLE001 -- anything else about this host (a bad key file): this host only
        result.error_kind, message = "step", f"{type(exc).__name__}: {exc}"
    else:
        result.steps.append(StepResult("connect", OK, inventory.mask(site.connection.describe()),
                                       time.monotonic() - t0))
        return remote
    result.steps.append(StepResult("connect", FAILED, inventory.mask(message), time.monotonic() - t0))
    return None


def provision_site(site: Site, inventory: Inventory, wheel: Wheel, check: bool = False,
                   accept_new_host_keys: bool = False, on_step: Callable[[str, str], None] | None = None) -> HostResult:
    """Provision one site once; never raises for a host problem, the result says what failed and why."""
    result = HostResult(site.name)
    start = time.monotonic()
    try:
        if on_step:
            on_step(site.name, "connect")
        remote = _connect(site, inventory, accept_new_host_keys, result)
        if remote is None:
            return result
        try:
            SiteProvisioner(site, inventory, remote, wheel, check, result).run(on_step)
        finally:
            remote.close()
        if result.failed:
            result.error_kind = "step"
        return result
    finally:
        result.seconds = time.monotonic() - start
        done = {s.step for s in result.steps}
        result.steps += [StepResult(name, SKIPPED, "an earlier step failed") for name in STEPS if name not in done]


DEFAULT_RETRY_DELAYS_S = (2.0, 4.0, 8.0)


def provision_host(site: Site, inventory: Inventory, wheel: Wheel, check: bool = False,
                   accept_new_host_keys: bool = False, retry_delays_s: tuple[float, ...] = DEFAULT_RETRY_DELAYS_S,
                   on_step: Callable[[str, str], None] | None = None,
                   sleep: Callable[[float], None] = time.sleep) -> HostResult:
    """Provision one site, trying an unreachable host again after each delay in ``retry_delays_s``."""
    result = provision_site(site, inventory, wheel, check, accept_new_host_keys, on_step)
    for attempt, delay in enumerate(retry_delays_s, start=2):
        if result.error_kind != "connect":
            break
        sleep(delay)
        result = provision_site(site, inventory, wheel, check, accept_new_host_keys, on_step)
        result.attempts = attempt
    return result


def provision(inventory: Inventory, limit: list[str] | None = None, check: bool = False,
              accept_new_host_keys: bool = False, concurrency: int | None = None, wheel: Wheel | None = None,
              retry_delays_s: tuple[float, ...] = DEFAULT_RETRY_DELAYS_S,
              on_step: Callable[[str, str], None] | None = None,
              on_host: Callable[[HostResult], None] | None = None) -> RunReport:
    """Provision the selected sites, ``concurrency`` at once (default: the inventory's ``ssh.concurrency``);
    ``on_host`` hears each host's result as it ends (progress: hosts done of N)."""
    sites = inventory.select(limit)
    wheel = wheel or build_wheel()
    workers = max(1, min(concurrency or inventory.ssh.concurrency, len(sites)))
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="provision") as pool:
        futures = [pool.submit(provision_host, site, inventory, wheel, check, accept_new_host_keys, retry_delays_s,
                               on_step) for site in sites]
        for future in as_completed(futures) if on_host else ():
            on_host(future.result())
        hosts = [f.result() for f in futures]
    return RunReport(hosts, check=check, seconds=time.monotonic() - start)
