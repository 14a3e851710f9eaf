"""The site's own labelled data: the one scan of ``data/labelled/<class>/`` and its train/val/test splits.

The fine-tune trigger counts what this scan finds and the fine-tune trains on what it finds, so the two
never disagree about which files are labelled images.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from edge_agent.datasets import IMAGE_SUFFIXES, MANIFEST, ArraySet, role
from edge_agent.errors import FinetuneError
from edge_agent.fileio import read_json
from edge_agent.imaging import ImageError, decode_image
from edge_agent.layout import AgentPaths

log = logging.getLogger(__name__)

# train fits weights; val chooses epochs and ensemble weights; gate decides what serves; test is reported only.
SPLITS = ("train", "val", "gate", "test")
SPLIT_FRACTIONS = (0.55, 0.15, 0.15, 0.15)


def labelled_files(paths: AgentPaths) -> list[tuple[str, Path]]:
    """(class, file) for every image an operator placed under ``data/labelled/<class>/``."""
    found = []
    for class_dir in sorted(p for p in paths.labelled.glob("*") if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(class_dir.iterdir()):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith("."):
                found.append((class_dir.name, file))
    return found


def load_labelled(paths: AgentPaths, classes: list[str], size: int
                  ) -> tuple[ArraySet, list[Path], list[tuple[Path, str]]]:
    """Decode every labelled image of a known class: (images, their files, skipped files with the reason)."""
    images, labels, files, skipped = [], [], [], []
    for class_name, file in labelled_files(paths):
        if class_name not in classes:
            skipped.append((file, f"unknown class {class_name!r}; expected one of {list(classes)}"))
            continue
        try:
            images.append(decode_image(file, size))
        except ImageError as exc:
            skipped.append((file, str(exc)))
            continue
        labels.append(classes.index(class_name))
        files.append(file)
    array = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    return ArraySet(array, np.array(labels, dtype=np.int64)), files, skipped


def _split_of(data: bytes, known: str | None) -> str:
    """A file's role, decided once by content hash so it never moves.

    A dataset version's manifest names train/val/test, and its val share is halved into val and gate
    (:func:`edge_agent.datasets.role`, as in the cloud); an operator's own files are split by hash.
    """
    digest = hashlib.sha256(data).hexdigest()
    if known in SPLITS:
        return role(known, digest)
    bucket = int(digest[:8], 16) % 1000 / 1000
    return SPLITS[int(np.searchsorted(np.cumsum(SPLIT_FRACTIONS), bucket, side="right"))]


def load_site_splits(paths: AgentPaths, classes: list[str], size: int):
    """train/val/gate/test ArraySets from the labelled folder.

    A manifest in the folder (a dataset version copied in) fixes the splits of the files it names; files an
    operator added later are split by content hash. An empty val split borrows the train split (noted);
    an empty gate split borrows val (noted in the report: the decision is then weaker evidence).
    """
    data, files, skipped = load_labelled(paths, classes, size)
    for path, reason in skipped:
        log.warning("labelled file %s skipped: %s", path, reason)
    manifest = read_json(paths.labelled / MANIFEST, default={}) or {}
    known = {r["file"]: r["split"] for r in manifest.get("records", [])}
    splits = np.array([_split_of(f.read_bytes(), known.get(f.relative_to(paths.labelled).as_posix()))
                       for f in files])
    out = {s: data.subset(np.flatnonzero(splits == s)) for s in SPLITS}
    if len(out["train"]) == 0:
        raise FinetuneError("no labelled training images under data/labelled/")
    if len(out["val"]) == 0:
        log.warning("no validation images; validating on the training split")
        out["val"] = out["train"]
    if len(out["gate"]) == 0:
        log.warning("no gate images; deciding on the validation split")
        out["gate"] = out["val"]
    return out
