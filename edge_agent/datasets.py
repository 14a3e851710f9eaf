"""Dataset versions: an ImageFolder tree plus a manifest whose hash is the dataset's id.

A version is immutable once written: ``root/<class>/<file>.png`` and ``root/manifest.json`` (class
names and one record per file: file, sha256, label, split and source fields). The id is the sha256 of
the canonical manifest, so the same inputs and seed always give the same id, and any change to a
file, a label or a split gives a new one. Import commands turn sources into this form; an import
never crashes on a bad image: it skips it and lists it with the reason in ``import_report.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .fileio import write_json_atomic
from .imaging import ImageError, decode_image, encode_png, read_regular_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REPORT = "import_report.json"
FORMAT = "edgeloop-dataset/1"
MAX_IMAGE_FILE_BYTES = 20 * 1024 * 1024  # a dataset image is stored resized: far smaller than this
SPLITS = ("train", "val", "test")
# Evaluation roles (DESIGN.md): train fits weights; val chooses (epochs, ensemble weights); gate decides
# (activation, promotion) and nothing else; test is reported and decides nothing.
ROLES = ("train", "val", "gate", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm"}
ELPV_CLASSES = ["functional", "defective"]
ELPV_DEFECT_THRESHOLD = 0.5


class DatasetError(ValueError):
    """A source or dataset that cannot be used as it is."""


@dataclass
class ArraySet:
    """Decoded images held in memory: small edge datasets are decoded once, not every epoch."""

    images: np.ndarray  # uint8 [N, H, W]
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "ArraySet":
        return ArraySet(self.images[index], self.labels[index])


@dataclass
class ImportReport:
    out: Path
    dataset_id: str
    counts: dict[str, dict[str, int]]  # split -> class -> n
    skipped: list[dict[str, str]] = field(default_factory=list)
    children: list["ImportReport"] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"out": str(self.out), "dataset_id": self.dataset_id, "counts": self.counts,
                "skipped": self.skipped, "children": [c.as_dict() for c in self.children]}


@dataclass
class SourceImage:
    """One decoded source image waiting to be written, with the fields its manifest record keeps
    (for ELPV: ``cell_type``, mono or poly, which the demo uses to give sites different cells)."""

    name: str
    label: int
    pixels: np.ndarray
    extra: dict


class DatasetVersion:
    """A written dataset version, opened read-only."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.classes: list[str] = manifest["classes"]
        self.records: list[dict] = manifest["records"]
        self.image_size: int = manifest["image_size"]
        self.id = manifest_id(manifest)

    def files(self, split: str) -> list[dict]:
        """The records in one split, or in one evaluation role (``val`` and ``gate`` halve the val split)."""
        if split in ("val", "gate"):
            return [r for r in self.records if r["split"] == "val" and role(r["split"], r["sha256"]) == split]
        return [r for r in self.records if r["split"] == split]

    def load_split(self, split: str, size: int | None = None) -> ArraySet:
        """Decode one split or role into memory (``size`` resizes; default: the stored size).

        Every file must still hold the bytes the manifest hashed: an image changed after import would
        silently train on data the dataset id does not describe. The first bad file is a
        :class:`DatasetError` naming it and why (in a distributed job, every rank says the same).
        """
        if split not in ROLES:
            raise DatasetError(f"unknown split {split!r}; expected one of {ROLES}")
        records = self.files(split)
        size = size or self.image_size
        images = np.zeros((len(records), size, size), dtype=np.uint8)
        for i, record in enumerate(records):
            path = self.root / record["file"]
            try:
                data = read_regular_file(path, MAX_IMAGE_FILE_BYTES)
                images[i] = decode_image(data, size)  # first: "truncated" says more than "changed"
                if hashlib.sha256(data).hexdigest() != record["sha256"]:
                    raise ImageError("its bytes do not match the manifest's sha256 (changed since the import)")
            except ImageError as exc:
                raise DatasetError(f"{path}: {exc}") from None
        labels = np.array([r["label"] for r in records], dtype=np.int64)
        return ArraySet(images, labels)

    def counts(self) -> dict[str, dict[str, int]]:
        counts = {s: Counter(self.classes[r["label"]] for r in self.records if r["split"] == s) for s in SPLITS}
        return {s: dict(sorted(c.items())) for s, c in counts.items()}


def role(split: str, sha256: str) -> str:
    """The evaluation role of an image in ``split``: a val image is val or gate by its content hash, so
    what chooses never also decides, and the halves never move as a dataset grows."""
    if split != "val":
        return split
    return "val" if int(sha256[:8], 16) % 1000 < 500 else "gate"


