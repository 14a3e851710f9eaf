"""The demo lifecycle flow: pretrain → provision → deploy → edge fine-tune and serve → samples → retrain → deploy.

Thin on purpose: every step is a function in :mod:`orchestrator`; this module adds task runs in the
Prefect UI, mapping over sites, and artifacts (model versions, fleet status, the gate's decision).
Sites that do not answer in time are reported and left behind; the loop goes on with the others.

Run it: ``edgeloop demo`` (or ``python -m flows.lifecycle``). With no Prefect server configured it runs
on Prefect's ephemeral local API.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from edge_agent.datasets import open_dataset
from edge_agent.ids import new_id
from edge_agent.train import EpochMetrics, TrainConfig
from flows.provision import publish as publish_provisioning
from flows.stages import gate_markdown
from orchestrator import demo, deploy
from orchestrator import retrain as steps
from orchestrator.inventory import Inventory, load_inventory
from orchestrator.labelling import LabelQueue
from orchestrator.provision import provision
from orchestrator.registry import ModelRegistry, ModelVersion, table
from orchestrator.samples import collect_samples

PROGRESS_EVERY_S = 30.0

SiteReady = Callable[[dict], bool]  # is this site's heartbeat status what we wait for?


@task(cache_policy=NO_CACHE)
def prepare_data(home: Path, sites: int, size: int, seed: int, fleet: str) -> list[Path]:
    """The demo's data: [generic pool, site 1, site 2, ...] (a task, so the UI shows when it is reused)."""
    return demo.prepare_elpv(home / "data", sites, size, seed, fleet)


@task(cache_policy=NO_CACHE)
def pretrain(registry: ModelRegistry, settings: demo.DemoSettings, generic: Path) -> ModelVersion:
    """The champion to start from: the registry's, unless it descends from another pool; else pretrain one."""
    logger = get_run_logger()
    champion = registry.champion(settings.family)
    pool = open_dataset(generic).id
    if champion and registry.lineage(champion.version)[-1].dataset_id == pool:
        logger.info("champion %s already in the registry (its lineage starts on this generic pool %s); "
                    "no pretraining", champion.version, pool)
        return champion
    if champion:
        logger.info("champion %s descends from another generic pool; pretraining on %s", champion.version, pool)
    config = TrainConfig(epochs=settings.pretrain_epochs, batch_size=64, seed=settings.seed)
    version = steps.train_version(registry, settings.family, generic, settings.pretrain_arch, config,
                                  note="pretrained on the generic pool", on_epoch=_progress(config.epochs))
    logger.info("pretrained %s: val_acc %.3f test_acc %.3f", version.version, version.metrics["val_acc"],
                version.metrics["test_acc"])
    return registry.promote(version.version)


def _progress(epochs: int) -> Callable[[EpochMetrics], None]:
    """An epoch callback that logs to the task run, so training shows progress in the Prefect UI."""
    logger = get_run_logger()

    def report(m: EpochMetrics) -> None:
        logger.info("epoch %d/%d: loss %.4f, val_acc %.3f (%.1f s)", m.epoch, epochs, m.train_loss, m.val_acc,
                    m.seconds)
    return report


@task(cache_policy=NO_CACHE)
def provision_fleet(inventory: Inventory) -> list[str]:
    """Provision every site; returns the names of those that came up healthy."""
    report = provision(inventory)
    publish_provisioning(report, "the demo fleet")
    get_run_logger().info("\n%s", report.recap())
    return [host.site for host in report.hosts if not host.failed]


@task(cache_policy=NO_CACHE)
def deploy_to(inventory: Inventory, site: str, checkpoint: Path, version: str) -> deploy.DeployResult:
    """Deploy one version to one site (one task run per site, so each site's outcome shows on its own)."""
    result = deploy.deploy_model(inventory.site(site), inventory, checkpoint, version)
    get_run_logger().info("deploy %s to %s: %s %s", version, site, result.status, result.reason)
    return result


def _after(version: str, since: dict[str, float]) -> SiteReady:
    """Ready when the site has seen base ``version`` and finished a fine-tune started after ``since[site]``."""
    def ready(status: dict) -> bool:
        run = status.get("last_run") or {}
        return (version in status.get("base_versions", []) and not status.get("pending_finetune")
                and not status.get("finetune", {}).get("running")
                and (run.get("finished") or 0) > since[status["site"]])
    return ready


def _classified(status: dict) -> int:
    """Images a site has dealt with (served or quarantined): what the cloud counts against what it fed."""
    return status.get("processed_total", 0) + status.get("quarantined_total", 0)


