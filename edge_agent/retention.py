"""Keeping the edge's small disk from filling: old runs, ensembles, base models, processed and quarantined
files, and rotated logs go, oldest first, within the limits of ``config.retention``.

What serves (the active ensemble and whatever the serving handle fell back to), what the next fine-tune
needs (the newest base models) and what is still queued (inbox, outbox) are never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.config import Retention
from edge_agent.layout import AgentPaths

log = logging.getLogger(__name__)


@dataclass
class RetentionReport:
    removed: dict[str, int] = field(default_factory=dict)
    freed_bytes: int = 0

    def count(self, kind: str, path: Path) -> None:
        self.freed_bytes += tree_bytes(path)
        self.removed[kind] = self.removed.get(kind, 0) + 1


def tree_bytes(path: Path) -> int:
    """Bytes under ``path`` (a file or a folder), not following links."""
    try:
        if path.is_symlink() or path.is_file():
            return path.lstat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())
    except OSError:
        return 0


def disk_use(paths: AgentPaths, known: dict[str, int] | None = None) -> dict[str, int]:
    """Bytes per area of the agent root, for the status heartbeat; ``known`` areas are not walked (the
    outbox keeps its own total: walking thousands of queued samples every heartbeat would cost a core)."""
    areas = {"models": paths.models, "runs": paths.runs, "outbox": paths.outbox, "inbox": paths.inbox,
             "processed": paths.processed, "quarantine": paths.quarantine, "labelled": paths.labelled}
    known = known or {}
    use = {name: known[name] if name in known else tree_bytes(folder) for name, folder in areas.items()}
    use["logs"] = sum(tree_bytes(p) for p in paths.root.glob(f"{paths.log_file.name}*"))
    use["total"] = sum(use.values())
    return use


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.1f} {unit}"


def disk_full_message(root: Path, min_free_bytes: int) -> str | None:
    """``disk full (free X of Y, under retention.min_free_bytes = Z)`` while the disk holding ``root`` has less
    free than the setting, else None. A disk smaller than the setting can never meet it: the message says so
    and what to change, instead of reading "disk full" forever."""
    try:
        usage = shutil.disk_usage(root)
    except OSError:
        return None
    if usage.free >= min_free_bytes:
        return None
    free, total, limit = human_bytes(usage.free), human_bytes(usage.total), human_bytes(min_free_bytes)
    if usage.total < min_free_bytes:
        return (f"disk full (free {free} of {total}): the whole disk is smaller than retention.min_free_bytes = "
                f"{limit} ({min_free_bytes} bytes), so it can never have that much free; lower "
                f"retention.min_free_bytes in the agent's config below {usage.total} bytes")
    return f"disk full (free {free} of {total}, under retention.min_free_bytes = {limit})"


def _oldest_first(entries: list[Path]) -> list[Path]:
    def age(path: Path) -> tuple[float, str]:
        try:
            return path.lstat().st_mtime, path.name
        except OSError:
            return 0.0, path.name
    return sorted(entries, key=age)


def _remove(path: Path, kind: str, report: RetentionReport) -> None:
    report.count(kind, path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _visible(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []


def enforce(paths: AgentPaths, limits: Retention, keep: set[str] = frozenset()) -> RetentionReport:
    """Apply the limits once; ``keep`` names ensembles that must stay (active, serving fallback)."""
    report = RetentionReport()
    runs = _oldest_first([p for p in _visible(paths.runs) if p.is_dir()])
    for run in runs[:max(0, len(runs) - limits.keep_runs)]:
        _remove(run, "runs", report)
    ensembles = _oldest_first([p for p in _visible(paths.ensembles) if p.is_dir() and p.name not in keep])
    for ensemble in ensembles[:max(0, len(ensembles) - limits.keep_ensembles)]:
        _remove(ensemble, "ensembles", report)
    bases = sorted(p for p in _visible(paths.base_models) if p.is_dir())  # version ids sort by time
    for base in bases[:max(0, len(bases) - limits.keep_base_models)]:
        _remove(base, "base_models", report)
    processed = _oldest_first([p for p in _visible(paths.processed) if p.name != "results.jsonl"
                               and not p.name.startswith("results.jsonl")])
    for item in processed[:max(0, len(processed) - limits.keep_processed)]:
        _remove(item, "processed", report)
    quarantined = _oldest_first([p for p in _visible(paths.quarantine) if not p.name.endswith(".reason.json")])
    for item in quarantined[:max(0, len(quarantined) - limits.keep_quarantined)]:
        _remove(item, "quarantine", report)
        reason = item.with_name(item.name + ".reason.json")
        if reason.exists():
            reason.unlink()
    _rotate(paths.processed / "results.jsonl", limits.results_max_bytes, report)
    if report.removed:
        log.info("retention: removed %s, %d bytes freed", report.removed, report.freed_bytes)
    return report


def _rotate(path: Path, max_bytes: int, report: RetentionReport) -> None:
    """Keep one previous generation: ``x`` → ``x.1`` (the older ``x.1`` goes)."""
    try:
        if path.stat().st_size <= max_bytes:
            return
    except OSError:
        return
    previous = path.with_name(path.name + ".1")
    if previous.exists():
        _remove(previous, "rotated", report)
    os.replace(path, previous)
