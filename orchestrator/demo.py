"""What only the demo does: ELPV as a fleet's data, seeding sites, feeding inboxes, reference labels.

A real fleet has none of this: its sites hold their own images, cameras fill the inboxes, and people
label what the sites send back. The demo stands in for all three with the bundled ELPV solar cells.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge_agent.datasets import ELPV_CLASSES, DatasetVersion, SourceImage, elpv_images, import_elpv, write_version
from edge_agent.layout import AgentPaths
from orchestrator.project import PROJECT_DIR
from orchestrator.samples import Sample


class DemoSettings(BaseSettings):
    """What ``make demo`` runs on; every field can be set as ``EDGELOOP_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_", extra="ignore")

    home: Path = Field(PROJECT_DIR / ".demo", description="the demo's working folder: data, registry, store, sites")
    inventory: Path = Field(PROJECT_DIR / "inventory" / "local.yaml", description="the fleet to run on")
    family: str = Field("elpv-defects", description="registry name of the model being improved")
    pretrain_arch: str = Field(
        "slim_resnet", description="architecture of the first base (bench/elpv_recipe.py chose it on val)")
    pretrain_epochs: int = Field(30, ge=1, description="the recipe's epochs (bench/elpv_recipe.py)")
    retrain_epochs: int = Field(3, ge=1)
    seed: int = 0
    site_timeout_s: float = Field(900, gt=0, description="how long the cloud waits for an edge before going on")
    fleet: Literal["shifted", "random"] = Field("shifted", description="sites that differ (mono, own camera, "
                                                                        "mixed) or random draws of one pool")


# Sites that differ the way real fleets differ (README, "The demo fleet"). The cloud's generic pool is
# mostly polycrystalline cells; one site inspects mono cells only, one sees poly cells through its own
# camera, one has both. Counts per site role: (mono, poly) images.
GENERIC_SHIFTED = (60, 900)
SITE_ROLES = {"mono": (600, 0), "poly-camera": (0, 450), "mixed": (200, 200)}
SITE_FRACTIONS = (0.55, 0.2, 0.25)  # train / val (halved into val and gate at the edge) / test


def camera(pixels: np.ndarray, key: str) -> np.ndarray:
    """A site's own imaging conditions, fixed per site: underexposed, softer, noisier (seeded per image)."""
    x = (pixels.astype(np.float32) / 255.0) ** 1.6 * 0.8  # darker exposure, flattened highlights
    x = (x + np.roll(x, 1, 0) + np.roll(x, -1, 0) + np.roll(x, 1, 1) + np.roll(x, -1, 1)) / 5  # blur
    rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
    x = x + rng.normal(0, 0.03, x.shape)
    return np.clip(x * 255, 0, 255).astype(np.uint8)


def shifted_fleet(images: list[SourceImage], sites: int, seed: int) -> list[list[SourceImage]]:
    """[generic pool, site 1, site 2, ...]: site roles cycle mono, poly-camera, mixed."""
    rng = np.random.default_rng(seed)
    pools = {kind: [images[i] for i in rng.permutation(len(images)) if images[i].extra["cell_type"] == kind]
             for kind in ("mono", "poly")}

    def take(mono: int, poly: int) -> list[SourceImage]:
        chosen = pools["mono"][:mono] + pools["poly"][:poly]
        del pools["mono"][:mono], pools["poly"][:poly]
        return chosen

    parts = [take(*GENERIC_SHIFTED)]
    for index in range(sites):
        role = list(SITE_ROLES)[index % len(SITE_ROLES)]
        chosen = take(*SITE_ROLES[role])
        if role == "poly-camera":
            chosen = [replace(item, pixels=camera(item.pixels, item.name),
                              extra={**item.extra, "site_camera": "underexposed-soft-noisy"}) for item in chosen]
        parts.append([replace(item, extra={**item.extra, "site_role": role}) for item in chosen])
    return parts


def prepare_elpv(out: Path, sites: int, size: int, seed: int, fleet: str = "shifted") -> list[Path]:
    """The demo's data: a generic pool for the cloud and one private set per site (reused when present).

    ``fleet="shifted"``: sites differ from the cloud's pool and from each other (:func:`shifted_fleet`);
    ``"random"``: every set a random draw from the same pool (nothing site-specific to learn).
    """
    parts = [out / "generic"] + [out / "sites" / f"site-{i}" for i in range(1, sites + 1)]
    marker = out / "fleet.json"
    wanted = {"fleet": fleet, "size": size, "seed": seed, "sites": sites}
    if marker.is_file() and json.loads(marker.read_text()) == wanted and \
            all((p / "manifest.json").is_file() for p in parts):
        return parts
    shutil.rmtree(out, ignore_errors=True)
    if fleet == "random":
        import_elpv(out, size=size, seed=seed, sites=sites)
    else:
        images, skipped = elpv_images(size, seed)
        for index, (path, items) in enumerate(zip(parts, shifted_fleet(images, sites, seed))):
            write_version(path, items, ELPV_CLASSES, (0.7, 0.15, 0.15) if index == 0 else SITE_FRACTIONS,
                          seed + index, size, f"elpv:{fleet}:{path.name}", skipped if index == 0 else [])
    marker.write_text(json.dumps(wanted))
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
    """The demo's stand-in for the labelling queue: the true label of an image from dataset manifests.

    Real fleets put people here (``edgeloop label``, :mod:`orchestrator.labelling`, or Label Studio); the
    demo knows the ELPV ground truth of every image it streamed to the sites, found by content hash, and
    answers only for what nobody labelled in the queue.
    """

    def __init__(self, datasets: list[DatasetVersion]) -> None:
        self.truth = {r["sha256"]: r["label"] for d in datasets for r in d.records}

    def __call__(self, sample: Sample) -> int | None:
        return self.truth.get(sample.sha256)

    def label_queue(self, queue, samples: list[Sample]) -> int:
        """Answer the labelling queue as a person would (``by: reference``), for the samples it knows that nobody
        labelled: those labels then go home to the sites like any other. Returns how many."""
        given = 0
        for item in queue.pending(samples):
            label = self.truth.get(item.sha256)
            if label is not None:
                queue.set(item.sha256, queue.classes[label], by="reference")
                given += 1
        return given


def labels_sent_home(store, site: str) -> list[dict]:
    """People's labels the cloud wrote for ``site`` (``labels/<site>.json``); [] when none or unreadable."""
    import json

    from edge_agent.homelabels import LABELS_KEY, MAX_LABELS_BYTES

    try:
        listed = json.loads(store.read(LABELS_KEY.format(site=site), max_bytes=MAX_LABELS_BYTES)).get("labels")
    except (OSError, ValueError, AttributeError, RuntimeError):  # absent, unreadable, or the store away
        return []
    return listed if isinstance(listed, list) else []
