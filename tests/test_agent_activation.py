"""The gate and the atomic switch: a reader never sees a missing or half-written active ensemble."""

from __future__ import annotations

import os
import threading

import pytest

from edge_agent.activation import activate, active_version, publish, staging_dir, sweep_staging
from edge_agent.gate import Score, gate
from edge_agent.layout import AgentPaths


def test_gate_needs_a_real_improvement():
    assert gate(Score(0.5, 1.0), None).accept
    assert gate(Score(0.8, 0.5), Score(0.7, 0.4)).accept
    assert not gate(Score(0.7, 0.5), Score(0.7, 0.4)).accept
    assert gate(Score(0.7, 0.3), Score(0.7, 0.4)).accept  # tie on accuracy, better log-loss
    assert not gate(Score(0.75, 0.3), Score(0.7, 0.4), min_gain=0.1).accept
    assert not gate(Score(0.6, 0.1), Score(0.7, 0.4)).accept


def stage(paths: AgentPaths, version: str) -> None:
    staged = staging_dir(paths, version)
    (staged / "ensemble.onnx").write_bytes(version.encode() * 1000)
    publish(paths, staged, version)


def test_switch_is_atomic_under_concurrent_readers(tmp_path):
    paths = AgentPaths(tmp_path)
    paths.ensure()
    for version in ("v1", "v2"):
        stage(paths, version)
    activate(paths, "v1")
    seen, problems, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                data = (paths.active_link / "ensemble.onnx").read_bytes()
                seen.add(data[:2].decode())
                if len(data) != 2000:
                    problems.append("short read")
            except OSError as exc:
                problems.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    for i in range(300):
        activate(paths, "v2" if i % 2 == 0 else "v1")
    stop.set()
    for thread in threads:
        thread.join()
    assert not problems and seen == {"v1", "v2"}
    assert active_version(paths) == "v1"
    assert not list(paths.models.glob(".active-*"))


def test_staging_is_invisible_and_swept(tmp_path):
    paths = AgentPaths(tmp_path)
    paths.ensure()
    stage(paths, "v1")
    activate(paths, "v1")
    staged = staging_dir(paths, "v2")  # a fine-tune killed half-way through its export
    (staged / "ensemble.onnx").write_bytes(b"half")
    assert [p.name for p in paths.ensembles.iterdir() if not p.name.startswith(".")] == ["v1"]
    with pytest.raises(FileNotFoundError):
        activate(paths, "v2")
    assert sweep_staging(paths) == [staged] and not staged.exists()
    assert active_version(paths) == "v1" and os.path.isfile(paths.active_link / "ensemble.onnx")
