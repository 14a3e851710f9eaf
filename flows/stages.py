"""The cloud's stage flows, each usable alone on any inventory: pretrain, collect, retrain.

Thin on purpose: every step is in :mod:`orchestrator`. Each flow takes the inventory and one pydantic
settings model, so the Prefect UI's run form shows named fields with their descriptions and defaults
(``edgeloop serve`` registers them as deployments).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed
from pydantic import BaseModel, Field

from edge_agent.datasets import open_dataset
from edge_agent.gate import GateRule
from edge_agent.ids import new_id
from edge_agent.train import TrainConfig
from flows.health import link_fleet_view
from flows.retries import transient
from flows.rollout import RolloutHalted, RolloutRequest, rollout
from flows.runs import FromInventory, finish, gate_state, run_name, tag_run, training_slot
from orchestrator import retrain as steps
from orchestrator.collect import collect_new
from orchestrator.demo import ReferenceLabels
from orchestrator.inventory import Inventory, load_inventory
from orchestrator.labelhome import send_labels_home
from orchestrator.labelling import LabelQueue
from orchestrator.pictures import EpochLog, publish_learning_curve
from orchestrator.progress import Progress, training_progress
from orchestrator.registry import ModelRegistry, ModelVersion
from orchestrator.samples import OperatorLabels, Quarantine, collect_samples, first_label, site_exam_rule
from orchestrator.trainers import train_on_trainers
from orchestrator.tune import Arch

DEFAULT_INVENTORY = "inventory/local.yaml"
INVENTORY_HELP = "path of the fleet's inventory YAML (sites, store, registry, datasets) where the flow runs"
CONTRACT_HELP = ("promote a candidate whose architecture, input size or classes differ from the champion's (the "
                 "fleet's members fine-tune from it and must then all take the new contract)")


class PretrainSettings(BaseModel):
    """What to train, on what, and how sure the gate must be to promote it."""

    data: FromInventory = Field("", description="dataset version to train on (edgeloop data import ...); empty: "
                                              "the inventory's cloud.datasets.generic")
    family: str = Field("elpv-defects", description="registry name of the model being improved")
    arch: Arch = Field("slim_resnet", description="architecture (edge_agent.models): slim_resnet (the default, "
                       "chosen on val: ResNet-18's shape at half its width, for 128-300 px cells on a CPU), "
                       "slim_resnet_small, resnet18, mobilenet_v3_small, tiny_cnn (tests)")
    epochs: int = Field(30, ge=1, description="training epochs (the best on the val split is kept; 30 is the "
                        "recipe's, bench/elpv_recipe.py)")
    batch_size: int = Field(64, ge=1, description="images per training step")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (one-cycle)")
    seed: int = Field(0, description="seed of the weights' initialisation and the data order")
    on_trainers: bool = Field(True, description="train on the inventory's cloud.trainers (torch.distributed over "
                              "SSH) when it lists any; the dataset path must be readable there")
    gate: GateRule = Field(default_factory=GateRule, description="how sure the gate must be to promote")
    allow_contract_change: bool = Field(False, description=CONTRACT_HELP)


class CollectSettings(BaseModel):
    """Which samples are pseudo-labelled, and in which family's classes."""

    pseudo_label_confidence: float = Field(0.95, gt=0.5, le=1.0, description="a sample whose served model was "
                                           "at least this sure, with every member agreeing, is pseudo-labelled")
    family: str = Field("elpv-defects", description="model family whose classes the labels use")


class RetrainSettings(BaseModel):
    """What the champion is retrained on, and how sure the gate must be to promote the result."""

    base_data: FromInventory = Field("", description="the generic pool the samples are added to; its gate split "
                                                   "decides promotion; empty: the inventory's "
                                                   "cloud.datasets.generic")
    family: str = Field("elpv-defects", description="registry name of the model being improved (the collect "
                                                    "labels in its classes)")
    pseudo_label_confidence: float = Field(0.95, gt=0.5, le=1.0, description="collect: a sample whose served "
                                           "model was at least this sure, every member agreeing, is pseudo-labelled")
    epochs: int = Field(3, ge=1, description="fine-tuning epochs from the champion")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (one-cycle)")
    gate: GateRule = Field(default_factory=GateRule, description="how sure the gate must be to promote")
    allow_contract_change: bool = Field(False, description=CONTRACT_HELP)
    seed: int = Field(0, description="seed of the data order")
    reference_data: list[str] = Field(default_factory=list, description="the demo's stand-in for people: dataset "
                                      "versions whose manifests answer the labelling queue for the samples nobody "
                                      "labelled (by: reference); those labels go home like people's")
    rollout: bool = Field(True, description="roll a promoted candidate out to the fleet (canaries first)")


