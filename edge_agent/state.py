"""The agent's persistent state (``state.json``), rewritten atomically with :mod:`edge_agent.fileio`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from edge_agent.fileio import read_json, write_json_atomic


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
