"""The atomic switch between ensembles (the decision to switch is :mod:`edge_agent.gate`'s).

An ensemble is built in ``models/ensembles/.tmp-<version>/``, every file fsynced, then renamed to
``<version>/`` (one rename: it is there completely or not at all). Activation replaces the
``models/active`` symlink with a temporary symlink via ``os.replace`` (also one rename). A crash or kill at
any moment therefore leaves the previous ensemble serving and no half-written model under a real name;
leftover staging folders are swept at the next start.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterable
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


class ActivationConflict(RuntimeError):
    """The active ensemble changed between the gate's decision and the activation: the decision is stale."""


UNCHECKED = object()  # activate() without a compare-and-swap (an operator's or a test's explicit switch)


def activate(paths: AgentPaths, version: str, expected: str | None | object = UNCHECKED,
             bases: Iterable[str] = ()) -> None:
    """Point ``models/active`` at ``ensembles/<version>`` atomically (temp symlink + os.replace).

    ``expected`` makes it a compare-and-swap: the version the gate judged against (None: nothing served),
    checked under a lock, so a decision taken against an ensemble that has since been replaced cannot
    overwrite the newer one. ``bases`` are the base versions the ensemble was built on: if a rollback
    fenced one (:func:`fenced_versions`), :class:`Fenced` is raised. A rollback fences and switches under
    the same lock, so an ensemble on a rolled-back base activates before the rollback or never.
    """
    if not (paths.ensembles / version).is_dir():
        raise FileNotFoundError(f"no published ensemble {version}")
    with open(paths.activation_lock, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fenced = fenced_versions(paths) & set(bases)
        if fenced:
            raise Fenced(f"base {', '.join(sorted(fenced))} was rolled back; {version} does not activate")
        current = active_version(paths)
        if expected is not UNCHECKED and current != expected:
            raise ActivationConflict(f"the active ensemble changed since this candidate was gated (now {current}, "
                                     f"gated against {expected})")
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


def active_version(paths: AgentPaths) -> str | None:
    try:
        return Path(os.readlink(paths.active_link)).name
    except OSError:
        return None


def active_dir(paths: AgentPaths) -> Path | None:
    version = active_version(paths)
    return None if version is None else paths.ensembles / version
