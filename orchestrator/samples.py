"""The cloud's side of the sample loop: read what the edges uploaded, check it, label it, learn from it.

Edges write ``<store>/samples/<site>/<sha256>.png`` and a ``.json`` sidecar (sidecar last, so a
sidecar always has its image). Here every sample is checked before it can reach a training set:
the bytes must hash to the name, decode as an image, and the sidecar must say where it came from.
Rejected samples are reported with the reason and never used; the cloud's :class:`Quarantine` keeps them
(and any sample that made a later step raise) so that they are never read again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edge_agent.datasets import DatasetVersion, ImportReport, derive_dataset
from edge_agent.fileio import sha256_hex
from edge_agent.imaging import ImageError, decode_image
from edge_agent.sitedata import EXAM_SPLITS
from edge_agent.sidecar import MAX_SIDECAR_BYTES, SampleSidecar, SidecarError, parse_sidecar
from edge_agent.store import Store, StoreError, UnreadableFile
from orchestrator.exams import read_exam_book
from orchestrator.ledger import Ledger, TableView

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # a sample is one camera frame, not an archive


@dataclass
class Sample:
    sha256: str
    site: str
    image: bytes
    sidecar: dict


@dataclass
class Collection:
    accepted: list[Sample] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)  # for good: {"sample": site/sha, "reason"}
    unreachable: list[dict[str, str]] = field(default_factory=list)  # the store failed: tried again next time
    held: list[dict[str, str]] = field(default_factory=list)  # the exam rule: {"sample", "kind", "reason"}

    def by_site(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for sample in self.accepted:
            counts[sample.site] = counts.get(sample.site, 0) + 1
        return counts


def _check(sha: str, image: bytes, sidecar: SampleSidecar, site: str, classes: list[str] | None) -> str | None:
    """Why a sample cannot be used, or None when it can."""
    if sha256_hex(image) != sha:
        return "image bytes do not match the content hash in the name"
    if sidecar.site != site:
        return f"sidecar names site {sidecar.site!r} but the sample is under {site!r}"
    if classes and (misfit := sidecar.fits(classes)):
        return misfit
    try:
        decode_image(image, 16, MAX_IMAGE_BYTES)
    except ImageError as exc:
        return str(exc)
    return None


def _read_sample(store: Store, sidecar_path: str, site: str, sha: str, classes: list[str] | None) -> Sample:
    """Read and check one sample; :class:`SampleRejected` says why it cannot be used."""
    try:
        sidecar = parse_sidecar(store.read(sidecar_path, max_bytes=MAX_SIDECAR_BYTES))
        image = store.read(sidecar_path[:-len(".json")] + ".png", max_bytes=MAX_IMAGE_BYTES)
    except StoreError as exc:
        raise SampleRejected(f"store unreachable: {exc}", lasting=False) from None
    except (OSError, UnreadableFile) as exc:
        raise SampleRejected(f"unreadable: {exc}") from None
    except SidecarError as exc:
        raise SampleRejected(str(exc)) from None
    reason = _check(sha, image, sidecar, site, classes)
    if reason:
        raise SampleRejected(reason)
    return Sample(sha, site, image, sidecar.model_dump(mode="json"))


class SampleRejected(ValueError):
    """A sample that must not reach a training set; the message is the reason. ``lasting`` is False when
    the store failed rather than the sample (then it is tried again next time)."""

    def __init__(self, reason: str, lasting: bool = True):
        super().__init__(reason)
        self.lasting = lasting


def collect_samples(store: Store, seen: Container[str] = (), quarantined: Container[str] = (),
                    classes: list[str] | None = None,
                    on_read: Callable[[int, int], None] | None = None) -> Collection:
    """Read and check every sample in the store, except those whose hash is in ``seen`` and those whose
    ``site/sha`` is in ``quarantined`` (neither is read); each bad one is rejected alone, with its reason.

    With ``classes`` (the family's), a sample whose probabilities are over other classes is rejected too.
    The exam rule fails closed (:mod:`orchestrator.exams`): a sample is *held* (neither accepted nor
    quarantined; read again next time) while its site's exam list does not read, when it is (a near-copy of)
    an exam image of its own site or of another (a conflict), or when its sidecar says it is in an exam split.
    ``on_read(done, total)`` hears how many of the samples to read are read (progress of a long collect).
    """
    collection = Collection()
    found = [(Path(p).parent.name, Path(p).stem, p) for p in store.list("samples/*/*.json")]
    todo = [(site, sha, path) for site, sha, path in found if sha not in seen and f"{site}/{sha}" not in quarantined]
    exams = read_exam_book(store)
    for done, (site, sha, sidecar_path) in enumerate(todo):
        if on_read:
            on_read(done, len(todo))
        try:
            sample = _read_sample(store, sidecar_path, site, sha, classes)
        except SampleRejected as exc:
            (collection.rejected if exc.lasting else collection.unreachable).append(
                {"sample": f"{site}/{sha}", "reason": str(exc)})
            log.warning("rejected sample %s/%s: %s", site, sha, exc)
            continue
        verdict = exams.verdict(site, sha, sample.image)
        if verdict is None and sample.sidecar.get("split") in EXAM_SPLITS:
            verdict = "exam", f"the sidecar says it is in the site's {sample.sidecar['split']} split: never trained on"
        if verdict is None:
            collection.accepted.append(sample)
        else:
            collection.held.append({"sample": f"{site}/{sha}", "kind": verdict[0], "reason": verdict[1]})
    if on_read:
        on_read(len(todo), len(todo))
    return collection


class Quarantine:
    """The cloud's quarantine: samples set aside for good, with why (``quarantine.sqlite3`` beside the registry;
    see :mod:`orchestrator.ledger`). A sample lands here when its intake check rejects it or when a later step
    raised on it; nothing here is read from the store again, so one hostile sample costs one read, once. A
    ``quarantine.json`` from before is migrated once (kept as ``quarantine.json.migrated``); a quarantine that does
    not read refuses the collect with one error and its damaged copy kept, instead of starting empty."""

    FILE = "quarantine.json"  # the record before SQLite
    DB = "quarantine.sqlite3"
    MAX_REASON = 500  # characters kept of a reason (they quote what a hostile file said)
    SCHEMA = "CREATE TABLE quarantine (sample TEXT PRIMARY KEY, reason TEXT NOT NULL)"

    def __init__(self, home: str | Path):
        self.home = Path(home)
        self.path = self.home / self.DB

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.path, self.SCHEMA, "the cloud's quarantine", legacy=self.home / self.FILE,
                      convert=_quarantine_rows)

    def reasons(self) -> TableView:
        """``{site/sha: reason}``, looked up in the database as asked (a million entries cost no memory)."""
        return TableView(self.ledger, "quarantine", "sample", "reason")

    def add(self, reasons: dict[str, str]) -> None:
        """Quarantine these samples (one transaction; a later reason for a sample replaces its earlier one)."""
        if reasons:
            with self.ledger.write() as db:
                db.executemany("INSERT OR REPLACE INTO quarantine VALUES (?, ?)",
                               [(str(k), str(v)[:self.MAX_REASON]) for k, v in reasons.items()])


def _quarantine_rows(data: object) -> dict[str, list[tuple]]:
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError("expected an object of reasons by site/sha")
    return {"quarantine": [(k, v[:Quarantine.MAX_REASON]) for k, v in data.items()]}


class Labeller(Protocol):
    """Gives a checked sample its class index, or None when nobody has said what it is yet."""

    def __call__(self, sample: Sample) -> int | None: ...


class OperatorLabels:
    """Labels that a site's operator gave (the sidecar's ``operator_label``)."""

    def __init__(self, classes: list[str]):
        self.classes = classes

    def __call__(self, sample: Sample) -> int | None:
        label = sample.sidecar.get("operator_label")
        return self.classes.index(label) if label in self.classes else None


def first_label(*labellers: Labeller) -> Labeller:
    def label(sample: Sample) -> int | None:
        return next((x for x in (labeller(sample) for labeller in labellers) if x is not None), None)

    return label


CLOUD_EXAM_SHARE = 0.15  # of the labelled samples: the cloud's gate grows with the fleet, as the sites' do


def build_retraining_set(base: DatasetVersion, samples: list[Sample], labeller: Labeller,
                         out: str | Path, pseudo: Container[str] = (),
                         exam_share: float = CLOUD_EXAM_SHARE,
                         site_exam: Callable[[Sample], bool] = lambda sample: False) -> tuple[ImportReport, int]:
    """A dataset version: ``base`` plus every labelled sample, in its train split but for ``exam_share`` of them
    (by content hash) which join the gate role and are never trained on; returns (report, unlabelled).
    ``pseudo`` holds the hashes whose label is a model's guess: never exam evidence. A sample for which
    ``site_exam`` is true is left out: its label goes home into its site's gate or test split
    (:func:`site_exam_rule`), and no model may have trained on it."""
    additions, unlabelled, names = [], 0, {}
    for sample in samples:
        if site_exam(sample):
            continue
        label = labeller(sample)
        if label is None:
            unlabelled += 1
            continue
        name = f"sample-{sample.site}-{sample.sha256[:16]}"
        names[name] = sample.sha256
        additions.append((name, sample.image, label,
                          {"source_file": f"store:samples/{sample.site}/{sample.sha256}.png", "site": sample.site,
                           "reasons": ",".join(sample.sidecar.get("reasons", []))}))
    report = derive_dataset(base, additions, out, source=f"retrain:{base.id}+{len(additions)} samples",
                            exam_share=exam_share, exam_eligible=lambda name: names[name] not in pseudo)
    return report, unlabelled


def site_exam_rule(shares: dict[str, dict[str, float]]) -> Callable[[Sample], bool]:
    """Whether a sample will be an exam image at its site once its label comes home: the site gives a label the
    role its content hash picks from ``home_labels.shares`` (:func:`edge_agent.homelabels.role_by_hash`), so
    the cloud knows it beforehand and never trains on one (a sample the site's operator labelled has its
    role at the site already, and was uploaded only from train or val)."""
    from edge_agent.homelabels import role_by_hash

    def exam(sample: Sample) -> bool:
        site_shares = shares.get(sample.site)
        return (site_shares is not None and not sample.sidecar.get("operator_label")
                and role_by_hash(sample.sha256, site_shares) in EXAM_SPLITS)

    return exam
