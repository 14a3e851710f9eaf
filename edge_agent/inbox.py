"""Classifying what lands in the inbox with the serving ensemble (:mod:`edge_agent.serving`).

Whatever a file is (an image, a corrupt one, a link, a FIFO, something Pillow chokes on) and whatever its
name's bytes are (Latin-1 from a Windows share, control characters, a leading ``-``), it leaves the queue
once: classified into ``data/processed/``, or moved to ``data/quarantine/`` with its reason beside it. One
bad file never stops the files behind it. A file that can be neither moved nor quarantined (no permission,
a read-only folder) is recorded once, skipped (never classified again, so never counted twice), retried
now and then, and the status says the inbox is stuck, naming it escaped.

Names are kept as the file system gave them only to touch the file; everything written about a file (result
lines, reasons, sample sidecars, logs, the status, its name under ``processed/`` and ``quarantine/``) uses
:func:`shown_name`: valid UTF-8 and printable, undecodable bytes as ``\\xNN``.
"""

from __future__ import annotations

import errno
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
REASON_SUFFIX = ".reason.json"
RESULTS_FILE = "results.jsonl"
STUCK_RETRY_S = 60.0  # a stuck file is tried again this often (someone may have fixed the permission)


def shown_name(name: str) -> str:
    """``name`` as a person and a JSON reader can take it: the file system's bytes decoded as UTF-8, bytes
    that are not UTF-8 as ``\\xNN`` and unprintable characters (newlines, terminal escapes) as ``\\xNN`` or
    ``\\uNNNN``. A name that is valid printable UTF-8 comes back unchanged."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def bounded_name(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """``name``, or when longer than ``limit`` bytes its start, a hash of the whole name and its suffix."""
    raw = os.fsencode(name)
    if len(raw) <= limit:
        return name
    suffix = Path(name).suffix if len(os.fsencode(Path(name).suffix)) <= 16 else ""
    tag = "~" + hashlib.sha256(raw).hexdigest()[:16]
    stem = raw[:limit - len(tag) - len(os.fsencode(suffix))].decode("utf-8", errors="ignore")
    return stem + tag + suffix


def unique_destination(folder: Path, name: str, beside: str = "") -> Path:
    """``folder/<shown name>`` (shortened when too long for the file system), or with a counter when that,
    or the file ``beside`` it (its ``.reason.json``), is taken: the inbox may reuse names, and a name may
    even be another file's reason."""
    name = bounded_name(shown_name(name))
    candidate = folder / name
    stem, suffix, n = Path(name).stem, Path(name).suffix, 1
    while os.path.lexists(candidate) or (beside and os.path.lexists(f"{candidate}{beside}")):
        candidate = folder / f"{stem}.{n}{suffix}"
        n += 1
    return candidate


def _not_ours(name: str, prefix: str = "", suffix: str = "") -> str:
    """A destination name that cannot pass for one of the agent's own files in that folder (the result log
    and its rotations in ``processed/``, a reason in ``quarantine/``), which retention treats apart."""
    if prefix and name.startswith(prefix):
        name = "inbox-" + name
    return name + ".file" if suffix and name.endswith(suffix) else name