def _fleet(inventory: str) -> tuple[Inventory, ModelRegistry]:
    fleet = load_inventory(inventory)
    return fleet, fleet.registry()


# Each side effect is a task, so the run graph shows the steps and a retry (typed transient errors only, see
# flows.retries) repeats the failed step, not the flow.

@contextmanager
def watched(epochs: int, what: str) -> Iterator[EpochLog]:
    """A training watched: its progress moves the run's artifact (and a bar on a terminal) and logs each epoch's
    line, and every epoch is kept for the learning-curve picture."""
    progress, on_epoch = training_progress(epochs, what)
    with progress:
        yield EpochLog(on_epoch)


@task(cache_policy=NO_CACHE, task_run_name="train-{settings.arch}")
def train_locally(registry: ModelRegistry, settings: PretrainSettings, config: TrainConfig) -> ModelVersion:
    """Train and register a version in this process; each epoch moves the run's progress artifact (and a bar on
    a terminal) and logs its line."""
    with watched(settings.epochs, f"training {settings.arch}") as epochs:
        version = steps.train_version(registry, settings.family, Path(settings.data), settings.arch, config,
                                      note=f"pretrained on {settings.data}", on_epoch=epochs)
    publish_learning_curve("pretrain-learning-curve", epochs.metrics(config.keep),
                           f"pretrain {version.version} ({settings.arch})")
    return version


@task(cache_policy=NO_CACHE, task_run_name="train-on-trainers", retries=1, retry_delay_seconds=10,
      retry_condition_fn=transient)
def train_remotely(fleet: Inventory, settings: PretrainSettings, config: TrainConfig, out: Path) -> dict:
    """One DDP job across ``cloud.trainers``; its checkpoint and metrics land in ``out``."""
    hosts = ", ".join(t.name for t in fleet.cloud.trainers)
    get_run_logger().info("training on the trainers %s (torch.distributed over SSH)", hosts)
    # the epochs rank 0 prints, as they stream back: the run's progress artifact (and a bar on a terminal)
    with Progress(settings.epochs, "epochs", f"training {settings.arch} on {hosts}", key="training-progress") as bar:
        folder = train_on_trainers(fleet, settings.data, settings.arch, config, out,
                                   on_epoch=lambda epoch, _epochs, line: bar.update(epoch, line))
    metrics = json.loads((folder / "metrics.json").read_text())
    get_run_logger().info("trained on %d ranks in %.0f s: val_acc %.3f (epoch %d of %d)", metrics["ranks"],
                          metrics["seconds"], metrics["val_acc"], metrics["best_epoch"], metrics["epochs_run"])
    publish_learning_curve("pretrain-learning-curve", metrics, f"pretrain {settings.arch} on {metrics['ranks']} ranks")
    return metrics


@task(cache_policy=NO_CACHE, task_run_name="register")
def register(registry: ModelRegistry, family: str, folder: Path, note: str) -> ModelVersion:
    return steps.register_trained(registry, family, folder, note=note)


@task(cache_policy=NO_CACHE, task_run_name="gate-{candidate.version}")
def gate_candidate(registry: ModelRegistry, candidate: ModelVersion, champion: ModelVersion | None, holdout: str,
                   rule: GateRule, allow_contract_change: bool, look: int | None = None) -> steps.GateDecision:
    """The shared paired gate, candidate against champion on the gate split (promotes nothing)."""
    return steps.gate(registry, candidate, champion, Path(holdout), rule, allow_contract_change, promote=False,
                      look=look)


@task(cache_policy=NO_CACHE, task_run_name="promote-{candidate.version}")
def promote(registry: ModelRegistry, candidate: ModelVersion, champion: ModelVersion | None,
            allow_contract_change: bool = False) -> None:
    """Compare-and-swap: the candidate becomes champion only if the champion is still the one it was gated
    against (and the serving contract holds unless its change is allowed)."""
    steps.promote_candidate(registry, candidate, champion, allow_contract_change)


def gate_and_promote(registry: ModelRegistry, candidate: ModelVersion, champion: ModelVersion | None, holdout: str,
                     rule: GateRule, allow_contract_change: bool, look: int | None = None) -> steps.GateDecision:
    decision = gate_candidate(registry, candidate, champion, holdout, rule, allow_contract_change, look)
    if decision.promoted:
        promote(registry, candidate, champion, allow_contract_change)
    return decision


@flow(name="edgeloop-pretrain", log_prints=True, flow_run_name=run_name(
    "pretrain", ("settings", "arch", "slim_resnet"), ("settings", "family", "elpv-defects")))
