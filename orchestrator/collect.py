"""Collecting what the sites sent since last time: new checked samples, pseudo-labels, the rest queued.

The watermark is the set of samples already collected, by content hash, kept beside the registry
(``collected.sqlite3``, a journalled record: :mod:`orchestrator.ledger`): a site that was offline and uploads old
samples late still has them collected, which a time watermark would miss. A ``collected.json`` from before is
migrated once; a watermark that does not read refuses the collect (one error, its damaged copy kept) instead of
starting over and collecting, pseudo-labelling and queueing every sample again. A sample the served model was confident about *and* whose members all
agreed gets a pseudo-label (saved in the labelling queue as ``by: pseudo``); the others wait for a person.
A rejected sample, or one that makes a step here raise, goes to the cloud's quarantine with its reason and
is never read again: one site's hostile file can neither stop the fleet's collect nor be retried forever.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.store import Store
from orchestrator.labelling import LabelQueue, is_sample_id
from orchestrator.ledger import Ledger, TableView
from orchestrator.samples import Quarantine, Sample, collect_samples

WATERMARK = "collected.json"  # the record before SQLite: migrated once, kept as collected.json.migrated
WATERMARK_DB = "collected.sqlite3"


@dataclass
class CollectResult:
    new: list[Sample] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    held: list[dict[str, str]] = field(default_factory=list)  # the exam rule: read again next time
    pseudo_labelled: int = 0
    operator_labelled: int = 0
    queued: int = 0

    def by_site(self) -> list[dict]:
        held = [h["sample"].split("/", 1)[0] for h in self.held]
        sites = sorted({s.site for s in self.new} | set(held))
        return [{"site": site, "new": sum(s.site == site for s in self.new), "held": held.count(site),
                 "why held": next((h["reason"] for h in self.held if h["sample"].startswith(f"{site}/")), "")}
                for site in sites]


def pseudo_label(sample: Sample, classes: list[str], confidence: float) -> str | None:
    """The served model's answer when it is at least ``confidence`` sure and every member agrees; else None."""
    probs = sample.sidecar.get("probabilities") or {}
    members = sample.sidecar.get("member_probabilities") or []
    if not probs:
        return None
    label = max(probs, key=probs.get)
    agree = all(int(np.argmax(m)) == classes.index(label) for m in members) if label in classes else False
    return label if probs[label] >= confidence and agree else None


def collect_new(store: Store, home: Path, queue: LabelQueue, confidence: float,
                on_read: Callable[[int, int], None] | None = None) -> CollectResult:
    """Check the samples not collected before; pseudo-label the sure ones; move the watermark.
    ``on_read(done, total)``: samples read of those to read, as they are read."""
    watermark = Watermark(home)
    quarantine = Quarantine(home)
    everything = collect_samples(store, watermark.seen(), quarantine.reasons(), queue.classes, on_read=on_read)
    result = CollectResult(rejected=everything.rejected, held=everything.held)
    for sample in everything.accepted:
        try:
            kind = _intake(sample, queue, confidence)
        except Exception as exc:  # noqa: BLE001 - one sample must not stop the fleet's collect
            result.rejected.append({"sample": f"{sample.site}/{sample.sha256}",
                                    "reason": f"{type(exc).__name__} while collecting: {exc}"})
            continue
        result.new.append(sample)
        setattr(result, kind, getattr(result, kind) + 1)
    quarantine.add({r["sample"]: r["reason"] for r in result.rejected})
    watermark.add(s.sha256 for s in result.new)
    return result


class Watermark:
    """The content hashes collected so far (``collected.sqlite3`` beside the registry)."""

    SCHEMA = "CREATE TABLE collected (sha256 TEXT PRIMARY KEY)"

    def __init__(self, home: str | Path):
        self.home = Path(home)
        self.path = self.home / WATERMARK_DB

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.path, self.SCHEMA, "the collect watermark", legacy=self.home / WATERMARK,
                      convert=_watermark_rows)

    def seen(self) -> TableView:
        """The collected hashes, looked up in the database as asked (no list of a million in memory)."""
        return TableView(self.ledger, "collected", "sha256", "sha256")

    def add(self, hashes) -> None:
        rows = [(sha,) for sha in hashes]
        if rows:
            with self.ledger.write() as db:
                db.executemany("INSERT OR IGNORE INTO collected VALUES (?)", rows)


def _watermark_rows(data: object) -> dict[str, list[tuple]]:
    if not isinstance(data, list) or not all(is_sample_id(sha) for sha in data):
        raise ValueError("expected a list of sample ids")
    return {"collected": [(sha,) for sha in data]}


def _intake(sample: Sample, queue: LabelQueue, confidence: float) -> str:
    """Label ``sample`` where it can be; returns the :class:`CollectResult` counter it adds to."""
    if sample.sidecar.get("operator_label"):
        return "operator_labelled"
    if (label := pseudo_label(sample, queue.classes, confidence)) and queue.label_of(sample.sha256) is None:
        queue.set(sample.sha256, label, by="pseudo")
        return "pseudo_labelled"
    return "queued"
