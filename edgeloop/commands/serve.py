"""``edgeloop serve``: every stage flow as a Prefect deployment, served from this process.

The Prefect UI then has something to start: each deployment's run form shows the inventory and the
stage's settings (named fields, descriptions, defaults), and the retrain deployment runs on the
inventory's ``cloud.retrain_schedule``. Stop with Ctrl-C; the deployments stay listed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="register the stage flows as Prefect deployments and run what is started")
    parser.add_argument("-i", "--inventory", default="inventory/local.yaml", help="the fleet the flows act on")
    parser.set_defaults(func=_serve)


def deployments(inventory: str) -> list:
    """One deployment per stage flow, parameterised with the inventory (its absolute path)."""
    from flows.health import fleet_health
    from flows.lifecycle import lifecycle_flow
    from flows.provision import provision_flow
    from flows.rollout import rollout
    from flows.stages import collect, pretrain, retrain
    from flows.tune import tune
    from orchestrator.inventory import load_inventory

    fleet = load_inventory(inventory)  # a bad inventory is reported here, before anything is registered
    path = str(Path(inventory).resolve())
    tags = ["edgeloop"]
    return [
        pretrain.to_deployment(name="pretrain", parameters={"inventory": path}, tags=tags),
        tune.to_deployment(name="tune", parameters={"inventory": path}, tags=tags),
        provision_flow.to_deployment(name="provision", parameters={"inventory": path}, tags=tags),
        rollout.to_deployment(name="rollout", parameters={"inventory": path}, tags=tags),
        collect.to_deployment(name="collect", parameters={"inventory": path}, tags=tags),
        retrain.to_deployment(name="retrain", parameters={"inventory": path}, tags=tags,
                              cron=fleet.cloud.retrain_schedule),
        fleet_health.to_deployment(name="fleet-health", parameters={"inventory": path}, tags=tags),
        lifecycle_flow.to_deployment(name="lifecycle", parameters={"inventory": path}, tags=tags),
    ]


def _serve(args: argparse.Namespace) -> int:
    from prefect import serve

    serve(*deployments(args.inventory))
    return 0
