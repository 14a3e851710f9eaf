"""Durable small JSON files: the agent's persistent state and its status heartbeat.

Both are rewritten often and read by others (the cloud, the provisioning health check, the operator),
so every write goes to a temporary file in the same folder, is fsynced and then renamed over the old one:
a reader sees the previous or the next version, never half of one, even after a power cut.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field


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


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


class UploadLedger(BaseModel):
    """What went up today (UTC), so the daily budget survives a restart."""

    day: str = ""
    count: int = 0
    bytes: int = 0

    def roll(self, now: float) -> None:
        today = time.strftime("%Y-%m-%d", time.gmtime(now))
        if today != self.day:
            self.day, self.count, self.bytes = today, 0, 0


class AgentState(BaseModel):
    """Everything the daemon must remember across a restart (``state.json``)."""

    base_versions_seen: list[str] = Field(default_factory=list)
    labelled_seen: list[str] = Field(default_factory=list, description="relative paths of labelled files already counted")
    new_labelled: int = 0
    pending_finetune: str | None = Field(None, description="why a fine-tune is owed; kept until one completes")
    finetune_failures: int = 0
    last_run: dict[str, Any] | None = None
    processed_total: int = 0
    quarantined_total: int = 0
    selected_total: int = 0
    uploaded_total: int = 0
    dropped_total: int = 0
    upload_ledger: UploadLedger = Field(default_factory=UploadLedger)
    last_upload_error: str | None = None

    @classmethod
    def load(cls, path: Path) -> "AgentState":
        raw = read_json(path, default=None)
        if not isinstance(raw, dict):
            return cls()
        try:
            return cls.model_validate(raw)
        except ValueError:
            return cls()

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.model_dump(mode="json"))
