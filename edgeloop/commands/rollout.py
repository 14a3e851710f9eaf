"""``edgeloop rollout`` and ``edgeloop rollback``: a version to the fleet in canary waves, or back."""

from __future__ import annotations

import argparse
import time


def add_commands(sub: argparse._SubParsersAction) -> None:
    out = sub.add_parser("rollout", help="deploy a registry version: canaries first, then the rest")
    out.add_argument("-i", "--inventory", required=True)
    out.add_argument("--version", help="registry version (default: the family's champion)")
    out.add_argument("--family", default="elpv-defects")
    out.add_argument("--limit", default="", help="comma-separated sites (default: all)")
    out.add_argument("--override", help="the reason to deploy a version that was rolled back (recorded)")
    out.set_defaults(func=_rollout)
    back = sub.add_parser("rollback", help="undo the deploy of a version: every site that got it serves exactly "
                                           "what served before, and the version is set aside")
    back.add_argument("-i", "--inventory", required=True)
    back.add_argument("--version", required=True, help="the version to roll back (sites that never got it are "
                                                        "not touched)")
    back.add_argument("--limit", default="", help="comma-separated sites (default: all)")
    back.add_argument("--reason", default="operator's rollback", help="why, for the version's registry record")
    back.add_argument("--verify-timeout-s", type=float, default=120.0,
                      help="wait this long for each changed site's next heartbeat to show the rollback (0: don't)")
    back.set_defaults(func=_rollback)


def _sites(limit: str) -> list[str] | None:
    return [s for s in limit.split(",") if s] or None


def _rollout(args: argparse.Namespace) -> int:
    from flows.rollout import RolloutHalted, RolloutRequest, rollout

    from orchestrator.lease import LeaseHeld
    from orchestrator.registry import RegistryError

    try:
        summary = rollout(args.inventory, RolloutRequest(version=args.version, family=args.family,
                                                         limit=_sites(args.limit), override=args.override))
    except RolloutHalted as exc:
        print(f"rollout stopped: {exc}")
        return 1
    except (LeaseHeld, RegistryError) as exc:
        print(f"rollout refused, nothing changed: {exc}")
        return 2
    print(f"rolled out {summary['version']}: canaries {summary['canaries']}, rest {summary['rest']}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    """Exit 0 when every site that got the version serves again what it served before (checked by its next
    heartbeat); 1 when a site failed (after retries), refused or did not confirm; 2 when the version is
    unknown or another rollout or rollback holds the fleet. The version is marked rolled back in the registry
    with the sites that still serve it."""
    from orchestrator.inventory import load_inventory
    from orchestrator.lease import Lease, LeaseHeld
    from orchestrator.registry import operator

    fleet = load_inventory(args.inventory)
    try:
        with Lease(fleet.store(), f"rollback of {args.version} by {operator()}", fleet.rollout.lease_s):
            return _rollback_held(fleet, args)
    except LeaseHeld as exc:
        print(f"rollback refused, nothing changed: {exc}")
        return 2


def _rollback_held(fleet, args: argparse.Namespace) -> int:
    from orchestrator.health import FleetStatus
    from orchestrator.registry import RegistryError
    from orchestrator.rollout import rollback_with_retries

    sites = fleet.select(_sites(args.limit))
    reader = FleetStatus(fleet.store())
    if fleet.cloud.registry:
        try:
            fleet.registry().get(args.version)
        except RegistryError as exc:
            serving = reader.read([s.name for s in sites])
            print(f"rollback refused, nothing changed: {exc}")
            for site in sites:
                print(f"{site.name}: serving {(serving.get(site.name) or {}).get('active_version') or 'unknown'}")
            return 2
    started, failed, expect, still = time.time(), 0, {}, []
    for site in sites:
        outcome = rollback_with_retries(fleet, site.name, args.version)
        if outcome.still_serving:  # one site's failure or refusal is its own
            failed += 1
            still.append(site.name)
            print(f"{site.name}: failed ({outcome.text}); it may still serve {args.version}")
            continue
        if outcome.state == "never got it":
            print(f"{site.name}: ok (never got {args.version}; not touched)")
            continue
        changed, _, serving = outcome.text.partition("; serving ")
        serving = serving.split(" (attempt")[0]
        print(f"{site.name}: changed ({changed}; serving {serving})" if changed != "nothing to undo"
              else f"{site.name}: ok (already rolled back; serving {serving})")
        if changed != "nothing to undo":
            expect[site.name] = None if serving == "nothing" else serving
    if fleet.cloud.registry:
        fleet.registry().mark_rolled_back(args.version, args.reason, still)
    if expect and args.verify_timeout_s > 0:
        failed += _verify(reader, expect, args.version, started, args.verify_timeout_s)
    return 1 if failed else 0


def _verify(reader, expect: dict[str, str | None], version: str, since: float, timeout_s: float) -> int:
    """Wait for each site's next heartbeat (one the cloud saw change after ``since``, by its own clock) to show
    the rollback; prints one line per site and returns how many did not confirm."""
    from orchestrator.rollout import rolled_back

    deadline, pending = time.monotonic() + timeout_s, dict(expect)
    while pending and time.monotonic() < deadline:
        status, now = reader.read(list(pending)), time.time()
        for site in list(pending):
            age = reader.age(site, now)
            if age is not None and now - age >= since and rolled_back(status.get(site), version, pending[site]):
                print(f"{site}: verified by its heartbeat (serving {pending.pop(site) or 'nothing'})")
        time.sleep(1.0 if pending else 0)
    for site, serving in pending.items():
        print(f"{site}: not verified: no heartbeat showing {serving or 'nothing'} serving within {timeout_s:.0f} s")
    return len(pending)
