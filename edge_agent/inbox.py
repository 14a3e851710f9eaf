"""Classifying what lands in the inbox, with the ensemble that is active right now.

The active ensemble is whatever ``models/active`` points at. :class:`EnsembleHandle` reads the link on
every use and reloads when its target changed, so a newly activated ensemble serves from the next image on,
in the inbox loop and in the HTTP server alike, with no restart. A file that cannot be decoded is moved to
``data/quarantine/`` with a reason beside it; one bad file never stops the agent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_agent.imaging import ImageError, decode_image
from edge_agent.onnx_model import OnnxClassifier
from edge_agent.layout import AgentPaths
from edge_agent.fileio import fsync_dir, write_json_atomic

log = logging.getLogger(__name__)

ENSEMBLE_FILE = "ensemble.onnx"


class EnsembleHandle:
    """The serving ensemble, reloaded when the active link moves (thread-safe)."""

    def __init__(self, active_link: Path, threads: int = 1):
        self.active_link = Path(active_link)
        self.threads = threads
        self._lock = threading.Lock()
        self._target: str | None = None
        self._classifier = None

    def target(self) -> str | None:
        try:
            return os.readlink(self.active_link)
        except OSError:
            return None

    def get(self):
        """The classifier for the active ensemble, or None when nothing is active."""
        target = self.target()
        with self._lock:
            if target != self._target:
                self._classifier = self._load(target)
                self._target = target
            return self._classifier

    def _load(self, target: str | None):
        if target is None:
            return None
        path = (self.active_link.parent / target / ENSEMBLE_FILE).resolve()
        classifier = OnnxClassifier(path, threads=self.threads)
        log.info("serving ensemble %s", classifier.version)
        return classifier


@dataclass(frozen=True)
class Prediction:
    """One classified image: what the result line says plus what sample selection needs."""

    label: str
    probabilities: dict[str, float]
    probs: np.ndarray
    member_probs: np.ndarray | None
    model_version: str

    def as_result(self, file: str) -> dict[str, Any]:
        return {"file": file, "label": self.label, "probabilities": self.probabilities,
                "model_version": self.model_version, "time": round(time.time(), 3)}


def classify(classifier, images: np.ndarray) -> list[Prediction]:
    """Run the ensemble graph on uint8 images [N,H,W]."""
    outputs = classifier.run(images)
    probs = outputs.get("probs", outputs[classifier.output_names[0]])
    members = outputs.get("member_probs")
    names = classifier.class_names
    return [Prediction(names[int(p.argmax())], {c: round(float(v), 6) for c, v in zip(names, p)}, p,
                       None if members is None else members[i], classifier.version)
            for i, p in enumerate(probs)]


def unique_destination(folder: Path, name: str) -> Path:
    """``folder/name``, or ``name`` with a counter when that is taken (the inbox may reuse names)."""
    candidate = folder / name
    stem, suffix, n = Path(name).stem, Path(name).suffix, 1
    while candidate.exists():
        candidate = folder / f"{stem}.{n}{suffix}"
        n += 1
    return candidate


def quarantine(paths: AgentPaths, source: Path, reason: str) -> Path:
    """Move a bad file aside with ``<name>.reason.json`` saying why."""
    paths.quarantine.mkdir(parents=True, exist_ok=True)
    target = unique_destination(paths.quarantine, source.name)
    write_json_atomic(target.with_name(target.name + ".reason.json"),
                      {"file": source.name, "reason": reason, "time": time.time()})
    shutil.move(str(source), target)
    log.warning("quarantined %s: %s", source.name, reason)
    return target


class ResultLog:
    """Append-only ``results.jsonl``; every line is flushed and fsynced before the image moves."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock, open(self.path, "a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def inbox_files(inbox: Path, limit: int) -> list[Path]:
    """Oldest first; hidden and partial files are still being written by someone."""
    files = [p for p in inbox.iterdir()
             if p.is_file() and not p.name.startswith(".") and not p.name.endswith((".part", ".tmp"))]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))[:limit]


@dataclass
class InboxReport:
    processed: int = 0
    quarantined: int = 0


class InboxProcessor:
    """Inbox → classify → result line → (sample selection) → processed/."""

    def __init__(self, paths: AgentPaths, handle: EnsembleHandle, max_bytes: int,
                 on_prediction: Callable[[bytes, Prediction, str], None], batch_size: int = 32):
        self.paths = paths
        self.handle = handle
        self.max_bytes = max_bytes
        self.on_prediction = on_prediction
        self.batch_size = batch_size
        self.results = ResultLog(paths.processed / "results.jsonl")

    def process(self, limit: int = 256) -> InboxReport:
        report = InboxReport()
        classifier = self.handle.get()
        if classifier is None:
            return report
        good: list[tuple[Path, bytes, np.ndarray]] = []
        for path in inbox_files(self.paths.inbox, limit):
            try:
                raw = path.read_bytes() if path.stat().st_size <= self.max_bytes else b""
                good.append((path, raw, decode_image(raw or path, classifier.image_size, self.max_bytes)))
            except ImageError as exc:
                quarantine(self.paths, path, str(exc))
                report.quarantined += 1
        for start in range(0, len(good), self.batch_size):
            batch = good[start:start + self.batch_size]
            predictions = classify(classifier, np.stack([image for _, _, image in batch]))
            for (path, raw, _), prediction in zip(batch, predictions):
                self._finish(path, raw, prediction)
                report.processed += 1
        return report

    def _finish(self, path: Path, raw: bytes, prediction: Prediction) -> None:
        """Result line and sample first, move last: a crash in between reprocesses, never loses."""
        self.results.append(prediction.as_result(path.name))
        try:
            self.on_prediction(raw, prediction, path.name)
        except Exception:  # selection must never stop classification
            log.exception("sample selection failed for %s", path.name)
        target = unique_destination(self.paths.processed, path.name)
        shutil.move(str(path), target)
        fsync_dir(self.paths.processed)
