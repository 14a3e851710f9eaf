"""The gate and the atomic switch: a reader never sees a missing or half-written active ensemble."""

from __future__ import annotations

import os
import threading

import pytest

from edge_agent.activation import activate, active_version, publish, staging_dir, sweep_staging
from edge_agent.layout import AgentPaths


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


def test_activation_against_a_stale_judgement_is_refused(tmp_path):
    """The fine-tune judged its candidates against v1; if v2 was activated meanwhile, its choice must not land."""
    from edge_agent.activation import ActivationConflict

    paths = AgentPaths(tmp_path)
    paths.ensure()
    for version in ("v1", "v2", "v3"):
        stage(paths, version)
    activate(paths, "v3", expected=None)  # nothing served when it was judged
    with pytest.raises(ActivationConflict, match=r"changed since this candidate was gated \(now v3"):
        activate(paths, "v1", expected=None)
    activate(paths, "v2", expected="v3")
    with pytest.raises(ActivationConflict, match="now v2"):
        activate(paths, "v1", expected="v3")
    assert active_version(paths) == "v2"
