"""The sites' exam lists, read fail-closed: no sample reaches a training set unless its site's list reads.

Each site publishes ``exams/<site>.json``: ``{"site": ..., "sha256": [...], "phash": [...]}``, the content
hashes of its gate and test images (as the file and as the PNG an upload carries) and their perceptual
hashes (:mod:`edge_agent.perceptual`). Here:

- a sample is **held** (kept out of this collect, not quarantined, read again next time) while its site's list
  is missing, unreadable, late, over the caps, or names another site than the one whose path it is under;
- a sample that is, or is a near-copy of, an image of its own site's exam is **held** for good reasons but
  never quarantined: the exam rule keeps it out of training, nothing more;
- a sample that matches *another* site's exam is held as a **conflict**, reported, and released when that list
  changes: one site can keep an image out of training, never take another site's samples away for good.

Lists are bounded (bytes and entries per list; one list per site, at the path named for it) and each is
parsed once per change of its listing entry (size, mtime, tag), not once per request.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np

from edge_agent.fileio import site_document
from edge_agent.perceptual import MAX_DISTANCE, as_bits, nearest, sample_bits
from edge_agent.sitedata import EXAMS_KEY
from edge_agent.store import Listed, Store, StoreError, UnreadableFile

log = logging.getLogger(__name__)

MAX_EXAM_LIST_BYTES = 16 * 1024 * 1024  # ~100k exam images' hashes; a site with more splits its store
MAX_EXAM_ENTRIES = 200_000
MAX_EXAM_LISTS = 1000  # one per site
_SHA = re.compile(r"[0-9a-f]{64}")


class ExamListError(ValueError):
    """A list that cannot be used; the message says why (its site's samples are held meanwhile)."""


@dataclass(frozen=True)
class ExamList:
    site: str
    sha256: frozenset[str]
    phash: np.ndarray  # (n, bits) bool

    def near(self, bits: np.ndarray | None) -> int | None:
        """Distance of a sample's perceptual hash to this exam, when within :data:`MAX_DISTANCE`."""
        if bits is None:
            return None
        distance = nearest(bits, self.phash)
        return distance if distance <= MAX_DISTANCE else None


def parse_exam_list(data: bytes, site: str) -> ExamList:
    """An exam list, checked: it must name ``site`` (the site its path is under) and hold only hashes."""
    try:
        listed = site_document(data, site)
    except ValueError as exc:
        raise ExamListError(str(exc)) from None
    hashes, perceptual = listed.get("sha256"), listed.get("phash", [])
    if not isinstance(hashes, list) or not isinstance(perceptual, list):
        raise ExamListError("sha256 and phash must be lists")
    if len(hashes) + len(perceptual) > MAX_EXAM_ENTRIES:
        raise ExamListError(f"{len(hashes) + len(perceptual)} entries, over the cap of {MAX_EXAM_ENTRIES}")
    if not all(isinstance(h, str) and _SHA.fullmatch(h) for h in hashes):
        raise ExamListError("a sha256 entry is not 64 lower-case hex digits")
    try:
        bits = as_bits(perceptual)
    except ValueError as exc:
        raise ExamListError(str(exc)) from None
    return ExamList(site, frozenset(hashes), bits)


@dataclass
class ExamBook:
    """Every exam list this collect could read, and why the others could not."""

    lists: dict[str, ExamList] = field(default_factory=dict)
    unusable: dict[str, str] = field(default_factory=dict)  # site -> why its samples are held

    def verdict(self, site: str, sha: str, image: bytes) -> tuple[str, str] | None:
        """``(kind, reason)`` when the sample must not be trained on now: kind "held" (its own site's list
        does not read: released when it does), "exam" (its own site's exam image or a near-copy) or
        "conflict" (another site's exam: released when that list changes); None when it may be."""
        if site in self.unusable:
            return "held", f"held: the exam list of site {site} {self.unusable[site]}"
        if site not in self.lists:
            return "held", f"held: site {site} has published no exam list (exams/{site}.json) yet"
        bits = sample_bits(image)
        for name, exam in sorted(self.lists.items(), key=lambda item: item[0] != site):
            if sha in exam.sha256:
                what = "one of its exam images" if name == site else f"an exam image of site {name}"
            elif (distance := exam.near(bits)) is not None:
                what = (f"a near-copy ({distance} bits) of " +
                        ("one of its exam images" if name == site else f"an exam image of site {name}"))
            else:
                continue
            if name == site:
                return "exam", f"{what} (its gate or test split): never trained on"
            return "conflict", f"conflict: {what}; held until that list changes"
        return None


_parsed: dict[str, tuple[Listed, ExamList | str]] = {}  # its path -> (listing entry read, its list or why not)


def read_exam_book(store: Store) -> ExamBook:
    """Every site's exam list (at most :data:`MAX_EXAM_LISTS`), each parsed once per change of its listing."""
    book = ExamBook()
    listing = store.listing("exams")
    names = sorted(name for name in listing if name.endswith(".json") and not name.startswith("."))
    for number, name in enumerate(names):
        site = name.removesuffix(".json")
        if number >= MAX_EXAM_LISTS:
            book.unusable[site] = f"is not read: more than {MAX_EXAM_LISTS} exam lists in the store"
            continue
        where, entry = store.path(f"exams/{name}"), listing[name]
        found = _parsed.get(where)
        if found is None or found[0] != entry:
            value, lasting = _read_one(store, site, entry)
            if lasting:  # a store that failed is asked again next time; anything else waits for a change
                _parsed[where] = (entry, value)
            found = (entry, value)
        if isinstance(found[1], ExamList):
            book.lists[site] = found[1]
        else:
            book.unusable[site] = found[1]
    return book


def _read_one(store: Store, site: str, entry: Listed) -> tuple[ExamList | str, bool]:
    """(the list or why not, whether that holds until the list changes)."""
    if entry.size is not None and entry.size > MAX_EXAM_LIST_BYTES:
        return f"is {entry.size} bytes, over the cap of {MAX_EXAM_LIST_BYTES}", True
    try:
        return parse_exam_list(store.read(EXAMS_KEY.format(site=site), max_bytes=MAX_EXAM_LIST_BYTES), site), True
    except FileNotFoundError:
        return "vanished while it was read", False
    except (StoreError, OSError) as exc:
        return f"could not be read in time ({exc})", False
    except (UnreadableFile, ExamListError) as exc:
        log.warning("exam list of %s refused: %s", site, exc)
        return f"is refused: {exc}", True