def manifest_id(manifest: dict) -> str:
    canonical = json.dumps({"classes": manifest["classes"], "records": manifest["records"]},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def open_dataset(root: str | Path) -> DatasetVersion:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{root}: not a dataset version (no {MANIFEST}); import one with `edgeloop data import`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: corrupt manifest: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: unknown format {manifest.get('format')!r}")
    return DatasetVersion(root, manifest)


def stratified_split(strata: Sequence, fractions: Sequence[float], seed: int) -> list[int]:
    """Assign each item a part index so that every stratum is split in the given fractions."""
    rng = np.random.default_rng(seed)
    parts = [0] * len(strata)
    groups: dict = {}
    for i, key in enumerate(strata):
        groups.setdefault(key, []).append(i)
    bounds = np.cumsum(fractions) / np.sum(fractions)
    for key in sorted(groups, key=str):
        members = np.array(groups[key])[rng.permutation(len(groups[key]))]
        cuts = np.round(bounds * len(members)).astype(int)
        start = 0
        for part, stop in enumerate(cuts):
            for i in members[start:stop]:
                parts[i] = part
            start = stop
    return parts


def write_version(out: Path, items: list[SourceImage], classes: list[str], fractions: Sequence[float], seed: int,
                   size: int, source: str, skipped: list[dict[str, str]]) -> ImportReport:
    """Write items as a dataset version, stratified by label (and cell type where known)."""
    if not items:
        raise DatasetError(f"{out}: no usable images to write")
    out.mkdir(parents=True, exist_ok=True)
    splits = stratified_split([(it.label, it.extra.get("cell_type")) for it in items], fractions, seed)
    records = []
    for item, part in zip(items, splits):
        rel = f"{classes[item.label]}/{item.name}.png"
        data = encode_png(item.pixels)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        records.append({"file": rel, "sha256": hashlib.sha256(data).hexdigest(), "label": item.label,
                        "split": SPLITS[part], **item.extra})
    records.sort(key=lambda r: r["file"])
    manifest = {"format": FORMAT, "source": source, "image_size": size, "seed": seed,
                "classes": classes, "records": records}
    write_json_atomic(out / MANIFEST, manifest)
    version = DatasetVersion(out, manifest)
    report = ImportReport(out, version.id, version.counts(), skipped)
    write_json_atomic(out / REPORT, report.as_dict())
    log.info("dataset %s at %s: %s", version.id, out, report.counts)
    return report


def _decode_all(sources: Iterable[tuple[str, Path, int, dict]], size: int,
                skipped: list[dict[str, str]]) -> list[SourceImage]:
    items = []
    for name, path, label, extra in sources:
        try:
            items.append(SourceImage(name, label, decode_image(path, size), extra))
        except ImageError as exc:
            skipped.append({"file": str(path), "reason": str(exc)})
            log.warning("skipped %s: %s", path, exc)
    return items


def import_folder(src: str | Path, out: str | Path, size: int = 96, seed: int = 0,
                  fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> ImportReport:
    """Import a user's ImageFolder tree (``src/<class>/<image>``)."""
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(f"source {src} does not exist or is not a folder")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DatasetError(f"{src}: need at least two class folders, found {classes or 'none'}")
    files = {c: sorted(p for p in (src / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    empty = [c for c, fs in files.items() if not fs]
    if empty:
        raise DatasetError(f"{src}: class folder(s) with no images: {', '.join(empty)}")
    skipped: list[dict[str, str]] = []
    sources = [(_safe_name(p.relative_to(src / c)), p, label, {"source_file": str(p.relative_to(src))})
               for label, c in enumerate(classes) for p in files[c]]
    items = _decode_all(sources, size, skipped)
    missing = [c for i, c in enumerate(classes) if not any(it.label == i for it in items)]
    if missing:
        raise DatasetError(f"{src}: no readable images in class folder(s): {', '.join(missing)}")
    return write_version(Path(out), items, classes, fractions, seed, size, f"folder:{src.resolve()}", skipped)


def _safe_name(rel: Path) -> str:
    return "__".join(rel.with_suffix("").parts)


def elpv_root() -> Path:
    """The ELPV folder (``labels.csv`` + ``images/``): ``EDGELOOP_ELPV_ROOT`` when set (a copy on a machine
    without the package), else the bundled elpv-dataset package."""
    if override := os.environ.get("EDGELOOP_ELPV_ROOT"):
        return Path(override)
    try:
        import elpv_dataset
    except ImportError:
        raise DatasetError("the ELPV data needs the elpv-dataset package: pip install 'edgeloop[cloud]'") from None
    return Path(elpv_dataset.__file__).parent / "data"


def _elpv_sources(limit: int | None, seed: int) -> list[tuple[str, Path, int, dict]]:
    root = elpv_root()
    rows = [line.split() for line in (root / "labels.csv").read_text().splitlines() if line.strip()]
    sources = []
    for rel, prob, cell_type in rows:
        probability = float(prob)
        label = int(probability >= ELPV_DEFECT_THRESHOLD)
        extra = {"source_probability": round(probability, 4), "cell_type": cell_type, "source_file": rel}
        sources.append((Path(rel).stem, root / rel, label, extra))
    if limit is not None and limit < len(sources):
        keep = stratified_split([(s[2], s[3]["cell_type"]) for s in sources], (limit, len(sources) - limit), seed)
        sources = [s for s, part in zip(sources, keep) if part == 0]
    return sources


def elpv_images(size: int, seed: int = 0, limit: int | None = None) -> tuple[list[SourceImage], list[dict[str, str]]]:
    """The bundled ELPV images decoded at ``size`` (binary labels, cell type kept), and any skipped."""
    skipped: list[dict[str, str]] = []
    return _decode_all(_elpv_sources(limit, seed), size, skipped), skipped


def import_elpv(out: str | Path, size: int = 96, seed: int = 0, sites: int = 0, limit: int | None = None,
                fractions: Sequence[float] = (0.7, 0.15, 0.15), generic_share: float = 0.5) -> ImportReport:
    """Import the bundled ELPV solar-cell images as a binary task (defective when probability >= 0.5).

    With ``sites`` > 0, a "generic" pool for the cloud (``generic_share`` of the images) and ``sites``
    disjoint private site sets are carved out, each a dataset version with its own splits.
    """
    out = Path(out)
    items, skipped = elpv_images(size, seed, limit)
    if sites <= 0:
        return write_version(out, items, ELPV_CLASSES, fractions, seed, size, "elpv", skipped)
    site_share = (1 - generic_share) / sites
    parts = stratified_split([(it.label, it.extra["cell_type"]) for it in items],
                             [generic_share] + [site_share] * sites, seed)
    children = []
    for part in range(sites + 1):
        name = "generic" if part == 0 else f"sites/site-{part}"
        chosen = [it for it, p in zip(items, parts) if p == part]
        children.append(write_version(out / name, chosen, ELPV_CLASSES, fractions, seed + part, size,
                                       f"elpv:{name}", []))
    counts = {c.out.relative_to(out).as_posix(): {s: sum(v.values()) for s, v in c.counts.items()} for c in children}
    report = ImportReport(out, manifest_id({"classes": ELPV_CLASSES,
                                            "records": [c.dataset_id for c in children]}), counts, skipped, children)
    write_json_atomic(out / REPORT, report.as_dict())
    return report


def exam_share_of(sha256: str, share: float) -> bool:
    """Whether an added image belongs to the dataset's growing exam: ``share`` of all images, by content hash
    (its val-or-gate half picks the gate role, :func:`role`; a second slice of the hash picks the share)."""
    return role("val", sha256) == "gate" and int(sha256[8:16], 16) / 16 ** 8 < 2 * share


def derive_dataset(base: DatasetVersion, additions: Sequence[tuple[str, bytes, int, dict]], out: str | Path,
                   source: str, exam_share: float = 0.0, exam_eligible: Callable[[str], bool] = lambda name: True
                   ) -> ImportReport:
    """A new version: ``base`` plus extra images ``(name, image bytes, label, fields)``, for training, except
    ``exam_share`` of them (by content hash, :func:`exam_share_of`) which join the gate role and are never
    trained on: the exam grows with the data. An addition in the exam share that is not ``exam_eligible``
    (a pseudo-label: a model's guess is no exam evidence) is left out altogether, so no image ever moves role.

    The base's validation and test splits stay as they are, so a model trained on the new version
    is compared with its parent on the same held-out images.
    """
    out = Path(out)
    skipped: list[dict[str, str]] = []
    records = [dict(r) for r in base.records]
    for record in records:
        target = out / record["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((base.root / record["file"]).read_bytes())
    known = {r["sha256"] for r in records}
    for name, data, label, extra in additions:
        try:
            pixels = decode_image(data, base.image_size)
        except ImageError as exc:
            skipped.append({"file": name, "reason": str(exc)})
            continue
        png = encode_png(pixels)
        digest = hashlib.sha256(png).hexdigest()
        if digest in known:
            continue  # the same image twice (or already in the base) adds nothing
        split = "val" if exam_share_of(digest, exam_share) else "train"  # "val" with this hash: the gate role
        if split == "val" and not exam_eligible(name):
            continue
        known.add(digest)
        rel = f"{base.classes[label]}/{name}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(png)
        records.append({"file": rel, "sha256": digest, "label": label, "split": split, **extra})
    records.sort(key=lambda r: r["file"])
    manifest = {**base.manifest, "source": source, "parent_dataset": base.id, "records": records}
    write_json_atomic(out / MANIFEST, manifest)
    version = DatasetVersion(out, manifest)
    report = ImportReport(out, version.id, version.counts(), skipped)
    write_json_atomic(out / REPORT, report.as_dict())
    return report
