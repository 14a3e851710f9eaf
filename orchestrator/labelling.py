"""The labelling queue: people say what the samples the sites sent up are, and retraining uses it.

Samples without an operator's label wait here, the most informative first (the agent's own score: how
unsure the served model was, how much its members disagreed). A label or a discard is saved at once, in one
transaction of a small SQLite database under the registry home (``labels.sqlite3``, keyed by content hash; see
:mod:`orchestrator.ledger`), so the next retraining set sees it (:class:`LabelQueue` is a
:class:`~orchestrator.samples.Labeller`). A ``labels.json`` from before is migrated once and kept as
``labels.json.migrated``; a record that does not read is refused, never taken as empty. Labels are taken only
for samples the store holds (the callers pass the content hashes they know). Teams that label in Label Studio
export the queue as its JSON tasks and import the annotations back.
"""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.fileio import write_json_atomic
from edge_agent.store import Store
from orchestrator.ledger import Ledger, RecordError
from orchestrator.samples import Quarantine, Sample, collect_samples

LABELS_DB = "labels.sqlite3"
LABELS_FILE = "labels.json"  # the record before SQLite: migrated once, then kept as labels.json.migrated
DISCARDED = "__discarded__"  # what a discard is stored as: the sample is never used, nor asked about again
SCHEMA = """CREATE TABLE labels (sha256 TEXT PRIMARY KEY CHECK (length(sha256) = 64), label TEXT NOT NULL,
                                 by TEXT NOT NULL, time REAL NOT NULL)"""
MAX_BY = 64  # who gave a label: "web", "label-studio", "pseudo", a demo's name
MAX_IMPORT_BYTES = 256 * 1024 * 1024  # a Label Studio export of the queue with its images inline, in batches
HEX = frozenset("0123456789abcdef")

__all__ = ["DISCARDED", "LabelError", "LabelQueue", "Pending", "RecordError", "label_studio_config"]


class LabelError(ValueError):
    """A label that cannot be taken (unknown class or sample, unreadable import file)."""


