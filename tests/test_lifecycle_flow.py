"""The whole loop through the real flow: Prefect test API, real agents as processes, real store and registry."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from prefect.client.orchestration import get_client

from edge_agent.datasets import open_dataset
from edge_agent.layout import AgentPaths
from edge_agent.sitedata import exam_hashes
from flows.lifecycle import lifecycle_flow
from orchestrator.deploy import stop_agent
from orchestrator.inventory import load_inventory
from orchestrator.registry import ModelRegistry

pytestmark = pytest.mark.timeout(900)

INVENTORY = """
cloud:
  store_url: file://${EDGELOOP_HOME}/store
  registry: ${EDGELOOP_HOME}/registry
rollout: {canary: [north], soak_s: 6, fresh_within_s: 5, timeout_s: 300, inconclusive: proceed}   # fed after
defaults:
  connection: {type: local}
  python: ${EDGELOOP_PYTHON}
  learning:
    image_size: 32
    members:
      - {arch: tiny_cnn, policy: flips}
      - {arch: tiny_cnn, policy: contrast}
    finetune: {epochs: 1, batch_size: 32}
    upload: {random_share: 0.2}
  agent: {heartbeat_interval_s: 1, poll_interval_s: 0.5, serve: {port: 0}}
sites:
  - {name: north, root: "${EDGELOOP_HOME}/sites/north"}
  - {name: south, root: "${EDGELOOP_HOME}/sites/south"}
"""


def test_one_turn_of_the_loop(prefect_harness, tmp_path):
    inventory = tmp_path / "fleet.yaml"
    inventory.write_text(INVENTORY)
    home = tmp_path / "home"
    run = {"inventory": str(inventory), "home": str(home), "pretrain_arch": "tiny_cnn", "pretrain_epochs": 1,
           "retrain_epochs": 1, "site_timeout_s": 300}
    try:
        result = lifecycle_flow(**run)
        again = lifecycle_flow(**run)  # a second turn resumes from the registry and the provisioned sites
    finally:
        fleet = load_inventory(inventory, env={"EDGELOOP_HOME": str(home), "EDGELOOP_PYTHON": "python3"})
        for site in fleet.sites:
            stop_agent(site, fleet)

    assert sorted(result["sites_completed"]) == ["north", "south"]
    for site in ("north", "south"):
        paths = AgentPaths(home / "sites" / site)
        assert paths.active_link.is_symlink() and (paths.active_link / "ensemble.onnx").is_file()
        results = [json.loads(line) for line in (paths.processed / "results.jsonl").read_text().splitlines()]
        assert results and all(r["label"] in ("functional", "defective") for r in results)
        assert list((home / "store" / "samples" / site).glob("*.json")), f"no samples from {site}"
        assert json.loads((home / "store" / "status" / f"{site}.json").read_text())["site"] == site

    decision = result["decision"]
    assert decision["samples_accepted"] > 0 and decision["samples_rejected"] == 0
    registry = ModelRegistry(home / "registry")
    pretrained, retrained, second = registry.versions()  # one version per turn, plus the pretrained one
    assert retrained.parent == pretrained.version and retrained.version == decision["candidate"]
    first_champion = decision["candidate"] if decision["promoted"] else decision["champion"]
    if decision["promoted"]:  # the new champion went out to the sites again
        for site in ("north", "south"):
            assert (AgentPaths(home / "sites" / site).base_models / first_champion / "model.pt").is_file()
    keys = asyncio.run(_artifact_keys())
    assert {"provision-results", "rollout", "collect", "fleet-status", "model-versions", "gate", "fleet"} <= keys
    assert {"site-history-north", "site-history-south"} <= keys  # the demo leaves the fleet view and histories

    assert sorted(again["sites_completed"]) == ["north", "south"]
    assert again["decision"]["champion"] == first_champion  # the second turn starts from the first's champion
    assert second.version == again["decision"]["candidate"] and second.parent == first_champion
    assert [v.stage for v in registry.versions()].count("champion") == 1

    # no exam left a site, and none was ever trained on: no gate or test image of any site is in the store's
    # samples, except labels that came home into those roles (uploaded before a person labelled them), and none
    # is in the training split of a retraining set
    retraining = [open_dataset(d) for d in sorted((home / "retraining-sets").iterdir())]
    assert len(retraining) == 2
    trained = {r["sha256"] for d in retraining for r in d.records if r["split"] == "train"}
    for site in ("north", "south"):
        paths = AgentPaths(home / "sites" / site)
        exam = set(exam_hashes(paths))
        assert exam and exam <= set(json.loads((home / "store" / "exams" / f"{site}.json").read_text())["sha256"])
        uploaded = {p.stem for p in (home / "store" / "samples").glob("*/*.json")}
        came_home = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths.labelled.glob("*/home-*.png")}
        assert exam & uploaded <= came_home and not exam & trained


async def _artifact_keys() -> set[str]:
    async with get_client() as client:
        return {a.key for a in await client.read_artifacts()}