def _drained(fleet: Inventory, expected: dict[str, int]) -> SiteReady:
    """Ready when every fed image is classified and the site uploaded all it may today.

    The outbox may legitimately keep samples: a site that spent its daily upload budget sends the
    rest tomorrow, and the cloud does not wait for that.
    """
    def ready(status: dict) -> bool:
        queues, ledger = status.get("queues", {}), status.get("upload_ledger", {})
        budget = fleet.site(status["site"]).learning.upload
        budget_spent = (ledger.get("count", 0) >= budget.max_samples_per_day
                        or ledger.get("bytes", 0) >= budget.max_bytes_per_day)
        return (_classified(status) >= expected[status["site"]] and queues.get("inbox", 1) == 0
                and (queues.get("outbox", 1) == 0 or budget_spent))
    return ready


@task(cache_policy=NO_CACHE)
def wait_for(inventory: Inventory, sites: list[str], what: str, ready: SiteReady, timeout_s: float) -> list[str]:
    """Wait until each site is ``ready``; returns those that were in time (the loop goes on without the rest)."""
    logger = get_run_logger()
    next_report = time.monotonic() + PROGRESS_EVERY_S

    def progress(status: dict[str, dict]) -> None:
        nonlocal next_report
        if time.monotonic() >= next_report:
            next_report = time.monotonic() + PROGRESS_EVERY_S
            logger.info("%s: %s", what, "; ".join(_site_line(site, status.get(site)) for site in sites))

    done, status = deploy.wait_for_sites(inventory.store(), sites, ready, timeout_s, on_poll=progress)
    late = sorted(set(sites) - set(done))
    if late:
        logger.warning("%s: no answer in %.0f s from %s; going on with %s", what, timeout_s, late, done)
    publish_fleet(status)
    return done


def _site_line(site: str, status: dict | None) -> str:
    """One site's state for the progress log, e.g. ``site-a finetuning (member 0 epoch 2, member 1 epoch 1)``."""
    if not status:
        return f"{site} no heartbeat yet"
    members = ((status.get("finetune") or {}).get("progress") or {}).get("members") or {}
    epochs = ", ".join(f"member {k} epoch {m.get('epoch', 0)}" for k, m in sorted(members.items()))
    detail = f" ({epochs})" if status.get("state") == "finetuning" and epochs else \
        f" (classified {_classified(status)}, uploaded {status.get('uploaded_total', 0)})"
    return f"{site} {status.get('state')}{detail}"


def publish_fleet(status: dict[str, dict]) -> None:
    """The fleet-status artifact: one row per site from its latest heartbeat, every candidate's accuracy."""
    rows = [_fleet_row(site, s) for site, s in sorted(status.items())]
    create_table_artifact(key="fleet-status", table=rows, description="latest heartbeat of every site")


def _fleet_row(site: str, s: dict) -> dict:
    """One site's row: what serves, each candidate's gate and test accuracy, queues, heartbeat age."""
    run = s.get("last_run") or {}
    candidates = run.get("candidates") or {}
    accuracy = {f"{name}_{split}_acc": ((candidates.get(name) or {}).get(split) or {}).get("accuracy")
                for name in ("base", "active", "new") for split in ("gate", "test")}
    return {"site": site, "state": s.get("state"), "serving": run.get("serving"),
            "active_version": s.get("active_version"), **accuracy,
            "gain_over_base_test": (run.get("gain_over_base") or {}).get("test"),
            "precision": (run.get("precision") or {}).get("serving"),
            "processed": s.get("processed_total"), "selected": s.get("selected_total"),
            "uploaded": s.get("uploaded_total"), "outbox": s.get("queues", {}).get("outbox"),
            "heartbeat_age_s": round(time.time() - s.get("time", 0), 1)}


@task(cache_policy=NO_CACHE)
def retrain(registry: ModelRegistry, settings: demo.DemoSettings, inventory: Inventory,
            parts: list[Path]) -> dict | None:
    """Retrain on the checked samples and gate the candidate; None when no sample came back."""
    logger = get_run_logger()
    collection = collect_samples(inventory.store())
    logger.info("samples: %d accepted %s, %d rejected", len(collection.accepted), collection.by_site(),
                len(collection.rejected))
    if not collection.accepted:
        logger.warning("no samples came back from the sites; nothing to retrain on")
        return None
    champion = registry.champion(settings.family)
    out = settings.home / "data" / f"retrain-{new_id()}"
    config = TrainConfig(epochs=settings.retrain_epochs, batch_size=64, lr=1e-3, seed=settings.seed)
    # People's labels from the queue (`edgeloop label`) first; the demo's reference labels stand in for the rest.
    people = LabelQueue(registry.root, open_dataset(parts[0]).classes)
    reference = demo.ReferenceLabels([open_dataset(p) for p in parts[1:]])
    candidate, summary = steps.retrain_from_samples(registry, settings.family, parts[0], collection, out, config,
                                                    labellers=[people, reference], on_epoch=_progress(config.epochs))
    decision = steps.gate(registry, candidate, champion, parts[0])
    logger.info("gate: candidate %s gate_acc %.3f vs champion %s gate_acc %.3f: %s", decision.candidate,
                decision.candidate_gate_acc, decision.champion, decision.champion_gate_acc or float("nan"),
                "promoted" if decision.promoted else "kept the champion")
    return {**summary, **decision.as_dict()}


