"""Deploying a model version to edge sites, and reading back what the sites report.

A deploy writes ``<root>/models/base/<version>/`` under a temporary name and renames it into place;
the agent only uses a base model whose ``model.pt`` matches the ``model.pt.sha256`` beside it, so a
cut connection leaves at worst an ignored temporary folder, never a half-written model in use.
"""

from __future__ import annotations

import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_agent.fileio import file_sha256
from edge_agent.layout import AgentPaths
from edge_agent.serving import ENSEMBLE_FILE
from edge_agent.store import Store
from orchestrator.health import FleetStatus
from orchestrator.inventory import Inventory, Site
from orchestrator.provision.remote import HostWorker, WorkerGone, open_remote
from orchestrator.ssh import ConnectError
from orchestrator.provision.service import agent_unit, service_mode, supervisor_pidfile, supervisor_script


@dataclass
class DeployResult:
    site: str
    version: str
    status: str  # ok (already there), changed (deployed), failed
    reason: str = ""
    transient: bool = False  # failed because the host did not answer: a retry may succeed
    served_before: str | None = None  # the ensemble the host served when this deploy landed (changed only)


class HostUnreachable(RuntimeError):
    """A deploy failed because the host could not be reached this time (retried by the flow's task)."""


# what a host that did not answer raises (typed: a retry is decided by kind, never by message)
UNREACHABLE = (ConnectError, WorkerGone, TimeoutError, ConnectionError, socket.timeout)


def serving_artifact(checkpoint: Path, image_size: int, version: str | None = None) -> Path:
    """The checkpoint as the one-member ensemble graph an ``edge-serve`` site serves as it comes (that site
    has no torch to export it): exported here once per checkpoint content, input size and version. The graph
    names itself as the folder the site serves it from (``base-<version>``), so the site's live window is
    keyed by what its heartbeat says is active (the canary analysis reads it by that name)."""
    from edge_agent.candidates import base_folder_name

    from edge_agent.ensemble import export_ensemble
    from edge_agent.models import load_checkpoint

    digest = file_sha256(checkpoint)
    named = {"version": base_folder_name(version)} if version else {}
    folder = "-".join([digest[:16], str(image_size), *named.values()])
    out = Path(checkpoint).parent / ".serving" / folder / ENSEMBLE_FILE
    if not out.is_file():
        model, meta = load_checkpoint(checkpoint)
        staged = out.parent.with_name(out.parent.name + f".tmp-{uuid.uuid4().hex[:8]}")
        export_ensemble([model], [meta.normalization], [1.0], staged / ENSEMBLE_FILE, image_size=image_size,
                        class_names=meta.class_names, metadata={"checkpoint_sha256": digest, **named})
        try:
            staged.rename(out.parent)
        except OSError:  # exported at the same time by another deploy: theirs is the same graph
            shutil.rmtree(staged, ignore_errors=True)
    return out


def deploy_model(site: Site, inventory: Inventory, checkpoint: str | Path, version: str,
                 accept_new_host_keys: bool = False) -> DeployResult:
    """Put one checkpoint on one site as base model ``version``; idempotent, never raises for a host problem.

    ``model.pt`` is uploaded under a temporary name, checked and renamed; its ``.sha256`` is written last.
    An ``edge-serve`` site gets the model's ensemble graph (``ensemble.onnx``) instead: it serves, never
    fine-tunes.
    """
    remote = None
    try:
        artifact = Path(checkpoint)
        if site.install.profile == "edge-serve":
            artifact = serving_artifact(artifact, site.learning.image_size, version)
        digest, name = file_sha256(artifact), "model.pt" if artifact == Path(checkpoint) else ENSEMBLE_FILE
        remote = open_remote(site, inventory, accept_new_host_keys)
        worker = HostWorker(remote, site.python)
        paths = AgentPaths(Path(host_facts(worker, site)["root"]))
        if worker.call("file_sha", path=str(paths.config_file))["sha256"] is None:
            return DeployResult(site.name, version, "failed", f"not provisioned: no agent config at "
                                f"{paths.config_file} (run edgeloop provision first)")
        folder = f"{paths.base_models}/{version}"
        weights, marker = f"{folder}/{name}", f"{folder}/{name}.sha256"
        if worker.call("file_sha", path=weights)["sha256"] == digest and \
                worker.call("put_text", path=marker, content=f"{digest}\n", check=True)["changed"] is False:
            return DeployResult(site.name, version, "ok")
        record = worker.call("deploy_record", root=str(paths.root), version=version)  # what a rollback restores
        worker.call("folders", folders=[folder], check=False)
        staged = f"{folder}/.{name}.tmp"
        remote.put(artifact, staged)
        worker.call("commit", tmp=staged, path=weights, sha256=digest)
        worker.call("put_text", path=marker, content=f"{digest}\n", check=False)
        return DeployResult(site.name, version, "changed", served_before=record.get("before_active"))
    except Exception as exc:  # one host's failure is its own; the caller goes on with the others
        return DeployResult(site.name, version, "failed", inventory.mask(str(exc)), isinstance(exc, UNREACHABLE))
    finally:
        if remote is not None:
            remote.close()


def wait_for_sites(store: Store, sites: list[str], ready: Callable[[dict], bool], timeout_s: float,
                   poll_s: float = 2.0, on_poll: Callable[[dict[str, dict]], None] | None = None
                   ) -> tuple[list[str], dict[str, dict]]:
    """Wait until every site's status satisfies ``ready`` or the time is up; never waits past it.

    Returns the sites that got ready and the last status seen, so the caller goes on with those
    that answered (a dead or slow edge never holds the fleet back).
    """
    deadline = time.monotonic() + timeout_s
    fleet_status = FleetStatus(store)
    while True:
        status = fleet_status.read(sites)
        done = [s for s in sites if s in status and ready(status[s])]
        if on_poll:
            on_poll(status)
        if len(done) == len(sites) or time.monotonic() >= deadline:
            return done, status
        time.sleep(poll_s)


def host_facts(worker: HostWorker, site: Site) -> dict:
    """The host's facts, among them ``root``: the site's root with ``~/`` resolved to the login user's home."""
    return worker.call("facts", root=site.root)


def stop_agent(site: Site, inventory: Inventory) -> bool:
    """Stop a site's agent (systemd unit or supervised process); True when one was running."""
    remote = open_remote(site, inventory, False)
    try:
        worker = HostWorker(remote, site.python)
        facts = host_facts(worker, site)
        if service_mode(site.agent.service, facts) == "systemd":
            worker.call("systemd", unit=agent_unit(site.name), stop=True)
            return True
        return bool(worker.call("process_stop", pidfile=supervisor_pidfile(facts["root"]),
                                script=supervisor_script(facts["root"]))["stopped"])
    finally:
        remote.close()
