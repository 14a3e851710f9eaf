"""What the agent must not lose count of across crashes: the upload ledger and its own state file."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from edge_agent.outbox import Outbox
from edge_agent.state import AgentState, UploadLedger
from edge_agent.store import Store
from edge_agent.uplink import Uplink


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs, no except clause catches it."""


def png(i: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8), i, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_every_upload_is_counted_on_disk_before_the_agent_can_die(tmp_path):
    """Each run uploads one sample and is killed right after the bytes arrive, before anything else runs.
    The budget is 3 a day: a crash-looping agent must stop at 3, not send all 6."""
    state_file, store_dir = tmp_path / "state.json", tmp_path / "store"
    outbox = Outbox(tmp_path / "outbox", max_bytes=10**9)
    for i in range(6):
        outbox.put(png(i), {"time": float(i)}, 0.5)

    class DyingStore(Store):
        def put_verified(self, relative: str, data: bytes) -> bool:
            sent = super().put_verified(relative, data)
            if sent and relative.endswith(".json"):
                raise Killed()  # a new sample is in the store; the agent dies before it can note that
            return sent

    for _ in range(6):
        state = AgentState.load(state_file, set_damaged_aside=True)
        uplink = Uplink(DyingStore(f"file://{store_dir}"), outbox, "s", max_samples_per_day=3,
                        max_bytes_per_day=10**9)
        try:
            uplink.pump(state.upload_ledger, save_ledger=lambda _: state.save(state_file))
        except Killed:
            pass
    arrived = len(list((store_dir / "samples" / "s").glob("*.json")))
    counted = AgentState.load(state_file).upload_ledger.count
    assert 0 < arrived <= counted <= 3  # never more sent than counted, never more counted than the budget


def test_a_failed_upload_gives_its_count_back(tmp_path):
    outbox = Outbox(tmp_path / "outbox", max_bytes=10**9)
    outbox.put(png(1), {"time": 1.0}, 0.5)
    (tmp_path / "blocked").write_text("a file where the store's folder should be")
    saved = []
    ledger = UploadLedger()
    result = Uplink(Store(f"file://{tmp_path / 'blocked'}"), outbox, "s", 10, 10**9).pump(
        ledger, save_ledger=lambda l: saved.append(l.count))
    assert result.error and ledger.count == 0 and saved == [1, 0]


@pytest.mark.parametrize("damage", [b"", b"{\"new_labelled\": ", b"null", b"[1, 2]", b"{\"new_labelled\": \"x\"}",
                                    b"\xff\xfe garbage"])
def test_a_damaged_state_file_resumes_from_the_copy_before_it_and_says_so(tmp_path, damage):
    path = tmp_path / "state.json"
    good = AgentState(labelled_seen=["defective/a.png", "functional/b.png"], uploaded_total=7)
    good.save(path)
    good.model_copy(update={"uploaded_total": 8}).save(path)  # the copy before is the first save
    path.write_bytes(damage)
    state = AgentState.load(path, set_damaged_aside=True)
    assert state.labelled_seen == ["defective/a.png", "functional/b.png"] and state.uploaded_total == 7
    assert state.recovery and "previous copy" in state.recovery
    assert list(tmp_path.glob("state.json.damaged-*"))  # kept for a person to look at
    state.save(path)
    assert "recovery" not in json.loads(path.read_text())  # said once, in the status, not saved


def test_no_good_copy_starts_afresh_but_says_so_and_status_reads_without_moving_files(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("{broken")
    read_only = AgentState.load(path)
    assert read_only.recovery and path.read_text() == "{broken"  # `edgeloop-agent status` changes nothing
    state = AgentState.load(path, set_damaged_aside=True)
    assert state.recovery and "started afresh" in state.recovery and not path.exists()


def test_a_tick_parses_each_outbox_sidecar_once_not_every_time(tmp_path, monkeypatch):
    import edge_agent.outbox as outbox_module

    outbox = Outbox(tmp_path / "outbox", max_bytes=10**9)
    for i in range(50):
        outbox.put(png(i), {"time": float(i)}, i / 100)
    parses = []
    real_loads = outbox_module.json.loads
    monkeypatch.setattr(outbox_module.json, "loads", lambda text: parses.append(1) or real_loads(text))
    for _ in range(3):  # enforce_cap, pump and status each list the outbox on every tick
        assert len(outbox.items()) == 50 and outbox.enforce_cap() == 0
    assert len(parses) == 50
    outbox.remove(outbox.items()[0])
    assert len(outbox.items()) == 49 and len(parses) == 50


def test_base_models_are_hashed_once_until_they_change(tmp_path, monkeypatch):
    import hashlib

    import edge_agent.fileio as fileio
    from edge_agent.basemodels import verified_base_models
    from edge_agent.layout import AgentPaths

    paths = AgentPaths(tmp_path / "site")
    paths.ensure()
    folder = paths.base_models / "v1"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights" * 1000)
    (folder / "model.pt.sha256").write_text(hashlib.sha256(b"weights" * 1000).hexdigest() + "\n")
    hashed = []
    real = fileio.file_sha256
    monkeypatch.setattr(fileio, "file_sha256", lambda path, *a: hashed.append(path) or real(path, *a))
    for _ in range(5):
        assert verified_base_models(paths) == ["v1"]
    assert len(hashed) == 1
    (folder / "model.pt").write_bytes(b"tampered" * 1000)  # changed on disk: checked again, and refused
    assert verified_base_models(paths) == [] and len(hashed) == 2
