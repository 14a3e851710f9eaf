"""``edgeloop label``: the labelling queue as a local web page, or exported to / imported from Label Studio."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("label", help="label the samples the sites sent (web page, or Label Studio files)")
    parser.add_argument("-i", "--inventory", required=True, help="the fleet's inventory (its store and registry)")
    parser.add_argument("--classes", help="comma-separated class names (default: the champion model's)")
    parser.add_argument("--family", default="elpv-defects", help="model family whose champion names the classes")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (off loopback a token is "
                                                            "required)")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a Host name the page answers under besides the --host address (repeatable)")
    parser.add_argument("--token-env", default="EDGELOOP_LABEL_TOKEN", metavar="VAR",
                        help="environment variable holding the page's token (required off loopback)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--export", type=Path, metavar="FILE", help="write the pending samples as Label Studio tasks")
    what.add_argument("--import", dest="import_", type=Path, metavar="FILE",
                      help="take the labels from a Label Studio JSON export")
    parser.set_defaults(func=_label)


def _label(args: argparse.Namespace) -> int:
    from orchestrator.inventory import load_inventory
    from orchestrator.labelling import CheckedSamples, LabelQueue, label_studio_config

    fleet = load_inventory(args.inventory)
    registry = fleet.registry()  # the labels live beside it
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else \
        registry.champion_classes(args.family)
    queue = LabelQueue(registry.root, classes)
    samples = CheckedSamples(fleet.store(), registry.root)

    if args.export:
        print(f"wrote {queue.export_label_studio(samples(), args.export)} tasks to {args.export}; labelling "
              f"interface for the project:\n{label_studio_config(queue.classes)}")
        return 0
    if args.import_:
        known = {s.sha256 for s in samples()}  # labels only for samples the store holds
        print(f"took {queue.import_label_studio(args.import_, known)} labels from {args.import_}")
        return 0
    import os

    import uvicorn

    from orchestrator.labelpage import create_app, is_loopback

    token = os.environ.get(args.token_env) or None
    if not is_loopback(args.host) and not token:
        raise ValueError(f"--host {args.host} is off loopback: set a token in ${args.token_env} (anyone who can "
                         "reach the page could otherwise label the fleet's training data)")
    hosts = ["127.0.0.1", "localhost", "::1", args.host, *args.allow_host]
    print(f"labelling queue on http://{args.host}:{args.port}/{'?token=...' if token else ''} (Ctrl-C to stop)",
          flush=True)
    uvicorn.run(create_app(queue, samples, hosts=hosts, token=token), host=args.host, port=args.port,
                log_level="warning")
    return 0
