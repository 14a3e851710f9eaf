"""What only the demo does: ELPV as a fleet's data, seeding sites, feeding inboxes, reference labels.

A real fleet has none of this: its sites hold their own images, cameras fill the inboxes, and people
label what the sites send back. The demo stands in for all three with the bundled ELPV solar cells.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge_agent.datasets import DatasetVersion, import_elpv, open_dataset
from edge_agent.layout import AgentPaths
from orchestrator.project import PROJECT_DIR
from orchestrator.samples import Sample


class DemoSettings(BaseSettings):
    """What ``make demo`` runs on; every field can be set as ``EDGELOOP_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_", extra="ignore")

    home: Path = Field(PROJECT_DIR / ".demo", description="the demo's working folder: data, registry, store, sites")
    inventory: Path = Field(PROJECT_DIR / "inventory" / "local.yaml", description="the fleet to run on")
    family: str = Field("elpv-defects", description="registry name of the model being improved")
    pretrain_arch: str = "resnet18"
    pretrain_epochs: int = Field(8, ge=1)
    retrain_epochs: int = Field(3, ge=1)
    seed: int = 0
    site_timeout_s: float = Field(900, gt=0, description="how long the cloud waits for an edge before going on")


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


class ReferenceLabels:
    """The demo's stand-in for a human review queue: the true label of an image from dataset manifests.

    Real fleets put a person here (an annotation tool); the demo knows the ELPV ground truth of every
    image it streamed to the sites, found by content hash.
    """

    def __init__(self, datasets: list[DatasetVersion]):
        self.truth = {r["sha256"]: r["label"] for d in datasets for r in d.records}

    def __call__(self, sample: Sample) -> int | None:
        return self.truth.get(sample.sha256)
