"""The fleet view (issue 26, item 3) from real agents' heartbeats in a real store, shaped as the demo leaves a
fleet: a site that fine-tuned on two bases in turn, a serve-only site, a live agent with no model yet, and a site
never provisioned. Its history survives a restart of the cloud and holds each run once; ``edgeloop fleet status``
prints the same rows; a fleet-health run is red naming the sites not ok; a real Prefect UI shows the view and a
site's history picture (screenshots in test-artifacts/)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_helpers import (REPO, AgentProcess, copy_labelled, deploy_base, latest_artifact_id, screenshot_prefect_page,
                           serving_site, wait_for, write_config)

from test_run_graphs import on_server  # noqa: F401 - this process's flows report to a real server
from test_serve import prefect_server  # noqa: F401 - a real server: the harness serves no UI

from edge_agent.store import Store
from orchestrator import fleetview

pytestmark = pytest.mark.timeout(900)
FINETUNE_TIMEOUT = 240
SITES = ["site-a", "site-b", "site-c", "site-d"]  # fine-tunes, serves only, no model yet, never provisioned


def _finetuned(agent: AgentProcess, after: str | None) -> dict:
    """Wait for a fine-tune run other than ``after`` to finish and be in a heartbeat."""
    return wait_for(lambda: (s := agent.status()) and (s.get("last_run") or {}).get("run_id") not in (None, after)
                    and not s["finetune"]["running"] and s, FINETUNE_TIMEOUT, "a fine-tune run", agent)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, elpv_small, tiny_base_model):
    """Live agents for sites a-c (d never ran); site-a fine-tuned on base v1, then on v2. The cloud looked (and
    recorded history) after each run, as the demo's fleet-health runs do."""
    work = tmp_path_factory.mktemp("fleet")
    store = work / "store"
    small = {"members": [{"arch": "tiny_cnn", "policy": p} for p in ("flips", "contrast")],
             "heartbeat_interval_s": 0.5}
    a = write_config(work / "site-a", store.as_uri(), site="site-a", **small)
    deploy_base(work / "site-a", tiny_base_model, "v1")
    copy_labelled(elpv_small / "sites" / "site-1", work / "site-a")
    shutil.copy(elpv_small / "sites" / "site-1" / "manifest.json", work / "site-a" / "data" / "labelled")
    serving_site(work / "site-b", 32)
    b = write_config(work / "site-b", store.as_uri(), site="site-b")
    c = write_config(work / "site-c", store.as_uri(), site="site-c")
    inventory = work / "fleet.yaml"
    inventory.write_text(f'cloud: {{store_url: "{store.as_uri()}", stale_after_s: 600}}\n'
                         "defaults: {connection: {type: local}}\nsites:\n"
                         + "".join(f'  - {{name: {s}, root: "{work / s}"}}\n' for s in SITES))
    agents = [AgentProcess(config) for config in (a, b, c)]
    try:
        first = _finetuned(agents[0], None)
        for site in SITES[:3]:
            wait_for(lambda: (store / "status" / f"{site}.json").is_file(), 60, f"{site}'s heartbeat")
        wait_for(lambda: _heartbeat(store, "site-a").get("last_run", {}).get("run_id") == first["last_run"]["run_id"],
                 30, "site-a's run in the store")
        view = fleetview.look(Store(store.as_uri()), SITES, 600, record=True)
        assert set(view.changed) == {"site-a", "site-b"}, view  # site-c serves nothing and ran nothing yet
        deploy_base(work / "site-a", tiny_base_model, "v2")  # the cloud's next base: a second fine-tune
        second = _finetuned(agents[0], first["last_run"]["run_id"])
        wait_for(lambda: _heartbeat(store, "site-a").get("last_run", {}).get("run_id") == second["last_run"]["run_id"],
                 30, "site-a's second run in the store")
        fleetview.look(Store(store.as_uri()), SITES, 600, record=True)
        yield {"work": work, "store": store, "inventory": inventory, "runs": [first["last_run"], second["last_run"]],
               "agents": agents}
    finally:
        for agent in agents:
            agent.close()


