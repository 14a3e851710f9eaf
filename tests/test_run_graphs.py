"""What an operator sees in a real Prefect server's UI (screenshots by a real Chromium in test-artifacts/):
the pretrain and retrain runs have their steps as tasks (train, gate, promote, collect...) in the run graph,
their dataset defaults come from the inventory; a rollout to a site never provisioned fails at once, red,
with its table of sites and reasons."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from agent_helpers import latest_artifact_id, latest_table, one_site_inventory, screenshot_prefect_page
from test_serve import prefect_server  # noqa: F401 - a real server: the harness serves no UI

pytestmark = pytest.mark.timeout(900)


def _task_names(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return [r.name for r in runs]

    return asyncio.run(read())


@pytest.fixture
def on_server(prefect_server):  # noqa: F811
    """This process's flows report to ``prefect_server``. Prefect's events worker is one per process and keeps
    the API it started with (the session harness's, once an earlier test ran a flow), and task runs reach the
    server as events: so it is drained before and after, and the next flow starts one for this server."""
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    EventsWorker.drain_all(timeout=30)
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server
        EventsWorker.drain_all(timeout=30)


def test_pretrain_and_retrain_runs_show_their_steps_as_tasks(on_server, tmp_path, elpv_small):
    from flows.stages import PretrainSettings, RetrainSettings, pretrain, retrain

    inventory = one_site_inventory(tmp_path, elpv_small)
    state = pretrain(str(inventory), PretrainSettings(family="graph", arch="tiny_cnn", epochs=1, batch_size=16),
                     return_state=True)
    assert state.is_completed() and state.result()["promoted"]  # on cloud.datasets.generic: no data given
    pretrain_run = state.state_details.flow_run_id
    names = _task_names(pretrain_run)
    assert {"train-tiny_cnn", "promote-" + state.result()["candidate"]} <= set(names), names
    assert any(n.startswith("gate-") for n in names)
    page = screenshot_prefect_page(f"/runs/flow-run/{pretrain_run}", "pretrain-run-graph.png", ["edgeloop-pretrain"])
    assert "did not generate any task" not in page

    state = retrain(str(inventory), RetrainSettings(family="graph", epochs=1, rollout=False), return_state=True)
    assert state.is_completed(), state
    retrain_run = state.state_details.flow_run_id
    names = _task_names(retrain_run)
    assert {"read-samples", "train-from-champion"} <= set(names) and any(n.startswith("gate-") for n in names), names
    page = screenshot_prefect_page(f"/runs/flow-run/{retrain_run}", "retrain-run-graph.png", ["edgeloop-retrain"])
    assert "did not generate any task" not in page

    from orchestrator.registry import ModelRegistry

    versions = len(list(ModelRegistry(tmp_path / "registry").versions("graph")))
    again = retrain(str(inventory), RetrainSettings(family="graph", epochs=1, rollout=False))
    assert again["nothing_new"] and "nothing new" in again["reason"]  # no new label: no try spent, no training
    assert len(list(ModelRegistry(tmp_path / "registry").versions("graph"))) == versions


def test_a_rollout_to_a_site_never_provisioned_fails_at_once_with_its_table(on_server, tmp_path, tiny_base_model):
    from flows.rollout import RolloutHalted, RolloutRequest, rollout
    from orchestrator.registry import ModelRegistry

    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register("elpv", tiny_base_model, arch="tiny_cnn", dataset_id=None, hyperparameters={},
                                metrics={}).version
    inventory = tmp_path / "inv.yaml"
    inventory.write_text(f"""
cloud: {{store_url: "{(tmp_path / 'store').as_uri()}", registry: "{tmp_path / 'registry'}"}}
rollout: {{canary: [new-site], timeout_s: 900}}
defaults: {{connection: {{type: local}}, python: {sys.executable}}}
sites: [{{name: new-site, root: "{tmp_path / 'new-site'}"}}, {{name: later, root: "{tmp_path / 'later'}"}}]
""")
    began = time.monotonic()
    with pytest.raises(RolloutHalted, match=r"new-site failed: deploy failed: not provisioned: no agent config"):
        rollout(str(inventory), RolloutRequest(version=version, family="elpv"))
    assert time.monotonic() - began < 120  # at once, not after the 900 s timeout
    assert not (tmp_path / "new-site" / "models" / "base" / version).exists()
    rows = {r["site"]: r for r in latest_table("rollout")}
    assert rows["new-site"]["rolled_back"] == "never got it" and rows["later"]["verdict"] == "not deployed"
    page = screenshot_prefect_page(f"/artifacts/artifact/{latest_artifact_id('rollout')}", "rollout-verdict-table.png",
                                   ["new-site", "not provisioned", "not deployed"])
    assert "rolled_back" in page or "rolled back" in page


def test_the_canary_analysis_table_shows_each_metric_before_and_after(on_server):
    """The analysis artifact an operator reads after a canary: the rollout flow's own publishing of the checks
    :func:`orchestrator.canary.analyse` makes of a site whose defect rate jumped (the e2e test in test_rollout
    drives real sites into this; here the page is what is checked, in a real server's UI)."""
    from prefect import flow

    from flows.rollout import _publish
    from orchestrator.canary import analyse
    from orchestrator.inventory import CanaryThresholds

    def heartbeat(model: str, defective: float) -> dict:
        window = {"predictions": 40, "class_rates": {"defective": defective, "functional": 1 - defective},
                  "mean_confidence": 0.9, "mean_disagreement": 0.05, "latency_p50_ms": 4.0,
                  "latency_p95_ms": 6.0, "errors": 0, "quarantined": 0}
        return {"active_version": model, "window": {model: window}}

    checks = analyse("site-a", heartbeat("before", 0.1), heartbeat("after", 1.0), CanaryThresholds())
    assert [c.metric for c in checks if c.failed] == ["rate of defective"]  # one test covers both classes

    @flow(name="edgeloop-rollout-analysis-view")
    def publish() -> None:
        _publish([{"site": "site-a", "stage": "canary", "verdict": "failed", "reason": checks[0].why()}],
                 [c.row() for c in checks], "v-bad")

    publish()
    rows = latest_table("rollout-analysis")
    assert {r["metric"]: r["result"] for r in rows}["rate of defective"] == "fail"
    page = screenshot_prefect_page(f"/artifacts/artifact/{latest_artifact_id('rollout-analysis')}",
                                   "rollout-analysis-table.png", ["rate of defective", "latency p95 growth"])
    assert "fail" in page and "threshold" in page
