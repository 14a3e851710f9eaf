"""Classifying what lands in the inbox with the serving ensemble (:mod:`edge_agent.serving`).

Whatever a file is (an image, a corrupt one, a link, a FIFO, something Pillow chokes on), it leaves the
queue: classified into ``data/processed/``, or moved to ``data/quarantine/`` with its reason beside it.
One bad file never stops the files behind it. A file that can be neither moved nor quarantined (no
permission, a read-only folder) is recorded once and skipped, and the status says the inbox is stuck.
"""

from __future__ import annotations

import hashlib
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

from edge_agent.fileio import fsync_dir, write_json_atomic
from edge_agent.imaging import MAX_PIXELS, ImageError, decode_image, read_regular_file
from edge_agent.layout import AgentPaths
from edge_agent.serving import EnsembleHandle, Prediction, classify

log = logging.getLogger(__name__)

ENSEMBLE_FILE = "ensemble.onnx"
# File systems allow 255 bytes per name; a destination gets a counter and ``.reason.json`` on top.
MAX_NAME_BYTES = 200


def bounded_name(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """``name``, or when longer than ``limit`` bytes its start, a hash of the whole name and its suffix."""
    if len(name.encode()) <= limit:
        return name
    suffix = Path(name).suffix if len(Path(name).suffix.encode()) <= 16 else ""
    tag = "~" + hashlib.sha256(name.encode()).hexdigest()[:16]
    stem = name.encode()[:limit - len(tag) - len(suffix.encode())].decode(errors="ignore")
    return stem + tag + suffix


def unique_destination(folder: Path, name: str) -> Path:
    """``folder/name`` (shortened when too long for the file system), or with a counter when that is
    taken (the inbox may reuse names)."""
    name = bounded_name(name)
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
    """Oldest first; hidden and partial files are still being written by someone.

    Entries are listed without following links (``lstat``): links, FIFOs and folders are listed too, so
    that processing quarantines them instead of leaving them in the queue forever.
    """
    entries = []
    for path in inbox.iterdir():
        if path.name.startswith(".") or path.name.endswith((".part", ".tmp")):
            continue
        try:
            entries.append((path.lstat().st_mtime, path.name, path))
        except OSError:
            continue  # gone since the listing
    return [path for _, _, path in sorted(entries)[:limit]]


@dataclass
class InboxReport:
    processed: int = 0
    quarantined: int = 0


class InboxProcessor:
    """Inbox → classify → result line → (sample selection) → processed/."""

    def __init__(self, paths: AgentPaths, handle: EnsembleHandle, max_bytes: int,
                 on_prediction: Callable[[bytes, Prediction, str], None], batch_size: int = 32,
                 max_pixels: int = MAX_PIXELS):
        self.paths = paths
        self.handle = handle
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels  # the same canvas limit as the HTTP endpoint: checked before decoding
        self.on_prediction = on_prediction
        self.batch_size = batch_size
        self.results = ResultLog(paths.processed / "results.jsonl")
        self.stuck: dict[str, str] = {}  # name -> why it can neither leave the inbox nor be quarantined

    def stuck_summary(self) -> str | None:
        """For the heartbeat: which files are stuck in the inbox and why, or None when none is."""
        if not self.stuck:
            return None
        name, why = next(iter(self.stuck.items()))
        return f"inbox stuck: {len(self.stuck)} file(s) cannot be moved or quarantined, e.g. {name[:80]!r} ({why})"

    def process(self, limit: int = 256) -> InboxReport:
        report = InboxReport()
        classifier = self.handle.get()
        if classifier is None:
            return report
        good: list[tuple[Path, bytes, np.ndarray]] = []
        for path in inbox_files(self.paths.inbox, limit):
            if path.name in self.stuck:
                continue
            try:
                raw = read_regular_file(path, self.max_bytes)
                good.append((path, raw, decode_image(raw, classifier.image_size, self.max_bytes,
                                                     self.max_pixels)))
            except Exception as exc:  # whatever a file does, it leaves the queue with its reason
                self._set_aside(path, str(exc) if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}")
                report.quarantined += 1
        for start in range(0, len(good), self.batch_size):
            batch = good[start:start + self.batch_size]
            predictions = classify(classifier, np.stack([image for _, _, image in batch]))
            for (path, raw, _), prediction in zip(batch, predictions):
                self._finish(path, raw, prediction)
                report.processed += 1
        return report

    def _set_aside(self, path: Path, reason: str) -> None:
        """Quarantine a file; if even that fails, skip it from now on so the files behind it move."""
        try:
            quarantine(self.paths, path, reason)
        except OSError as exc:
            self.stuck[path.name] = f"{reason}; cannot quarantine: {exc.strerror or exc}"
            log.error("cannot quarantine %s (%s: %s); skipping it", path.name, reason, exc)

    def _finish(self, path: Path, raw: bytes, prediction: Prediction) -> None:
        """Result line and sample first, move last: a crash in between reprocesses, never loses."""
        self.results.append(prediction.as_result(path.name))
        try:
            self.on_prediction(raw, prediction, path.name)
        except Exception:  # selection must never stop classification
            log.exception("sample selection failed for %s", path.name)
        try:
            shutil.move(str(path), unique_destination(self.paths.processed, path.name))
            fsync_dir(self.paths.processed)
        except OSError as exc:  # classified once: never again, whether or not it can be set aside
            self._set_aside(path, f"classified, but cannot move to processed/: {exc.strerror or exc}")
