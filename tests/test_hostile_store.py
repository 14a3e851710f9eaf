"""What the cloud reads from the store, made hostile by one broken or compromised site: links, FIFOs,
devices, a 200 MB sidecar and heartbeat, schema-valid sidecars whose probabilities are the wrong shape
or not finite, malformed heartbeats. Read through file:// and through a real sftp server; the fleet's
collect and fleet-health go on, every hostile file is named with its reason, and the reading process's
memory stays bounded (its peak RSS is measured)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import REPO, agent_env, latest_table
from PIL import Image

from edge_agent.store import Store
from orchestrator.samples import Quarantine

CLASSES = ["functional", "defective"]
BIG = 200 * 1024 * 1024
RSS_BOUND_MB = 40  # the reading process may grow by this much at most, with 200 MB files in the store


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def sidecar(**changes) -> dict:
    return {"site": "a", "time": 1.0, "reasons": ["uncertain"], "probabilities": {"functional": 0.9,
            "defective": 0.1}, "member_probabilities": [[0.9, 0.1], [0.8, 0.2]], **changes}


def hostile_store(root: Path) -> tuple[set[str], dict[str, str]]:
    """Good samples and hostile ones under ``root/samples/a``; returns (good shas, {hostile sha: expected reason})."""
    folder = root / "samples" / "a"
    folder.mkdir(parents=True)
    (root / "exams").mkdir()  # site a published its exam list (without one its samples are held)
    (root / "exams" / "a.json").write_text(json.dumps({"site": "a", "sha256": [], "phash": []}))

    def put(seed: int, side: dict | bytes | None) -> str:
        image = png(seed)
        sha = hashlib.sha256(image).hexdigest()
        (folder / f"{sha}.png").write_bytes(image)
        if side is not None:
            (folder / f"{sha}.json").write_bytes(side if isinstance(side, bytes) else json.dumps(side).encode())
        return sha

    good = {put(i, sidecar()) for i in range(3)}
    hostile = {
        put(10, sidecar(member_probabilities=[[0.9, 0.1, 0.0]])): "3 values for 2 classes",
        put(11, sidecar(member_probabilities=[[[0.9, 0.1]]])): "valid number",
        put(12, json.dumps(sidecar(probabilities={"functional": math.inf, "defective": 0})).encode()): "finite",
        put(13, json.dumps(sidecar(member_probabilities=[[math.nan, 1.0]])).encode()): "finite",
        put(14, sidecar(probabilities={"cat": 0.5, "dog": 0.5}, member_probabilities=None)): "family's classes",
        put(15, sidecar(member_probabilities=[[1.0], [1.0]],
                        probabilities={"functional": 1.0})): "family's classes",
    }
    for seed, make, reason in ((20, lambda p: os.mkfifo(p), "FIFO"),
                               (21, lambda p: p.symlink_to("/dev/zero"), "symbolic link"),
                               (22, lambda p: p.mkdir(), "directory"),
                               (23, lambda p: open(p, "wb").truncate(BIG), "larger than")):
        sha = put(seed, None)
        make(folder / f"{sha}.json")
        hostile[sha] = reason
    sha = put(24, sidecar())
    (folder / f"{sha}.png").unlink()
    (folder / f"{sha}.png").symlink_to("/dev/zero")  # the image, not the sidecar, is the trap
    hostile[sha] = "symbolic link"
    return good, hostile


def hostile_heartbeats(root: Path, now: float) -> dict[str, str]:
    """One valid heartbeat (site ``ok``) and malformed ones; returns {site: expected reason}."""
    status = root / "status"
    status.mkdir(parents=True, exist_ok=True)
    good = {"site": "ok", "time": now, "pid": 12, "state": "serving", "queues": {"inbox": 0, "outbox": 1}}
    cases = {"list": [good], "pidtext": {**good, "site": "pidtext", "pid": "twelve"},
             "timetext": {**good, "site": "timetext", "time": "now"}, "queues": {**good, "site": "queues",
             "queues": {"outbox": [1]}}, "lastrun": {**good, "site": "lastrun", "last_run": {"candidates": [1]}},
             "other": {**good, "site": "ok"}}
    reasons = {"list": "not a JSON object", "pidtext": "pid", "timetext": "time", "queues": "queues.outbox",
               "lastrun": "last_run.candidates", "other": "names site 'ok'"}
    (status / "ok.json").write_text(json.dumps(good))
    for site, body in cases.items():
        (status / f"{site}.json").write_text(json.dumps(body))
    (status / "nan.json").write_text('{"time": NaN}')
    os.mkfifo(status / "fifo.json")
    (status / "zero.json").symlink_to("/dev/zero")
    with open(status / "huge.json", "wb") as handle:
        handle.truncate(BIG)
    reasons |= {"nan": "time", "fifo": "FIFO", "zero": "symbolic link", "huge": "larger than"}
    return reasons


READER = """
import json, resource, sys, time
from edge_agent.store import Store
from orchestrator import health
from orchestrator.collect import collect_new
from orchestrator.labelling import LabelQueue
url, options, home, sites = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
store = Store(url, options)
store.listing("status")  # connect (and import what the driver imports) before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
queue = LabelQueue(home, %r)
runs = [collect_new(store, home, queue, confidence=0.5) for _ in range(2)]
fleet = health.FleetStatus(store)
heartbeats = fleet.read(sites)
rows = health.assess(heartbeats, sites, 60, {s: fleet.age(s) for s in sites}, fleet.unreadable)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"new": [[s.sha256 for s in r.new] for r in runs], "rejected": [r.rejected for r in runs],
                  "pseudo": runs[0].pseudo_labelled, "rows": [r.row() for r in rows],
                  "grew_mb": (after - before) / 1024}))
