"""Helpers for the edge agent tests: configs, a real daemon subprocess, and waiting for it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_config(root: Path, store_url: str, **overrides: Any) -> Path:
    """An agent config for tests: fast ticks, tiny images, three tiny_cnn members, 1 epoch."""
    config: dict[str, Any] = {
        "site": "site-1", "root": str(root), "store_url": store_url, "image_size": 32,
        "members": [{"arch": "tiny_cnn", "policy": p} for p in ("flips", "contrast", "geometric")],
        "finetune": {"epochs": 1, "batch_size": 16, "lr": 0.003},
        "thresholds": {"min_new_labelled": 5, "uncertainty": 0.5, "disagreement": 0.2,
                       "min_gate_images": 1},  # the machinery under test, not the evidence (test_small_sites)
        "upload": {"random_share": 0.0, "retry_base_s": 0.2, "retry_max_s": 1.0},
        "serve": {"port": 0},
        "poll_interval_s": 0.2, "heartbeat_interval_s": 0.5,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = root.parent / f"{root.name}.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def agent_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class AgentProcess:
    """``python -m edge_agent run`` as a real subprocess."""

    def __init__(self, config: Path):
        self.config = config
        self.root = Path(yaml.safe_load(config.read_text())["root"])
        self.log = open(self.root.parent / f"{self.root.name}.stdout", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                     cwd=REPO, env=agent_env(), stdout=self.log, stderr=subprocess.STDOUT)

    def status(self) -> dict[str, Any] | None:
        """This process's latest status (a status.json left by an earlier agent does not count)."""
        try:
            status = json.loads((self.root / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return status if status.get("pid") == self.proc.pid else None

    def terminate(self, timeout: float = 15.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.log.close()

    def tail(self, n: int = 60) -> str:
        log = self.root / "agent.log"
        return "\n".join(log.read_text().splitlines()[-n:]) if log.exists() else ""


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, agent: AgentProcess | None = None,
             interval: float = 0.2) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if agent is not None and agent.proc.poll() is not None:
            raise AssertionError(f"agent exited ({agent.proc.returncode}) while waiting for {what}\n{agent.tail()}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{agent.tail() if agent else ''}")


def deploy_base(root: Path, checkpoint: Path, version: str) -> Path:
    """What the cloud's deploy does: model.pt, then its sha256 last."""
    import hashlib

    folder = root / "models" / "base" / version
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(checkpoint, folder / "model.pt")
    digest = hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    (folder / "model.pt.sha256").write_text(digest + "\n")
    return folder


def copy_labelled(dataset: Path, root: Path, limit: int | None = None) -> int:
    """Copy a dataset version's class folders into the agent's labelled folder."""
    target = root / "data" / "labelled"
    n = 0
    for class_dir in sorted(p for p in dataset.iterdir() if p.is_dir()):
        files = sorted(f for f in class_dir.iterdir() if f.is_file())
        for file in files[:limit]:
            (target / class_dir.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(file, target / class_dir.name / file.name)
            n += 1
    return n


def exam_split(root: Path) -> tuple[int, set[str]]:
    """(labelled images the agent may upload: train and val, the sha256 of the others: its exam)."""
    from edge_agent.layout import AgentPaths
    from edge_agent.sitedata import EXAM_SPLITS, SplitOf, labelled_files

    paths = AgentPaths(root)
    split_of, allowed, exam = SplitOf(paths), 0, set()
    for _, file in labelled_files(paths):
        if split_of(file) in EXAM_SPLITS:
            exam.add(hashlib.sha256(file.read_bytes()).hexdigest())
        else:
            allowed += 1
    return allowed, exam


def serving_site(root: Path, size: int):
    """An agent root with a real two-member tiny_cnn ensemble active (what a deploy and a fine-tune leave)."""
    from edge_agent.activation import activate
    from edge_agent.ensemble import export_ensemble
    from edge_agent.layout import AgentPaths
    from edge_agent.models import ModelSpec, Normalization, build_model

    paths = AgentPaths(root)
    paths.ensure()
    (paths.ensembles / "v1").mkdir(parents=True)
    spec = ModelSpec(arch="tiny_cnn", num_classes=2, image_size=size)
    export_ensemble([build_model(spec, seed=i) for i in range(2)], [Normalization()] * 2, [0.5, 0.5],
                    paths.ensembles / "v1" / "ensemble.onnx", image_size=size, class_names=["functional", "defective"],
                    metadata={"version": "v1"})
    activate(paths, "v1")
    return paths


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_url(url: str, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Wait until ``url`` answers; fail with the tail of ``proc``'s output if it dies or the time is up."""
    import urllib.request

    import pytest

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"{what} did not come up:\n{proc.stdout.read().decode()[-3000:]}")
            time.sleep(0.3)


def _latest_artifact(key: str):
    """The newest artifact published under ``key`` (other runs in the session reuse keys)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            return (await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                                sort=ArtifactSort.CREATED_DESC, limit=1))[0]

    return asyncio.run(read())


def latest_table(key: str) -> list[dict]:
    """The rows of the newest table artifact published under ``key``."""
    data = _latest_artifact(key).data
    return json.loads(data) if isinstance(data, str) else data


def latest_artifact_id(key: str) -> str:
    return str(_latest_artifact(key).id)


def screenshot_prefect_page(path: str, name: str, wait_for_text: list[str], timeout: float = 90,
                            height: int = 1000) -> str:
    """Open a page of the running Prefect API's UI (``path`` under its root, e.g. ``/runs/flow-run/ID``) in a
    real headless Chromium, wait until every text in ``wait_for_text`` shows, save ``test-artifacts/<name>``
    and return the page's text."""
    from prefect.settings import PREFECT_API_URL
    from selenium.webdriver.common.by import By

    from test_labelling import ARTIFACTS, _browser

    ui = str(PREFECT_API_URL.value()).removesuffix("/").removesuffix("/api")
    browser = _browser()
    try:
        browser.set_window_size(1400, height)  # taller to take a whole long form in one picture
        browser.get(ui + path)
        deadline = time.monotonic() + timeout
        while True:
            text = browser.find_element(By.TAG_NAME, "body").text
            if all(t in text for t in wait_for_text):
                break
            assert time.monotonic() < deadline, f"{path} never showed {wait_for_text}:\n{text[-2000:]}"
            time.sleep(1)
        time.sleep(2)  # let the run graph (a canvas) finish drawing
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / name))
        return text
    finally:
        browser.quit()


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def ours(pid: int) -> bool:
    """Whether ``pid`` descends from this test process: tests run side by side (make test's workers), so a test
    that kills a process it found by name must never hit another test's (or that test's worker itself)."""
    while pid > 1:
        pid = parent_pid(pid)
        if pid == os.getpid():
            return True
    return False


def one_site_inventory(tmp_path: Path, elpv_small: Path) -> Path:
    """A local fleet of one site whose cloud pool is ``elpv_small``'s generic set (the stage flows' defaults)."""
    inventory = tmp_path / "fleet.yaml"
    inventory.write_text(f"""
cloud: {{store_url: "{(tmp_path / 'store').as_uri()}", registry: "{tmp_path / 'registry'}",
        datasets: {{generic: {elpv_small / 'generic'}}}}}
defaults: {{connection: {{type: local}}}}
sites: [{{name: site-1, root: "{tmp_path / 'site-1'}"}}]
""")
    return inventory
