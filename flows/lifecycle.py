"""The demo lifecycle flow: the stage flows composed, on the demo's data.

pretrain (when the registry has no champion from this pool) → provision → rollout (canary, then the rest)
→ the sites fine-tune and serve → their inboxes are fed → samples → retrain (collect, label, gate) →
rollout of the new champion. Every stage is the same flow an operator starts from the Prefect UI
(``edgeloop serve``); this module adds only what the demo needs around them: its data, seeding the sites,
feeding their inboxes, and waiting for the sites before the next stage. Sites that do not answer in time
are reported and left behind; the loop goes on with the others.

Run it: ``edgeloop demo`` (or ``python -m flows.lifecycle``). With no Prefect server configured it runs
on Prefect's ephemeral local API.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from edge_agent.datasets import open_dataset
from flows import stages
from flows.health import fleet_health
from flows.provision import provision_flow, summary_of
from flows.runs import finish, run_name, tag_run
from flows.stages import Arch
from flows.rollout import RolloutHalted, RolloutRequest, rollout
from orchestrator import demo, deploy
from orchestrator.health import read_fleet_status
from orchestrator.inventory import Inventory, load_inventory
from orchestrator.registry import ModelRegistry, ModelVersion, table

PROGRESS_EVERY_S = 30.0

SiteReady = Callable[[dict], bool]  # is this site's heartbeat status what we wait for?


@task(cache_policy=NO_CACHE)
def prepare_data(home: Path, sites: int, size: int, seed: int, fleet: str) -> list[Path]:
    """The demo's data: [generic pool, site 1, site 2, ...] (a task, so the UI shows when it is reused)."""
    return demo.prepare_elpv(home / "data", sites, size, seed, fleet)


def pretrained_champion(registry: ModelRegistry, settings: demo.DemoSettings, generic: Path) -> ModelVersion:
    """The champion to start from: the registry's, unless it descends from another pool; else the pretrain stage."""
    logger = get_run_logger()
    champion = registry.champion(settings.family)
    pool = open_dataset(generic).id
    if champion and registry.lineage(champion.version)[-1].dataset_id == pool:
        logger.info("champion %s already in the registry (its lineage starts on this generic pool %s); "
                    "no pretraining", champion.version, pool)
        return champion
    decision = stages.pretrain(str(settings.inventory), stages.PretrainSettings(
        data=str(generic), family=settings.family, arch=settings.pretrain_arch, epochs=settings.pretrain_epochs,
        seed=settings.seed))
    if decision["promoted"]:  # an empty registry is bootstrapped only this way: the gate's "nothing in place"
        return registry.get(decision["candidate"])
    kept = registry.champion(settings.family)  # the gate kept the champion: the demo goes on with it
    logger.warning("the gate kept champion %s over this pool's candidate %s (%s); the demo goes on with it",
                   kept.version, decision["candidate"], decision["reason"])
    return kept


def _after(version: str) -> SiteReady:
    """Ready when the site serves from a finished fine-tune on base ``version`` and owes no other.

    (A run summarised by an older agent does not name its bases; the newest base the site has stands in.)
    """
    def ready(status: dict) -> bool:
        run = status.get("last_run") or {}
        bases = run.get("bases") or status.get("base_versions", [])[-1:]
        return (version in bases and run.get("finished") and not status.get("pending_finetune")
                and not status.get("finetune", {}).get("running"))
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
    gate = run.get("gate") or {}
    shadow = s.get("shadow") or {}
    return {"site": site, "state": s.get("state"), "serving": run.get("serving"),
            "active_version": s.get("active_version"), **accuracy,
            "labels_home": (s.get("labels_home") or {}).get("taken"),
            "gate_evidence": (f"n {gate.get('n')}, {gate.get('challenger_only')} for / {gate.get('incumbent_only')} "
                              f"against, {gate.get('test') or 'exact'}" if gate else None),
            "shadow": f"{shadow['version']} (looks {shadow.get('looks')}, disagreed on "
                      f"{shadow.get('disagreements')} of {shadow.get('production_images')})" if shadow else None,
            "gain_over_base_test": (run.get("gain_over_base") or {}).get("test"),
            "precision": (run.get("precision") or {}).get("serving"),
            "decision": run.get("decision"),  # the gate's evidence: n, discordant counts, p-value, alpha
            "processed": s.get("processed_total"), "selected": s.get("selected_total"),
            "uploaded": s.get("uploaded_total"), "outbox": s.get("queues", {}).get("outbox"),
            "heartbeat_age_s": round(time.time() - s.get("time", 0), 1)}


