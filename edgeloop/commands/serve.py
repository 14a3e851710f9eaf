"""``edgeloop serve``: every stage flow as a Prefect deployment, served from this process; ``edgeloop run``:
start one of them with flat settings (``-p epochs=3``).

The Prefect UI then has something to start: each deployment's run form shows the inventory and the
stage's settings (named fields, descriptions, defaults), and the retrain deployment runs on the
inventory's ``cloud.retrain_schedule``. Every deployment is tagged ``edgeloop`` and ``stage:<stage>``
(the training stages also ``training``); each run adds ``family:<family>`` and is named for what it does.
``serve`` also creates the Prefect global concurrency limit the trainings share (``edgeloop-training``, one
slot unless ``--training-slots`` says otherwise), so a run from the UI, the nightly retrain and a tune never
train on the same cores at once. Stop with Ctrl-C; the deployments stay listed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# stage -> (flow name, whether it trains, the parameter its settings model is, if any)
STAGES = {"pretrain": ("edgeloop-pretrain", True, "settings"), "tune": ("edgeloop-tune", True, "settings"),
          "provision": ("provision", False, None), "rollout": ("edgeloop-rollout", False, "request"),
          "collect": ("edgeloop-collect", False, "settings"), "retrain": ("edgeloop-retrain", True, "settings"),
          "fleet-health": ("edgeloop-fleet-health", False, None), "lifecycle": ("edgeloop-lifecycle", False, None)}


def add_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="register the stage flows as Prefect deployments and run what is started")
    parser.add_argument("-i", "--inventory", default="inventory/local.yaml", help="the fleet the flows act on")
    parser.add_argument("--training-slots", type=int, default=int(os.environ.get("EDGELOOP_TRAINING_SLOTS", "1")),
                        help="trainings (pretrain, retrain, tune) that may run at once (default 1, or "
                             "$EDGELOOP_TRAINING_SLOTS; 0: no limit)")
    parser.set_defaults(func=_serve)
    run = sub.add_parser("run", help="start a served stage's deployment with some settings, e.g. "
                                     "`edgeloop run pretrain -p epochs=3 -p arch=tiny_cnn`")
    run.add_argument("stage", choices=sorted(STAGES))
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="a parameter: a field of the stage's settings (epochs=3, gate.alpha=0.05) or a "
                          "parameter of the flow (inventory=...); VALUE is JSON where it parses, else text")
    run.add_argument("--watch", action="store_true", help="wait for the run to end; exit 1 unless it completed")
    run.set_defaults(func=_run)


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
    flows = {"pretrain": pretrain, "tune": tune, "provision": provision_flow, "rollout": rollout,
             "collect": collect, "retrain": retrain, "fleet-health": fleet_health, "lifecycle": lifecycle_flow}
    served = [flows[stage].to_deployment(name=stage, parameters={"inventory": path}, tags=stage_tags(stage),
                                         cron=fleet.cloud.retrain_schedule if stage == "retrain" else None)
              for stage in STAGES]
    for deployment in served:
        _say_resolved(deployment, fleet)
    return served


def _say_resolved(deployment, fleet) -> None:
    """Each form field left empty for the inventory's pool says, in its description, which pool that is on
    this inventory (the champion is read when the run starts: it changes between runs)."""
    from orchestrator.inventory import InventoryError

    try:
        pool = fleet.dataset("generic")
    except InventoryError:
        return
    # what to_deployment registers as the run form (a copy: the flow object keeps its own)
    schema = deployment._parameter_openapi_schema = deployment._parameter_openapi_schema.model_copy(deep=True)
    for definition in (schema.definitions or {}).values():
        for field in definition.get("properties", {}).values():
            if field.get("description", "").endswith("the inventory's cloud.datasets.generic"):
                field["description"] += f" (here: {pool})"


def stage_tags(stage: str) -> list[str]:
    """A deployment's tags: the product, the stage, and ``training`` for the stages that train."""
    return ["edgeloop", f"stage:{stage}", *(["training"] if STAGES[stage][1] else [])]


def _serve(args: argparse.Namespace) -> int:
    from prefect import serve

    from flows.runs import ensure_training_limit

    # Local sites (the demo's inventory names ${EDGELOOP_PYTHON:-python3}) reuse this interpreter's packages, as
    # `make demo` does; a bare python3 lacks fsspec and the agent's other dependencies.
    os.environ.setdefault("EDGELOOP_PYTHON", sys.executable)
    served = deployments(args.inventory)
    print(f"edgeloop serve: {ensure_training_limit(args.training_slots)}", flush=True)
    serve(*served)
    return 0


def flat_parameters(stage: str, pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs as the deployment's parameters: a flow parameter stays on top, anything else is a
    field of the stage's settings model (dots reach into nested models: ``gate.alpha=0.05``). A field the
    settings do not have is refused in one line naming the fields there are."""
    from edgeloop.cli import UserError

    flow_params, settings_param = _flow_parameters(stage), STAGES[stage][2]
    params: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UserError(f"-p {pair!r}: expected KEY=VALUE")
        value = _value(text)
        if key in flow_params or settings_param is None:
            if key not in flow_params:
                raise UserError(f"{stage} has no parameter {key!r} (it has: {', '.join(sorted(flow_params))})")
            params[key] = value
            continue
        fields = flow_params[settings_param]
        if key.split(".")[0] not in fields:
            raise UserError(f"{stage} has no setting {key.split('.')[0]!r} (its settings: {', '.join(fields)}; "
                            f"its parameters: {', '.join(sorted(flow_params))})")
        target = params.setdefault(settings_param, {})
        *path, last = key.split(".")
        for part in path:
            target = target.setdefault(part, {})
        target[last] = value
    return params


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _flow_parameters(stage: str) -> dict[str, list[str]]:
    """The stage flow's parameters, each with its settings model's field names (empty for a plain one)."""
    import importlib
    import inspect
    import typing

    module, name = {"pretrain": ("flows.stages", "pretrain"), "tune": ("flows.tune", "tune"),
                    "provision": ("flows.provision", "provision_flow"), "rollout": ("flows.rollout", "rollout"),
                    "collect": ("flows.stages", "collect"), "retrain": ("flows.stages", "retrain"),
                    "fleet-health": ("flows.health", "fleet_health"),
                    "lifecycle": ("flows.lifecycle", "lifecycle_flow")}[stage]
    fn = getattr(importlib.import_module(module), name).fn
    hints = typing.get_type_hints(fn)
    return {p: list(getattr(hints.get(p), "model_fields", {})) for p in inspect.signature(fn).parameters}


def _run(args: argparse.Namespace) -> int:
    """Start ``<flow>/<stage>`` on the configured Prefect API with the given parameters; print the run's name and
    id (and, with ``--watch``, how it ended)."""
    from prefect.deployments import run_deployment

    params = flat_parameters(args.stage, args.param)
    flow_name = STAGES[args.stage][0]
    run = run_deployment(name=f"{flow_name}/{args.stage}", parameters=params, timeout=None if args.watch else 0)
    state = run.state
    print(f"{flow_name}/{args.stage}: run {run.name} ({run.id}) {state.name if state else 'created'}"
          + (f": {state.message}" if state and state.message else ""))
    return 0 if not args.watch or (state and state.is_completed()) else 1