def _heartbeat(store: Path, site: str) -> dict:
    try:
        return json.loads((store / "status" / f"{site}.json").read_text())
    except (OSError, ValueError):
        return {}


def test_rows_from_real_heartbeats_say_what_serves_on_which_base_since_when_and_why(fleet):
    before = time.time()
    view = fleetview.look(Store(fleet["store"].as_uri()), SITES, 600)
    rows = {r.site: r for r in view.rows}
    assert {s: r.verdict for s, r in rows.items()} == {"site-a": "ok", "site-b": "ok", "site-c": "not serving",
                                                         "site-d": "not provisioned"}
    a, last = rows["site-a"], fleet["runs"][1]
    beat = _heartbeat(fleet["store"], "site-a")
    assert a.serving == beat["active_version"] and a.deployed_bases == "v1, v2"
    runs = {r["run_id"]: r for r in fleet["runs"]}  # what serves is built on: a base as-is on itself, an ensemble
    assert a.bases == (a.serving.removeprefix("base-") if a.serving.startswith("base-")  # on its run's bases
                       else ", ".join(dict.fromkeys(runs[a.serving]["bases"])))
    assert ", ".join(beat["active_bases"]) == a.bases  # the agent says it too, read from the serving graph
    history = view.histories["site-a"]
    first_seen = min(e["seen"] for e in history if e["serving"] == a.serving)
    assert a.since == first_seen and a.since <= before  # by the cloud's clock, from the durable history
    gate = last["gate"]
    assert a.gate["n"] == gate["n"] and a.gate["challenger_only"] == gate["challenger_only"]
    assert f"n = {gate['n']}, discordant {gate['challenger_only']} for / {gate['incumbent_only']} against" in a.evidence
    assert ("p = " in a.evidence or "e = " in a.evidence) and f"alpha = {gate['alpha']:.3g}" in a.evidence
    assert a.decision and "(" not in a.decision and a.decision.split(":")[0] in last["decision"]
    candidates = last["candidates"]
    assert a.test_accuracy == candidates[last["serving"]]["test"]["accuracy"]
    assert a.base_test_accuracy == candidates["base"]["test"]["accuracy"] and a.test_images > 0
    assert a.labels_home.startswith("0 taken") and a.outbox == beat["queues"]["outbox"]
    assert rows["site-b"].serving == "v1" and rows["site-b"].decision is None and rows["site-b"].since
    assert "serves no model" in rows["site-c"].reason and rows["site-c"].serving is None
    assert rows["site-d"].heartbeat_age_s is None and "never provisioned" in rows["site-d"].reason
    assert a.history == "history/site-a.jsonl"


def test_the_history_survives_a_restart_and_holds_each_run_once(fleet):
    store = Store(fleet["store"].as_uri())
    path = fleet["store"] / "history" / "site-a.jsonl"
    kept = path.read_bytes()
    runs = fleetview.runs(fleetview.parse_history(kept))
    assert [r["run_id"] for r in runs] == [r["run_id"] for r in fleet["runs"]]  # both, in order, once each
    assert set(runs[0]["bases"]) == {"v1"} and runs[1]["bases"][-1] == "v2"
    assert all(r["test_accuracy"] is not None and r["base_test_accuracy"] is not None for r in runs)
    since = {r.site: r.since for r in fleetview.look(store, SITES, 600).rows}
    for _ in range(2):  # a new reader is a restarted cloud: it sees the same heartbeats, adds nothing
        again = fleetview.look(Store(fleet["store"].as_uri()), SITES, 600, record=True)
        assert again.changed == [] and path.read_bytes() == kept
        assert {r.site: r.since for r in again.rows} == since
    with open(path, "ab") as handle:  # a torn line (a write cut off) costs that line, not the history
        handle.write(b'{"seen": 1, "serv')
    assert fleetview.runs(fleetview.read_histories(store, ["site-a"])["site-a"]) == runs
    path.write_bytes(kept)