@flow(name="edgeloop-lifecycle", log_prints=True,
      flow_run_name=run_name("lifecycle", ("pretrain_arch", None, "slim_resnet"), ("site_data", None, "shifted")))
def lifecycle_flow(inventory: str = "", home: str = "", pretrain_arch: Arch = "slim_resnet",
                   pretrain_epochs: int = 30, retrain_epochs: int = 3, site_timeout_s: float = 900,
                   stop_agents: bool = True, site_data: Literal["shifted", "random"] = "shifted") -> dict:
    """One turn of the loop on a fleet; the parameters are the hyperparameter form in the Prefect UI.

    Args:
        inventory: path of the fleet's inventory YAML (empty: the demo's inventory/local.yaml in the project)
        home: the demo's working folder: data, registry, store and site roots (empty: .demo in the project)
        pretrain_arch: architecture of the cloud's base model (edge_agent.models)
        pretrain_epochs: epochs of the cloud's pretraining (the best on the val split is kept)
        retrain_epochs: epochs of the cloud's retraining from the champion
        site_timeout_s: how long the loop waits for a site at each step before it goes on without it
        stop_agents: stop the sites' agents when the turn ends (also when a step failed)
        site_data: shifted (sites differ from the cloud's pool: mono cells, their own camera, mixed) or
            random (every site a random draw of the same pool)
    """
    return finish(_lifecycle, inventory, home, pretrain_arch, pretrain_epochs, retrain_epochs, site_timeout_s,
                  stop_agents, site_data)


def _lifecycle(inventory: str | None, home: str | None, pretrain_arch: str, pretrain_epochs: int,
               retrain_epochs: int, site_timeout_s: float, stop_agents: bool, site_data: str) -> dict:
    overrides = {k: v for k, v in {"inventory": inventory, "home": home}.items() if v}
    settings = demo.DemoSettings(pretrain_arch=pretrain_arch, pretrain_epochs=pretrain_epochs,
                                 retrain_epochs=retrain_epochs, site_timeout_s=site_timeout_s, fleet=site_data,
                                 **overrides)
    tag_run("lifecycle", settings.family)
    settings.home.mkdir(parents=True, exist_ok=True)
    # The stage flows read the inventory by path: its ${EDGELOOP_HOME} and ${EDGELOOP_PYTHON} (local demo
    # sites reuse this interpreter's packages, so torch is not installed again per site) come from here.
    os.environ["EDGELOOP_HOME"] = str(settings.home.resolve())
    os.environ.setdefault("EDGELOOP_PYTHON", sys.executable)
    fleet = load_inventory(settings.inventory)
    _demo_fleet_only(fleet)
    names = fleet.names()
    parts = prepare_data(settings.home, len(names), _image_size(fleet), settings.seed, settings.fleet)
    registry = fleet.registry()
    champion = pretrained_champion(registry, settings, parts[0])

    streams = {name: demo.seed_site(Path(fleet.site(name).root), open_dataset(part))
               for name, part in zip(names, parts[1:])}
    # a host that failed is named by the provision run (red); the loop goes on with the others
    provisioned = summary_of(provision_flow(str(settings.inventory), return_state=True))
    live = [name for name in names if name not in provisioned["failed"]]
    try:
        live, decision = _turn(fleet, registry, settings, champion, live, streams, parts)
    finally:
        if stop_agents:  # also when a step failed: a demo must not leave agents behind
            for name in names:
                deploy.stop_agent(fleet.site(name), fleet)
    create_table_artifact(key="model-versions", table=table(list(registry.versions(settings.family))),
                          description="registry: every version, its stage, data and metrics")
    return {"sites_completed": live, "decision": decision}


