"""The edge's disk stays bounded: old runs, ensembles, base models, processed and quarantined files,
results and logs go within the configured limits; what serves and what is queued never goes."""

from __future__ import annotations

import logging
import os
import time

from edge_agent.activation import activate
from edge_agent.cli import setup_logging
from edge_agent.config import Retention
from edge_agent.layout import AgentPaths
from edge_agent.retention import disk_use, enforce
from edge_agent.store import Store


def aged(path, seconds_ago: float):
    os.utime(path, (time.time() - seconds_ago, time.time() - seconds_ago))
    return path


def test_limits_remove_the_oldest_and_never_what_serves(tmp_path):
    paths = AgentPaths(tmp_path / "site")
    paths.ensure()
    for i in range(8):
        run = paths.runs / f"2026010{i}T000000-run"
        run.mkdir()
        (run / "member-0.pt").write_bytes(b"x" * 1000)
        aged(run, 1000 - i)
    for i in range(6):
        folder = paths.ensembles / f"2026010{i}T000000-ens"
        folder.mkdir()
        (folder / "ensemble.onnx").write_bytes(b"onnx")
        aged(folder, 1000 - i)
    activate(paths, "20260100T000000-ens")  # the oldest one is the one serving
    for i in range(4):
        (paths.base_models / f"2026010{i}T000000-base").mkdir(parents=True)
    for i in range(30):
        (paths.processed / f"img{i:02d}.png").write_bytes(b"p")
        aged(paths.processed / f"img{i:02d}.png", 1000 - i)
    (paths.processed / "results.jsonl").write_bytes(b"{}\n" * 5000)
    for i in range(10):
        (paths.quarantine / f"bad{i}.png").write_bytes(b"q")
        (paths.quarantine / f"bad{i}.png.reason.json").write_text("{}")
        aged(paths.quarantine / f"bad{i}.png", 1000 - i)
    (paths.inbox / "waiting.png").write_bytes(b"i")
    before = disk_use(paths)

    limits = Retention(keep_runs=3, keep_ensembles=2, keep_base_models=2, keep_processed=10, keep_quarantined=4,
                       results_max_bytes=1000)
    report = enforce(paths, limits, keep={"20260100T000000-ens"})

    assert sorted(p.name for p in paths.runs.iterdir()) == [f"2026010{i}T000000-run" for i in (5, 6, 7)]
    assert sorted(p.name for p in paths.ensembles.iterdir()) == ["20260100T000000-ens", "20260104T000000-ens",
                                                                  "20260105T000000-ens"]
    assert (paths.active_link / "ensemble.onnx").is_file()
    assert sorted(p.name for p in paths.base_models.iterdir()) == ["20260102T000000-base", "20260103T000000-base"]
    assert sorted(p.name for p in paths.processed.glob("img*")) == [f"img{i:02d}.png" for i in range(20, 30)]
    assert not (paths.processed / "results.jsonl").exists() and (paths.processed / "results.jsonl.1").exists()
    assert sorted(p.name for p in paths.quarantine.glob("*.png")) == [f"bad{i}.png" for i in (6, 7, 8, 9)]
    assert len(list(paths.quarantine.glob("*.reason.json"))) == 4
    assert (paths.inbox / "waiting.png").exists()
    assert report.removed["runs"] == 5 and report.freed_bytes > 5000
    after = disk_use(paths)
    assert after["total"] < before["total"] and after["runs"] == 3000


def test_the_agent_log_rotates(tmp_path):
    paths = AgentPaths(tmp_path / "site")
    setup_logging(paths, console=False, max_bytes=2000)
    for i in range(200):
        logging.getLogger("edge_agent").info("line %d %s", i, "x" * 40)
    logging.getLogger().handlers[0].flush()
    assert paths.log_file.stat().st_size <= 2000
    assert sorted(p.name for p in paths.root.glob("agent.log*")) == ["agent.log", "agent.log.1", "agent.log.2"]
    for handler in logging.getLogger().handlers:
        handler.close()
    logging.getLogger().handlers.clear()


def test_partial_uploads_left_in_the_store_are_swept(tmp_path):
    folder = tmp_path / "store" / "samples" / "north"
    folder.mkdir(parents=True)
    old = folder / ".abc.png.1234abcd.part"
    old.write_bytes(b"half")
    aged(old, 7200)
    fresh = folder / ".def.png.5678abcd.part"
    fresh.write_bytes(b"being written")
    (folder / "abc.png").write_bytes(b"whole")
    assert Store(f"file://{tmp_path / 'store'}").sweep_partials("samples/north") == 1
    assert not old.exists() and fresh.exists() and (folder / "abc.png").exists()
