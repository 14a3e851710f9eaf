"""``edgeloop provision -i FILE``: install, configure and start the edge agent on the inventory's sites.

Runs the steps of :mod:`orchestrator.provision` on every selected site at once (up to the inventory's
``ssh.concurrency``) and prints an Ansible-style recap; exits 1 when any host failed. For runs tracked in
the Prefect UI use the flow: ``python -m flows.provision -i FILE``.
"""

from __future__ import annotations

import argparse
import json


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("provision", help="provision edge sites over SSH (agentless, idempotent)")
    parser.add_argument("-i", "--inventory", required=True, help="inventory YAML")
    parser.add_argument("--limit", default="", help="comma-separated site names (default: all)")
    parser.add_argument("--check", action="store_true",
                        help="connect and report what would change (and how many wheels, how many bytes would be "
                             "shipped); change nothing")
    parser.add_argument("--accept-new-host-keys", action="store_true",
                        help="trust unknown host keys on first use and record them (changed keys are always refused)")
    parser.add_argument("--concurrency", type=int, default=None, help="hosts at once (default: the inventory's)")
    parser.add_argument("--json", action="store_true", help="print per-host, per-step results as JSON")
    parser.set_defaults(func=provision_command)


def parse_limit(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def step_table(report) -> str:
    lines = []
    for host in report.hosts:
        for step in host.steps:
            lines.append(f"{host.site:<16} {step.step:<8} {step.status:<8} {step.message}")
    return "\n".join(lines)


def provision_command(args: argparse.Namespace) -> int:
    from orchestrator.inventory import load_inventory
    from orchestrator.progress import Progress, size_text
    from orchestrator.provision import provision

    inventory = load_inventory(args.inventory)  # InventoryError is a ValueError: printed without traceback
    limit = parse_limit(args.limit)
    with Progress(len(inventory.select(limit)), "hosts", "provisioning") as bar:  # a bar on a terminal
        shipped = [0]

        def host_done(host) -> None:
            shipped[0] += host.shipped_bytes
            bar.advance(detail=f"{size_text(shipped[0])} shipped")

        report = provision(inventory, limit=limit, check=args.check, accept_new_host_keys=args.accept_new_host_keys,
                           concurrency=args.concurrency, on_host=host_done)
    if args.json:
        print(json.dumps({"check": report.check, "seconds": round(report.seconds, 2),
                          "hosts": [h.to_dict() for h in report.hosts]}, indent=2))
    else:
        print(step_table(report))
        print()
        print(report.recap())
    return 1 if report.failed else 0
