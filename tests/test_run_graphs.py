"""What an operator sees: the pretrain and retrain flows' runs have their steps as tasks (train, gate,
promote, collect...), shown in the Prefect UI's run graph (screenshots by a real Chromium in test-artifacts/),
and the dataset defaults come from the inventory, not from where the flow was started."""

from __future__ import annotations

import asyncio

import pytest

from agent_helpers import screenshot_prefect_page

pytestmark = pytest.mark.timeout(900)


def _task_names(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return [r.name for r in runs]

    return asyncio.run(read())


def test_pretrain_and_retrain_runs_show_their_steps_as_tasks(prefect_harness, tmp_path, elpv_small):
    from flows.stages import PretrainSettings, RetrainSettings, pretrain, retrain

    inventory = tmp_path / "fleet.yaml"
    inventory.write_text(f"""
cloud: {{store_url: "{(tmp_path / 'store').as_uri()}", registry: "{tmp_path / 'registry'}",
        datasets: {{generic: {elpv_small / 'generic'}}}}}
defaults: {{connection: {{type: local}}}}
sites: [{{name: site-1, root: "{tmp_path / 'site-1'}"}}]
""")
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
