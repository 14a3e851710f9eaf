"""``edgeloop rollout`` and ``edgeloop rollback``: a version to the fleet in canary waves, or back."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    out = sub.add_parser("rollout", help="deploy a registry version: canaries first, then the rest")
    out.add_argument("-i", "--inventory", required=True)
    out.add_argument("--version", help="registry version (default: the family's champion)")
    out.add_argument("--family", default="elpv-defects")
    out.add_argument("--limit", default="", help="comma-separated sites (default: all)")
    out.set_defaults(func=_rollout)
    back = sub.add_parser("rollback", help="set a site's newest base aside and serve its previous ensemble")
    back.add_argument("-i", "--inventory", required=True)
    back.add_argument("--limit", default="", help="comma-separated sites (default: all)")
    back.add_argument("--version", help="the base version to set aside (default: each site's newest)")
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
    from orchestrator.inventory import load_inventory
    from orchestrator.rollout import rollback_site

    fleet = load_inventory(args.inventory)
    failed = 0
    for site in fleet.select(_sites(args.limit)):
        try:
            done = rollback_site(fleet, site.name, args.version)
            print(f"{site.name}: changed ({', '.join(done['changed'])}; set aside {done['version']}, "
                  f"serving {done['active'] or 'what it served'})" if done["changed"] else f"{site.name}: ok")
        except Exception as exc:  # one site's failure is its own
            failed += 1
            print(f"{site.name}: failed ({fleet.mask(str(exc))})")
    return 1 if failed else 0
