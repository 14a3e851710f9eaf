"""``edgeloop``: the cloud-side command line.

Each command group lives in its own module with an ``add_commands(subparsers)`` function; this module
only wires them together, so that ``edgeloop --help`` stays fast (heavy imports happen inside commands).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Modules that contribute commands, in the order they appear in --help.
COMMAND_MODULES = (
    "edgeloop.commands.data",
    "edgeloop.commands.modelfiles",
    "edgeloop.commands.tune",
    "edgeloop.commands.stages",
    "edgeloop.commands.models",
    "edgeloop.commands.inventory",
    "edgeloop.commands.provision",
    "edgeloop.commands.label",
    "edgeloop.commands.rollout",
    "edgeloop.commands.fleet",
    "edgeloop.commands.serve",
    "edgeloop.commands.demo",
)


# Libraries that log every optimisation pass at INFO; their news is not the user's.
QUIET_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "root", "httpx", "paramiko")


class UserError(Exception):
    """A problem the user can fix (bad input, missing file); printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree: each module in :data:`COMMAND_MODULES` adds its own subcommands."""
    parser = argparse.ArgumentParser(prog="edgeloop", description="edgeloop: cloud-edge DNN lifecycle orchestrator")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


# Prefect settings every command starts with unless the environment says otherwise: offline (no telemetry,
# no phoning home from the ephemeral server), and time for the ephemeral API's first start, which migrates
# its database (20 s is short on a busy 2-core box).
PREFECT_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def main(argv: list[str] | None = None) -> int:
    """Run one command; problems the user can fix print one line and exit 2 (no traceback)."""
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from edge_agent.store import StoreError  # a store that is down or refuses us: one line naming it

    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, LookupError, ValueError, StoreError) as exc:
        print(f"edgeloop {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`edgeloop models show V | head`): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        return 0

