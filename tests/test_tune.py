"""Random search with successive halving: the library directly, the flow on a process pool and on Dask."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from agent_helpers import latest_table, ours

from edge_agent.models import load_checkpoint
from edge_agent.train import TrainConfig
from orchestrator.registry import ModelRegistry
from orchestrator.tune import Halving, SearchSpace, Trial, TrialResult, grid_trials, random_trials, successive_halving

pytestmark = pytest.mark.timeout(900)


def test_random_draws_cover_the_space_and_a_grid_repeats_values():
    space = SearchSpace()
    trials = random_trials(space, 16, dataset_size=64, seed=1)
    lrs = [t.params["lr"] for t in trials]
    assert len(set(lrs)) == 16 and all(space.lr[0] <= lr <= space.lr[1] for lr in lrs)
    assert {t.params["image_size"] for t in trials} <= {64, 48, 32}
    assert random_trials(space, 16, 64, seed=1) == trials  # the seed makes a search repeatable
    grid = grid_trials(space, 16, dataset_size=64)
    assert 8 <= len(grid) <= 16
    assert len({t.params["lr"] for t in grid}) <= 3  # a grid of 16 tries few values of each knob


def test_the_search_space_covers_the_recipe_knobs_and_the_slim_architectures():
    """Policy (EL augmentation included), label smoothing, class balance, EMA and the slim ResNets can all be
    searched; every drawn trial is a valid TrainConfig; the Prefect forms offer every architecture."""
    import typing

    from edge_agent.augment import POLICIES
    from edge_agent.models import ARCHITECTURES
    from flows.stages import Arch
    from orchestrator.tune import OPEN_ARCHS, RECIPE_KNOBS

    assert set(typing.get_args(Arch)) == set(ARCHITECTURES)
    assert {"slim_resnet", "slim_resnet_small"} <= set(OPEN_ARCHS) and "el" in SearchSpace().policy
    space = SearchSpace(ema_decay=[None, 0.99])
    trials = random_trials(space, 40, dataset_size=64, seed=0)
    for knob, values in (("label_smoothing", {0.0, 0.1}), ("class_balance", {"none", "weighted"}),
                         ("ema_decay", {None, 0.99}), ("arch", set(OPEN_ARCHS)), ("policy", set(SearchSpace().policy))):
        assert {t.params[knob] for t in trials} == values, knob
    for trial in trials + grid_trials(space, 64, dataset_size=64):
        TrainConfig(policy=trial.params["policy"], **{k: trial.params[k] for k in RECIPE_KNOBS})
    assert set(POLICIES) >= set(SearchSpace().policy)
    for bad, why in (({"ema_decay": [1.5]}, "less than 1"), ({"class_balance": ["oversample"]}, "none"),
                     ({"label_smoothing": []}, "at least 1")):
        with pytest.raises(ValueError, match=why):
            SearchSpace(**bad)


def test_successive_halving_promotes_the_better_half_with_more_epochs():
    trials = [Trial(n, {"quality": q}) for n, q in enumerate([0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6])]
    calls = []

    def run_rung(batch: list[Trial], rung: int, epochs: int) -> list[TrialResult]:
        calls.append((sorted(t.number for t in batch), epochs))
        return [TrialResult(t, rung, epochs, t.params["quality"] * epochs, 0.0, 0.0, f"{t.number}.pt",
                            error="boom" if t.number == 1 and rung == 1 else "") for t in batch]

    search = successive_halving(trials, Halving(min_epochs=1, max_epochs=4, eta=2), run_rung)
    assert calls == [([0, 1, 2, 3, 4, 5, 6, 7], 1), ([1, 3, 5, 7], 2), ([3, 5], 4)]
    assert search.best.trial.number == 5  # trial 1 was best but failed in rung 1: it goes no further
    assert len(search.table()) == 14


def _inventory(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(f"""
cloud: {{store_url: "file://{tmp_path / 'store'}", registry: "{tmp_path / 'registry'}"}}
defaults: {{connection: {{type: local}}}}
sites: [{{name: only, root: "{tmp_path / 'only'}"}}]
""")
    return path


def _settings(data: Path, **overrides):
    from flows.tune import TuneSettings

    space = SearchSpace(arch=["tiny_cnn"], policy=["none", "flips"], image_size=[32, 24])
    return TuneSettings(data=str(data), family="tuned", trials=4, space=space,
                        halving=Halving(min_epochs=1, max_epochs=2, eta=2), concurrency=2, **overrides)


def _workers(tmp_path: Path) -> set[int]:
    """The processes the trials trained in (from their rows in the table artifact)."""
    rows = latest_table("tune-trials")
    return {int(row["worker"].rsplit(":", 1)[1]) for row in rows}


def _check_registered(result: dict, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    version = registry.get(result["candidate"])
    search = version.hyperparameters["search"]
    assert result["trials_run"] == 4 + 2  # four trials for one epoch, the better two for two
    assert search["trials"] == 4 and search["rung"] == 1
    assert {k: search[k] for k in ("arch", "policy", "image_size")} == \
        {k: result["best_trial"][k] for k in ("arch", "policy", "image_size")}
    assert version.hyperparameters["lr"] == pytest.approx(search["lr"])
    assert version.hyperparameters["image_size"] == search["image_size"]
    _, meta = load_checkpoint(registry.artifact(version.version))
    assert meta.spec.image_size == search["image_size"]
    assert result["promoted"] and registry.champion("tuned").version == version.version  # no champion yet


def test_tune_on_a_process_pool_registers_the_best_trial(prefect_harness, elpv_small, tmp_path):
    from flows.tune import tune

    result = tune(str(_inventory(tmp_path)), _settings(elpv_small / "generic"))
    _check_registered(result, tmp_path)
    processes = {int(row["process"]) for row in latest_table("tune-trials")}
    assert len(processes) == 6 and os.getpid() not in processes  # each trained in a process of its own


def test_tune_on_a_local_dask_cluster(prefect_harness, elpv_small, tmp_path):
    from distributed import Client, LocalCluster

    from flows.tune import tune

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        settings = _settings(elpv_small / "generic", dask_address=cluster.scheduler_address)
        result = tune(str(_inventory(tmp_path)), settings)
        dask_workers = set(client.run(os.getpid).values())
    _check_registered(result, tmp_path)
    assert _workers(tmp_path) <= dask_workers  # every trial trained on the cluster


@pytest.mark.parametrize("bad, why", [({"arch": ["vgg"]}, "unknown arch"), ({"policy": []}, "no policy"),
                                      ({"lr": (0, 1)}, "0 < low <= high"), ({"image_size": [8]}, "below 16 px")])
def test_a_search_space_with_a_bad_choice_is_refused_before_any_trial(bad, why):
    with pytest.raises(ValueError, match=why):
        SearchSpace(**bad)


def _tune_settings(**fields):
    from flows.tune import TuneSettings

    return TuneSettings(**fields)


@pytest.mark.parametrize("make, why", [(lambda: SearchSpace(image_size=[2_000_000_000]), "out of bounds"),
                                       (lambda: Halving(max_epochs=10**9), "less than or equal to 1000"),
                                       (lambda: _tune_settings(trials=10**9), "less than or equal to 1000")])
def test_a_search_space_out_of_bounds_is_refused_with_a_clear_error(make, why):
    with pytest.raises(ValueError, match=why):
        make()


def test_a_trial_whose_process_the_os_kills_is_recorded_failed_and_the_search_goes_on(elpv_small, tmp_path):
    import signal
    import threading
    import time

    from orchestrator.tune import run_trial

    trials = random_trials(SearchSpace(arch=["tiny_cnn"], policy=["none"], image_size=[24]), 3, 32, seed=1)
    victim, stop = "trial-001-rung-0", threading.Event()

    def kill_the_victim():  # the OS's OOM killer, in effect: SIGKILL to the process training trial 1
        while not stop.is_set():
            for proc in Path("/proc").iterdir():
                try:
                    if proc.name.isdigit() and victim.encode() in (proc / "cmdline").read_bytes() \
                            and ours(int(proc.name)):
                        os.kill(int(proc.name), signal.SIGKILL)
                        return
                except (OSError, ValueError, IndexError):
                    continue
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_victim, daemon=True)
    killer.start()
    try:
        search = successive_halving(trials, Halving(min_epochs=1, max_epochs=1), lambda ts, rung, epochs: [
            run_trial(elpv_small / "generic", t, rung, epochs, tmp_path, threads=1) for t in ts])
    finally:
        stop.set()
    errors = {r.trial.number: r.error for r in search.results}
    assert errors[1] == "the trial's process was killed by SIGKILL"
    assert not errors[0] and not errors[2] and search.best.trial.number in (0, 2)
    assert all(r.worker.endswith(f":{os.getpid()}") for r in search.results)  # recorded by the worker itself
