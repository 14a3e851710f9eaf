"""Small durable file operations shared by the agent and the cloud (no heavy imports here).

Files that others read while they change (status, state, manifests, records) are written to a temporary
file in the same folder, fsynced, then renamed over the old one: a reader sees the previous or the next
version, never half of one, even after a power cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class HashCache:
    """sha256 of files, recomputed only when a file's identity, size or mtime changed.

    The agent checks its base models every tick; re-hashing hundreds of MB each time would cost a core.
    """

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[int, int, int], str]] = {}

    def sha256(self, path: Path) -> str:
        info = os.stat(path)
        key = (info.st_ino, info.st_size, info.st_mtime_ns)
        cached = self._known.get(str(path))
        if cached is None or cached[0] != key:
            cached = (key, file_sha256(path))
            self._known[str(path)] = cached
        return cached[1]


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX needs the directory itself fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; status and reports are for others to read
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def site_document(data: bytes, site: str) -> dict:
    """A JSON object that a site wrote (or the cloud wrote for it) and that must name ``site``, the site whose
    path it is under; ValueError saying why not (one rule for exam lists and labels files)."""
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON ({str(exc)[:120]})") from None
    if not isinstance(parsed, dict):
        raise ValueError("not a JSON object")
    if parsed.get("site") != site:
        raise ValueError(f"names site {str(parsed.get('site'))[:80]!r}, not {site!r} (the site whose path it is under)")
    return parsed


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default