def pretrain(inventory: str = DEFAULT_INVENTORY, settings: PretrainSettings = PretrainSettings()) -> dict:
    """Train a version on a dataset; promoted when it passes the gate against the champion (or there is none).

    Args:
        inventory: path of the fleet's inventory YAML (sites, store, registry, datasets) where the flow runs
        settings: what to train, on what data, and how sure the gate must be to promote it
    """
    return finish(_pretrain, inventory, settings)


def _pretrain(inventory: str, settings: PretrainSettings):
    tag_run("pretrain", settings.family, "training")
    fleet, registry = _fleet(inventory)
    settings = settings.model_copy(update={"data": settings.data or fleet.dataset("generic")})
    open_dataset(settings.data)  # a missing dataset: one line now, not a traceback from the training task
    config = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed)
    champion = registry.champion(settings.family)
    if fleet.cloud.trainers and settings.on_trainers:
        hosts = ", ".join(t.name for t in fleet.cloud.trainers)
        with tempfile.TemporaryDirectory(prefix="edgeloop-pretrain-") as tmp:
            with training_slot("pretrain"):
                train_remotely(fleet, settings, config, Path(tmp))
            candidate = register(registry, settings.family, Path(tmp), f"pretrained on {settings.data} by {hosts}")
    else:
        with training_slot("pretrain"):
            candidate = train_locally(registry, settings, config)
    decision = gate_and_promote(registry, candidate, champion, settings.data, settings.gate,
                                settings.allow_contract_change)
    create_markdown_artifact(key="gate", markdown=gate_markdown(decision.as_dict()),
                             description="pretraining: the gate's decision")
    get_run_logger().info("%s: %s", candidate.version, decision.reason)
    return gate_state(decision.as_dict(), "pretrain")


