"""The real daemon, end to end, on tiny ELPV data: base model → 3 members fine-tuned in parallel →
ensemble activated → inbox classified (a corrupt file quarantined) → HTTP answers → samples in the store.
Then the faults: kill -9 during a fine-tune, and SIGTERM with work queued."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from agent_helpers import AgentProcess, copy_labelled, deploy_base, wait_for, write_config

FINETUNE_TIMEOUT = 180


def processes_mentioning(text: str) -> list[int]:
    """Live pids whose command line contains ``text`` (e.g. the fine-tune child of a killed agent)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def active_version(root: Path) -> str | None:
    link = root / "models" / "active"
    return Path(link.readlink()).name if link.is_symlink() else None


def set_up_site(root: Path, elpv_small: Path, base: Path, store: Path, **overrides) -> Path:
    config = write_config(root, f"file://{store}", **overrides)
    deploy_base(root, base, "v1")
    copy_labelled(elpv_small / "sites" / "site-1", root)
    shutil.copy(elpv_small / "sites" / "site-1" / "manifest.json", root / "data" / "labelled" / "manifest.json")
    return config


@pytest.fixture(scope="module")
def served_site(tmp_path_factory, elpv_small, tiny_base_model):
    """A site whose daemon fine-tuned and activated its first ensemble, then stopped (SIGTERM)."""
    work = tmp_path_factory.mktemp("served")
    config = set_up_site(work / "agent", elpv_small, tiny_base_model, work / "store")
    agent = AgentProcess(config)
    try:
        wait_for(lambda: active_version(agent.root), FINETUNE_TIMEOUT, "first ensemble activated", agent)
        wait_for(lambda: (s := agent.status()) and s.get("last_run") and not s["finetune"]["running"], 30,
                 "fine-tune recorded", agent)
        assert agent.terminate() == 0
    finally:
        agent.close()
    return work


def clone_site(served: Path, to: Path, **overrides) -> Path:
    """A copy of the served site (symlinks kept) with its own store and config."""
    shutil.copytree(served / "agent", to / "agent", symlinks=True)
    return write_config(to / "agent", f"file://{to / 'store'}", **overrides)


def test_first_finetune_serves_the_best_of_the_base_as_is_and_the_new_ensemble(served_site):
    root = served_site / "agent"
    state = json.loads((root / "state.json").read_text())
    assert state["pending_finetune"] is None
    report = json.loads((root / "runs" / state["last_run"]["run_id"] / "report.json").read_text())
    assert len(report["members"]) == 3 and {m["policy"] for m in report["members"]} == {"flips", "contrast", "geometric"}
    assert set(report["candidates"]) == {"base", "new"}  # nothing was active yet
    for candidate in report["candidates"].values():
        assert candidate["gate"]["n"] == report["counts"]["gate"] and candidate["test"]["n"] == report["counts"]["test"]
    assert abs(sum(report["ensemble"]["weights"]) - 1.0) < 1e-6
    assert report["serving"] in ("base", "new") and active_version(root) == report["serving_version"]
    gate = report["gate"]  # the paired gate's evidence: n, discordant counts, p-value, alpha
    assert (report["serving"] == "new") == gate["accept"] and gate["n"] == report["counts"]["gate"]
    assert f"n = {gate['n']}" in report["decision"] and f"alpha = {gate['alpha']}" in report["decision"]
    assert state["last_run"]["gate"] == gate  # the status shows it
    served, base = report["candidates"][report["serving"]], report["candidates"]["base"]
    assert report["gain_over_base"]["test"] == pytest.approx(served["test"]["accuracy"] - base["test"]["accuracy"])
    assert report["precision"]["serving"] in ("int8", "fp32") and report["precision"]["val_fp32"] is not None
    import numpy as np

    from edge_agent.onnx_model import OnnxClassifier

    classifier = OnnxClassifier(root / "models" / "active" / "ensemble.onnx")
    assert classifier.metadata.get("precision", "fp32") == report["precision"]["serving"]
    out = classifier.run(np.zeros((2, 32, 32), np.uint8))
    members = 3 if report["serving"] == "new" else 1
    assert out["probs"].shape == (2, 2) and out["member_probs"].shape == (2, members, 2)
    assert state["last_run"]["serving"] == report["serving"]


