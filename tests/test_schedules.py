"""A schedule that fires: on a real Prefect server, a served deployment on an interval schedule gets a flow run
created by the server's scheduler and run to COMPLETED by the serving process, with no one starting it.

This is what the nightly retrain relies on. With SQLAlchemy 2.1 (which Prefect 3.8.8 does not pin) every
scheduler loop failed ("Can't evaluate bulk DML statement") and no scheduled run was ever created, while a test
that only read the registered cron back passed; constraints.txt pins the 2.0 line. The same served deployment
then takes a run started from the CLI with one of its settings given (the README's `-p settings='{...}'`).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import free_port

pytestmark = pytest.mark.timeout(240)

# A trivial flow of the test's own, served the way `edgeloop serve` serves the stages (prefect.serve over
# flow.to_deployment), every 15 s: soon enough for a first run within seconds, rarely enough not to crowd a 2-core
# machine with run processes. The runner polls every second, so a run starts as soon as it is due.
# Its one parameter is a pydantic model, as the stages' settings are, so that the README's way of starting a run
# with some settings from the CLI (`prefect deployment run ... -p settings='{...}'`) is checked too.
SERVED = '''
from prefect import flow, serve
from pydantic import BaseModel

class Settings(BaseModel):
    n: int = 1
    m: int = 2

@flow(name="tick")
def tick(settings: Settings = Settings()) -> int:
    assert settings.m == 2, "the fields not given keep their defaults"
    return settings.n + settings.m

if __name__ == "__main__":
    serve(tick.to_deployment(name="every-15s", interval=15, parameters={"settings": {"n": 41}}))
'''


@pytest.fixture
def scheduling_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real `prefect server start` whose scheduler looks every 2 s; yields its API URL and a client env."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "2"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "server.log"  # a file, not a pipe: a failing scheduler logs a traceback every loop
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    try:
        _wait_until_up(api + "/health", proc, log)
        yield api, {**env, "PREFECT_API_URL": api}
    finally:
        _stop(proc)


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not come up:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_a_served_interval_schedule_creates_and_completes_a_run(scheduling_server, tmp_path):
    api, env = scheduling_server
    script = tmp_path / "served_tick.py"
    script.write_text(SERVED)
    served_log = tmp_path / "served.log"
    with served_log.open("wb") as out:
        serving = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path,
                                   env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        runs = _wait_for_completed_run(api, serving, timeout=90)
        if not any(r["state"] == "COMPLETED" for r in runs):
            pytest.fail(f"no scheduled run completed in 90 s (runs: {runs})\nserver:\n"
                        f"{_tail(tmp_path / 'server.log')}\nserving process:\n{_tail(served_log)}")
        # created by the scheduler (no one started it), with the deployment's parameters
        done = [r for r in runs if r["state"] == "COMPLETED"]
        assert done[0]["parameters"] == {"settings": {"n": 41}}
        assert all(r["deployment"] == "every-15s" for r in runs)
        # a run started from the CLI with one setting given; the others keep their defaults (the flow checks)
        started = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "tick/every-15s",
                                  "-p", 'settings={"n": 5}'], env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        manual = _wait_for_completed_run(api, serving, timeout=60, manual=True)
        assert [(r["state"], r["parameters"]) for r in manual] == [("COMPLETED", {"settings": {"n": 5}})], (
            f"{manual}\nserving process:\n{_tail(served_log)}")
    finally:
        _stop(serving)


def _wait_for_completed_run(api: str, serving: subprocess.Popen, timeout: float, manual: bool = False
                            ) -> list[dict]:
    """The scheduled flow runs (``manual``: those started by hand) once one is COMPLETED, or as they stand when
    the time is up or the serving process died."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read() -> list[dict]:
        async with get_client() as client:
            names = {d.id: d.name for d in await client.read_deployments()}
            return [{"state": r.state.type.value if r.state else None, "auto_scheduled": r.auto_scheduled,
                     "parameters": r.parameters, "deployment": names.get(r.deployment_id)}
                    for r in await client.read_flow_runs()]

    deadline, runs = time.monotonic() + timeout, []
    with temporary_settings({PREFECT_API_URL: api}):
        while time.monotonic() < deadline and serving.poll() is None:
            runs = [r for r in asyncio.run(read()) if r["auto_scheduled"] != manual]
            if any(r["state"] == "COMPLETED" for r in runs):
                break
            time.sleep(1)
    return runs


def _tail(log: Path) -> str:
    """The last lines of a log, the scheduler's own error among them when it fails."""
    return log.read_text(errors="replace")[-2500:]
