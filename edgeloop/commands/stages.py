"""``edgeloop pretrain`` and ``edgeloop deploy``: the first deploy from the command line, no Python needed.

``pretrain`` runs the pretrain stage flow (the same as the ``edgeloop-pretrain/pretrain`` deployment: train,
register, gate, promote) and prints the gate's decision in one line. ``deploy`` puts one registered version on
one site with :func:`orchestrator.deploy.deploy_model` (uploaded, sha256-checked on the host, renamed into
place) and prints ``ok`` / ``changed`` / ``failed`` as provisioning does. A fleet goes through ``edgeloop
rollout`` (canaries, waves, rollback); ``deploy`` is for one site, e.g. the first one.
"""

from __future__ import annotations

import argparse
import time


def add_commands(sub: argparse._SubParsersAction) -> None:
    pre = sub.add_parser("pretrain", help="train a version on a dataset; promoted when it passes the gate")
    pre.add_argument("-i", "--inventory", default="inventory/local.yaml", help="whose registry gets the version")
    pre.add_argument("--data", help="dataset version to train on (default: the inventory's cloud.datasets.generic)")
    pre.add_argument("--family", default="elpv-defects", help="registry name of the model being improved")
    pre.add_argument("--arch", default="slim_resnet", help="slim_resnet (default), slim_resnet_small, resnet18, "
                                                           "mobilenet_v3_small or tiny_cnn")
    pre.add_argument("--epochs", type=int, default=30, help="training epochs (the best on val is kept; default 30)")
    pre.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    pre.add_argument("--batch-size", type=int, default=64, help="images per training step (default 64)")
    pre.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, one-cycle (default 0.003)")
    pre.add_argument("--here", action="store_true", help="train in this process even when the inventory lists "
                                                         "cloud.trainers")
    pre.add_argument("--allow-contract-change", action="store_true",
                     help="promote a winner of another architecture, input size or classes than the champion's")
    pre.set_defaults(func=_pretrain)
    dep = sub.add_parser("deploy", help="put one registered version on one site (verified; idempotent)")
    dep.add_argument("--site", required=True, help="site name in the inventory")
    dep.add_argument("--version", required=True, help="registry version (edgeloop models list)")
    dep.add_argument("-i", "--inventory", default="inventory/local.yaml", help="the fleet and its registry")
    dep.add_argument("--override", metavar="REASON", help="the reason to deploy a version that was rolled back "
                                                          "(recorded in its registry record)")
    dep.add_argument("--accept-new-host-keys", action="store_true",
                     help="trust an unknown host key on first use and record it (a changed key is always refused)")
    dep.set_defaults(func=_deploy)


def _refused(exc) -> str:
    """A pydantic ValidationError as one line naming each field and what is wrong with it."""
    return "refused: " + "; ".join(f"{'.'.join(map(str, e['loc'])) or exc.title}: {e['msg']}"
                                   for e in exc.errors()[:5])


def _pretrain(args: argparse.Namespace) -> int:
    """Exit 0 when the run completed (promoted or not: the line says which), 1 when it failed, 2 for input
    refused before anything ran (bad inventory, dataset or setting)."""
    from pydantic import ValidationError

    from edge_agent.datasets import open_dataset
    from edgeloop.cli import UserError
    from flows.stages import PretrainSettings, pretrain
    from orchestrator.inventory import load_inventory

    try:
        settings = PretrainSettings(data=args.data, family=args.family, arch=args.arch, epochs=args.epochs,
                                    seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                                    on_trainers=not args.here, allow_contract_change=args.allow_contract_change)
    except ValidationError as exc:
        raise UserError(_refused(exc)) from None
    fleet = load_inventory(args.inventory)  # refused here, in one line, rather than inside a failed run
    fleet.registry()
    open_dataset(settings.data or fleet.dataset("generic"))
    state = pretrain(args.inventory, settings, return_state=True)
    if not state.is_completed():
        print(f"pretrain failed ({state.name}): {_first_line(state.message)}")
        return 1
    print(decision_line(state.result()))
    return 0


def decision_line(d: dict) -> str:
    """The gate's decision in one line: the version, promoted or not, and why (the reason carries the paired
    test's evidence: n, discordant counts, p, alpha)."""
    verdict = "promoted to champion" if d["promoted"] else f"not promoted, {d['champion']} stays champion"
    against = "no champion" if d["champion_gate_acc"] is None else f"{d['champion_gate_acc']:.3f}"
    return (f"pretrain {d['candidate']}: {verdict} (gate acc {d['candidate_gate_acc']:.3f} vs {against}); "
            f"{_first_line(d['reason'])}")


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else "no reason given"


def _deploy(args: argparse.Namespace) -> int:
    """Exit 0 when the site holds the version (``ok``: it already did; ``changed``: it does now), 1 when the
    deploy failed on the host, 2 when refused before touching it (unknown site or version, a rolled-back version
    without ``--override``, a registry artifact that does not match its sha256)."""
    from orchestrator.deploy import deploy_model
    from orchestrator.inventory import load_inventory

    fleet = load_inventory(args.inventory)
    site = fleet.site(args.site)  # an unknown site: one line naming the sites there are
    registry = fleet.registry()
    record = registry.check_deployable(args.version, args.override)  # unknown or rolled back: refused
    checkpoint = registry.artifact(record.version)  # checked against its sha256: a corrupt registry never ships
    started = time.monotonic()
    result = deploy_model(site, fleet, checkpoint, record.version, args.accept_new_host_keys)
    seconds = time.monotonic() - started
    what = {"ok": f"{record.version} already in place", "changed": f"{record.version} deployed (sha256 verified "
            "on the host); the site's agent takes it up on its next scan", "failed": result.reason}[result.status]
    print(f"{site.name}  {result.status:<7}  {what}  {seconds:.1f}s")
    return 1 if result.status == "failed" else 0
