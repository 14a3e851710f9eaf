"""Forms and run states that tell the truth, on a real Prefect API (the session's harness: a real server).

The deployments ``edgeloop serve`` registers have run forms with dropdowns for every choice and no str/None
toggles (a field left empty says which inventory key it resolves to, and what that is here); a pretrain that
kept the champion says so in its state; a provision run with a failed host is red naming it; expected errors end
a run with one line and no traceback in its logs; runs have names and tags that say what they are; the training
stages share one concurrency slot, so two trainings never overlap.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pytest

from test_serve import prefect_server  # noqa: F401 - a real server for the browser: the harness serves no UI

pytestmark = pytest.mark.timeout(600)


def _inventory(tmp_path: Path, pool: Path, sites: str | None = None) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(f"""
cloud: {{store_url: "{(tmp_path / 'store').as_uri()}", registry: "{tmp_path / 'registry'}",
        datasets: {{generic: "{pool}"}}}}
defaults: {{connection: {{type: local}}}}
sites: {sites or f'[{{name: site-1, root: "{tmp_path / "site-1"}"}}]'}
""")
    return path


def _settings(**fields):
    from flows.stages import PretrainSettings

    return PretrainSettings(**{"family": "forms", "arch": "tiny_cnn", "epochs": 1, "batch_size": 16,
                               "on_trainers": False, **fields})


def _read(run_id):
    """A flow run, its logs and its artifacts' keys, as the API holds them. Logs reach the API from a background
    worker in batches, so this process's queued logs are sent first (else a line just logged may not be there
    yet: the suite's workers load the one server)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()

    async def read():
        async with get_client() as client:
            run = await client.read_flow_run(run_id)
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
        return run, [log.message for log in logs], {a.key for a in artifacts}

    return asyncio.run(read())


def _properties(schema: dict):
    """(where, field) for every parameter and every field of every settings model in a run form."""
    for name, field in schema.get("properties", {}).items():
        yield name, field
    for model, definition in schema.get("definitions", {}).items():
        for name, field in definition.get("properties", {}).items():
            yield f"{model}.{name}", field


@pytest.fixture(scope="module")
def registered(prefect_harness, elpv_small, tmp_path_factory):
    """Every stage's deployment as ``edgeloop serve`` registers it, read back from the API: {flow name: (id, schema,
    tags)}."""
    from prefect.client.orchestration import get_client

    from edgeloop.commands.serve import deployments

    inventory = _inventory(tmp_path_factory.mktemp("served"), elpv_small / "generic")
    ids = [deployment.apply() for deployment in deployments(str(inventory))]

    async def read():
        async with get_client() as client:
            found = {}
            for deployment_id in ids:
                d = await client.read_deployment(deployment_id)
                flow = await client.read_flow(d.flow_id)
                found[flow.name] = (str(d.id), d.parameter_openapi_schema, d.tags)
            return found

    return asyncio.run(read())


def test_every_form_offers_choices_as_dropdowns_and_says_what_an_empty_field_resolves_to(registered, elpv_small):
    from typing import get_args

    from edge_agent.augment import POLICIES
    from edge_agent.models import ARCHITECTURES
    from orchestrator.tune import Arch, Policy
    from test_serve import _undescribed

    assert set(get_args(Arch)) == set(ARCHITECTURES) and set(get_args(Policy)) == set(POLICIES)
    for flow, (_, schema, tags) in registered.items():
        assert _undescribed(schema) == [], flow  # space and halving included
        toggles = [where for where, field in _properties(schema)
                   if any(option.get("type") == "null" for option in field.get("anyOf", []))]
        assert toggles == [], f"{flow}: str/None toggles in the form: {toggles}"
        assert "edgeloop" in tags and any(t.startswith("stage:") for t in tags), (flow, tags)
    pool = str(elpv_small / "generic")
    for flow, model, field in (("edgeloop-pretrain", "PretrainSettings", "data"),
                               ("edgeloop-retrain", "RetrainSettings", "base_data"),
                               ("edgeloop-tune", "TuneSettings", "data")):
        entry = registered[flow][1]["definitions"][model]["properties"][field]
        assert entry["default"] == "" and entry["description"].endswith(
            f"empty: the inventory's cloud.datasets.generic (here: {pool})"), (flow, entry)
    tune = registered["edgeloop-tune"][1]["definitions"]
    assert set(tune["SearchSpace"]["properties"]["arch"]["items"]["enum"]) == set(ARCHITECTURES)
    assert set(tune["SearchSpace"]["properties"]["policy"]["items"]["enum"]) == set(POLICIES)
    assert set(registered["edgeloop-pretrain"][1]["definitions"]["PretrainSettings"]["properties"]["arch"]["enum"]) \
        == set(ARCHITECTURES)
    lifecycle = registered["edgeloop-lifecycle"][1]["properties"]
    assert set(lifecycle["pretrain_arch"]["enum"]) == set(ARCHITECTURES) and lifecycle["site_data"]["enum"]
    rollout = registered["edgeloop-rollout"][1]["definitions"]["RolloutRequest"]["properties"]
    assert "champion" in rollout["version"]["description"] and rollout["limit"]["default"] == []
    assert {"training"} <= set(registered["edgeloop-tune"][2]) and "training" not in registered["provision"][2]


