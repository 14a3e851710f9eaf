"""``edgeloop inventory check FILE``: validate an inventory and print its sites (secrets masked);
``edgeloop inventory policy FILE``: what each site's own store credentials may touch."""

from __future__ import annotations

import argparse


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inventory", help="inventory files (sites, connections, learning settings)")
    sub = parser.add_subparsers(dest="inventory_command", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="validate an inventory and print its sites")
    check.add_argument("file", help="inventory YAML, e.g. inventory/local.yaml")
    check.set_defaults(func=check_command)
    policy = sub.add_parser("policy", help="each site's store access: its paths, and on s3:// the IAM policy to "
                                           "attach to that site's own credentials")
    policy.add_argument("file", help="inventory YAML")
    policy.add_argument("--site", help="one site (default: all)")
    policy.set_defaults(func=policy_command)


def site_table(inventory) -> str:
    """One line per site: name, connection, root, python, install (mode/profile), members, labels (env-var
    values shown as ${VAR})."""
    rows = [("SITE", "CONNECTION", "ROOT", "PYTHON", "INSTALL", "MEMBERS", "LABELS")]
    for site in inventory.sites:
        members = ",".join(f"{m.arch}/{m.policy}" for m in site.learning.members)
        labels = ",".join(f"{k}={v}" for k, v in site.labels.items()) or "-"
        rows.append(tuple(inventory.mask(cell) for cell in
                          (site.name, site.connection.describe(), site.root, site.python,
                           f"{site.install_mode}/{site.install.profile}", members, labels)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
    return text


def check_command(args: argparse.Namespace) -> int:
    from orchestrator.inventory import load_inventory

    inventory = load_inventory(args.file)  # InventoryError is a ValueError: the CLI prints it, no traceback
    print(site_table(inventory))
    for trainer in inventory.cloud.trainers:
        conn = trainer.connection
        print(f"trainer {trainer.name}: ssh {conn.user or ''}@{conn.host}:{conn.port}, {trainer.nproc_per_node} "
              f"rank(s), {trainer.python}, runs in {trainer.workdir}")
    print(inventory.mask(f"{len(inventory.sites)} site(s) OK in {args.file}; store {inventory.cloud.store_url}; "
                         f"known_hosts {inventory.known_hosts}"))
    return 0


def policy_command(args: argparse.Namespace) -> int:
    import json

    from edge_agent.store import is_s3
    from orchestrator.inventory import load_inventory
    from orchestrator.storepolicy import site_paths, site_s3_policy

    inventory = load_inventory(args.file)
    sites = [inventory.site(args.site)] if args.site else inventory.sites
    for site in sites:
        url = site.store_url or inventory.cloud.store_url
        paths = site_paths(site.name)
        print(f"# {site.name}: writes {', '.join(paths['write'])}; reads also labels/{site.name}.json "
              f"(store {inventory.mask(url)})")
        if is_s3(url):
            print(json.dumps(site_s3_policy(url, site.name), indent=1))
    return 0