def test_an_ensemble_made_between_two_looks_is_still_named_on_its_bases():
    """A labels fine-tune (or any run) the cloud never saw in a heartbeat leaves no run report in the history,
    but the agent says what the serving ensemble is built on, and the history line keeps it."""
    between = {"active_version": "run-7", "base_versions": ["v1", "v2"], "active_bases": ["v2"],
               "last_run": {"run_id": "run-8", "serving": "incumbent", "serving_version": "run-7"}}
    history = [{"seen": 1.0, "serving": "base-v1", "bases": ["v1"], "run_id": None}]
    entry = fleetview.next_entry(history, between, 2.0)
    assert entry["built_on"] == ["v2"] and entry["run"]["version"] == "run-7"
    later = history + [entry]
    assert fleetview.built_on("run-7", None, later) == ["v2"]  # the history picture's tick: "on v2", not "on ?"
    assert fleetview.bases_text("run-7", None, history, ["v1", "v2"]) == "deployed: v1, v2"  # older agents
    assert fleetview.bases_text("run-7", None, history, ["v1", "v2"], ["v2"]) == "v2"
    assert fleetview.built_on("run-7", None, [{**entry, "built_on": "v2"}]) is None  # a misshapen line says nothing


def test_the_history_is_bounded_and_a_new_run_or_version_appends_one_line(tmp_path):
    store = Store((tmp_path / "store").as_uri())
    history: list[dict] = []
    beat = {"active_version": "e1", "base_versions": ["v1"], "last_run": {"run_id": "r1", "serving": "new"}}
    for n in range(fleetview.MAX_HISTORY + 20):
        entry = fleetview.next_entry(history, {**beat, "active_version": f"e{n}"}, float(n))
        history = fleetview.append(store, "s", history, entry)
    stored = fleetview.read_histories(store, ["s"])["s"]
    assert len(stored) == fleetview.MAX_HISTORY and stored[-1]["serving"] == f"e{fleetview.MAX_HISTORY + 19}"
    assert fleetview.next_entry(stored, {**beat, "active_version": stored[-1]["serving"]}, 1e9) is None
    assert "run" not in fleetview.next_entry(stored, beat, 1e9)  # r1 again (a rollback): no second description


