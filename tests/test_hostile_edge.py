"""Hostile input at the edge, round three (issue 27 items 1, 6 and 9), against real agents and real files.

Inbox names of any bytes (Latin-1 from a Windows share, a leading ``-``, control characters, 255 bytes) are
classified or quarantined once and named escaped; a file that can leave neither way (an immutable file, a
quarantine that is not a folder) is named in ``inbox_stuck`` while the images behind it move on, and it is
counted once in the live window. One graph contract: a graph without member outputs is refused before it is
activated, and a fine-tune facing one that was made active by hand is held with the reason, not dropped. A
disk smaller than ``retention.min_free_bytes`` says so, naming the setting and the numbers.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import AgentProcess, copy_labelled, deploy_base, serving_site, wait_for, write_config
from PIL import Image

from edge_agent.activation import EXIT_HELD, activate, active_graph_hold
from edge_agent.layout import AgentPaths
from edge_agent.serving import GraphContractError, validate_ensemble

SIZE = 32
CLASSES = ["functional", "defective"]


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def put(inbox: Path, name: bytes, data: bytes, age: int) -> bytes:
    """Write ``data`` under the raw bytes ``name``, ``age`` seconds after the epoch (older: first in the queue)."""
    path = os.fsencode(inbox) + b"/" + name
    with open(path, "wb") as handle:
        handle.write(data)
    os.utime(path, (age, age))
    return path


def results(paths: AgentPaths) -> list[dict]:
    try:
        raw = (paths.processed / "results.jsonl").read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]  # strict UTF-8: escaped names only


def predictions(status: dict) -> int:
    return sum(model["predictions"] for model in (status.get("window") or {}).values())


# ---- item 1: inbox names ------------------------------------------------------------------------------

HOSTILE_GOOD = {  # raw name -> the name every record shows
    b"cam_\xe9t\xe9_0001.png": "cam_\\xe9t\\xe9_0001.png",
    b"-rf.png": "-rf.png",
    b"--help.png": "--help.png",
    b"new\nline.png": "new\\nline.png",
    b"\x1b[31mred.png": "\\x1b[31mred.png",
    b"\xff\xfe.png": "\\xff\\xfe.png",
    b"results.jsonl": "results.jsonl",  # an image named as the agent's own result log
    "caf\u00e9.png".encode(): "caf\u00e9.png",  # valid UTF-8 stays as it is
    b"\xe9" * 251 + b".png": "\\xe9" * 251 + ".png",  # 255 bytes, four times that escaped
}
HOSTILE_BAD = {b"cam_\xe9t\xe9_0002.png": "cam_\\xe9t\\xe9_0002.png", b"a.png.reason.json": "a.png.reason.json",
               b"a.png": "a.png"}


def test_any_name_is_classified_or_quarantined_once_and_the_images_behind_it_move(tmp_path):
    paths = serving_site(tmp_path / "site-1", SIZE)
    agent_config = write_config(paths.root, (tmp_path / "store").as_uri(), upload={"random_share": 1.0})
    age = 1000
    for name in [*HOSTILE_GOOD, *HOSTILE_BAD]:  # the hostile names first in the queue, the plain ones behind
        put(paths.inbox, name, png(age) if name in HOSTILE_GOOD else b"not an image", age)
        age += 1
    plain = [f"good-{i}.png" for i in range(5)]
    for i, name in enumerate(plain):
        put(paths.inbox, name.encode(), png(100 + i), 2000 + i)
    agent = AgentProcess(agent_config)
    try:
        wanted = len(HOSTILE_GOOD) + len(plain)
        status = wait_for(lambda: (s := agent.status()) and s["processed_total"] >= wanted
                          and s["quarantined_total"] >= len(HOSTILE_BAD) and s, 60, "the inbox to drain", agent)
        time.sleep(2.0)  # ten more passes: nothing may be classified again
        status = agent.status()
        log = agent.tail(2000)
    finally:
        agent.close()
    assert os.listdir(os.fsencode(paths.inbox)) == []
    assert status["selected_total"] == wanted and "sample selection failed" not in log  # every one is a sample
    lines = results(paths)
    assert sorted(r["file"] for r in lines) == sorted([*HOSTILE_GOOD.values(), *plain])  # each once, escaped
    assert status["processed_total"] == wanted and status["quarantined_total"] == len(HOSTILE_BAD)
    assert predictions(status) == wanted, status["window"]  # the canary's live window counts each image once
    assert status["inbox_stuck"] is None and status["state"] == "serving"
    reasons = {json.loads(p.read_text())["file"]: json.loads(p.read_text())["reason"]
               for p in paths.quarantine.glob("*.reason.json")}
    assert reasons.keys() == set(HOSTILE_BAD.values()) and all("not an image" in r for r in reasons.values())
    kept = sorted(p.name for p in paths.quarantine.iterdir())
    assert "a.png.reason.json.file" in kept and "a.png" in kept  # a name that looks like a reason stays a file
    processed = {p.name for p in paths.processed.iterdir()}
    assert {"cam_\\xe9t\\xe9_0001.png", "-rf.png", "inbox-results.jsonl", *plain} <= processed
    assert all(len(name.encode()) <= 255 for name in processed)  # the 1,000-character escaped name was shortened


def chattr(flag: str, path: bytes) -> None:
    done = subprocess.run(["chattr", flag, os.fsdecode(path)], capture_output=True, text=True)
    if done.returncode != 0:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(  # CI runs as root on ext4: it must run there
            f"a file that cannot be moved needs chattr +i (root, ext4): {done.stderr.strip()}")


def test_a_file_that_cannot_leave_is_named_in_inbox_stuck_counted_once_and_the_rest_move(tmp_path):
    paths = serving_site(tmp_path / "site-1", SIZE)
    agent_config = write_config(paths.root, (tmp_path / "store").as_uri())
    stuck = put(paths.inbox, b"cam_\xe9t\xe9_0003.png", png(1), 1000)  # a good image that cannot be moved
    for i in range(5):
        put(paths.inbox, f"good-{i}.png".encode(), png(10 + i), 2000 + i)
    chattr("+i", stuck)
    agent = AgentProcess(agent_config)
    try:
        status = wait_for(lambda: (s := agent.status()) and s["processed_total"] >= 6 and s["inbox_stuck"] and s,
                          60, "the good images classified and the stuck one named", agent)
        time.sleep(2.0)
        status = agent.status()
    finally:
        chattr("-i", stuck)
        agent.close()
    assert "cam_\\xe9t\\xe9_0003.png" in status["inbox_stuck"] and "cannot quarantine" in status["inbox_stuck"]
    assert os.listdir(os.fsencode(paths.inbox)) == [os.path.basename(stuck)]  # the five behind it moved
    assert sorted(r["file"] for r in results(paths)) == sorted(["cam_\\xe9t\\xe9_0003.png",
                                                               *(f"good-{i}.png" for i in range(5))])
    assert status["processed_total"] == 6 and predictions(status) == 6  # classified once, counted once


def test_a_stuck_file_moves_once_it_can_and_a_vanished_one_is_forgotten(tmp_path, monkeypatch):
    from edge_agent import inbox as inbox_module
    from edge_agent.inbox import InboxProcessor
    from edge_agent.serving import EnsembleHandle

    paths = serving_site(tmp_path / "site", SIZE)
    seen: list[str] = []
    processor = InboxProcessor(paths, EnsembleHandle(paths.active_link, image_size=SIZE), 1_000_000,
                               lambda raw, prediction, name: seen.append(name))
    stuck = put(paths.inbox, b"\xe9t\xe9.png", png(1), 1000)
    chattr("+i", stuck)
    try:
        for _ in range(3):
            processor.process()
    finally:
        chattr("-i", stuck)
    assert seen == ["\\xe9t\\xe9.png"] and "\\xe9t\\xe9.png" in processor.stuck_summary()
    monkeypatch.setattr(inbox_module, "STUCK_RETRY_S", 0.0)
    processor.stuck[os.fsdecode(os.path.basename(stuck))].retry_at = 0.0  # its retry is due
    processor.process()
    assert seen == ["\\xe9t\\xe9.png"] and processor.stuck_summary() is None  # moved, not classified again
    assert (paths.processed / "\\xe9t\\xe9.png").is_file()

    paths.quarantine.rmdir()
    paths.quarantine.write_text("not a folder")  # nothing can be set aside now
    gone = put(paths.inbox, b"-broken\xff.png", b"broken", 1000)
    processor.process()
    assert "-broken\\xff.png" in processor.stuck_summary() and "cannot quarantine" in processor.stuck_summary()
    os.unlink(gone)  # someone took it away
    processor.process()
    assert processor.stuck_summary() is None


# ---- item 6: one graph contract ---------------------------------------------------------------------

def export_without_members(path: Path, version: str) -> Path:
    """A graph that serves class probabilities only: what a plain classifier export (or an old exporter) makes."""
    from edge_agent.export import Classifier, export_onnx
    from edge_agent.models import ModelSpec, Normalization, build_model

    model = build_model(ModelSpec(arch="tiny_cnn", num_classes=2, image_size=SIZE), seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_onnx(Classifier(model, Normalization()), path, image_size=SIZE, class_names=CLASSES,
                       metadata={"version": version})


def test_the_contract_names_what_a_graph_lacks(tmp_path):
    import onnx

    plain = export_without_members(tmp_path / "plain" / "ensemble.onnx", "plain")
    with pytest.raises(GraphContractError, match="no member_probs output .*its outputs: probs"):
        validate_ensemble(plain, SIZE)
    paths = serving_site(tmp_path / "site", SIZE)
    good = paths.ensembles / "v1" / "ensemble.onnx"
    assert validate_ensemble(good, SIZE).metadata["members"] == "2"
    model = onnx.load(str(good))
    next(p for p in model.metadata_props if p.key == "members").value = "3"
    onnx.save(model, str(tmp_path / "lying.onnx"))
    with pytest.raises(GraphContractError, match="says 3 members, member_probs has 2"):
        validate_ensemble(tmp_path / "lying.onnx", SIZE)


def test_a_shipped_graph_without_member_outputs_is_never_activated(tmp_path):
    """``edge-serve``: the cloud ships each base as its graph; one that breaks the contract is refused before it
    becomes active, and the next good one serves."""
    root = tmp_path / "site-1"
    paths = AgentPaths(root)
    paths.ensure()
    agent_config = write_config(root, (tmp_path / "store").as_uri(), profile="edge-serve")

    def ship(version: str, graph: Path) -> None:
        import hashlib

        folder = paths.base_models / version
        folder.mkdir(parents=True)
        (folder / "ensemble.onnx").write_bytes(graph.read_bytes())
        (folder / "ensemble.onnx.sha256").write_text(hashlib.sha256(graph.read_bytes()).hexdigest() + "\n")

    ship("20260101T000000-plain", export_without_members(tmp_path / "plain.onnx", "plain"))
    agent = AgentProcess(agent_config)
    try:
        wait_for(lambda: "no member_probs output" in agent.tail(200), 60, "the refusal in the log", agent)
        assert agent.status()["active_version"] is None and not paths.active_link.is_symlink()
        assert not any(paths.ensembles.iterdir())  # not even published
        good = serving_site(tmp_path / "donor", SIZE).ensembles / "v1" / "ensemble.onnx"
        ship("20260102T000000-good", good)
        status = wait_for(lambda: (s := agent.status()) and s["active_version"] and s, 60, "the good graph", agent)
    finally:
        agent.close()
    assert status["active_version"] == "base-20260102T000000-good" and status["serving_problem"] is None


def hand_activated_plain(root: Path) -> AgentPaths:
    """A site whose good ensemble v1 was replaced by hand with a graph without member outputs."""
    paths = serving_site(root, SIZE)
    export_without_members(paths.ensembles / "v2" / "ensemble.onnx", "v2")
    activate(paths, "v2")  # by hand: the operator's switch, unchecked (what the agent itself activates is checked)
    return paths


def test_a_fine_tune_that_cannot_use_the_active_graph_is_held_with_the_reason_not_dropped(
        tmp_path, elpv_small, tiny_base_model):
    paths = hand_activated_plain(tmp_path / "site-1")
    assert "no member_probs output" in active_graph_hold(paths, SIZE)
    agent_config = write_config(paths.root, (tmp_path / "store").as_uri())
    copy_labelled(elpv_small / "sites" / "site-1", paths.root, limit=8)
    deploy_base(paths.root, tiny_base_model, "20260101T000000-base")  # a fine-tune is owed at once
    agent = AgentProcess(agent_config)
    try:
        held = wait_for(lambda: (s := agent.status()) and (s.get("finetune_blocked") or "").startswith("held: ")
                        and s, 60, "the fine-tune held", agent)
        time.sleep(3.0)  # many ticks: still owed, never started, never counted as a failure
        held = agent.status()
        assert "v2" in held["finetune_blocked"] and "no member_probs output" in held["finetune_blocked"]
        assert held["pending_finetune"] and held["finetune_failures"] == 0 and not held["finetune"]["running"]
        assert held["state"] == "serving-fallback" and "serving v1 instead" in held["serving_problem"]
        assert not (paths.runs.exists() and any(paths.runs.glob("*/report.json")))
        activate(paths, "v1")  # someone makes a usable ensemble active again: the owed fine-tune runs
        done = wait_for(lambda: (s := agent.status()) and (s.get("last_run") or {}).get("finished") and s, 240,
                        "the held fine-tune to run", agent)
    finally:
        agent.close()
    assert done["pending_finetune"] is None and done["finetune_failures"] == 0
    assert not (done["finetune_blocked"] or "").startswith("held")


def test_a_fine_tune_process_that_meets_a_broken_active_graph_exits_held_with_its_report(
        tmp_path, tiny_base_model):
    """The race the daemon cannot see: the graph changed after its check. The process says why and exits
    EXIT_HELD (the daemon keeps the fine-tune owed), before any training."""
    from edge_agent.config import load_config
    from edge_agent.finetune import run_finetune_process

    paths = hand_activated_plain(tmp_path / "site-1")
    deploy_base(paths.root, tiny_base_model, "20260101T000000-base")
    config = load_config(write_config(paths.root, (tmp_path / "store").as_uri()))
    started = time.time()
    assert run_finetune_process(config, paths, "run-held", "test", parallel=False) == EXIT_HELD
    report = json.loads((paths.runs / "run-held" / "report.json").read_text())
    assert "no member_probs output" in report["held"] and time.time() - started < 60
    assert os.readlink(paths.active_link).endswith("v2")  # nothing was switched


# ---- item 9: a disk smaller than the setting ---------------------------------------------------------

def test_a_disk_smaller_than_min_free_bytes_names_the_setting_and_the_numbers(tmp_path):
    from edge_agent.retention import disk_full_message

    paths = serving_site(tmp_path / "site-1", SIZE)
    agent_config = write_config(paths.root, (tmp_path / "store").as_uri(), retention={"min_free_bytes": 10 ** 18})
    agent = AgentProcess(agent_config)
    try:
        status = wait_for(lambda: (s := agent.status()) and s.get("disk_full") and s, 60, "a heartbeat", agent)
    finally:
        agent.close()
    message = status["disk_full"]
    assert message.startswith("disk full (free ") and "smaller than retention.min_free_bytes" in message
    assert "1000000000000000000 bytes" in message and "lower retention.min_free_bytes" in message
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    ordinary = disk_full_message(tmp_path, free + 10 ** 9)  # a disk that could have that much free
    assert ordinary is not None and "under retention.min_free_bytes = " in ordinary and "smaller" not in ordinary
    assert disk_full_message(tmp_path, 0) is None
