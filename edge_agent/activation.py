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
EXIT_HELD = 6  # a fine-tune process that could not use the active graph: it stays owed (see active_graph_hold)

_HOLDS: dict[tuple, str | None] = {}  # (graph file, its identity) -> hold reason: checked again when either moves


def active_graph_hold(paths: AgentPaths, image_size: int) -> str | None:
    """Why a fine-tune cannot use the active ensemble, or None.

    The active ensemble is the incumbent a fine-tune's gate scores every candidate against, through the graph
    contract (:func:`edge_agent.serving.validate_ensemble`). One that loads at the site's size but lacks what
    the fine-tune reads (each member's probabilities, say) holds the fine-tune: it stays owed, with this
    reason, until a usable ensemble is active; a silent replacement would be judged against the wrong model.
    A graph that cannot serve at all (missing, unloadable, another input size after the site's size changed)
    is no incumbent: the fine-tune goes on as on a site where nothing serves yet. Cached per file identity.
    """
    from edge_agent.serving import ENSEMBLE_FILE, GraphContractError, validate_ensemble

    folder = active_dir(paths)
    if folder is None:
        return None
    graph = folder / ENSEMBLE_FILE
    try:
        info = graph.stat()
    except OSError:
        return None
    key = (str(graph.resolve()), info.st_ino, info.st_size, info.st_mtime_ns, image_size)
    if key not in _HOLDS:
        if len(_HOLDS) > 64:
            _HOLDS.clear()
        try:
            validate_ensemble(graph, image_size)
            _HOLDS[key] = None
        except GraphContractError as exc:
            _HOLDS[key] = (f"the active ensemble {folder.name} breaks the graph contract ({exc}); the fine-tune "
                           f"waits until a usable ensemble is active (edgeloop rollback, or activate another)")
        except ValueError:
            _HOLDS[key] = None
    return _HOLDS[key]


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
