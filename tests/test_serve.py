"""``edgeloop serve`` against a real local Prefect server: every stage a deployment, typed forms, the schedule,
and the Prefect UI's Deployments page listing them in a real headless Chromium."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_helpers import free_port, wait_for_url
from test_labelling import ARTIFACTS, _browser

REPO = Path(__file__).resolve().parents[1]
STAGES = {"edgeloop-pretrain": "pretrain", "edgeloop-tune": "tune", "provision": "provision",
          "edgeloop-collect": "collect", "edgeloop-retrain": "retrain", "edgeloop-rollout": "rollout",
          "edgeloop-fleet-health": "fleet-health", "edgeloop-lifecycle": "lifecycle"}
pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    wait_for_url(api + "/health", proc, "prefect server")
    yield api
    proc.terminate()
    proc.wait(30)


def test_serve_registers_every_stage_with_its_form_and_schedule(prefect_server, tmp_path):
    inventory = tmp_path / "fleet.yaml"
    inventory.write_text(f"""
cloud: {{store_url: "{(tmp_path / 'store').as_uri()}", registry: "{tmp_path / 'registry'}",
        retrain_schedule: "15 3 * * *"}}
defaults: {{connection: {{type: local}}}}
sites: [{{name: site-1, root: "{tmp_path / 'site-1'}"}}]
""")
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    serving = subprocess.Popen([sys.executable, "-m", "edgeloop", "serve", "-i", str(inventory)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deployments = _wait_for_deployments(prefect_server, serving)
        by_flow = {flow: d for flow, d in deployments.items()}
        assert set(by_flow) == set(STAGES)
        pretrain = by_flow["edgeloop-pretrain"]
        assert pretrain["parameters"] == {"inventory": str(inventory.resolve())}
        settings = pretrain["schema"]["definitions"]["PretrainSettings"]["properties"]
        assert settings["epochs"]["default"] == 30 and "dataset version" in settings["data"]["description"]
        assert [s for s in by_flow["edgeloop-retrain"]["crons"]] == ["15 3 * * *"]
        assert "RetrainSettings" in by_flow["edgeloop-retrain"]["schema"]["definitions"]
        for flow, deployment in by_flow.items():  # every field of every run form says what it is
            assert _undescribed(deployment["schema"]) == [], flow
        from edge_agent.models import ARCHITECTURES

        assert sorted(settings["arch"]["enum"]) == sorted(ARCHITECTURES) and settings["arch"]["default"] == "slim_resnet"
        retrain = by_flow["edgeloop-retrain"]["schema"]
        assert list(retrain["properties"]) == ["inventory", "settings"]  # one family, in the settings
        ui = prefect_server.removesuffix("/api")
        browser = _browser()
        try:
            browser.get(ui + "/deployments")
            deadline = time.monotonic() + 60
            while not all(name in browser.page_source for name in ("edgeloop-retrain", "edgeloop-pretrain")):
                assert time.monotonic() < deadline, "the Deployments page never listed the edgeloop deployments"
                time.sleep(1)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "prefect-deployments.png"))
        finally:
            browser.quit()
    finally:
        serving.terminate()
        serving.wait(30)


def _undescribed(schema: dict) -> list[str]:
    """The parameters, nested fields included, that the run form would show without a description."""
    definitions, missing = schema.get("definitions", {}), []

    def walk(properties: dict, prefix: str) -> None:
        for name, field in properties.items():
            ref = field.get("$ref") or next((a["$ref"] for a in field.get("allOf", []) if "$ref" in a), None)
            target = definitions[ref.rsplit("/", 1)[-1]] if ref else {}
            if not field.get("description") and not target.get("description"):
                missing.append(prefix + name)
            walk(target.get("properties", {}), f"{prefix}{name}.")

    walk(schema.get("properties", {}), "")
    return missing


def _wait_for_deployments(api: str, serving: subprocess.Popen, timeout: float = 180) -> dict[str, dict]:
    from prefect.client.orchestration import get_client

    async def read() -> dict[str, dict]:
        async with get_client() as client:
            found = {}
            for d in await client.read_deployments():
                flow = await client.read_flow(d.flow_id)
                found[flow.name] = {"name": d.name, "parameters": d.parameters,
                                    "schema": d.parameter_openapi_schema,
                                    "crons": [s.schedule.cron for s in d.schedules if hasattr(s.schedule, "cron")]}
            return found

    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings({PREFECT_API_URL: api}):
        while True:
            found = asyncio.run(read())
            if len(found) >= len(STAGES):
                return found
            if serving.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"edgeloop serve registered {sorted(found)}:\n{serving.stdout.read().decode()[-3000:]}")
            time.sleep(1)
