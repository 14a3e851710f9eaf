"""Deploying a model version to edge sites, and reading back what the sites report.

A deploy writes ``<root>/models/base/<version>/`` under a temporary name and renames it into place;
the agent only uses a base model whose ``model.pt`` matches the ``model.pt.sha256`` beside it, so a
cut connection leaves at worst an ignored temporary folder, never a half-written model in use.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import fsspec

from edge_agent.layout import AgentPaths
from edge_agent.fileio import file_sha256
from orchestrator.inventory import Inventory, Site
from orchestrator.provision import open_remote


@dataclass
class DeployResult:
    site: str
    version: str
    status: str  # ok (already there), changed (deployed), failed
    reason: str = ""


def deploy_model(site: Site, inventory: Inventory, checkpoint: str | Path, version: str,
                 accept_new_host_keys: bool = False) -> DeployResult:
    """Put one checkpoint on one site as base model ``version``; idempotent."""
    digest = file_sha256(checkpoint)
    base = AgentPaths(Path(site.root)).base_models
    final, staged = f"{base}/{version}", f"{base}/.{version}.tmp"
    try:
        remote = open_remote(site, inventory, accept_new_host_keys)
    except Exception as exc:  # an unreachable host fails alone; the caller goes on with the others
        return DeployResult(site.name, version, "failed", f"connect: {exc}")
    try:
        present = remote.run(f"cd {shlex.quote(final)} 2>/dev/null && cat model.pt.sha256 && sha256sum model.pt")
        if present.rc == 0 and present.stdout.split()[:2] == [digest, digest]:
            return DeployResult(site.name, version, "ok")
        remote.run(f"rm -rf {shlex.quote(staged)} && mkdir -p {shlex.quote(staged)}")
        remote.put(Path(checkpoint), f"{staged}/model.pt")
        done = remote.run(
            f"cd {shlex.quote(staged)} && test \"$(sha256sum model.pt | cut -d' ' -f1)\" = {digest} "
            f"&& echo {digest} > model.pt.sha256 && rm -rf {shlex.quote(final)} "
            f"&& mv {shlex.quote(staged)} {shlex.quote(final)}")
        if done.rc != 0:
            return DeployResult(site.name, version, "failed", f"verify/rename: {done.stderr.strip() or done.rc}")
        return DeployResult(site.name, version, "changed")
    except Exception as exc:
        return DeployResult(site.name, version, "failed", str(exc))
    finally:
        remote.close()


def read_fleet_status(store_url: str, sites: list[str], storage_options: dict | None = None) -> dict[str, dict]:
    """The latest heartbeat each site pushed to the store (missing sites are absent)."""
    fs, root = fsspec.core.url_to_fs(store_url, **(storage_options or {}))
    status = {}
    for name in sites:
        try:
            status[name] = json.loads(fs.cat_file(f"{root.rstrip('/')}/status/{name}.json"))
        except (OSError, ValueError):
            continue
    return status


def wait_for_sites(store_url: str, sites: list[str], ready: Callable[[dict], bool], timeout_s: float,
                   poll_s: float = 2.0, on_poll: Callable[[dict[str, dict]], None] | None = None
                   ) -> tuple[list[str], dict[str, dict]]:
    """Wait until every site's status satisfies ``ready`` or the time is up; never waits past it.

    Returns the sites that got ready and the last status seen, so the caller goes on with those
    that answered (a dead or slow edge never holds the fleet back).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        status = read_fleet_status(store_url, sites)
        done = [s for s in sites if s in status and ready(status[s])]
        if on_poll:
            on_poll(status)
        if len(done) == len(sites) or time.monotonic() >= deadline:
            return done, status
        time.sleep(poll_s)


def stop_agent(site: Site, inventory: Inventory) -> bool:
    """Stop a site's supervised agent process (SIGTERM to its process group)."""
    remote = open_remote(site, inventory, False)
    try:
        pidfile = shlex.quote(f"{site.root}/supervisor.pid")
        done = remote.run(f"test -f {pidfile} && kill -TERM -$(cat {pidfile}) && rm -f {pidfile}")
        return done.rc == 0
    finally:
        remote.close()
