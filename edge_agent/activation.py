"""The atomic switch between ensembles (the decision to switch is :mod:`edge_agent.gate`'s).

An ensemble is built in ``models/ensembles/.tmp-<version>/``, every file fsynced, then renamed to
``<version>/`` (one rename: it is there completely or not at all). Activation replaces the
``models/active`` symlink with a temporary symlink via ``os.replace`` (also one rename). A crash or kill at
any moment therefore leaves the previous ensemble serving and no half-written model under a real name;
leftover staging folders are swept at the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from edge_agent.fileio import fsync_dir
from edge_agent.layout import AgentPaths

STAGING_PREFIX = ".tmp-"


def staging_dir(paths: AgentPaths, version: str) -> Path:
    folder = paths.ensembles / f"{STAGING_PREFIX}{version}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def sweep_staging(paths: AgentPaths) -> list[Path]:
    """Remove staging folders a crash left behind (never a published version)."""
    removed = []
    for folder in paths.ensembles.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    for link in paths.models.glob(".active-*"):
        link.unlink(missing_ok=True)
    return removed


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def publish(paths: AgentPaths, staged: Path, version: str) -> Path:
    """Make a staged ensemble visible under its version name in one rename."""
    _fsync_tree(staged)
    final = paths.ensembles / version
    os.rename(staged, final)
    fsync_dir(paths.ensembles)
    return final


def activate(paths: AgentPaths, version: str) -> None:
    """Point ``models/active`` at ``ensembles/<version>`` atomically (temp symlink + os.replace)."""
    if not (paths.ensembles / version).is_dir():
        raise FileNotFoundError(f"no published ensemble {version}")
    temp = paths.models / f".active-{os.getpid()}"
    temp.unlink(missing_ok=True)
    os.symlink(os.path.join(paths.ensembles.name, version), temp)
    os.replace(temp, paths.active_link)
    fsync_dir(paths.models)


EXIT_FENCED = 5  # the exit status of a fine-tune process that was fenced


class Fenced(RuntimeError):
    """The fine-tune was built on a base version a rollback fenced: it must not activate."""


def fenced_versions(paths: AgentPaths) -> set[str]:
    """Base versions a rollback fenced (``models/fence.json``; written by the cloud's rollback)."""
    try:
        return set(json.loads(paths.fence_file.read_text()).get("versions", []))
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, AttributeError) as exc:  # unreadable fence: activate nothing, say why
        raise Fenced(f"{paths.fence_file} unreadable ({exc})") from None


@contextlib.contextmanager
def activation_guard(paths: AgentPaths, bases: list[str]) -> Iterator[None]:
    """Hold the activation lock, and refuse (:class:`Fenced`) when any of ``bases`` is fenced.

    A rollback fences under the same lock before it switches ``active``, so a fine-tune either activates
    before the rollback (which then switches away from it) or sees the fence: never after a rollback.
    """
    with open(paths.activation_lock, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fenced = fenced_versions(paths) & set(bases)
        if fenced:
            raise Fenced(f"base {', '.join(sorted(fenced))} was rolled back; this fine-tune does not activate")
        yield


def active_version(paths: AgentPaths) -> str | None:
    try:
        return Path(os.readlink(paths.active_link)).name
    except OSError:
        return None


def active_dir(paths: AgentPaths) -> Path | None:
    version = active_version(paths)
    return None if version is None else paths.ensembles / version