def test_inbox_http_quarantine_and_samples_reach_the_store(served_site, elpv_small, tmp_path):
    port = free_port()
    config = clone_site(served_site, tmp_path, serve={"port": port}, upload={"random_share": 1.0})
    root, store = tmp_path / "agent", tmp_path / "store"
    images = sorted((elpv_small / "sites" / "site-2").glob("*/*.png"))[:8]
    for image in images:
        shutil.copy(image, root / "data" / "inbox" / image.name)
    (root / "data" / "inbox" / "broken.png").write_bytes(images[0].read_bytes()[:100])
    agent = AgentProcess(config)
    try:
        wait_for(lambda: not any((root / "data" / "inbox").iterdir()), 60, "inbox drained", agent)
        results = [json.loads(line) for line in (root / "data" / "processed" / "results.jsonl").read_text().splitlines()]
        assert sorted(r["file"] for r in results) == sorted(i.name for i in images)
        assert all(r["model_version"] == active_version(root) and r["label"] in r["probabilities"] for r in results)
        reason = json.loads((root / "data" / "quarantine" / "broken.png.reason.json").read_text())
        assert "truncated" in reason["reason"] or "corrupt" in reason["reason"]
        assert (root / "data" / "quarantine" / "broken.png").exists()

        request = urllib.request.Request(f"http://127.0.0.1:{port}/classify", data=images[1].read_bytes(),
                                         method="POST", headers={"X-Filename": "probe.png"})
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        assert answer["file"] == "probe.png" and answer["model_version"] == active_version(root)
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/classify", data=b"not an image", method="POST")
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(bad, timeout=30)
        assert error.value.code == 400

        samples = store / "samples" / "site-1"
        wait_for(lambda: samples.is_dir() and len(list(samples.glob("*.json"))) >= len(images), 30,
                 "inference samples uploaded", agent)
        for sidecar_path in samples.glob("*.json"):
            sidecar = json.loads(sidecar_path.read_text())
            image = sidecar_path.with_suffix(".png").read_bytes()
            assert hashlib.sha256(image).hexdigest() == sidecar_path.stem == sidecar["sha256"]
            assert sidecar["site"] == "site-1" and sidecar["reasons"]
        inferred = [json.loads(p.read_text()) for p in samples.glob("*.json")]
        serving = json.loads((root / "state.json").read_text())["last_run"]["serving"]
        members = 3 if serving == "new" else 1  # the gate may keep the base as-is on this small gate split
        assert any(s["model_version"] and len(s["member_probabilities"]) == members for s in inferred)
        assert not list(samples.glob(".*"))  # no temp files left in the store
        assert agent.terminate() == 0
        kept = len(list((root / "outbox").glob("*.json")))  # SIGTERM keeps what is still queued
        assert agent.status()["queues"]["outbox"] == kept
    finally:
        agent.close()


def test_kill_9_during_finetune_keeps_old_ensemble_and_restart_completes(served_site, tiny_base_model, tmp_path):
    config = clone_site(served_site, tmp_path)
    root = tmp_path / "agent"
    old = active_version(root)
    published = sorted(p.name for p in (root / "models" / "ensembles").iterdir() if not p.name.startswith("."))
    deploy_base(root, tiny_base_model, "v2")
    agent = AgentProcess(config)
    try:
        wait_for(lambda: (s := agent.status()) and (s["finetune"]["progress"] or {}).get("phase") == "training",
                 60, "fine-tune training", agent)
        agent.kill()  # SIGKILL: no handler runs
    finally:
        agent.close()
    assert active_version(root) == old
    from edge_agent.onnx_model import OnnxClassifier

    assert OnnxClassifier(root / "models" / "active" / "ensemble.onnx").version == old
    visible = sorted(p.name for p in (root / "models" / "ensembles").iterdir() if not p.name.startswith("."))
    assert visible == published and old in visible  # (a challenger kept in shadow may be published beside it)
    state = json.loads((root / "state.json").read_text())
    assert state["pending_finetune"]  # still owed after the crash

    assert wait_for(lambda: not processes_mentioning(str(config)), 30, "orphaned fine-tune to exit")  # its workers poll their parent; slow under load

    agent = AgentProcess(config)  # SIGTERM while it fine-tunes: clean, prompt exit, the fine-tune still owed
    try:
        wait_for(lambda: (s := agent.status()) and s["state"] == "finetuning", 60, "fine-tune restarted", agent)
        started = time.monotonic()
        assert agent.terminate() == 0
        assert time.monotonic() - started < 10
    finally:
        agent.close()
    assert wait_for(lambda: not processes_mentioning(str(config)), 10, "fine-tune stopped with the agent")
    assert json.loads((root / "state.json").read_text())["pending_finetune"]
    assert active_version(root) == old

    agent = AgentProcess(config)
    try:
        status = wait_for(lambda: (s := agent.status()) and s.get("last_run") and s["last_run"]["run_id"] !=
                          state["last_run"]["run_id"] and s, FINETUNE_TIMEOUT, "fine-tune completed after restart", agent)
        assert status["pending_finetune"] is None
        assert status["last_run"]["version"] is not None
        assert not list((root / "models" / "ensembles").glob(".tmp-*"))
        assert agent.terminate() == 0
    finally:
        agent.close()