def is_sample_id(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= HEX


def _unit(value: Any) -> float:
    """A score in [0, 1] (a sidecar's are checked there; this keeps an older one from heading the queue)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return 0.0
    return min(1.0, max(0.0, float(value)))


SHADOW_FIRST = 2.0  # above every model-derived score


@dataclass(frozen=True)
class Pending:
    """One sample waiting for a person, with what the site's model said about it."""

    sample: Sample

    @property
    def sha256(self) -> str:
        return self.sample.sha256

    @property
    def prediction(self) -> str | None:
        probs = self.sample.sidecar.get("probabilities") or {}
        return max(probs, key=probs.get) if probs else None

    @property
    def score(self) -> float:
        """How much a person's answer is worth: a disagreement with the site's shadow challenger first (labelled,
        it is one discordant pair for the decision that waits on it, edge_agent.shadow), then how unsure the
        served model was or how much its members disagreed (each within 0..1)."""
        s = self.sample.sidecar
        shadow = s.get("shadow")
        if isinstance(shadow, dict) and shadow.get("disagrees") is True:
            return SHADOW_FIRST
        return max(_unit(s.get("uncertainty")), _unit(s.get("disagreement")))


def _legacy_rows(data: Any) -> dict[str, list[tuple]]:
    """The rows of a ``labels.json`` from before SQLite; ValueError when it is not that record's shape."""
    if not isinstance(data, dict):
        raise ValueError(f"expected an object of labels by sample id, got {type(data).__name__}")
    rows = []
    for sha, entry in data.items():
        if not is_sample_id(sha) or not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
            raise ValueError(f"entry {str(sha)[:80]!r} is not a sample id with a label")
        when = entry.get("time")
        rows.append((sha, entry["label"], str(entry.get("by", ""))[:MAX_BY],
                     float(when) if isinstance(when, (int, float)) and math.isfinite(when) else 0.0))
    return {"labels": rows}


class LabelQueue:
    """Labels for samples, by content hash, in ``<home>/labels.sqlite3``."""

    def __init__(self, home: str | Path, classes: list[str]):
        self.home = Path(home)
        self.path = self.home / LABELS_DB
        self.classes = list(classes)

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.path, SCHEMA, "the labels database", legacy=self.home / LABELS_FILE, convert=_legacy_rows)

    def labels(self) -> dict[str, dict[str, Any]]:
        """``{sha256: {"label", "by", "time"}}``, every label and discard."""
        with self.ledger.read() as db:
            return {sha: {"label": label, "by": by, "time": when}
                    for sha, label, by, when in db.execute("SELECT sha256, label, by, time FROM labels")}

    def count(self) -> int:
        """How many samples have an answer (a label or a discard)."""
        with self.ledger.read() as db:
            return db.execute("SELECT count(*) FROM labels").fetchone()[0]

    def label_of(self, sha256: str) -> str | None:
        """The label (or :data:`DISCARDED`) given to one sample, None when none was."""
        with self.ledger.read() as db:
            row = db.execute("SELECT label FROM labels WHERE sha256 = ?", (sha256,)).fetchone()
        return row[0] if row else None

    def pending(self, samples: list[Sample]) -> list[Pending]:
        """Samples nobody has labelled (at the site or here) or discarded, most informative first."""
        done = self.answered()
        waiting = [Pending(s) for s in samples if s.sha256 not in done and not s.sidecar.get("operator_label")]
        return sorted(waiting, key=lambda p: (-p.score, p.sample.sidecar.get("time", 0), p.sha256))

    def answered(self) -> set[str]:
        """The content hashes with an answer (a label or a discard)."""
        with self.ledger.read() as db:
            return {sha for (sha,) in db.execute("SELECT sha256 FROM labels")}

    def set(self, sha256: str, label: str | None, *, by: str = "web", discard: bool = False,
            known: Container[str] | None = None) -> None:
        """Save one label (or a discard) in one transaction; the last word on a sample wins. With ``known`` (the
        content hashes of the samples the store holds), a label for any other sample is refused."""
        self.set_many({sha256: DISCARDED if discard else label}, by=by, known=known)

    def set_many(self, labels: dict[str, str | None], *, by: str, known: Container[str] | None = None) -> None:
        """Save several labels in one transaction: all of them, or (on any refusal) none."""
        for sha256, label in labels.items():
            self._check(sha256, label, known)
        now = time.time()
        with self.ledger.write() as db:
            db.executemany("INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?)",
                           [(sha, label, str(by)[:MAX_BY], now) for sha, label in labels.items()])

    def _check(self, sha256: Any, label: Any, known: Container[str] | None) -> None:
        if label != DISCARDED and label not in self.classes:
            raise LabelError(f"unknown class {str(label)[:80]!r}; expected one of {self.classes}")
        if not is_sample_id(sha256):
            raise LabelError(f"not a sample id: {str(sha256)[:80]!r}")
        if known is not None and sha256 not in known:
            raise LabelError(f"sample {sha256} is not a checked sample in the store")

    def __call__(self, sample: Sample) -> int | None:
        """The class index a person gave this sample; None when unlabelled or discarded."""
        label = self.label_of(sample.sha256)
        return self.classes.index(label) if label in self.classes else None

    def discarded(self) -> set[str]:
        with self.ledger.read() as db:
            return {sha for (sha,) in db.execute("SELECT sha256 FROM labels WHERE label = ?", (DISCARDED,))}

    # ---- Label Studio ---------------------------------------------------------------------------------
    def export_label_studio(self, samples: list[Sample], out: Path) -> int:
        """The pending samples as Label Studio tasks (images inline, the site's prediction pre-filled)."""
        tasks = []
        for item in self.pending(samples):
            image = "data:image/png;base64," + base64.b64encode(item.sample.image).decode()
            task: dict[str, Any] = {"data": {"image": image, "sha256": item.sha256, "site": item.sample.site,
                                             "reasons": ", ".join(item.sample.sidecar.get("reasons", []))}}
            if item.prediction:
                task["predictions"] = [{"model_version": item.sample.sidecar.get("model_version") or "",
                                        "result": [_choice(item.prediction)]}]
            tasks.append(task)
        write_json_atomic(Path(out), tasks)
        return len(tasks)

    def import_label_studio(self, path: Path, known: Container[str] | None = None) -> int:
        """Take the labels from a Label Studio JSON export (the last annotation with a choice wins).

        The whole file is checked before anything is written: a file that is not a regular JSON file of at most
        :data:`MAX_IMPORT_BYTES`, nested too deep to parse, or not a list is refused in one line; so is a file in
        which a task is misshapen (annotations, results or choices of the wrong type), names no sample or one
        the store does not hold (``known``: the checked samples' content hashes), or a class this queue does
        not know: one error naming every such task (the first few), and no label is saved.
        """
        tasks = _read_export(Path(path))
        labels, problems = {}, []
        for number, task in enumerate(tasks, 1):
            try:
                found = _task_label(task)
                if found is not None:
                    if found[1] not in self.classes:  # a person's choice, never the discard marker
                        raise LabelError(f"unknown class {found[1][:80]!r}; expected one of {self.classes}")
                    self._check(*found, known)
                    labels[found[0]] = found[1]
            except (LabelError, TypeError, ValueError) as exc:
                problems.append(f"task {number}: {exc}")
        if problems:
            raise LabelError(f"{path}: nothing imported; {len(problems)} task(s) refused: " + "; ".join(problems[:5])
                             + ("; ..." if len(problems) > 5 else ""))
        if labels:
            self.set_many(labels, by="label-studio")
        return len(labels)


