"""The outbox: selected samples waiting for the store, bounded on disk.

A sample is ``<sha256>.png`` (the image bytes) plus ``<sha256>.json`` (the sidecar). Both are written
under a temporary name and renamed, the image first and the sidecar last, so a sample is complete exactly
when its sidecar exists; leftovers of a crash are swept at start. The name is the content hash, so putting
the same image twice is a no-op and the store deduplicates for free.

When the cloud is away for long the outbox would grow without end; ``enforce_cap`` drops the least useful
samples first (lowest selection score, then oldest) and counts what it dropped.

The folder is scanned once; after that an index in memory, kept by ``put`` and ``remove`` (this process
is the outbox's only writer), answers the agent's every tick: its count, bytes and order cost the same with
4,000 samples queued as with none.
"""

from __future__ import annotations

import bisect
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.fileio import file_sha256, sha256_hex, write_bytes_atomic  # noqa: F401 (re-exported)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def as_png(raw: bytes) -> bytes:
    """The image as PNG bytes at its own resolution (PNG input is kept byte for byte)."""
    if raw.startswith(PNG_MAGIC):
        return raw
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as image:
        out = io.BytesIO()
        image.convert("L").save(out, format="PNG")
        return out.getvalue()


@dataclass(frozen=True)
class OutboxItem:
    sha256: str
    image: Path
    sidecar: Path
    score: float
    created: float
    size: int

    def read_sidecar(self) -> dict[str, Any]:
        return json.loads(self.sidecar.read_text())

    @property
    def rank(self) -> tuple[float, float, str]:
        """Most useful first: highest score, then oldest."""
        return (-self.score, self.created, self.sha256)


class Outbox:
    """Content-addressed, crash-safe queue of samples on local disk."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, OutboxItem] | None = None  # built by the first scan, then kept up to date
        self._order: list[tuple[float, float, str]] = []  # ranks, sorted
        self._bytes = 0

    def sweep(self) -> int:
        """Remove what a crash left behind: temp files and images whose sidecar never landed."""
        removed = 0
        with self._lock:
            for path in self.folder.iterdir():
                orphan = path.suffix == ".png" and not path.with_suffix(".json").exists()
                if path.name.startswith(".") or orphan:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def put(self, image_png: bytes, sidecar: dict[str, Any], score: float) -> str:
        """Queue one sample; returns its sha256 name. Idempotent for the same image bytes."""
        sha = sha256_hex(image_png)
        sidecar = {**sidecar, "sha256": sha, "bytes": len(image_png), "score": float(score)}
        with self._lock:
            json_path = self.folder / f"{sha}.json"
            if json_path.exists():
                return sha
            text = (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode()
            write_bytes_atomic(self.folder / f"{sha}.png", image_png)
            write_bytes_atomic(json_path, text)
            if self._index is not None:
                self._add(OutboxItem(sha, json_path.with_suffix(".png"), json_path, float(score),
                                     float(sidecar.get("time", 0.0)), len(image_png) + len(text)))
        return sha

    def __len__(self) -> int:
        with self._lock:
            self._load()
            return len(self._order)

    def in_order(self) -> Iterator[OutboxItem]:
        """Complete samples, most useful first, read lazily: a caller that takes a few pays for a few."""
        with self._lock:
            self._load()
            ranks = list(self._order)
        for rank in ranks:
            item = self._index.get(rank[2])
            if item is not None:
                yield item

    def items(self) -> list[OutboxItem]:
        """Complete samples, most useful first (score, then oldest)."""
        return list(self.in_order())

    def _load(self) -> None:
        """Scan the folder, once."""
        if self._index is not None:
            return
        self._index = {}
        for sidecar in self.folder.glob("*.json"):
            if not sidecar.name.startswith(".") and (item := _read_item(sidecar)) is not None:
                self._add(item)

    def _add(self, item: OutboxItem) -> None:
        self._index[item.sha256] = item
        bisect.insort(self._order, item.rank)
        self._bytes += item.size

    def remove(self, item: OutboxItem) -> None:
        """Sidecar first: a crash in between leaves an orphan image that ``sweep`` clears."""
        with self._lock:
            item.sidecar.unlink(missing_ok=True)
            item.image.unlink(missing_ok=True)
            if self._index is not None and self._index.pop(item.sha256, None) is not None:
                at = bisect.bisect_left(self._order, item.rank)
                if at < len(self._order) and self._order[at] == item.rank:
                    del self._order[at]
                self._bytes -= item.size

    def size_bytes(self) -> int:
        with self._lock:
            self._load()
            return self._bytes

    def enforce_cap(self) -> int:
        """Drop the least useful samples until the outbox fits ``max_bytes``; returns how many went."""
        dropped = 0
        with self._lock:
            while self.size_bytes() > self.max_bytes and self._order:
                self.remove(self._index[self._order[-1][2]])  # last = lowest score, newest among equals
                dropped += 1
        return dropped


def _read_item(sidecar: Path) -> OutboxItem | None:
    try:
        meta = json.loads(sidecar.read_text())
        size = sidecar.with_suffix(".png").stat().st_size + sidecar.stat().st_size
        return OutboxItem(sidecar.stem, sidecar.with_suffix(".png"), sidecar, float(meta.get("score", 0.0)),
                          float(meta.get("time", 0.0)), size)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
