"""The cloud's stage flows, each usable alone on any inventory: pretrain, collect, retrain.

Thin on purpose: every step is in :mod:`orchestrator`. Each flow takes the inventory and one pydantic
settings model, so the Prefect UI's run form shows named fields with their descriptions and defaults
(``edgeloop serve`` registers them as deployments).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from edge_agent.datasets import open_dataset
from edge_agent.gate import GateRule
from edge_agent.ids import new_id
from edge_agent.train import TrainConfig
from flows.rollout import RolloutRequest, rollout
from orchestrator import retrain as steps
from orchestrator.collect import collect_new
from orchestrator.demo import ReferenceLabels
from orchestrator.inventory import Inventory, load_inventory
from orchestrator.labelling import LabelQueue
from orchestrator.registry import ModelRegistry
from orchestrator.samples import Quarantine, collect_samples
from orchestrator.trainers import train_on_trainers

DEFAULT_INVENTORY = "inventory/local.yaml"
CONTRACT_HELP = ("promote a candidate whose architecture, input size or classes differ from the champion's (the "
                 "fleet's members fine-tune from it and must then all take the new contract)")


class PretrainSettings(BaseModel):
    data: str = Field(".demo/data/generic", description="dataset version to train on (edgeloop data import ...)")
    family: str = Field("elpv-defects", description="registry name of the model being improved")
    arch: str = Field("resnet18", description="architecture (edge_agent.models: resnet18, mobilenet_v3_small, "
                                              "tiny_cnn)")
    epochs: int = Field(8, ge=1, description="training epochs (the best on the val split is kept)")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0, description="peak learning rate (one-cycle)")
    seed: int = 0
    on_trainers: bool = Field(True, description="train on the inventory's cloud.trainers (torch.distributed over "
                              "SSH) when it lists any; the dataset path must be readable there")
    gate: GateRule = Field(default_factory=GateRule, description="how sure the gate must be to promote")
    allow_contract_change: bool = Field(False, description=CONTRACT_HELP)


class CollectSettings(BaseModel):
    pseudo_label_confidence: float = Field(0.95, gt=0.5, le=1.0, description="a sample whose served model was "
                                           "at least this sure, with every member agreeing, is pseudo-labelled")
    family: str = Field("elpv-defects", description="model family whose classes the labels use")


class RetrainSettings(BaseModel):
    base_data: str = Field(".demo/data/generic", description="the generic pool the samples are added to; its gate "
                                                             "split decides promotion")
    family: str = Field("elpv-defects", description="registry name of the model being improved")
    epochs: int = Field(3, ge=1, description="fine-tuning epochs from the champion")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (one-cycle)")
    gate: GateRule = Field(default_factory=GateRule, description="how sure the gate must be to promote")
    allow_contract_change: bool = Field(False, description=CONTRACT_HELP)
    seed: int = 0
    reference_data: list[str] = Field(default_factory=list, description="the demo's stand-in for people: dataset "
                                      "versions whose manifests label the samples nobody labelled in the queue")
    rollout: bool = Field(True, description="roll a promoted candidate out to the fleet (canaries first)")


def _fleet(inventory: str) -> tuple[Inventory, ModelRegistry]:
    fleet = load_inventory(inventory)
    return fleet, fleet.registry()


@flow(name="edgeloop-pretrain", log_prints=True)
def pretrain(inventory: str = DEFAULT_INVENTORY, settings: PretrainSettings = PretrainSettings()) -> dict:
    """Train a version on a dataset; promoted when it passes the gate against the champion (or there is none)."""
    fleet, registry = _fleet(inventory)
    config = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed)
    champion = registry.champion(settings.family)
    logger = get_run_logger()

    def progress(m) -> None:
        logger.info("epoch %d/%d: loss %.4f, val_acc %.3f (%.1f s)", m.epoch, settings.epochs, m.train_loss,
                    m.val_acc, m.seconds)

    if fleet.cloud.trainers and settings.on_trainers:
        hosts = ", ".join(t.name for t in fleet.cloud.trainers)
        logger.info("training on the trainers %s (torch.distributed over SSH)", hosts)
        with tempfile.TemporaryDirectory(prefix="edgeloop-pretrain-") as tmp:
            metrics = json.loads((train_on_trainers(fleet, settings.data, settings.arch, config, Path(tmp))
                                  / "metrics.json").read_text())
            logger.info("trained on %d ranks in %.0f s: val_acc %.3f (epoch %d of %d)", metrics["ranks"],
                        metrics["seconds"], metrics["val_acc"], metrics["best_epoch"], metrics["epochs_run"])
            candidate = steps.register_trained(registry, settings.family, Path(tmp),
                                               note=f"pretrained on {settings.data} by {hosts}")
    else:
        candidate = steps.train_version(registry, settings.family, Path(settings.data), settings.arch, config,
                                        note=f"pretrained on {settings.data}", on_epoch=progress)
    decision = steps.gate(registry, candidate, champion, Path(settings.data), settings.gate,
                          settings.allow_contract_change)
    create_markdown_artifact(key="pretrain-gate", markdown=gate_markdown(decision.as_dict()),
                             description="pretraining: the gate's decision")
    get_run_logger().info("%s: %s", candidate.version, decision.reason)
    return decision.as_dict()


@flow(name="edgeloop-collect", log_prints=True)
def collect(inventory: str = DEFAULT_INVENTORY, settings: CollectSettings = CollectSettings()) -> dict:
    """New samples since the watermark, checked; sure ones pseudo-labelled, the rest to the labelling queue."""
    fleet, registry = _fleet(inventory)
    queue = LabelQueue(registry.root, registry.champion_classes(settings.family))
    result = collect_new(fleet.store(), registry.root, queue, settings.pseudo_label_confidence)
    create_table_artifact(key="collect", table=result.by_site() or [{"site": "-", "new": 0}],
                          description="new samples per site since the last collect")
    summary = {"new": len(result.new), "rejected": len(result.rejected), "pseudo_labelled": result.pseudo_labelled,
               "operator_labelled": result.operator_labelled, "queued_for_people": result.queued}
    get_run_logger().info("collect: %s", summary)
    return summary


@flow(name="edgeloop-retrain", log_prints=True)
def retrain(inventory: str = DEFAULT_INVENTORY, settings: RetrainSettings = RetrainSettings(),
            collect_settings: CollectSettings = CollectSettings()) -> dict:
    """Collect, then champion + generic pool + every labelled sample → candidate → gate → promote → rollout."""
    collect(inventory, collect_settings)
    fleet, registry = _fleet(inventory)
    collection = collect_samples(fleet.store(), quarantined=Quarantine(registry.root).reasons())
    base = open_dataset(settings.base_data)
    config = TrainConfig(epochs=settings.epochs, batch_size=64, lr=settings.lr, seed=settings.seed)
    champion = registry.champion(settings.family)
    out = registry.root.parent / "retraining-sets" / f"retrain-{new_id()}"
    people = LabelQueue(registry.root, base.classes)
    stand_in = [ReferenceLabels([open_dataset(p) for p in settings.reference_data])] if settings.reference_data else []
    candidate, summary = steps.retrain_from_samples(registry, settings.family, Path(settings.base_data),
                                                    collection, out, config, labellers=[people, *stand_in])
    decision = steps.gate(registry, candidate, champion, Path(settings.base_data), settings.gate,
                          settings.allow_contract_change)
    result = {**summary, **decision.as_dict()}
    create_markdown_artifact(key="gate", markdown=gate_markdown(result), description="retraining gate")
    if decision.promoted and settings.rollout:
        # a halted rollout (a canary failed and was rolled back) fails this run too: it shows red
        result["rollout"] = rollout(inventory, RolloutRequest(version=candidate.version, family=settings.family))
    return result


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def gate_markdown(decision: dict) -> str:
    """The gate artifact: the verdict and why, what decided (gate split) apart from what is only reported (test)."""
    verdict = "promoted" if decision["promoted"] else "kept the champion"
    text = (f"### Gate: {verdict}\n\n{decision['reason']}\n\n"
            f"Paired test on n = {decision['n']} gate images: {decision['candidate_only']} right only by the "
            f"candidate, {decision['champion_only']} only by the champion, one-sided p = "
            f"{_fmt(decision['p_value'])} (alpha {_fmt(decision['alpha'])}).\n\n"
            "| | version | gate acc (decides) | gate loss | test acc (reported only) |\n|---|---|---|---|---|\n"
            f"| candidate | {decision['candidate']} | {decision['candidate_gate_acc']:.4f} | "
            f"{decision['candidate_gate_loss']:.4f} | {decision['candidate_test_acc']:.4f} |\n"
            f"| champion | {decision['champion'] or '–'} | {decision['champion_gate_acc'] or 0:.4f} | "
            f"{decision['champion_gate_loss'] or 0:.4f} | {decision['champion_test_acc'] or 0:.4f} |\n")
    if "samples_accepted" in decision:
        text += (f"\n{decision['samples_accepted']} samples accepted ({decision['by_site']}), "
                 f"{decision['samples_rejected']} rejected, {decision['samples_unlabelled']} awaiting labels.")
    return text
