"""A full disk, for real: the agent's root and the store each on a small tmpfs filled to the last byte.
The owed fine-tune is held, not dropped, and runs once space returns; the heartbeat says "disk full (free X
of Y)" even when status.json cannot be written locally; partial uploads left in the store are swept once
uploads work again."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
from agent_helpers import AgentProcess, copy_labelled, deploy_base, serving_site, wait_for, write_config


@pytest.fixture
def small_disk(tmp_path):
    """Mount tmpfs file systems of a given size under ``tmp_path`` (root only); unmounted after the test."""
    mounts = []

    def mount(name: str, size_mb: int) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            (pytest.fail if os.environ.get("CI") else pytest.skip)(  # CI runs as root: there it must run
                f"a real full disk needs a small tmpfs, and mounting one needs root: {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(folder: Path) -> Path:
    """Write a file in ``folder`` until its file system has no byte left."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * (256 * 1024))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        try:
            while True:
                handle.write(b"\0" * 512)
        except OSError:
            pass
    return filler


def test_a_full_agent_disk_holds_the_fine_tune_and_says_so_then_resumes(tmp_path, small_disk, elpv_small,
                                                                          tiny_base_model):
    root = small_disk("agent", 48) / "site-1"
    store = tmp_path / "store"
    config = write_config(root, store.as_uri(), retention={"min_free_bytes": 2_000_000})
    copy_labelled(elpv_small / "sites" / "site-1", root, limit=8)
    deploy_base(root, tiny_base_model, "v1")  # a fine-tune is owed as soon as the agent starts
    filler = fill(root.parent)
    agent = AgentProcess(config)  # it starts on the full disk
    try:
        def heartbeat_in_store() -> dict:
            try:
                beat = json.loads((store / "status" / "site-1.json").read_text())
            except (FileNotFoundError, ValueError):
                return {}
            return beat if beat.get("pid") == agent.proc.pid else {}

        held = wait_for(lambda: (b := heartbeat_in_store()).get("pending_finetune") and b, 60,
                        "a heartbeat with the fine-tune owed", agent)
        assert held["disk_full"].startswith("disk full (free ") and " of " in held["disk_full"], held["disk_full"]
        assert held["finetune_failures"] == 0 and not held["finetune"]["running"]
        assert agent.status() is None  # sent from memory: status.json could not be written on the full disk
        filler.unlink()
        wait_for(lambda: ((agent.status() or {}).get("last_run") or {}).get("finished"), 180,
                 "the owed fine-tune to run once space returned", agent)
        assert agent.status()["disk_full"] is None and agent.status()["pending_finetune"] is None
    finally:
        agent.close()


def good_pngs(n: int) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    out = []
    for seed in range(n):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32), dtype=np.uint8)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def test_partial_uploads_left_on_a_full_store_are_swept_once_it_has_space(tmp_path, small_disk):
    store = small_disk("store", 8)
    root = tmp_path / "site-1"
    paths = serving_site(root, 32)
    config = write_config(root, store.as_uri(), upload={"random_share": 1.0})
    samples, status = store / "samples" / "site-1", store / "status"
    samples.mkdir(parents=True)
    status.mkdir()
    stale = [samples / ".abc.png.1234abcd.part", status / ".site-1.json.5678abcd.part"]
    other = status / ".site-2.json.9999abcd.part"  # another site's upload in flight: never ours to remove
    for part in [*stale, other]:
        part.write_bytes(b"half an upload")
    filler = fill(store)
    for i, data in enumerate(good_pngs(3)):
        (paths.inbox / f"img{i}.png").write_bytes(data)
    agent = AgentProcess(config)
    try:
        wait_for(lambda: (agent.status() or {}).get("last_upload_error"), 60, "uploads failing on the full store",
                 agent)
        filler.unlink()
        wait_for(lambda: (agent.status() or {}).get("uploaded_total", 0) > 0 and
                 not any(p.exists() for p in stale), 60, "uploads again and the stale parts swept", agent)
    finally:
        agent.close()
    assert other.exists()
    assert not list(samples.glob(".*.part"))