def test_the_tune_form_in_the_browser(prefect_server, elpv_small, tmp_path):  # noqa: F811
    """The tune form as an operator sees it (test-artifacts/tune-form.png) on a real server (the harness serves
    no UI): a text field for the pool that names the inventory's, dropdowns for architectures and policies, no
    'Property is type "None"'."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from agent_helpers import screenshot_prefect_page
    from edgeloop.commands.serve import deployments

    inventory = _inventory(tmp_path, elpv_small / "generic")
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        tune = next(d for d in deployments(str(inventory)) if d.name == "tune")
        text = screenshot_prefect_page(f"/deployments/deployment/{tune.apply()}/run", "tune-form.png",
                                       ["cloud.datasets.generic", "Policy"], height=3200)
    assert 'Property is type "None"' not in text and "cloud.datasets.generic (here:" in text


def test_a_kept_champion_says_so_in_the_runs_state_with_its_name_tags_and_gate(prefect_harness, elpv_small,
                                                                             tmp_path):
    from flows.stages import pretrain

    inventory = str(_inventory(tmp_path, elpv_small / "generic"))
    first = pretrain(inventory, _settings(), return_state=True)
    assert first.is_completed() and first.message.startswith("pretrain: promoted "), first.message
    champion = first.result()["candidate"]
    again = pretrain(inventory, _settings(), return_state=True)  # same recipe, same seed: no better, kept
    decision = again.result()  # the flow's value is still the decision (callers and tests read it)
    assert not decision["promoted"] and decision["champion"] == champion
    assert again.is_completed() and again.message.startswith(f"pretrain: kept champion {champion}; "
                                                             f"{decision['candidate']} not promoted: "), again.message
    run, logs, keys = _read(again.state_details.flow_run_id)
    assert run.name == "pretrain-tiny_cnn-forms"
    assert {"edgeloop", "stage:pretrain", "family:forms", "training"} <= set(run.tags)
    assert "gate" in keys and "pretrain-gate" not in keys  # one key per kind: `gate` in every gated stage


def test_expected_errors_end_the_run_with_one_line_and_no_traceback(prefect_harness, elpv_small, tmp_path):
    from flows.rollout import RolloutRequest, rollout
    from flows.stages import pretrain
    from orchestrator.inventory import load_inventory

    inventory = str(_inventory(tmp_path, tmp_path / "no-such-pool"))
    missing_pool = pretrain(inventory, _settings(), return_state=True)
    bad_inventory = pretrain(str(tmp_path / "nowhere.yaml"), _settings(), return_state=True)
    registry = load_inventory(inventory).registry()
    trained = pretrain(inventory, _settings(data=str(elpv_small / "generic")))["candidate"]
    registry.mark_rolled_back(trained, "a test rolled it back", [])
    refused = rollout(inventory, RolloutRequest(version=trained, family="forms"), return_state=True)
    for state, words in ((missing_pool, ["DatasetError", "no-such-pool"]), (bad_inventory, ["nowhere.yaml"]),
                         (refused, ["RolledBackVersion", trained, "override"])):
        assert state.is_failed() and all(w in state.message for w in words), state.message
        assert "\n" not in state.message
        _, logs, _ = _read(state.state_details.flow_run_id)
        assert not any("Traceback" in line for line in logs), logs
        assert [line for line in logs if line == state.message], logs  # logged once, as the same one line
    with pytest.raises(Exception, match="RolledBack|rolled back"):  # a caller still gets the exception
        rollout(inventory, RolloutRequest(version=trained, family="forms"))


def test_a_task_that_fails_on_an_expected_error_logs_its_line_without_a_traceback(prefect_harness, tmp_path):
    """The flows' tasks raise the same expected errors (a store away, a missing dataset): the task's failure line
    stays in the run's logs, its engine traceback does not; a bug in a task keeps its traceback."""
    from prefect import flow, task

    from edge_agent.store import StoreError
    from flows.runs import finish

    @task(task_run_name="read-the-store")
    def read_the_store(error: Exception):
        raise error

    @flow(name="edgeloop-test-task-errors")
    def stage(error: Exception):
        return finish(read_the_store, error)

    store_away = stage(StoreError("store sftp://nowhere: connection refused"), return_state=True)
    assert store_away.is_failed() and store_away.message == "StoreError: store sftp://nowhere: connection refused"
    _, logs, _ = _read(store_away.state_details.flow_run_id)
    assert any(line.startswith("Task run failed with exception: StoreError(") for line in logs), logs
    assert not any("Traceback" in line for line in logs), logs
    bug = stage(ZeroDivisionError("a bug"), return_state=True)
    _, logs, _ = _read(bug.state_details.flow_run_id)
    assert bug.is_failed() and any("Traceback" in line and "ZeroDivisionError" in line for line in logs), logs


