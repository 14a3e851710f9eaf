"""``edgeloop fleet status``: the fleet view on the command line, the same rows as the ``fleet`` artifact."""

from __future__ import annotations

import argparse
import json


def add_commands(sub: argparse._SubParsersAction) -> None:
    fleet = sub.add_parser("fleet", help="the fleet: what serves where, since when, on what evidence").add_subparsers(
        dest="fleet_command", required=True)
    status = fleet.add_parser("status", help="one row per site from its latest heartbeat and its history; exit 1 "
                                             "when any site is not ok")
    status.add_argument("-i", "--inventory", required=True)
    status.add_argument("--json", action="store_true", help="the rows as JSON (one object per site)")
    status.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    """Reads only (the fleet-health flow is what appends to the histories): exit 0 when every site is ok."""
    from orchestrator import fleetview
    from orchestrator.inventory import load_inventory

    fleet = load_inventory(args.inventory)
    view = fleetview.look(fleet.store(), fleet.names(), fleet.cloud.stale_after_s)
    if args.json:
        print(json.dumps([r.row() for r in view.rows], indent=1))
    else:
        ok = len(view.rows) - len(view.not_ok)
        print(f"{ok} of {len(view.rows)} sites ok (stale after {fleet.cloud.stale_after_s:.0f} s, by the cloud's clock)")
        print(fleetview.table(view.rows))
        if view.history_error:
            print(f"histories not read: {view.history_error}")
    return 1 if view.not_ok else 0
