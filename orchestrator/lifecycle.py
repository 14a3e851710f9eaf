"""The steps of the cloud's lifecycle loop as plain functions; ``flows/lifecycle.py`` strings them together.

pretrain on the generic pool → deploy the champion to every site → each site fine-tunes its own
ensemble on its own data and serves it → sites upload the samples worth learning from → the cloud
checks and labels them, retrains, gates the candidate against the champion → promotes and deploys again.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_agent.datasets import DatasetVersion, import_elpv, open_dataset
from edge_agent.layout import AgentPaths
from edge_agent.models import load_checkpoint
from edge_agent.train import EpochMetrics, TrainConfig, evaluate
from orchestrator.registry import ModelRegistry, ModelVersion
from orchestrator.samples import Collection, OperatorLabels, ReferenceLabels, build_retraining_set, first_label
from orchestrator.training import export_checkpoint, train_on_dataset



def prepare_elpv(out: Path, sites: int, size: int, seed: int) -> list[Path]:
    """The demo's data: a generic pool for the cloud and one private set per site (reused when present)."""
    parts = [out / "generic"] + [out / "sites" / f"site-{i}" for i in range(1, sites + 1)]
    report = out / "import_report.json"
    if report.is_file() and all((p / "manifest.json").is_file() for p in parts):
        if all(open_dataset(p).image_size == size for p in parts):
            return parts
    shutil.rmtree(out, ignore_errors=True)
    import_elpv(out, size=size, seed=seed, sites=sites)
    return parts


def train_version(registry: ModelRegistry, family: str, data: Path, arch: str, config: TrainConfig,
                  parent: ModelVersion | None = None, note: str = "",
                  on_epoch: Callable[[EpochMetrics], None] | None = None) -> ModelVersion:
    """Train (or fine-tune ``parent``) on a dataset version and register the result as a candidate."""
    with tempfile.TemporaryDirectory(prefix="edgeloop-train-") as tmp:
        init = registry.artifact(parent.version) if parent else None
        metrics = train_on_dataset(data, arch, tmp, config, init=init, on_epoch=on_epoch)
        onnx = export_checkpoint(Path(tmp) / "model.pt", Path(tmp) / "model.onnx")
        return registry.register(
            family, Path(tmp) / "model.pt", arch=metrics["arch"], dataset_id=metrics["dataset_id"],
            hyperparameters=config.model_dump(), parent=parent.version if parent else None,
            metrics={k: metrics[k] for k in ("val_acc", "test_acc", "seconds_per_epoch")},
            extra_artifacts={"onnx": onnx}, note=note)


def seed_site(site_root: Path, dataset: DatasetVersion, labelled_splits: tuple[str, ...] = ("train", "val")
              ) -> list[Path]:
    """Give a demo site its private data: labelled images for the operator folder; returns the stream.

    The stream (the site's test split) plays the production images that arrive later in the inbox.
    """
    paths = AgentPaths(site_root)
    paths.ensure()
    for record in dataset.records:
        if record["split"] in labelled_splits:
            target = paths.labelled / dataset.classes[record["label"]] / Path(record["file"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                shutil.copyfile(dataset.root / record["file"], target)
    return [dataset.root / r["file"] for r in dataset.records if r["split"] == "test"]


def feed_inbox(site_root: Path, images: list[Path]) -> int:
    """Drop production images into a site's inbox (as a camera would: temp name, then rename)."""
    inbox = AgentPaths(site_root).inbox
    inbox.mkdir(parents=True, exist_ok=True)
    for image in images:
        staged = inbox / f".{image.name}.part"
        shutil.copyfile(image, staged)
        staged.rename(inbox / image.name)
    return len(images)


@dataclass
class GateDecision:
    candidate: str
    champion: str | None
    candidate_val_acc: float
    champion_val_acc: float | None
    candidate_val_loss: float
    champion_val_loss: float | None
    promoted: bool

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def gate(registry: ModelRegistry, candidate: ModelVersion, champion: ModelVersion | None, holdout: Path,
         min_gain: float = 0.0) -> GateDecision:
    """Promote the candidate only if it beats the champion on the same held-out validation split.

    Ties in accuracy go to the lower validation loss (small validation sets tie often).
    """
    val = open_dataset(holdout).load_split("val")

    def score(version: ModelVersion) -> tuple[float, float]:
        model, meta = load_checkpoint(registry.artifact(version.version))
        return evaluate(model, val, meta.normalization)

    cand_acc, cand_loss = score(candidate)
    champ_acc, champ_loss = score(champion) if champion else (None, None)
    better = champion is None or cand_acc > champ_acc + min_gain or (
        min_gain == 0 and cand_acc == champ_acc and cand_loss < champ_loss)
    if better:
        registry.promote(candidate.version)
    return GateDecision(candidate.version, champion.version if champion else None, cand_acc, champ_acc, cand_loss,
                        champ_loss, better)


def retrain_from_samples(registry: ModelRegistry, family: str, base_data: Path, collection: Collection,
                         truth: list[Path], out: Path, config: TrainConfig,
                         on_epoch: Callable[[EpochMetrics], None] | None = None) -> tuple[ModelVersion, dict]:
    """Fine-tune the champion on the base data plus the checked, labelled samples."""
    base = open_dataset(base_data)
    labeller = first_label(OperatorLabels(base.classes), ReferenceLabels([open_dataset(p) for p in truth]))
    report, unlabelled = build_retraining_set(base, collection.accepted, labeller, out)
    champion = registry.champion(family)
    candidate = train_version(registry, family, out, champion.arch if champion else "resnet18", config,
                              parent=champion, note=f"retrained with {len(collection.accepted)} edge samples",
                              on_epoch=on_epoch)
    summary = {"dataset_id": report.dataset_id, "samples_accepted": len(collection.accepted),
               "samples_rejected": len(collection.rejected), "samples_unlabelled": unlabelled,
               "train_images": report.counts["train"], "by_site": collection.by_site()}
    (out / "retrain_summary.json").write_text(json.dumps(summary, indent=1))
    return candidate, summary
