"""Collecting what the sites sent since last time: new checked samples, pseudo-labels, the rest queued.

The watermark is the set of samples already collected, by content hash, kept beside the registry
(``collected.json``): a site that was offline and uploads old samples late still has them collected,
which a time watermark would miss. A sample the served model was confident about *and* whose members all
agreed gets a pseudo-label (saved in the labelling queue as ``by: pseudo``); the others wait for a person.
A rejected sample, or one that makes a step here raise, goes to the cloud's quarantine with its reason and
is never read again: one site's hostile file can neither stop the fleet's collect nor be retried forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.fileio import read_json, write_json_atomic
from edge_agent.store import Store
from orchestrator.labelling import LabelQueue
from orchestrator.samples import Quarantine, Sample, collect_samples

WATERMARK = "collected.json"


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


def collect_new(store: Store, home: Path, queue: LabelQueue, confidence: float) -> CollectResult:
    """Check the samples not collected before; pseudo-label the sure ones; move the watermark."""
    path = Path(home) / WATERMARK
    seen = set(read_json(path, default=[]) or [])
    quarantine = Quarantine(home)
    everything = collect_samples(store, seen, quarantine.reasons(), queue.classes)
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
    write_json_atomic(path, sorted(seen | {s.sha256 for s in result.new}))
    return result


def _intake(sample: Sample, queue: LabelQueue, confidence: float) -> str:
    """Label ``sample`` where it can be; returns the :class:`CollectResult` counter it adds to."""
    if sample.sidecar.get("operator_label"):
        return "operator_labelled"
    if (label := pseudo_label(sample, queue.classes, confidence)) and sample.sha256 not in queue.labels():
        queue.set(sample.sha256, label, by="pseudo")
        return "pseudo_labelled"
    return "queued"