def test_edgeloop_fleet_status_prints_the_same_rows(fleet):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "edgeloop", "fleet", "status", "-i", str(fleet["inventory"])],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr  # two sites are not ok
    lines = run.stdout.splitlines()
    assert lines[0].startswith("2 of 4 sites ok") and lines[1].split()[:3] == ["site", "verdict", "serving"]
    view = {r.site: r for r in fleetview.look(Store(fleet["store"].as_uri()), SITES, 600).rows}
    a = next(line for line in lines if line.startswith("site-a "))
    assert view["site-a"].serving in a and view["site-a"].evidence in a and "base " in a
    assert "site-c: not serving: serves no model" in run.stdout and "site-d: not provisioned:" in run.stdout
    run = subprocess.run([sys.executable, "-m", "edgeloop", "fleet", "status", "-i", str(fleet["inventory"]), "--json"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    rows = {r["site"]: r for r in json.loads(run.stdout)}
    assert {s: r["verdict"] for s, r in rows.items()} == {s: r.verdict for s, r in view.items()}
    assert rows["site-a"]["serving"] == view["site-a"].serving and rows["site-a"]["gate"]["n"] > 0
    assert rows["site-a"]["since_utc"].endswith("Z")


def test_a_fleet_health_run_is_red_naming_every_site_not_ok(prefect_harness, fleet):
    from agent_helpers import _latest_artifact, latest_table

    from flows.health import FleetUnhealthy, fleet_health

    state = fleet_health(str(fleet["inventory"]), return_state=True)
    assert state.is_failed() and "site-c: serves no model" in state.message and "site-d: no heartbeat" in state.message
    with pytest.raises(FleetUnhealthy) as failure:
        state.result()
    assert str(failure.value).startswith("2 ok, 1 not serving (site-c") and "site-a" not in str(failure.value)
    assert {r["site"]: r["verdict"] for r in latest_table("fleet-health")}["site-d"] == "not provisioned"
    page = _latest_artifact(fleetview.FLEET_KEY).data
    picture = _latest_artifact(fleetview.history_artifact_key("site-a"))
    assert "**2 of 4 sites ok**" in page and f"/artifacts/artifact/{picture.id})" in page
    assert page.count("[picture](") == 1  # site-b never fine-tuned: no picture to link
    assert picture.data.startswith("![") and "data:image/png;base64," in picture.data
    assert "- **site-c** not serving: serves no model" in page and "- **site-a**: " in page


def test_the_fleet_view_and_a_site_history_in_a_real_prefect_ui(on_server, fleet):
    from flows.health import FleetUnhealthy, fleet_health

    with pytest.raises(FleetUnhealthy):
        fleet_health(str(fleet["inventory"]))
    serving = _heartbeat(fleet["store"], "site-a")["active_version"]
    page = screenshot_prefect_page(f"/artifacts/artifact/{latest_artifact_id(fleetview.FLEET_KEY)}", "fleet-view.png",
                                   ["site-a", "not provisioned", "not serving", serving[:12]])
    assert "discordant" in page and "base " in page
    screenshot_prefect_page(f"/artifacts/artifact/{latest_artifact_id(fleetview.history_artifact_key('site-a'))}",
                            "site-history.png", ["site-history-site-a"])



def test_a_rollout_run_links_the_fleet_view(prefect_harness, tmp_path, tiny_base_model):
    """Every rollout (and retrain: the same call) points at the fleet view; here one that fails at once."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.rollout import RolloutRequest, rollout
    from orchestrator.registry import ModelRegistry

    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register("elpv", tiny_base_model, arch="tiny_cnn", dataset_id=None, hyperparameters={},
                                metrics={}).version
    inventory = tmp_path / "inv.yaml"
    inventory.write_text(f'cloud: {{store_url: "{(tmp_path / "store").as_uri()}", registry: "{registry.root}"}}\n'
                         "defaults: {connection: {type: local}}\n"
                         f'sites: [{{name: new-site, root: "{tmp_path / "new-site"}"}}]\n')
    state = rollout(str(inventory), RolloutRequest(version=version, family="elpv"), return_state=True)
    assert state.is_failed()

    async def markdowns() -> list[str]:
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        return [a.data for a in found if a.type == "markdown"]

    assert any(f"/artifacts/key/{fleetview.FLEET_KEY})" in text for text in asyncio.run(markdowns()))


def test_a_history_the_store_refuses_or_cannot_write_leaves_the_rows_true_and_says_why(tmp_path):
    """Faults on purpose: site a's history is a directory (unwritable), site b's a link (refused, never
    overwritten); site c's history is written as usual. Every row still says what its heartbeat says."""
    status = tmp_path / "store" / "status"
    status.mkdir(parents=True)
    now = time.time()
    for site in "abc":
        (status / f"{site}.json").write_text(json.dumps({"site": site, "time": now, "state": "serving",
                                                         "active_version": f"e-{site}", "base_versions": ["v1"]}))
    history = tmp_path / "store" / "history"
    (history / "a.jsonl").mkdir(parents=True)
    (history / "b.jsonl").symlink_to("/dev/zero")
    view = fleetview.look(Store((tmp_path / "store").as_uri()), ["a", "b", "c"], 60, record=True)
    assert [r.serving for r in view.rows] == ["e-a", "e-b", "e-c"] and all(r.verdict == "ok" for r in view.rows)
    assert view.changed == ["c"] and (history / "b.jsonl").is_symlink()
    assert "history/b.jsonl" in view.history_error and "history/a.jsonl" in view.history_error
    assert "History not updated: " in fleetview.markdown(view, 60)


def test_edgeloop_fleet_status_says_the_store_is_away_rather_than_every_site_unprovisioned(tmp_path):
    from agent_helpers import free_port

    inventory = tmp_path / "fleet.yaml"
    inventory.write_text(f'cloud: {{store_url: "sftp://nobody@127.0.0.1:{free_port()}/store"}}\n'
                         f'defaults: {{connection: {{type: local}}}}\nsites: [{{name: a, root: "{tmp_path / "a"}"}}]\n')
    run = subprocess.run([sys.executable, "-m", "edgeloop", "fleet", "status", "-i", str(inventory)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2 and run.stdout == "", run.stdout + run.stderr
    assert run.stderr.startswith("edgeloop fleet: error: store sftp://") and "Traceback" not in run.stderr