def test_a_provision_run_with_a_failed_host_is_red_and_names_it(prefect_harness, elpv_small, tmp_path):
    from flows.provision import main, provision_flow, summary_of
    from flows.runs import StageFailed

    with socket.socket() as probe:  # a port nobody listens on: the host refuses at once
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    sites = (f'[{{name: gone, root: /tmp/edgeloop-gone, connection: {{type: ssh, host: 127.0.0.1, port: {closed}, '
             f'user: nobody, key_file: {tmp_path / "no-key"}, connect_timeout_s: 2}}}}]')
    inventory = str(_inventory(tmp_path, elpv_small / "generic", sites))
    state = provision_flow(inventory, retry_delays_s=[], return_state=True)
    assert state.is_failed() and "1 of 1 host(s) failed: gone: " in state.message, state.message
    assert summary_of(state)["failed"] == ["gone"]  # the summary is still there for the caller
    assert isinstance(state.result(raise_on_failure=False), StageFailed)
    run, _, keys = _read(state.state_details.flow_run_id)
    assert run.name == "provision-fleet" and "stage:provision" in run.tags and "provision-results" in keys
    assert main(["-i", inventory]) == 1


def test_two_trainings_take_turns_on_the_training_slot(prefect_harness, elpv_small, tmp_path):
    """With the limit `edgeloop serve` creates (one slot), two pretrains started together train one after the
    other: their training task runs never overlap; without the limit they are not held back."""
    from prefect.client.orchestration import get_client

    from flows.runs import TRAINING_LIMIT, ensure_training_limit
    from flows.stages import pretrain

    inventory = str(_inventory(tmp_path, elpv_small / "generic"))
    assert ensure_training_limit(1) == f"{TRAINING_LIMIT}: 1 training(s) at once"
    states: dict[int, object] = {}

    def train(seed: int) -> None:
        # a family each: both start with no champion, and each promotes its own (no compare-and-swap race)
        states[seed] = pretrain(inventory, _settings(seed=seed, epochs=2, family=f"slot-{seed}"), return_state=True)

    try:
        threads = [threading.Thread(target=train, args=(seed,)) for seed in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
    finally:
        assert ensure_training_limit(0).endswith("no limit (trainings may run at once)")
    assert all(state.is_completed() for state in states.values()), states

    async def trainings():
        async with get_client() as client:
            spans = []
            for state in states.values():
                from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

                runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
                spans += [(r.start_time, r.end_time) for r in runs if r.name.startswith("train-")]
            return sorted(spans)

    (start1, end1), (start2, end2) = asyncio.run(trainings())
    assert end1 <= start2, f"the trainings overlapped: {start1}..{end1} and {start2}..{end2}"


def test_edgeloop_run_takes_flat_settings_from_the_command_line(registered, capsys):
    """`edgeloop run pretrain -p epochs=3 -p gate.alpha=0.05` starts the served deployment with those settings (the
    others keep their defaults); a setting the stage does not have is refused in one line naming those it has."""
    from prefect.client.orchestration import get_client

    from edgeloop.cli import main

    assert main(["run", "pretrain", "-p", "epochs=3", "-p", "arch=tiny_cnn", "-p", "gate.alpha=0.05"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("edgeloop-pretrain/pretrain: run "), line
    run_id = line.split("(")[1].split(")")[0]

    async def parameters():
        async with get_client() as client:
            return (await client.read_flow_run(run_id)).parameters

    given = asyncio.run(parameters())
    assert given["settings"] == {"epochs": 3, "arch": "tiny_cnn", "gate": {"alpha": 0.05}}
    assert given["inventory"].endswith("fleet.yaml")  # the deployment's own parameter is kept
    assert main(["run", "pretrain", "-p", "epoch=3"]) == 2
    refused = capsys.readouterr().err
    assert "pretrain has no setting 'epoch' (its settings: data, family, arch, epochs," in refused
    assert len(refused.strip().splitlines()) == 1


def test_served_runs_end_in_one_line_and_the_local_inventory_provisions(prefect_server, tmp_path):  # noqa: F811
    """Through `edgeloop serve` (runs in the runner's own processes, as from the UI): a pretrain on a pool that
    is not there ends Failed with one line, and neither its logs nor serve's output hold a traceback; the run is
    named and tagged; a local site whose python is `${EDGELOOP_PYTHON:-python3}` (as in inventory/local.yaml)
    provisions with no EDGELOOP_PYTHON set."""
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from orchestrator.deploy import stop_agent
    from orchestrator.inventory import load_inventory
    from test_serve import REPO, _wait_for_deployments

    root = tmp_path / "site-1"
    inventory = _inventory(tmp_path, tmp_path / "no-such-pool", sites=(
        f'[{{name: site-1, root: "{root}", python: "${{EDGELOOP_PYTHON:-python3}}", '
        'agent: {heartbeat_interval_s: 1, serve: {port: 0}}}]'))
    env = {**{k: v for k, v in os.environ.items() if k != "EDGELOOP_PYTHON"}, "PREFECT_API_URL": prefect_server,
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serving = subprocess.Popen([sys.executable, "-m", "edgeloop", "serve", "-i", str(inventory)], cwd=REPO,
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            _wait_for_deployments(prefect_server, serving)

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "edgeloop", "run", *args, "--watch"], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=400)

        failed = run("pretrain", "-p", "arch=tiny_cnn", "-p", "family=served")
        provisioned = run("provision")
    finally:
        serving.terminate()
        serving.wait(30)
        fleet = load_inventory(inventory, env={"EDGELOOP_PYTHON": sys.executable})
        stop_agent(fleet.site("site-1"), fleet)
    served = log.read_text(errors="replace")
    assert failed.returncode == 1 and " Failed: DatasetError: " in failed.stdout and "no-such-pool" in failed.stdout, (
        failed.stdout + failed.stderr + served[-3000:])
    run_id = failed.stdout.split("(")[1].split(")")[0]

    async def read():
        async with get_client() as client:
            run = await client.read_flow_run(run_id)
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        return run, [entry.message for entry in logs]

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        flow_run, logs = asyncio.run(read())
    assert flow_run.name == "pretrain-tiny_cnn-served" and {"stage:pretrain", "family:served"} <= set(flow_run.tags)
    assert not any("Traceback" in line for line in logs), logs
    assert "Traceback" not in served, served[-3000:]
    assert "edgeloop serve: edgeloop-training: 1 training(s) at once" in served  # the limit trainings share
    assert provisioned.returncode == 0 and "Completed" in provisioned.stdout, (
        provisioned.stdout + provisioned.stderr + served[-3000:])
    assert (root / "config" / "agent.yaml").is_file(), sorted(p.name for p in root.iterdir())
