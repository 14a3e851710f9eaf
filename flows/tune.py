"""``edgeloop-tune``: random search with successive halving, each trial a mapped Prefect task.

Each trial trains in a process of its own (:func:`orchestrator.tune.run_trial`), started here by one of
``concurrency`` threads, or on a Dask cluster (``dask_address``) through prefect-dask, whose workers bound how
many train at once. Here there is no pool process between the flow and a trial that could die and take the
others with it (a broken process pool failed every trial in it); on Dask, a trial whose worker dies is tried
again by Dask and, when its workers keep dying, recorded failed. Either way a trial that cannot finish is a
failed row, never a failed tune. Trials write under the registry's folder (``<registry>/../tuning``), so Dask
workers on other hosts need it on a shared file system. Every trial of every rung is a row of the ``tune-trials``
table artifact; the winner is registered with its parameters and meets the gate.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field, field_validator

from edge_agent.datasets import open_dataset
from edge_agent.ids import new_id
from edge_agent.gate import GateRule
from flows.runs import FromInventory, finish, gate_state, run_name, tag_run, training_slot
from flows.stages import CONTRACT_HELP, DEFAULT_INVENTORY, gate_markdown
from orchestrator import retrain as steps
from orchestrator.inventory import load_inventory
from orchestrator.progress import Progress
from orchestrator.pictures import publish_tune
from orchestrator.tune import (
    MAX_CONCURRENCY,
    MAX_TRIALS,
    Halving,
    Search,
    SearchSpace,
    Trial,
    TrialResult,
    random_trials,
    run_trial,
    successive_halving,
)


class TuneSettings(BaseModel):
    """The search: data, space, budget, and where the trials run."""

    data: FromInventory = Field("", description="dataset version to search on (val chooses, gate decides); empty: "
                                              "the inventory's cloud.datasets.generic")
    family: str = Field("elpv-defects", description="registry name of the model being improved")
    trials: int = Field(8, ge=1, le=MAX_TRIALS, description=f"random draws from the search space (1..{MAX_TRIALS})")
    space: SearchSpace = Field(default_factory=SearchSpace, description=(
        "what the search may choose: learning rate and weight decay ranges (log-uniform), augmentation policies, "
        "image sizes, architectures and the recipe's knobs, each within its documented range"))
    halving: Halving = Field(default_factory=Halving, description=(
        "successive halving: every trial trains min_epochs, the best 1/eta go on to eta times as many, up to "
        "max_epochs"))
    concurrency: int = Field(2, ge=1, le=MAX_CONCURRENCY,
                             description=f"trials training at once on this host (1..{MAX_CONCURRENCY}), each in a "
                                         "process of its own")
    trial_memory_mb: int = Field(0, ge=0, le=1 << 22, description=(
        "memory one trial may hold, MB (at least 64); over it the trial is killed and recorded failed (0: 80 % of "
        "the host's memory shared by the trials at once)"))
    dask_address: FromInventory = Field("", max_length=256,
                                        description="tcp://HOST:PORT of a Dask scheduler to run the trials on instead "
                                                    "(its workers bound the concurrency); empty: this host")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds the draws and every trial's training (0..2^32-1)")
    gate: GateRule = Field(default_factory=GateRule, description="how sure the gate must be to promote the winner")
    allow_contract_change: bool = Field(False, description=CONTRACT_HELP)

    @field_validator("trial_memory_mb", mode="before")
    @classmethod
    def _memory(cls, value):
        """0 (or None, from callers of the old type) is the automatic share; else at least 64 MB."""
        if value is None:
            return 0
        if isinstance(value, int) and 0 < value < 64:
            raise ValueError(f"Input should be greater than or equal to 64 (MB; got {value}), or 0 for the "
                             "automatic share")
        return value


@task(name="trial", task_run_name="trial {trial.number} rung {rung} ({epochs} epochs)")
def train_trial(data: str, trial: Trial, rung: int, epochs: int, out: str, seed: int, threads: int,
                memory_mb: int | None = None, parallel: int = 1) -> TrialResult:
    return run_trial(data, trial, rung, epochs, out, seed=seed, threads=threads, memory_mb=memory_mb,
                     parallel=parallel)


@flow(name="edgeloop-tune-trials")
def run_trials(settings: TuneSettings, space: SearchSpace, out: str, threads: int) -> list[TrialResult]:
    """Every rung of the search in ``space``; the caller gives it the task runner the trials run on."""
    logger = get_run_logger()
    dataset = open_dataset(settings.data)

    def run_rung(trials: list[Trial], rung: int, epochs: int) -> list[TrialResult]:
        futures = train_trial.map(unmapped(settings.data), trials, rung, epochs, unmapped(out), settings.seed,
                                  threads, settings.trial_memory_mb or None, settings.concurrency)
        results = []
        for future, trial in zip(futures, trials):  # in order: each trial counts when it (and those before) ended
            results.append(_outcome(future, trial, rung, epochs))
            progress.advance(detail=f"rung {rung + 1} of {len(rungs)}")
        return results

    def report(rung: int, results: list[TrialResult]) -> None:
        scored = Search(results).ranked(rung)
        logger.info("rung %d: %d trials, best val_acc %s, %d failed", rung, len(results),
                    f"{scored[0].val_acc:.3f} (trial {scored[0].trial.number})" if scored else "-",
                    sum(bool(r.error) for r in results))

    trials = random_trials(space, settings.trials, dataset.image_size, settings.seed)
    rungs = settings.halving.rungs(len(trials))  # trials done of every rung's trials (fewer when some fail)
    with Progress(sum(count for count, _ in rungs), "trials", "tuning", key="tune-progress") as progress:
        return successive_halving(trials, settings.halving, run_rung, on_rung=report).results


def _outcome(future, trial: Trial, rung: int, epochs: int) -> TrialResult:
    """A trial's result; a trial whose runner failed (a Dask worker that kept dying, a crashed task) is a failed
    row with why, not a failed tune."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - one trial's end, whatever it was, must not end the search
        why = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        get_run_logger().warning("trial %d rung %d failed outside its own process: %s", trial.number, rung, why)
        return TrialResult(trial, rung, epochs, float("nan"), float("nan"), 0.0, "",
                           f"its worker failed, not the trial: {why}")


