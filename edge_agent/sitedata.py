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
# The site's exam: never uploaded, never trained on anywhere (the cloud refuses their hashes).
EXAM_SPLITS = ("gate", "test")
EXAMS_KEY = "exams/{site}.json"  # where a site publishes the hashes of its exam images in the store


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


class SplitOf:
    """Which split a labelled file is in at this site (the role a label that came home was given, the manifest's
    word for the files it names, else the content hash): the one rule the fine-tune, the uploader and the exam
    list all read."""

    def __init__(self, paths: AgentPaths):
        from edge_agent.homelabels import HomeLabelsBook

        self.root = paths.labelled
        manifest = read_json(paths.labelled / MANIFEST, default={}) or {}
        self.known = {r["file"]: r["split"] for r in manifest.get("records", []) if isinstance(r, dict)
                      and "file" in r and "split" in r}
        self.given = {f: r for f, r in HomeLabelsBook(paths).roles().items() if r in SPLITS}  # labels that came home

    def __call__(self, file: Path, data: bytes | None = None) -> str:
        relative = file.relative_to(self.root).as_posix()
        if relative in self.given:
            return self.given[relative]
        data = file.read_bytes() if data is None else data
        return _split_of(data, self.known.get(relative))


def exam_hashes(paths: AgentPaths) -> list[str]:
    """sha256 of every labelled image in the gate or test split (see :func:`exam_list`)."""
    return exam_list(paths, "")["sha256"]


_phash_cache: dict[str, list[str]] = {}  # content hash -> perceptual hashes (an exam list is rebuilt often)


def exam_list(paths: AgentPaths, site: str) -> dict:
    """What a site publishes as ``exams/<site>.json``: its name, and for every labelled image in the gate or
    test split its sha256 as the file and as the PNG an upload would carry (:func:`edge_agent.outbox.as_png`)
    and its perceptual hashes (:func:`edge_agent.perceptual.file_phashes`), so the cloud refuses the image,
    its upload and its near-copies."""
    from edge_agent.outbox import as_png
    from edge_agent.perceptual import file_phashes

    split_of, hashes, perceptual = SplitOf(paths), set(), set()
    for _, file in labelled_files(paths):
        try:
            data = file.read_bytes()
            if split_of(file, data) not in EXAM_SPLITS:
                continue
            digest = hashlib.sha256(data).hexdigest()
            hashes.update((digest, hashlib.sha256(as_png(data)).hexdigest()))
            if digest not in _phash_cache:
                _phash_cache[digest] = file_phashes(data)
            perceptual.update(_phash_cache[digest])
        except Exception as exc:  # an unreadable file is never uploaded either; the fine-tune reports it
            log.debug("exam hash of %s skipped: %s", file, exc)
    return {"site": site, "sha256": sorted(hashes), "phash": sorted(perceptual)}


def split_counts(paths: AgentPaths) -> dict[str, int]:
    """How many labelled images each split holds (by file, without decoding)."""
    split_of, counts = SplitOf(paths), dict.fromkeys(SPLITS, 0)
    for _, file in labelled_files(paths):
        try:
            counts[split_of(file)] += 1
        except OSError:
            continue
    return counts


MIN_TRAIN_IMAGES = 10  # fewer: a fine-tune would only memorise them


def finetune_blocker(counts: dict[str, int]) -> str | None:
    """Why a fine-tune would be pointless now, or None. A thin gate does not block it: the gate then decides
    at whatever n it has, and a challenger it cannot accept yet waits in shadow (:mod:`edge_agent.shadow`)."""
    if counts["train"] >= MIN_TRAIN_IMAGES:
        return None
    have = ", ".join(f"{split} {n}" for split, n in counts.items())
    return f"too few labelled images to fine-tune ({have}): it needs {MIN_TRAIN_IMAGES} in the train split; label more"


def load_site_splits(paths: AgentPaths, classes: list[str], size: int):
    """train/val/gate/test ArraySets from the labelled folder.

    A manifest in the folder (a dataset version copied in) fixes the splits of the files it names; files an
    operator added later are split by content hash. An empty val split borrows the train split (noted);
    an empty gate or test split stays empty (the gate then keeps what is in place: not enough evidence).
    """
    data, files, skipped = load_labelled(paths, classes, size)
    for path, reason in skipped:
        log.warning("labelled file %s skipped: %s", path, reason)
    split_of = SplitOf(paths)
    splits = np.array([split_of(f) for f in files])
    out = {s: data.subset(np.flatnonzero(splits == s)) for s in SPLITS}
    if len(out["train"]) == 0:
        raise FinetuneError("no labelled training images under data/labelled/")
    if len(out["val"]) == 0:
        log.warning("no validation images; validating on the training split")
        out["val"] = out["train"]
    for split in ("gate", "test"):
        if len(out[split]) == 0:
            log.warning("no %s images: %s", split, "nothing can replace what serves" if split == "gate"
                        else "no test figures in the report")
    return out