@task(cache_policy=NO_CACHE, task_run_name="collect", retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def collect_task(fleet: Inventory, registry: ModelRegistry, queue: LabelQueue, confidence: float):
    """New samples from the store since the watermark: checked, pseudo-labelled or queued for a person."""
    with Progress(0, "samples", "reading new samples", key="collect-progress") as progress:
        return collect_new(fleet.store(), registry.root, queue, confidence, on_read=progress.count)


@task(cache_policy=NO_CACHE, task_run_name="send-labels-home", retries=2, retry_delay_seconds=5,
      retry_condition_fn=transient)
def labels_home_task(fleet: Inventory, queue: LabelQueue):
    """Every label given in the cloud, to the site that sent the sample (labels/<site>.json in the store)."""
    return send_labels_home(fleet.store(), queue)


@task(cache_policy=NO_CACHE, task_run_name="reference-labels")
def reference_labels(reference_data: list[str], queue: LabelQueue, collection) -> int:
    """The demo's stand-in for people: the ground truth of the samples nobody labelled, written to the queue."""
    return ReferenceLabels([open_dataset(p) for p in reference_data]).label_queue(queue, collection.accepted)


@task(cache_policy=NO_CACHE, task_run_name="read-samples", retries=2, retry_delay_seconds=5,
      retry_condition_fn=transient)
def read_samples(fleet: Inventory, registry: ModelRegistry):
    """Every checked sample in the store (the quarantined left out), for the retraining set."""
    with Progress(0, "samples", "reading every sample", key="read-samples-progress") as progress:
        return collect_samples(fleet.store(), quarantined=Quarantine(registry.root).reasons(), on_read=progress.count)


@task(cache_policy=NO_CACHE, task_run_name="train-from-champion")
def retrain_task(registry: ModelRegistry, settings: RetrainSettings, collection, out: Path, config: TrainConfig,
                 labellers: list, pseudo: set[str], site_exam=None) -> tuple[ModelVersion, dict]:
    """The retraining set (pool + labelled samples, a share of them joining its gate) built and the champion
    fine-tuned on it, registered; each epoch moves the run's progress artifact and logs its line."""
    with watched(config.epochs, "fine-tuning the champion") as epochs:
        candidate, summary = steps.retrain_from_samples(registry, settings.family, Path(settings.base_data),
                                                        collection, out, config, labellers=labellers, pseudo=pseudo,
                                                        site_exam=site_exam, on_epoch=epochs)
    publish_learning_curve("retrain-learning-curve", epochs.metrics(config.keep),
                           f"retrain {candidate.version} from {candidate.parent or 'scratch'}")
    return candidate, summary


@flow(name="edgeloop-collect", log_prints=True,
      flow_run_name=run_name("collect", ("settings", "family", "elpv-defects")))
def collect(inventory: str = DEFAULT_INVENTORY, settings: CollectSettings = CollectSettings()) -> dict:
    """New samples since the watermark, checked; sure ones pseudo-labelled, the rest to the labelling queue.

    Args:
        inventory: path of the fleet's inventory YAML (sites, store, registry, datasets) where the flow runs
        settings: which samples are pseudo-labelled, and in which model family's classes
    """
    return finish(_collect, inventory, settings)


def _collect(inventory: str, settings: CollectSettings) -> dict:
    tag_run("collect", settings.family)
    fleet, registry = _fleet(inventory)
    queue = LabelQueue(registry.root, registry.champion_classes(settings.family))
    result = collect_task(fleet, registry, queue, settings.pseudo_label_confidence)
    create_table_artifact(key="collect", table=result.by_site() or [{"site": "-", "new": 0}],
                          description="new samples per site since the last collect, and the samples held by the "
                                      "exam rule (read again next time) with why")
    home = labels_home_task(fleet, queue)
    create_table_artifact(key="labels-home", table=home.rows or [{"site": "-"}],
                          description="labels on their way home: per site, the labels its samples were given in "
                                      "the cloud (written: the file changed this run)")
    if result.rejected:  # each by name, with why: now in the cloud's quarantine, never read again
        create_table_artifact(key="collect-rejected", table=result.rejected,
                              description="samples rejected by this collect and quarantined, with the reason")
    summary = {"new": len(result.new), "rejected": len(result.rejected), "held": len(result.held),
               "labels_sent_home": home.changed, "pseudo_labelled": result.pseudo_labelled,
               "operator_labelled": result.operator_labelled, "queued_for_people": result.queued}
    get_run_logger().info("collect: %s", summary)
    return summary


@flow(name="edgeloop-retrain", log_prints=True,
      flow_run_name=run_name("retrain", ("settings", "family", "elpv-defects")))
def retrain(inventory: str = DEFAULT_INVENTORY, settings: RetrainSettings = RetrainSettings()) -> dict:
    """Collect, then champion + generic pool + every labelled sample → candidate → gate → promote → rollout.

    Args:
        inventory: path of the fleet's inventory YAML (sites, store, registry, datasets) where the flow runs
        settings: what the champion is retrained on (one family for the collect and the training), and how
            sure the gate must be to promote the result
    """
    return finish(_retrain, inventory, settings, expected=(RolloutHalted,))


def _retrain(inventory: str, settings: RetrainSettings):
    tag_run("retrain", settings.family, "training")
    link_fleet_view()  # where the fleet stands: the fleet view
    collect(inventory, CollectSettings(family=settings.family,
                                       pseudo_label_confidence=settings.pseudo_label_confidence))
    fleet, registry = _fleet(inventory)
    settings = settings.model_copy(update={"base_data": settings.base_data or fleet.dataset("generic")})
    collection = read_samples(fleet, registry)
    base = open_dataset(settings.base_data)
    config = TrainConfig(epochs=settings.epochs, batch_size=64, lr=settings.lr, seed=settings.seed)
    champion = registry.champion(settings.family)
    out = registry.root.parent / "retraining-sets" / f"retrain-{new_id()}"
    people = LabelQueue(registry.root, base.classes)
    if settings.reference_data:  # the demo's stand-in for people answers the queue; its labels go home too
        reference_labels(settings.reference_data, people, collection)
        labels_home_task(fleet, people)
    labellers = [people]
    fingerprint = steps.labelled_inputs(collection, first_label(OperatorLabels(base.classes), *labellers))
    if champion is not None and steps.nothing_new(registry, settings.family, fingerprint):
        message = (f"nothing new: no labelled sample arrived since the last candidate of {settings.family}; "
                   f"{champion.version} stays champion and no try is spent")
        create_markdown_artifact(key="gate", markdown=f"### Retrain: nothing new\n\n{message}",
                                 description="retraining gate")
        get_run_logger().info(message)
        return Completed(message=f"retrain: kept champion {champion.version}; {message}",
                         data={"nothing_new": True, "champion": champion.version, "reason": message})
    pseudo = {sha for sha, entry in people.labels().items() if isinstance(entry, dict) and entry.get("by") == "pseudo"}
    site_exam = site_exam_rule({site.name: site.learning.home_labels.shares for site in fleet.sites})
    with training_slot("retrain"):
        candidate, summary = retrain_task(registry, settings, collection, out, config, labellers, pseudo, site_exam)
    decision = gate_and_promote(registry, candidate, champion, str(out), settings.gate,
                                settings.allow_contract_change, look=steps.looks_at(registry, champion))
    result = {**summary, **decision.as_dict()}
    create_markdown_artifact(key="gate", markdown=gate_markdown(result), description="retraining gate")
    if decision.promoted and settings.rollout:
        # a halted rollout (a canary failed and was rolled back) fails this run too: it shows red
        result["rollout"] = rollout(inventory, RolloutRequest(version=candidate.version, family=settings.family))
    return gate_state(result, "retrain")


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
