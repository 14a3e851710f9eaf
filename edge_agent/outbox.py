"""The outbox: selected samples waiting for the store, bounded on disk.

A sample is ``<sha256>.png`` (the image bytes) plus ``<sha256>.json`` (the sidecar). Both are written
under a temporary name and renamed, the image first and the sidecar last, so a sample is complete exactly
when its sidecar exists; leftovers of a crash are swept at start. The name is the content hash, so putting
the same image twice is a no-op and the store deduplicates for free.

When the cloud is away for long the outbox would grow without end; ``enforce_cap`` drops the least useful
samples first (lowest selection score, then oldest) and counts what it dropped.
"""

from __future__ import annotations

import io
import json
import threading
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


class Outbox:
    """Content-addressed, crash-safe queue of samples on local disk."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.folder.mkdir(parents=True, exist_ok=True)
        # Samples are content-addressed and never rewritten: parse each sidecar once, not every tick.
        self._parsed: dict[str, tuple[tuple[int, int], float, float, int]] = {}

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
            write_bytes_atomic(self.folder / f"{sha}.png", image_png)
            write_bytes_atomic(json_path, (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
        return sha

    def items(self) -> list[OutboxItem]:
        """Complete samples, most useful first (score, then oldest)."""
        found, seen = [], set()
        for sidecar in self.folder.glob("*.json"):
            if sidecar.name.startswith("."):
                continue
            entry = self._entry(sidecar)
            if entry is None:
                continue
            seen.add(sidecar.name)
            _, score, created, size = entry
            found.append(OutboxItem(sidecar.stem, sidecar.with_suffix(".png"), sidecar, score, created, size))
        for gone in set(self._parsed) - seen:
            self._parsed.pop(gone, None)
        return sorted(found, key=lambda item: (-item.score, item.created, item.sha256))

    def _entry(self, sidecar: Path) -> tuple[tuple[int, int], float, float, int] | None:
        """(stat key, score, created, bytes) of one sample, from the cache while the sidecar is unchanged."""
        try:
            info = sidecar.stat()
            key = (info.st_size, info.st_mtime_ns)
            cached = self._parsed.get(sidecar.name)
            if cached is not None and cached[0] == key:
                return cached
            meta = json.loads(sidecar.read_text())
            size = sidecar.with_suffix(".png").stat().st_size + info.st_size
        except (OSError, ValueError):
            return None
        entry = (key, float(meta.get("score", 0.0)), float(meta.get("time", 0.0)), size)
        self._parsed[sidecar.name] = entry
        return entry

    def remove(self, item: OutboxItem) -> None:
        """Sidecar first: a crash in between leaves an orphan image that ``sweep`` clears."""
        with self._lock:
            item.sidecar.unlink(missing_ok=True)
            item.image.unlink(missing_ok=True)

    def size_bytes(self) -> int:
        return sum(item.size for item in self.items())

    def enforce_cap(self) -> int:
        """Drop the least useful samples until the outbox fits ``max_bytes``; returns how many went."""
        items = self.items()
        total = sum(item.size for item in items)
        dropped = 0
        while items and total > self.max_bytes:
            victim = items.pop()  # last = lowest score, newest among equals
            self.remove(victim)
            total -= victim.size
            dropped += 1
        return dropped
