"""The agent's persistent state (``state.json``), rewritten atomically with :mod:`edge_agent.fileio`."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from edge_agent.fileio import write_json_atomic

log = logging.getLogger(__name__)


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
    labelled_unjudged: list[str] = Field(default_factory=list, description="labelled files not yet offered for "
                                         "upload: they wait for a serving model to say whether they are informative")
    new_labelled: int = 0
    pending_finetune: str | None = Field(None, description="why a fine-tune is owed; kept until one completes")
    finetune_failures: int = 0
    finetune_blocked: str | None = Field(None, description="why the last run trained nothing (too few labelled "
                                                           "images); None once a fine-tune could run")
    gate_decisions: int = Field(0, description="gate decisions this site has made on its gate split (it grows "
                                               "with the labelled data but is reused by every fine-tune)")
    last_run: dict[str, Any] | None = None
    processed_total: int = 0
    quarantined_total: int = 0
    selected_total: int = 0
    uploaded_total: int = 0
    dropped_total: int = 0
    upload_ledger: UploadLedger = Field(default_factory=UploadLedger)
    samples_by_source: dict[str, UploadLedger] = Field(default_factory=dict,
                                                       description="samples queued today from HTTP and labels")
    last_upload_error: str | None = None
    labels_home: dict[str, Any] = Field(default_factory=lambda: {"taken": 0, "relabelled": 0, "refused": 0},
                                        description="labels that came home from the cloud: totals, and the last "
                                                    "pass's refusals with their reasons")
    shadow_scored: dict[str, list[int]] = Field(default_factory=dict, description="per shadow challenger: production "
                                                "images it scored, and those where it disagreed with what serves")
    recovery: str | None = Field(None, description="set when state.json was unreadable at start; never saved")

    @classmethod
    def load(cls, path: Path, set_damaged_aside: bool = False) -> "AgentState":
        """The saved state; if ``state.json`` is damaged, the copy before it, and ``recovery`` says so.

        A silent reset would count every labelled image again and forget the day's upload budget. The
        daemon sets a damaged file aside (so its next save cannot make it the "previous" copy); a
        read-only caller such as ``edgeloop-agent status`` leaves it where it is.
        """
        state, problem = cls._read(path)
        if problem is None:
            return state or cls()
        if set_damaged_aside:
            _keep_damaged(path)
        previous, prev_problem = cls._read(_previous(path))
        if previous is not None and prev_problem is None:
            log.error("%s is damaged (%s); resumed from the copy before it", path, problem)
            return previous.model_copy(update={"recovery": f"state.json damaged ({problem}); resumed from "
                                                           f"the previous copy"})
        log.error("%s is damaged (%s) and no good previous copy exists; starting afresh", path, problem)
        return cls(recovery=f"state.json damaged ({problem}); no previous copy, started afresh")

    @classmethod
    def _read(cls, path: Path) -> tuple["AgentState | None", str | None]:
        """(state, None), (None, None) when there is no file, or (None, why it is unusable)."""
        try:
            raw = json.loads(path.read_bytes())
            return cls.model_validate(raw), None
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as exc:
            return None, f"{type(exc).__name__}: {str(exc)[:200]}"

    def save(self, path: Path) -> None:
        """Write atomically, keeping the last good file as ``state.json.prev`` (a hard link: no copy)."""
        if path.exists():
            link = path.with_name(f".{path.name}.prev-link")
            link.unlink(missing_ok=True)
            os.link(path, link)
            os.replace(link, _previous(path))
        write_json_atomic(path, self.model_dump(mode="json", exclude={"recovery"}))


def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def _keep_damaged(path: Path) -> None:
    """Set a damaged state file aside for a person to look at, instead of overwriting it."""
    try:
        os.replace(path, path.with_name(f"{path.name}.damaged-{int(time.time())}"))
    except OSError:
        pass
