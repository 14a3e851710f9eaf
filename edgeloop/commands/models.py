"""``edgeloop models list | show | lineage``: the registry's model versions (working sets)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.registry import ModelRegistry, RegistryError, table


def add_commands(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="model versions in the registry").add_subparsers(
        dest="models_command", required=True)
    listing = models.add_parser("list", help="every version with its stage, data and metrics")
    listing.add_argument("--family", help="only this model family")
    show = models.add_parser("show", help="one version's full record (data, hyperparameters, artifacts)")
    show.add_argument("version")
    lineage = models.add_parser("lineage", help="which data and which parent made a version, back to the start")
    lineage.add_argument("version")
    for parser in (listing, show, lineage):
        parser.add_argument("--registry", required=True, help="registry folder (the inventory's cloud.registry)")
    listing.set_defaults(func=_list)
    show.set_defaults(func=_show)
    lineage.set_defaults(func=_lineage)


def _print_rows(rows: list[dict]) -> None:
    if not rows:
        print("(no model versions)")
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def _registry(args: argparse.Namespace) -> ModelRegistry:
    """The registry the user named; one that does not exist is an error, not an empty list."""
    if not Path(args.registry).is_dir():  # (opening one creates it: a typo must not make a new, empty one)
        raise RegistryError(f"no registry at {args.registry} (the inventory's cloud.registry)")
    return ModelRegistry(args.registry)


def _list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    _print_rows(table(list(registry.versions(args.family))))
    for name, why in registry.skipped.items():
        print(f"skipped {registry.root / name}: not a model version ({why})", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    print(json.dumps(_registry(args).get(args.version).model_dump(), indent=1))
    return 0


def _lineage(args: argparse.Namespace) -> int:
    _print_rows(table(_registry(args).lineage(args.version)))
    return 0