def move(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; across file systems (an inbox on a mount of its own) copy, then remove
    the source, and when the source cannot go remove the copy again: never two of one image."""
    try:
        os.rename(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    try:
        shutil.move(str(source), target)
    except BaseException:
        if os.path.lexists(source) and os.path.lexists(target):
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                os.unlink(target)
        raise


def quarantine(paths: AgentPaths, source: Path, reason: str) -> Path:
    """Move a bad file aside with ``<name>.reason.json`` saying why (the reason is removed again when the move
    fails: no reason without its file)."""
    paths.quarantine.mkdir(parents=True, exist_ok=True)
    target = unique_destination(paths.quarantine, _not_ours(source.name, suffix=REASON_SUFFIX), beside=REASON_SUFFIX)
    reason_file = target.with_name(target.name + REASON_SUFFIX)
    write_json_atomic(reason_file, {"file": shown_name(source.name), "reason": reason, "time": time.time()})
    try:
        move(source, target)
    except BaseException:
        reason_file.unlink(missing_ok=True)
        raise
    log.warning("quarantined %s: %s", shown_name(source.name), reason)
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


def inbox_files(inbox: Path, limit: int, skip: set[str] | frozenset[str] = frozenset()) -> list[Path]:
    """Oldest first, at most ``limit``, none of ``skip`` (stuck files must not fill the pass and hold back the
    files behind them); hidden and partial files are still being written by someone.

    Entries are listed without following links (``lstat``): links, FIFOs and folders are listed too, so
    that processing quarantines them instead of leaving them in the queue forever.
    """
    entries = []
    for path in inbox.iterdir():
        if path.name in skip or path.name.startswith(".") or path.name.endswith((".part", ".tmp")):
            continue
        try:
            entries.append((path.lstat().st_mtime, path.name, path))
        except OSError:
            continue  # gone since the listing
    return [path for _, _, path in sorted(entries)[:limit]]


@dataclass
class InboxReport:
    processed: int = 0
    quarantined: int = 0  # set aside with a reason, or newly stuck (an input that failed, counted once)


@dataclass
class Stuck:
    """A file that can neither leave the inbox nor be quarantined."""

    why: str
    classified: bool  # its result line is written: from now on it is only moved, never classified again
    retry_at: float


def _why(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"


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
        self.results = ResultLog(paths.processed / RESULTS_FILE)
        self.stuck: dict[str, Stuck] = {}  # inbox name (as the file system gave it) -> why it cannot leave

    def stuck_summary(self) -> str | None:
        """For the heartbeat: which files are stuck in the inbox and why (names escaped), or None."""
        if not self.stuck:
            return None
        name, entry = next(iter(self.stuck.items()))
        return (f"inbox stuck: {len(self.stuck)} file(s) cannot be moved or quarantined, e.g. "
                f"\"{shown_name(name)[:120]}\" ({entry.why})")

    def process(self, limit: int = 256) -> InboxReport:
        report = InboxReport()
        classifier = self.handle.get()
        if classifier is None:
            return report
        self._retry_stuck()
        now = time.time()
        skip = {name for name, entry in self.stuck.items() if entry.classified or entry.retry_at > now}
        good: list[tuple[Path, bytes, np.ndarray]] = []
        for path in inbox_files(self.paths.inbox, limit, skip):
            try:
                raw = read_regular_file(path, self.max_bytes)
                good.append((path, raw, decode_image(raw, classifier.image_size, self.max_bytes,
                                                     self.max_pixels)))
            except Exception as exc:  # whatever a file does, it leaves the queue with its reason
                report.quarantined += self._set_aside(path, str(exc) if isinstance(exc, ImageError) else _why(exc))
        for start in range(0, len(good), self.batch_size):
            batch = good[start:start + self.batch_size]
            predictions = classify(classifier, np.stack([image for _, _, image in batch]))
            for (path, raw, _), prediction in zip(batch, predictions):
                self._finish(path, raw, prediction)
                report.processed += 1
        return report

    def _retry_stuck(self) -> None:
        """Forget stuck files someone took away; move classified ones whose retry is due (one that was never
        classified is simply read again by the pass: it may be fine now)."""
        now = time.time()
        for name, entry in list(self.stuck.items()):
            path = self.paths.inbox / name
            if not os.path.lexists(path):
                del self.stuck[name]
            elif entry.classified and entry.retry_at <= now:
                self._move_classified(path)

    def _set_aside(self, path: Path, reason: str, classified: bool = False) -> bool:
        """Quarantine a file; if even that fails, skip it from now on so the files behind it move (and retry it
        every :data:`STUCK_RETRY_S`). True when the file newly left the queue or newly got stuck."""
        try:
            quarantine(self.paths, path, reason)
        except Exception as exc:
            if not os.path.lexists(path):  # someone else took it meanwhile: nothing is stuck
                self.stuck.pop(path.name, None)
                return False
            before = self.stuck.get(path.name)
            why = f"{reason}; cannot quarantine: {_why(exc)}"
            self.stuck[path.name] = Stuck(why, classified or bool(before and before.classified),
                                          time.time() + STUCK_RETRY_S)
            if before is None or before.why != why:
                log.error("cannot quarantine %s (%s); skipping it", shown_name(path.name), why)
            return before is None
        self.stuck.pop(path.name, None)
        return True

    def _finish(self, path: Path, raw: bytes, prediction: Prediction) -> None:
        """Result line and sample first, move last: a crash in between reprocesses, never loses. Once its result
        line is written an image is never classified again in this process, whatever its move does."""
        name = shown_name(path.name)
        self.results.append(prediction.as_result(name))  # a full disk raises here: nothing counted, next pass
        try:
            self.on_prediction(raw, prediction, name)
        except Exception:  # selection must never stop classification
            log.exception("sample selection failed for %s", name)
        self._move_classified(path)

    def _move_classified(self, path: Path) -> None:
        try:
            move(path, unique_destination(self.paths.processed, _not_ours(path.name, prefix=RESULTS_FILE)))
            fsync_dir(self.paths.processed)
        except Exception as exc:  # classified once: never again, whether or not it can be set aside
            self._set_aside(path, f"classified, but cannot move to processed/: {_why(exc)}", classified=True)
        else:
            self.stuck.pop(path.name, None)