@flow(name="edgeloop-lifecycle", log_prints=True)
def lifecycle_flow(inventory: str | None = None, home: str | None = None, pretrain_arch: str = "resnet18",
                   pretrain_epochs: int = 8, retrain_epochs: int = 3, site_timeout_s: float = 900,
                   stop_agents: bool = True, site_data: str = "shifted") -> dict:
    """One turn of the loop on a fleet; the parameters are the hyperparameter form in the Prefect UI.

    ``site_data``: ``shifted`` (sites differ from the cloud's pool: mono cells, their own camera, mixed) or
    ``random`` (every site a random draw of the same pool).
    """
    overrides = {k: v for k, v in {"inventory": inventory, "home": home}.items() if v}
    settings = demo.DemoSettings(pretrain_arch=pretrain_arch, pretrain_epochs=pretrain_epochs,
                                 retrain_epochs=retrain_epochs, site_timeout_s=site_timeout_s, fleet=site_data,
                                 **overrides)
    settings.home.mkdir(parents=True, exist_ok=True)
    # Local demo sites reuse this interpreter's packages (torch is not installed again per site).
    env = {"EDGELOOP_PYTHON": sys.executable, **os.environ, "EDGELOOP_HOME": str(settings.home.resolve())}
    fleet = load_inventory(settings.inventory, env=env)
    names = fleet.names()
    parts = prepare_data(settings.home, len(names), _image_size(fleet), settings.seed, settings.fleet)
    registry = ModelRegistry(fleet.cloud.registry)
    champion = pretrain(registry, settings, parts[0])

    streams = {name: demo.seed_site(Path(fleet.site(name).root), open_dataset(part))
               for name, part in zip(names, parts[1:])}
    live = provision_fleet(fleet)
    try:
        live, decision = _turn(fleet, registry, settings, champion, live, streams, parts)
    finally:
        if stop_agents:  # also when a step failed: a demo must not leave agents behind
            for name in names:
                deploy.stop_agent(fleet.site(name), fleet)
    create_table_artifact(key="model-versions", table=table(list(registry.versions(settings.family))),
                          description="registry: every version, its stage, data and metrics")
    if decision:
        create_markdown_artifact(key="gate", markdown=gate_markdown(decision), description="retraining gate")
    return {"sites_completed": live, "decision": decision}


def _turn(fleet: Inventory, registry: ModelRegistry, settings: demo.DemoSettings, champion: ModelVersion,
          live: list[str], streams: dict[str, list[Path]], parts: list[Path]) -> tuple[list[str], dict | None]:
    """Deploy → edge fine-tune → inference and samples → retrain → deploy again; returns who kept up."""
    live = _deploy_and_wait(fleet, registry, champion, live, "fine-tune on the champion", settings.site_timeout_s)
    status = deploy.read_fleet_status(fleet.store(), live)
    expected = {name: _classified(status.get(name, {})) + demo.feed_inbox(Path(fleet.site(name).root),
                                                                             streams[name]) for name in live}
    live = wait_for(fleet, live, "inference and upload", _drained(fleet, expected), settings.site_timeout_s)

    decision = retrain(registry, settings, fleet, parts)
    if decision and decision["promoted"]:
        live = _deploy_and_wait(fleet, registry, registry.get(decision["candidate"]), live,
                                "fine-tune on the new champion", settings.site_timeout_s)
    return live, decision


def _deploy_and_wait(fleet: Inventory, registry: ModelRegistry, version: ModelVersion, sites: list[str],
                     what: str, timeout_s: float) -> list[str]:
    """Deploy a version and wait for the sites' fine-tunes on it (a site that already had it is not waited on)."""
    started = time.time()
    deployed = {name: deploy_to(fleet, name, registry.artifact(version.version), version.version) for name in sites}
    reached = [name for name, result in deployed.items() if result.status != "failed"]
    since = {name: started if deployed[name].status == "changed" else 0.0 for name in reached}
    return wait_for(fleet, reached, what, _after(version.version, since), timeout_s)


def _image_size(fleet: Inventory) -> int:
    """The one input size the whole fleet learns at (the cloud's base model must match the sites)."""
    sizes = {site.learning.image_size for site in fleet.sites}
    if len(sizes) != 1:
        raise ValueError(f"sites disagree on learning.image_size ({sorted(sizes)}); one base model serves them all")
    return sizes.pop()


if __name__ == "__main__":
    print(lifecycle_flow())