def _task_runner(settings: TuneSettings):
    if settings.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=settings.dask_address)
    return ThreadPoolTaskRunner(max_workers=settings.concurrency)  # each thread waits on its trial's process


@flow(name="edgeloop-tune", log_prints=True, flow_run_name=run_name(
    "tune", ("settings", "family", "elpv-defects"), ("settings", "trials", 8, lambda n: f"{n}-trials")))
def tune(inventory: str = DEFAULT_INVENTORY, settings: TuneSettings = TuneSettings()) -> dict:
    """Search, register the best trial as a candidate, and gate it against the champion.

    Args:
        inventory: path of the fleet's inventory YAML (sites, store, registry, datasets) where the flow runs
        settings: the search: data, space, budget, and where the trials run (this host, each in a process of its
            own, or Dask)
    """
    return finish(_tune, inventory, settings)


def _tune(inventory: str, settings: TuneSettings):
    tag_run("tune", settings.family, "training")
    fleet = load_inventory(inventory)
    registry = fleet.registry()
    settings = settings.model_copy(update={"data": settings.data or fleet.dataset("generic")})
    open_dataset(settings.data)  # a missing dataset: one line now, not a traceback from the trials' flow
    out = registry.root.parent / "tuning" / f"tune-{new_id()}"
    threads = max(1, (os.cpu_count() or 1) // settings.concurrency) if not settings.dask_address else 1
    champion = registry.champion(settings.family)  # the candidate is gated (compare-and-swap) against this one
    contract = registry.contract(champion.version) if champion and not settings.allow_contract_change else None
    space = settings.space.within(contract)
    # Dask workers report to this run's API, even an ephemeral one (else each would start its own)
    with get_client(sync_client=True) as client, temporary_settings({PREFECT_API_URL: str(client.api_url)}), \
            training_slot("tune"):
        results = run_trials.with_options(task_runner=_task_runner(settings))(settings, space, str(out), threads)
    search = Search(results)
    create_table_artifact(key="tune-trials", table=search.table(),
                          description=f"random search: {settings.trials} trials, successive halving")
    best = search.best
    publish_tune(results, best, settings.trials)  # trials across the rungs; the winner's learning curve
    candidate = steps.register_trained(
        registry, settings.family, Path(best.checkpoint).parent,
        note=f"random search: trial {best.trial.number} of {settings.trials}, {best.epochs} epochs",
        extra_hyperparameters={"search": {"trial": best.trial.number, "trials": settings.trials,
                                          "rung": best.rung, **best.trial.params}})
    shutil.rmtree(out, ignore_errors=True)  # the registry holds the winner; the table holds every trial's figures
    decision = steps.gate(registry, candidate, champion, Path(settings.data), settings.gate,
                          settings.allow_contract_change)
    create_markdown_artifact(key="gate", markdown=gate_markdown(decision.as_dict()),
                             description="random search: the gate's decision on the best trial")
    get_run_logger().info("best trial %d %s (val_acc %.3f): %s", best.trial.number, best.trial.params, best.val_acc,
                          decision.reason)
    return gate_state({**decision.as_dict(), "best_trial": best.row(), "trials_run": len(results)}, "tune")
