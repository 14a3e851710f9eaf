"""Labels come home: what people in the cloud said about this site's samples joins the site's labelled set.

The cloud writes ``labels/<site>.json`` in the store: ``{"site": ..., "labels": [...], "pseudo": [...]}``, each
entry ``{"sha256", "label", "by", "time"}`` for a sample this site uploaded (people's labels apart from the
pseudo-labels the cloud took from confident, unanimous models). The agent checks the file (bounded, names this
site) and each entry (a sample this site sent, by content hash, in its :class:`SentLog`; a known class), fetches
the sample's image back from the store (its bytes must hash to the name), and files it under
``data/labelled/<class>/home-<sha>.png`` with a role chosen by content hash from ``home_labels.shares``, so the
site's train, val, gate and test splits all grow as labels arrive, and no image ever changes role.

Where each label came from is kept in ``data/labelled/.home.json`` (who, when, which role). A pseudo-label is
used only where its hash gives it the train role: a model's own guess is never exam evidence. A refused entry
is reported with its reason and costs nothing else; a refused file changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.fileio import read_json, site_document, write_bytes_atomic, write_json_atomic
from edge_agent.imaging import ImageError, decode_image
from edge_agent.layout import AgentPaths
from edge_agent.store import Store, StoreError, UnreadableFile

log = logging.getLogger(__name__)

LABELS_KEY = "labels/{site}.json"
HOME_FILE = ".home.json"
HOME_PREFIX = "home-"
MAX_LABELS_BYTES = 16 * 1024 * 1024
MAX_ENTRIES = 100_000
MAX_FETCH_PER_PASS = 200  # images fetched back per pass: a large backlog comes home over several passes
_SHA = re.compile(r"[0-9a-f]{64}")


class LabelFileError(ValueError):
    """A labels file that is refused whole; the message says why."""


def role_by_hash(sha256: str, shares: dict[str, float]) -> str:
    """train / val / gate / test for an image, by its content hash: the same image always gets the same role."""
    bucket = int(sha256[8:16], 16) / 16 ** 8
    total = 0.0
    for split in ("train", "val", "gate", "test"):
        total += shares.get(split, 0.0)
        if bucket < total:
            return split
    return "train"


class SentLog:
    """The content hashes of every sample this agent uploaded (``sent.log``, one per line, append-only): a
    label can only come home for one of them."""

    def __init__(self, path: Path):
        self.path = path
        self._known: set[str] | None = None

    def _load(self) -> set[str]:
        if self._known is None:
            try:
                lines = self.path.read_text(errors="replace").split()
            except FileNotFoundError:
                lines = []
            self._known = {line for line in lines if _SHA.fullmatch(line)}
        return self._known

    def add(self, hashes: set[str]) -> None:
        new = sorted(hashes - self._load())
        if new:
            with open(self.path, "a") as handle:
                handle.write("".join(f"{h}\n" for h in new))
            self._known.update(new)

    def __contains__(self, sha: str) -> bool:
        return sha in self._load()


@dataclass
class HomeReport:
    """One pass: how many labels came home (or changed class), and what was refused, with why."""

    taken: int = 0
    relabelled: int = 0
    refused: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None
    pending: int = 0  # entries left for the next pass (:data:`MAX_FETCH_PER_PASS`)

    @property
    def changed(self) -> bool:
        return bool(self.taken or self.relabelled)


def parse_labels_file(data: bytes, site: str) -> list[tuple[str, dict[str, Any]]]:
    """``[(kind, entry)]`` of a labels file (kind "people" or "pseudo"); :class:`LabelFileError` refuses it whole."""
    try:
        parsed = site_document(data, site)
    except ValueError as exc:
        raise LabelFileError(str(exc)) from None
    entries = []
    for kind, key in (("people", "labels"), ("pseudo", "pseudo")):
        listed = parsed.get(key, [])
        if not isinstance(listed, list):
            raise LabelFileError(f"{key} is not a list")
        entries += [(kind, entry) for entry in listed]
    if len(entries) > MAX_ENTRIES:
        raise LabelFileError(f"{len(entries)} entries, over the cap of {MAX_ENTRIES}")
    return entries


def entry_problem(entry: Any, classes: list[str], sent: SentLog) -> str | None:
    """Why one entry cannot be taken, or None."""
    if not isinstance(entry, dict):
        return "not an object"
    sha, label, when = entry.get("sha256"), entry.get("label"), entry.get("time", 0)
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        return "sha256 is not 64 lower-case hex digits"
    if label not in classes:
        return f"unknown class {str(label)[:40]!r}; expected one of {classes}"
    if not isinstance(entry.get("by", ""), str) or len(entry.get("by", "")) > 64:
        return "by is not a short string"
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        return "time is not a number"
    if sha not in sent:
        return "not a sample this site sent"
    return None


class HomeLabelsBook:
    """``data/labelled/.home.json``: every label that came home, by file, with who gave it and its role."""

    def __init__(self, paths: AgentPaths):
        self.paths = paths
        self.path = paths.labelled / HOME_FILE

    def records(self) -> dict[str, dict[str, Any]]:
        found = read_json(self.path, default={})
        return found if isinstance(found, dict) else {}

    def roles(self) -> dict[str, str]:
        """``{relative file: role}`` of the labels that came home (the role they were given, for good)."""
        return {file: r["role"] for file, r in self.records().items() if isinstance(r, dict) and "role" in r}

    def save(self, records: dict[str, dict[str, Any]]) -> None:
        write_json_atomic(self.path, records)


def take_labels(store: Store, paths: AgentPaths, site: str, classes: list[str], sent: SentLog,
                shares: dict[str, float], max_image_bytes: int) -> HomeReport:
    """One pass over ``labels/<site>.json``: file every new or changed label (see the module docstring)."""
    report = HomeReport()
    try:
        entries = parse_labels_file(store.read(LABELS_KEY.format(site=site), max_bytes=MAX_LABELS_BYTES), site)
    except FileNotFoundError:
        return report
    except (StoreError, OSError) as exc:
        report.error = f"labels not read ({exc})"
        return report
    except (UnreadableFile, LabelFileError) as exc:
        report.error = f"labels file refused: {exc}"
        return report
    book = HomeLabelsBook(paths)
    records = book.records()
    by_sha = {r.get("sha256"): file for file, r in records.items() if isinstance(r, dict)}
    latest: dict[str, tuple[str, dict]] = {}
    for kind, entry in entries:  # people's word over a pseudo-label; the last entry for a sample wins
        if problem := entry_problem(entry, classes, sent):
            report.refused.append({"sample": str(entry.get("sha256", "?"))[:64] if isinstance(entry, dict) else "?",
                                   "reason": problem})
            continue
        if kind == "people" or latest.get(entry["sha256"], ("pseudo",))[0] == "pseudo":
            latest[entry["sha256"]] = (kind, entry)
    fetched = 0
    for sha, (kind, entry) in latest.items():
        source = f"cloud:{kind}"
        current = records.get(by_sha.get(sha, ""), {})
        if current.get("label") == entry["label"] and current.get("source") == source:
            continue
        role = current.get("role") or role_by_hash(sha, shares)
        if kind == "pseudo" and role != "train":
            continue  # a model's guess never decides, chooses or reports: only trains
        if current and _relabel(paths, records, by_sha[sha], entry, source):
            report.relabelled += 1
            continue
        if fetched >= MAX_FETCH_PER_PASS:
            report.pending += 1
            continue
        fetched += 1
        if problem := _fetch_and_file(store, paths, site, sha, entry, max_image_bytes, records, role, source):
            report.refused.append({"sample": sha, "reason": problem})
        else:
            report.taken += 1
    if report.changed:
        book.save(records)
    for refusal in report.refused[:5]:
        log.warning("label for %s refused: %s", refusal["sample"], refusal["reason"])
    return report


def _fetch_and_file(store: Store, paths: AgentPaths, site: str, sha: str, entry: dict, max_image_bytes: int,
                    records: dict, role: str, source: str) -> str | None:
    try:
        data = store.read(f"samples/{site}/{sha}.png", max_bytes=max_image_bytes)
    except FileNotFoundError:
        return "its image is not in the store"
    except (StoreError, OSError, UnreadableFile) as exc:
        return f"its image could not be read ({exc})"
    if hashlib.sha256(data).hexdigest() != sha:
        return "the image in the store does not hash to its name"
    try:
        decode_image(data, 16, max_image_bytes)
    except ImageError as exc:
        return f"its image does not decode ({exc})"
    relative = f"{entry['label']}/{HOME_PREFIX}{sha[:32]}.png"
    write_bytes_atomic(paths.labelled / relative, data)
    records[relative] = {"sha256": sha, "label": entry["label"], "by": entry.get("by", ""), "source": source,
                         "given": entry.get("time"), "arrived": time.time(), "role": role}
    return None


def _relabel(paths: AgentPaths, records: dict, relative: str, entry: dict, source: str) -> bool:
    """A person changed their mind (or confirmed a pseudo-label): the file moves class, keeping its role.
    False when its file is gone (an operator removed it): then it comes home again as new."""
    record = records.pop(relative)
    target = f"{entry['label']}/{Path(relative).name}"
    (paths.labelled / target).parent.mkdir(parents=True, exist_ok=True)
    try:
        (paths.labelled / relative).replace(paths.labelled / target)
    except FileNotFoundError:
        return False
    records[target] = {**record, "label": entry["label"], "by": entry.get("by", ""), "source": source,
                       "given": entry.get("time"), "relabelled": time.time()}
    return True


def is_home_label(file: Path) -> bool:
    """A file that came home (already in the store: never uploaded again)."""
    return file.name.startswith(HOME_PREFIX)
