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
    out.set_defaults(func=_rollout)
    back = sub.add_parser("rollback", help="undo the deploy of a version: every site that got it serves exactly "
                                           "what served before, and the version is set aside")
    back.add_argument("-i", "--inventory", required=True)
    back.add_argument("--version", required=True, help="the version to roll back (sites that never got it are "
                                                        "not touched)")
    back.add_argument("--limit", default="", help="comma-separated sites (default: all)")
    back.add_argument("--verify-timeout-s", type=float, default=120.0,
                      help="wait this long for each changed site's next heartbeat to show the rollback (0: don't)")
    back.set_defaults(func=_rollback)


def _sites(limit: str) -> list[str] | None:
    return [s for s in limit.split(",") if s] or None


def _rollout(args: argparse.Namespace) -> int:
    from flows.rollout import RolloutHalted, RolloutRequest, rollout

    try:
        summary = rollout(args.inventory, RolloutRequest(version=args.version, family=args.family,
                                                         limit=_sites(args.limit)))
    except RolloutHalted as exc:
        print(f"rollout stopped: {exc}")
        return 1
    print(f"rolled out {summary['version']}: canaries {summary['canaries']}, rest {summary['rest']}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    """Exit 0 when every site that got the version serves again what it served before (checked by its next
    heartbeat); 1 when a site failed, refused or did not confirm; 2 when the version is unknown."""
    from orchestrator.health import FleetStatus
    from orchestrator.inventory import load_inventory
    from orchestrator.registry import RegistryError
    from orchestrator.rollout import rollback_site

    fleet = load_inventory(args.inventory)
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
    started, failed, expect = time.time(), 0, {}
    for site in sites:
        try:
            done = rollback_site(fleet, site.name, args.version)
        except Exception as exc:  # one site's failure or refusal is its own
            failed += 1
            print(f"{site.name}: failed ({fleet.mask(str(exc))})")
            continue
        serving = done.get("serving") or "nothing"
        if done.get("never_got"):
            print(f"{site.name}: ok (never got {args.version}; not touched; serving {serving})")
            continue
        print(f"{site.name}: changed ({', '.join(done['changed'])}; serving {serving})" if done["changed"]
              else f"{site.name}: ok (already rolled back; serving {serving})")
        if done["changed"]:
            expect[site.name] = done.get("serving")
    if expect and args.verify_timeout_s > 0:
        failed += _verify(reader, expect, args.version, started, args.verify_timeout_s)
    return 1 if failed else 0


def _verify(reader, expect: dict[str, str | None], version: str, since: float, timeout_s: float) -> int:
    """Wait for each site's next heartbeat (written after ``since`` by the store's clock) to show the
    rollback; prints one line per site and returns how many did not confirm."""
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
