"""Shared fixtures: a small real ELPV dataset, a briefly trained base model, an isolated Prefect."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Isolate Prefect before anything imports it: own home, no telemetry, no network.
_PREFECT_HOME = tempfile.mkdtemp(prefix="edgeloop-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")

from orchestrator.sshfleet import SshdFleet, sshd_available, sshd_fleet_at  # noqa: E402

SMALL_SIZE = 32


@pytest.fixture(scope="session")
def elpv_small(tmp_path_factory) -> Path:
    """A few dozen real ELPV images at 32 px: a generic pool and two private site sets."""
    from edge_agent.datasets import import_elpv

    out = tmp_path_factory.mktemp("elpv")
    import_elpv(out, size=SMALL_SIZE, sites=2, limit=120)
    return out


@pytest.fixture(scope="session")
def tiny_base_model(elpv_small, tmp_path_factory) -> Path:
    """A tiny_cnn checkpoint trained briefly on the generic pool (the cloud's base model)."""
    from edge_agent.train import TrainConfig
    from orchestrator.training import train_on_dataset

    out = tmp_path_factory.mktemp("base")
    train_on_dataset(elpv_small / "generic", "tiny_cnn", out, TrainConfig(epochs=2, batch_size=16, threads=1))
    return out / "model.pt"


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for the whole session: real flow runs, real artifacts."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# Real OpenSSH servers on loopback ports, for provisioning and sftp tests.
@pytest.fixture(scope="module")
def sshd_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdFleet]:
    """Three real sshd hosts for one test module (they are cheap; the provisioning is not)."""
    if not sshd_available():
        pytest.fail("OpenSSH sshd is missing: `apt-get install -y openssh-server` (make test does this)")
    yield from sshd_fleet_at(tmp_path_factory.mktemp("sshd"), 3)