def _turn(fleet: Inventory, registry: ModelRegistry, settings: demo.DemoSettings, champion: ModelVersion,
          live: list[str], streams: dict[str, list[Path]], parts: list[Path]) -> tuple[list[str], dict | None]:
    """Rollout → edge fine-tune → inference and samples → retrain → rollout again; returns who kept up."""
    live = _rollout_and_wait(fleet, settings, champion.version, live, "fine-tune on the champion")
    fleet_health(str(settings.inventory), return_state=True)  # the history's first point: the champion fine-tuned
    status, _ = read_fleet_status(fleet.store(), live)
    expected = {name: _classified(status.get(name, {})) + demo.feed_inbox(Path(fleet.site(name).root),
                                                                             streams[name]) for name in live}
    live = wait_for(fleet, live, "inference and upload", _drained(fleet, expected), settings.site_timeout_s)
    decision = stages.retrain(str(settings.inventory), stages.RetrainSettings(
        base_data=str(parts[0]), family=settings.family, epochs=settings.retrain_epochs, seed=settings.seed,
        reference_data=[str(p) for p in parts[1:]], rollout=False))  # the demo rolls out and waits itself
    if decision.get("promoted"):
        live = _rollout_and_wait(fleet, settings, decision["candidate"], live, "fine-tune on the new champion")
    else:  # the labels given in the cloud went home: each site learns from them
        live = wait_for(fleet, live, "labels home and the fine-tune they owe", _learned_from_labels(fleet),
                        settings.site_timeout_s)
    # the fleet view and each site's history, while the agents still run (a site not ok is its row, not the demo's end)
    fleet_health(str(settings.inventory), return_state=True)
    return live, decision


def _learned_from_labels(fleet: Inventory) -> SiteReady:
    """Ready when a site took home every label the cloud sent it and the fine-tune they owe (as many as its
    ``thresholds.min_new_labelled``) has finished."""
    store, sent = fleet.store(), {}

    def ready(status: dict) -> bool:
        site = status["site"]
        if site not in sent:  # what the collect wrote for it (people's labels; pseudo-labels may add)
            sent[site] = len(demo.labels_sent_home(store, site))
        home, run = status.get("labels_home") or {}, status.get("last_run") or {}
        owed = sent[site] >= fleet.site(site).learning.thresholds.min_new_labelled
        busy = status.get("pending_finetune") or (status.get("finetune") or {}).get("running")
        return (home.get("taken", 0) >= sent[site] and not busy
                and (not owed or (run.get("finished") or 0) >= (home.get("last_change") or 0)))

    return ready


def _rollout_and_wait(fleet: Inventory, settings: demo.DemoSettings, version: str, sites: list[str],
                      what: str) -> list[str]:
    """The rollout stage (canaries judged, then the rest), then wait for every site's fine-tune on ``version``.

    A halted rollout (a canary failed and was rolled back) is reported; the demo goes on with the sites as
    they are, serving what they served.
    """
    try:
        rollout(str(settings.inventory), RolloutRequest(version=version, family=settings.family, limit=sites))
    except RolloutHalted as exc:
        get_run_logger().warning("rollout of %s stopped: %s", version, exc)
        return sites
    return wait_for(fleet, sites, what, _after(version), settings.site_timeout_s)


def _demo_fleet_only(fleet: Inventory) -> None:
    """The lifecycle is the demo: it writes demo data into the sites, feeds their inboxes and stops every agent
    when it ends. A fleet of real hosts gets the stage flows (provision, rollout, retrain), never this one."""
    remote = [site.name for site in fleet.sites if site.connection.type != "local"]
    if remote:
        raise ValueError(f"{fleet.path}: the lifecycle flow is the demo (it seeds site data, feeds inboxes and stops "
                         f"every agent at the end); {', '.join(remote)} are not local demo sites: run the stage "
                         "flows (provision, rollout, retrain) on a real fleet")


def _image_size(fleet: Inventory) -> int:
    """The one input size the whole fleet learns at (the cloud's base model must match the sites)."""
    sizes = {site.learning.image_size for site in fleet.sites}
    if len(sizes) != 1:
        raise ValueError(f"sites disagree on learning.image_size ({sorted(sizes)}); one base model serves them all")
    return sizes.pop()


if __name__ == "__main__":
    print(lifecycle_flow())
