"""``edgeloop-agent``: run the daemon, print its state, or run one fine-tune.

Only the edge's own packages are imported here (never prefect or fabric): an edge host installs the
``[edge]`` extra and nothing else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from logging.handlers import RotatingFileHandler
from pathlib import Path

from edge_agent.config import AgentConfig, ConfigError, load_config
from edge_agent.fileio import read_json
from edge_agent.layout import AgentPaths
from edge_agent.state import AgentState

LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"


def setup_logging(paths: AgentPaths, verbose: bool = False, console: bool = True,
                  max_bytes: int | None = None) -> None:
    """Log to ``agent.log``, rotated past ``max_bytes`` (and stderr unless stderr already goes to that log,
    as for a daemon's child)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [RotatingFileHandler(paths.log_file, maxBytes=max_bytes or 0, backupCount=2)]
    if console:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, handlers=handlers,
                        force=True)


def _load(args: argparse.Namespace) -> AgentConfig:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise SystemExit(f"edgeloop-agent: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.daemon import Agent, install_signal_handlers

    config = _load(args)
    paths = AgentPaths(Path(config.root))
    paths.ensure()
    setup_logging(paths, args.verbose, max_bytes=config.retention.log_max_bytes)
    agent = Agent(config, Path(args.config))
    install_signal_handlers(agent.stop)
    return agent.run()


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    paths = AgentPaths(Path(config.root))
    state = AgentState.load(paths.state_file).model_dump(mode="json", exclude={"labelled_seen"})
    print(json.dumps({"status": read_json(paths.status_file), "state": state}, indent=2, sort_keys=True))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from edge_agent.finetune import run_finetune_process

    config = _load(args)
    if config.profile != "edge":
        raise SystemExit(f"edgeloop-agent: fine-tune is off (profile {config.profile}): this site serves the "
                         f"models the cloud deploys as they come")
    paths = AgentPaths(Path(config.root))
    paths.ensure()
    setup_logging(paths, args.verbose, console=args.parent_pid is None)
    return run_finetune_process(config, paths, run_id=args.run_id, reason=args.reason, parent_pid=args.parent_pid)


def cmd_check_ensemble(args: argparse.Namespace) -> int:
    """Exit 0 when ``models/ensembles/<name>`` would serve at this site; else say why on stderr and exit 1."""
    from edge_agent.serving import ENSEMBLE_FILE, validate_ensemble

    config = _load(args)
    folder = AgentPaths(Path(config.root)).ensembles / args.name
    try:
        validate_ensemble(folder / ENSEMBLE_FILE, config.image_size)
    except ValueError as exc:
        print(f"ensemble {args.name}: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeloop-agent", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("run", cmd_run, "run the daemon until SIGTERM"),
                             ("status", cmd_status, "print the agent's status and state"),
                             ("finetune", cmd_finetune, "run one fine-tune now and exit"),
                             ("check-ensemble", cmd_check_ensemble, "exit 0 when a published ensemble would serve")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, type=Path, help="the agent's config file (agent.yaml)")
        p.add_argument("-v", "--verbose", action="store_true")
        p.set_defaults(func=func)
        if name == "check-ensemble":
            p.add_argument("name", help="the ensemble's version (its folder under models/ensembles)")
        if name == "finetune":
            p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
            p.add_argument("--reason", default="manual", help=argparse.SUPPRESS)
            p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
