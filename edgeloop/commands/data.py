"""``edgeloop data import elpv|folder``: turn a source into a dataset version."""

from __future__ import annotations

import argparse
import json

from edge_agent.datasets import ImportReport, import_elpv, import_folder


def add_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="dataset versions").add_subparsers(dest="data_command", required=True)
    imp = data.add_parser("import", help="import a source as a dataset version").add_subparsers(
        dest="source", required=True)

    elpv = imp.add_parser("elpv", help="the bundled ELPV solar-cell images (binary: defective if p >= 0.5)")
    _common(elpv)
    elpv.add_argument("--sites", type=int, default=0, help="carve a generic pool and N private site sets")
    elpv.add_argument("--limit", type=int, default=None, help="use a stratified subset of this many images")
    elpv.set_defaults(func=_import_elpv)

    folder = imp.add_parser("folder", help="a user's ImageFolder tree: SRC/<class>/<image>")
    folder.add_argument("src", help="source folder")
    _common(folder)
    folder.set_defaults(func=_import_folder)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write the dataset version to")
    parser.add_argument("--size", type=int, default=96, help="square image size in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified splits")
    parser.add_argument("--split", default="70/15/15", help="train/val/test percentages")


def _fractions(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.split("/")]
    if len(parts) != 3 or min(parts) < 0 or parts[0] <= 0:
        raise ValueError(f"--split must look like 70/15/15, got {text!r}")
    return parts[0], parts[1], parts[2]


def _print(report: ImportReport) -> int:
    for child in report.children or [report]:
        counts = ", ".join(f"{s}={sum(c.values())}" for s, c in child.counts.items())
        print(f"{child.out}: dataset {child.dataset_id} ({counts})")
    for skip in report.skipped:
        print(f"skipped {skip['file']}: {skip['reason']}")
    print(json.dumps({"dataset_id": report.dataset_id, "skipped": len(report.skipped)}))
    return 0


def _import_elpv(args: argparse.Namespace) -> int:
    return _print(import_elpv(args.out, size=args.size, seed=args.seed, sites=args.sites, limit=args.limit,
                              fractions=_fractions(args.split)))


def _import_folder(args: argparse.Namespace) -> int:
    return _print(import_folder(args.src, args.out, size=args.size, seed=args.seed, fractions=_fractions(args.split)))
