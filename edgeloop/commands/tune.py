"""``edgeloop tune``: random search with successive halving; the best trial meets the gate."""

from __future__ import annotations

import argparse
import json
import socket


def add_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("tune", help="random hyperparameter search; the best trial becomes a gated candidate")
    parser.add_argument("--data", required=True, help="dataset version (val chooses the trial, gate decides)")
    parser.add_argument("--trials", type=int, default=8, help="random draws from the search space (default 8)")
    parser.add_argument("--dask", metavar="ADDRESS", help="run the trials on this Dask scheduler (tcp://HOST:PORT)")
    parser.add_argument("-i", "--inventory", default="inventory/local.yaml", help="whose registry gets the candidate")
    parser.add_argument("--family", default="elpv-defects", help="registry name of the model being improved")
    parser.add_argument("--arch", action="append", help="architectures to search (repeat; default: the champion's, "
                                                         "which the fleet fine-tunes from; all three without one)")
    parser.add_argument("--allow-contract-change", action="store_true",
                        help="let a winner of another architecture or input size replace the champion")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once on this host (1..64), each in a "
                                                                    "process of its own")
    parser.add_argument("--trial-memory-mb", type=int, metavar="MB",
                        help="memory one trial may hold; over it the trial is killed and recorded failed (default: "
                             "80%% of this host's memory shared by the trials at once)")
    parser.add_argument("--min-epochs", type=int, default=1, help="epochs of the first rung (every trial)")
    parser.add_argument("--max-epochs", type=int, default=8, help="epochs of the longest rung")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_tune)


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """A clear error, at once, for a Dask scheduler that is not there (Dask itself retries for 30 s)."""
    from urllib.parse import urlsplit

    from edgeloop.cli import UserError

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        socket.create_connection((parts.hostname or "", parts.port or 8786), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"cannot reach the Dask scheduler at {address}: {exc}") from None


def _tune(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from edgeloop.cli import UserError
    from flows.tune import TuneSettings, tune
    from orchestrator.tune import refusal

    fields = {"data": args.data, "family": args.family, "trials": args.trials, "concurrency": args.concurrency,
              "trial_memory_mb": args.trial_memory_mb, "dask_address": args.dask, "seed": args.seed,
              "allow_contract_change": args.allow_contract_change,
              "halving": {"min_epochs": args.min_epochs, "max_epochs": args.max_epochs},
              "space": {"arch": args.arch} if args.arch else {}}
    try:
        settings = TuneSettings.model_validate(fields)
    except ValidationError as exc:  # one line naming each field, what is wrong and its range
        raise UserError(f"refused: {refusal(exc, TuneSettings)}") from None
    if args.dask:
        _reachable(args.dask)
    result = tune(args.inventory, settings)
    print(json.dumps(result, indent=1, default=str))
    return 0