""" % CLASSES


def read_as_the_cloud(url: str, options: dict, home: Path, sites: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", READER, url, json.dumps(options), str(home), json.dumps(sites)],
                          cwd=REPO, env=agent_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def sftp_host(tmp_path_factory):
    from orchestrator.sshfleet import sshd_available, sshd_fleet_at

    if not sshd_available():
        pytest.fail("OpenSSH sshd is missing: `apt-get install -y openssh-server` (make test does this)")
    yield from sshd_fleet_at(tmp_path_factory.mktemp("sshd"), 1)


@pytest.mark.parametrize("backend", ["file", "sftp"])
def test_hostile_store_files_are_refused_alone_and_collect_and_health_go_on(tmp_path, backend, request):
    import time

    root = tmp_path / "store"
    good, hostile = hostile_store(root)
    unreadable = hostile_heartbeats(root, time.time())
    if backend == "file":
        url, options = root.as_uri(), {}
    else:
        fleet = request.getfixturevalue("sftp_host")
        url = f"sftp://{fleet.user}@127.0.0.1:{fleet.hosts[0].port}{root}"
        options = {"key_filename": str(fleet.client_key), "known_hosts": str(fleet.known_hosts), "timeout": "10"}
    home = tmp_path / "registry"
    home.mkdir()

    out = read_as_the_cloud(url, options, home, ["ok", *unreadable])

    first, second = out["new"]
    assert set(first) == good and second == []  # the fleet's collect went on past every hostile file
    assert out["pseudo"] == len(good)
    reasons = {r["sample"].removeprefix("a/"): r["reason"] for r in out["rejected"][0]}
    assert set(hostile) <= set(reasons), set(hostile) - set(reasons)
    for sha, why in hostile.items():
        assert why in reasons[sha], (sha, reasons[sha])
    assert out["rejected"][1] == []  # quarantined: not read, not reported again
    quarantine = dict(Quarantine(home).reasons())
    assert {f"a/{sha}" for sha in hostile} <= set(quarantine)
    rows = {r["site"]: r for r in out["rows"]}
    assert rows["ok"]["verdict"] == "ok" and rows["ok"]["outbox"] == 1
    for site, why in unreadable.items():
        assert rows[site]["verdict"] == "unreadable", rows[site]
        assert rows[site]["reason"].startswith("unreadable heartbeat: ") and why in rows[site]["reason"], rows[site]
    print(f"{backend}: reader grew {out['grew_mb']:.1f} MB")
    assert out["grew_mb"] < RSS_BOUND_MB, f"the reading process grew by {out['grew_mb']:.0f} MB"


def test_a_sample_that_makes_collect_raise_is_quarantined_and_the_watermark_moves(tmp_path, monkeypatch):
    from orchestrator import collect
    from orchestrator.labelling import LabelQueue

    root = tmp_path / "store"
    good, _ = hostile_store(root)
    poison = sorted(good)[0]
    real = collect.pseudo_label

    def fails_on_one(sample, classes, confidence):  # a fault injected in a later step, for one sample
        if sample.sha256 == poison:
            raise IndexError("list index out of range")
        return real(sample, classes, confidence)

    monkeypatch.setattr(collect, "pseudo_label", fails_on_one)
    store, home = Store(root.as_uri()), tmp_path / "registry"
    home.mkdir()
    queue = LabelQueue(home, CLASSES)
    result = collect.collect_new(store, home, queue, confidence=0.5)
    assert {s.sha256 for s in result.new} == good - {poison}
    assert any(r["sample"] == f"a/{poison}" and "IndexError" in r["reason"] for r in result.rejected)
    assert "IndexError" in Quarantine(home).reasons()[f"a/{poison}"]
    later = hashlib.sha256(png(99)).hexdigest()  # a sample that arrives after the poisoned one
    (root / "samples" / "a" / f"{later}.png").write_bytes(png(99))
    (root / "samples" / "a" / f"{later}.json").write_text(json.dumps(sidecar()))
    again = collect.collect_new(store, home, queue, confidence=0.5)
    assert [s.sha256 for s in again.new] == [later] and again.rejected == []


def test_fleet_health_names_an_unreadable_heartbeat_and_fails_red(prefect_harness, tmp_path):
    import time

    from flows.health import FleetUnhealthy, fleet_health

    store = tmp_path / "store"
    unreadable = hostile_heartbeats(store, time.time())
    sites = ["ok", "pidtext", "huge", "fifo"]
    inventory = tmp_path / "fleet.yaml"
    inventory.write_text(f'cloud: {{store_url: "{store.as_uri()}", stale_after_s: 600}}\n'
                         "defaults: {connection: {type: local}}\nsites:\n"
                         + "".join(f'  - {{name: {s}, root: "{tmp_path / s}"}}\n' for s in sites))
    with pytest.raises(FleetUnhealthy) as failure:
        fleet_health(str(inventory))
    assert str(failure.value).startswith("1 ok, 3 unreadable (")
    rows = {r["site"]: r for r in latest_table("fleet-health")}
    assert rows["ok"]["verdict"] == "ok"
    for site in sites[1:]:
        assert rows[site]["verdict"] == "unreadable" and unreadable[site] in rows[site]["reason"]


def test_the_collect_flow_goes_on_past_hostile_samples_and_names_them(prefect_harness, tmp_path, tiny_base_model):
    from flows.stages import CollectSettings, collect
    from orchestrator.registry import ModelRegistry

    store = tmp_path / "store"
    good, hostile = hostile_store(store)
    registry = ModelRegistry(tmp_path / "registry")
    registry.promote(registry.register("elpv", tiny_base_model, arch="tiny_cnn", dataset_id=None,
                                       hyperparameters={}, metrics={}).version)
    inventory = tmp_path / "fleet.yaml"
    inventory.write_text(f'cloud: {{store_url: "{store.as_uri()}", registry: "{registry.root}"}}\n'
                         f'defaults: {{connection: {{type: local}}}}\nsites:\n  - {{name: a, root: "{tmp_path / "a"}"}}\n')
    summary = collect(str(inventory), CollectSettings(family="elpv", pseudo_label_confidence=0.85))
    assert summary["new"] == len(good) and summary["rejected"] == len(hostile)
    named = {row["sample"].removeprefix("a/"): row["reason"] for row in latest_table("collect-rejected")}
    assert set(named) == set(hostile) and all(named.values())
    again = collect(str(inventory), CollectSettings(family="elpv", pseudo_label_confidence=0.85))
    assert again["new"] == 0 and again["rejected"] == 0  # quarantined: not read again


def test_a_rollout_judges_a_canary_with_a_malformed_heartbeat_failed_and_does_not_crash(tmp_path):
    import time

    from orchestrator import health
    from orchestrator import rollout as waves

    store = tmp_path / "store"
    hostile_heartbeats(store, time.time())
    fleet = health.FleetStatus(Store(store.as_uri()))
    watches = [waves.Watch(site, time.time() - 60, None) for site in ("pidtext", "timetext", "lastrun", "huge")]
    verdicts = waves.wait_for_canaries(fleet, watches, "v2", soak_s=0, timeout_s=1, poll_s=0.2)
    assert {site: state for site, (state, _) in verdicts.items()} == dict.fromkeys(verdicts, "failed")
    assert set(fleet.unreadable) >= {"pidtext", "timetext", "lastrun", "huge"}  # why, for the rollout to say