class CheckedSamples:
    """The store's checked samples for the labelling queue, each read and checked once: a sample is
    content-addressed and never changes, so a later load lists the store, reads only the new samples and drops
    those gone. Every ``full_s`` all are read again (a site's exam list or the quarantine may since hold one)."""

    def __init__(self, store: Store, home: str | Path, full_s: float = 600.0):
        self.store, self.home, self.full_s = store, Path(home), full_s
        self._known: dict[str, Sample] = {}
        self._full_at = -math.inf
        self._lock = threading.Lock()

    def __call__(self) -> list[Sample]:
        with self._lock:
            if time.monotonic() - self._full_at >= self.full_s:
                self._known, self._full_at = {}, time.monotonic()
            listed = {Path(p).stem for p in self.store.list("samples/*/*.json")}
            self._known = {sha: s for sha, s in self._known.items() if sha in listed}
            fresh = collect_samples(self.store, seen=self._known, quarantined=Quarantine(self.home).reasons())
            for sample in fresh.accepted:
                self._known.setdefault(sample.sha256, sample)
            return list(self._known.values())


def _read_export(path: Path) -> list:
    """The tasks of a Label Studio export; LabelError in one line for a file that is not one."""
    try:
        if not path.is_file():
            raise LabelError(f"{path}: not a regular file")
        if (size := path.stat().st_size) > MAX_IMPORT_BYTES:
            raise LabelError(f"{path}: {size} bytes, larger than {MAX_IMPORT_BYTES}: export the project in "
                             "smaller batches")
        with open(path, "rb") as handle:
            data = handle.read(MAX_IMPORT_BYTES + 1)
    except OSError as exc:
        raise LabelError(f"{path}: not a Label Studio JSON export ({exc.strerror or exc})") from None
    if len(data) > MAX_IMPORT_BYTES:
        raise LabelError(f"{path}: larger than {MAX_IMPORT_BYTES} bytes: export the project in smaller batches")
    try:
        tasks = json.loads(data)
    except RecursionError:
        raise LabelError(f"{path}: nested too deeply to be a Label Studio export") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise LabelError(f"{path}: not a Label Studio JSON export ({str(exc)[:200]})") from None
    if not isinstance(tasks, list):
        raise LabelError(f"{path}: expected a list of tasks (got {type(tasks).__name__})")
    return tasks


def _listed(owner: dict, key: str, what: str) -> list:
    """``owner[key]`` as a list (absent or null: empty); TypeError naming ``what`` otherwise."""
    value = owner.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise TypeError(f"{what} is not a list (got {type(value).__name__})")
    return value


def _task_label(task: Any) -> tuple[str, str] | None:
    """(sample id, chosen class) of one exported task; None when nobody chose a class; TypeError/ValueError
    when the task does not have Label Studio's shape."""
    if not isinstance(task, dict):
        raise TypeError(f"not an object (got {type(task).__name__})")
    data = task.get("data")
    if not isinstance(data, dict):
        raise TypeError("data is not an object")
    choices = []
    for a, annotation in enumerate(_listed(task, "annotations", "annotations"), 1):
        if not isinstance(annotation, dict):
            raise TypeError(f"annotation {a} is not an object")
        if annotation.get("was_cancelled"):
            continue
        for r, result in enumerate(_listed(annotation, "result", f"annotation {a}'s result"), 1):
            where = f"annotation {a}'s result {r}"
            if not isinstance(result, dict):
                raise TypeError(f"{where} is not an object")
            value = result.get("value")
            if value is None:
                continue
            if not isinstance(value, dict):
                raise TypeError(f"{where}'s value is not an object")
            picked = _listed(value, "choices", f"{where}'s value.choices")
            if not all(isinstance(c, str) for c in picked):
                raise TypeError(f"{where}'s value.choices is not a list of class names")
            choices += picked
    if not choices:
        return None
    sha = data.get("sha256")
    if not isinstance(sha, str) or not sha:
        raise ValueError("a class was chosen but data.sha256 names no sample")
    return sha, choices[-1]


def _choice(label: str) -> dict[str, Any]:
    return {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}


LABEL_STUDIO_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="label" toName="image" choice="single">{choices}</Choices>
</View>"""


def label_studio_config(classes: list[str]) -> str:
    """The labelling interface to paste into a Label Studio project for these tasks."""
    return LABEL_STUDIO_CONFIG.format(choices="".join(f'<Choice value="{c}"/>' for c in classes))
