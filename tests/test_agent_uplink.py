"""Outbox, selection and uplink against real stores: a file:// store that goes away and comes back
(driven through the real daemon), an sftp:// store on a real loopback sshd, the disk cap and the budget."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import AgentProcess, copy_labelled, exam_split, serving_site, wait_for, write_config

from edge_agent.outbox import Outbox
from edge_agent.select import Selector, disagreement, normalised_entropy
from edge_agent.state import UploadLedger
from edge_agent.store import Store, StoreError
from edge_agent.uplink import Backoff, Uplink


def png(seed: int, size: int = 16) -> bytes:
    from edge_agent.imaging import encode_png

    return encode_png(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8))


def store_samples(store: Path, site: str = "site-1") -> tuple[list[Path], list[Path]]:
    folder = store / "samples" / site
    return sorted(folder.glob("*.png")), sorted(folder.glob("*.json"))


def assert_store_consistent(store: Path, expected: int) -> None:
    images, sidecars = store_samples(store)
    assert len(images) == len(sidecars) == expected
    for sidecar in sidecars:
        data = sidecar.with_suffix(".png").read_bytes()
        assert hashlib.sha256(data).hexdigest() == sidecar.stem == json.loads(sidecar.read_text())["sha256"]
    assert not [p for p in (store / "samples" / "site-1").iterdir() if p.name.startswith(".")]


def test_selection_scores():
    assert normalised_entropy(np.array([0.5, 0.5])) == pytest.approx(1.0)
    assert normalised_entropy(np.array([1.0, 0.0])) < 1e-6
    assert disagreement(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.5)
    selector = Selector(0.5, 0.2, random_share=0.0)
    assert selector.judge(np.array([0.55, 0.45])).reasons == ["uncertain"]
    assert not selector.judge(np.array([0.99, 0.01]), np.array([[0.99, 0.01], [0.98, 0.02]])).chosen
    assert selector.judge(np.array([0.95, 0.05]), np.array([[1.0, 0.0], [0.5, 0.5]])).reasons == ["disagreement"]
    # a labelled image the model already gets right, surely, stays at the site; a mistaken or unsure one goes
    assert not selector.judge(np.array([0.99, 0.01]), operator_label="functional").chosen
    mistaken = selector.judge(np.array([0.99, 0.01]), operator_label="defective", mistaken=True)
    assert mistaken.chosen and mistaken.reasons == ["operator_label", "mistaken"] and mistaken.score > 1.0
    unsure = selector.judge(np.array([0.55, 0.45]), operator_label="functional")
    assert unsure.chosen and unsure.reasons == ["operator_label", "uncertain"]
    assert Selector(0.5, 0.2, random_share=1.0).judge(np.array([0.99, 0.01])).reasons == ["random"]


def test_outbox_cap_drops_least_useful_first(tmp_path):
    outbox = Outbox(tmp_path / "outbox", max_bytes=10**9)
    names = {score: outbox.put(png(i), {"time": float(i)}, score) for i, score in enumerate([0.9, 0.1, 2.0, 0.5])}
    assert outbox.put(png(0), {"time": 9.0}, 0.9) == names[0.9]  # same bytes: same sample
    sizes = {item.sha256: item.size for item in outbox.items()}
    outbox.max_bytes = sum(sizes.values()) - sizes[names[0.1]] - 1
    assert outbox.enforce_cap() == 2
    assert [item.sha256 for item in outbox.items()] == [names[2.0], names[0.9]]
    (outbox.folder / "orphan.png").write_bytes(b"x")  # a crash between image and sidecar
    assert outbox.sweep() == 1 and len(outbox.items()) == 2


def test_daily_budget_and_idempotent_upload(tmp_path):
    outbox = Outbox(tmp_path / "outbox", max_bytes=10**9)
    for i in range(5):
        outbox.put(png(i), {"time": float(i)}, 0.5)
    store = tmp_path / "store"
    uplink = Uplink(Store(f"file://{store}"), outbox, "site-1", max_samples_per_day=3, max_bytes_per_day=10**9)
    ledger = UploadLedger()
    result = uplink.pump(ledger)
    assert result.uploaded == 3 and result.budget_exhausted and len(outbox.items()) == 2
    assert ledger.count == 3
    ledger.roll(ledger_time := 10**10)  # another day
    assert ledger.count == 0
    # a copy already in the store (an upload whose outbox removal was lost in a crash) is not sent twice
    item = outbox.items()[0]
    uplink.upload(item)
    assert uplink.upload(item) is False
    result = uplink.pump(ledger, now=lambda: ledger_time)
    assert result.uploaded == 1 and result.skipped_existing == 1
    assert_store_consistent(store, 5)


def test_store_outage_then_recovery_through_the_daemon(tmp_path, elpv_small):
    """The store path is a file (unreachable) while the agent queues operator-labelled samples; the agent is
    stopped and restarted during the outage; when the store is back every sample arrives exactly once.
    (``random_share`` 1: every labelled image the serving ensemble judges is chosen.)"""
    store = tmp_path / "store"
    store.write_text("not a directory: the store is down")
    serving_site(tmp_path / "agent", 32)
    config = write_config(tmp_path / "agent", f"file://{store}", upload={"random_share": 1.0})
    copy_labelled(elpv_small / "sites" / "site-1", tmp_path / "agent")
    labelled, exam = exam_split(tmp_path / "agent")  # gate and test images never leave the site
    assert labelled and exam
    agent = AgentProcess(config)
    try:
        status = wait_for(lambda: (s := agent.status()) and s["queues"]["outbox"] == labelled
                          and s["last_upload_error"] and s, 30, "samples queued during outage", agent)
        assert status["selected_total"] == labelled and status["uploaded_total"] == 0
        assert agent.terminate() == 0
    finally:
        agent.close()
    assert len(list((tmp_path / "agent" / "outbox").glob("*.json"))) == labelled

    agent = AgentProcess(config)
    try:
        wait_for(lambda: (s := agent.status()) and s["upload_backoff_failures"] >= 2, 30, "retries with backoff", agent)
        store.unlink()  # the store is back
        wait_for(lambda: (s := agent.status()) and s["uploaded_total"] == labelled and s["queues"]["outbox"] == 0,
                 60, "everything uploaded", agent)
        assert agent.terminate() == 0
    finally:
        agent.close()
    assert_store_consistent(store, labelled)
    sidecars = [json.loads(p.read_text()) for p in store_samples(store)[1]]
    assert all(s["operator_label"] in ("functional", "defective") and s["reasons"][0] == "operator_label"
               and len(s["reasons"]) > 1 and s["model_version"] and s["split"] in ("train", "val") for s in sidecars)
    published = set(json.loads((store / "exams" / "site-1.json").read_text())["sha256"])
    assert exam <= published and not published & {p.stem for p in store_samples(store)[1]}
    status = json.loads((store / "status" / "site-1.json").read_text())
    assert status["site"] == "site-1" and status["uploaded_total"] == labelled


@pytest.fixture(scope="module")
def sftp_host(tmp_path_factory):
    from orchestrator.sshfleet import sshd_available, sshd_fleet_at

    if not sshd_available():
        pytest.fail("OpenSSH sshd is missing: `apt-get install -y openssh-server` (make test does this)")
    yield from sshd_fleet_at(tmp_path_factory.mktemp("sshd"), 1)


def sftp_store(fleet, folder: Path) -> tuple[str, dict[str, str]]:
    host = fleet.hosts[0]
    return (f"sftp://{fleet.user}@127.0.0.1:{host.port}{folder}",
            {"key_filename": str(fleet.client_key), "known_hosts": str(fleet.known_hosts), "timeout": "10"})


def test_sftp_store_through_the_daemon(tmp_path, elpv_small, sftp_host):
    """Labelled images judged by the serving ensemble (every one chosen: ``random_share`` 1) go up over sftp."""
    url, options = sftp_store(sftp_host, tmp_path / "sftp-store")
    serving_site(tmp_path / "agent", 32)
    config = write_config(tmp_path / "agent", url, store_options=options, upload={"random_share": 1.0})
    copy_labelled(elpv_small / "sites" / "site-1", tmp_path / "agent", limit=4)
    labelled = exam_split(tmp_path / "agent")[0]
    agent = AgentProcess(config)
    try:
        wait_for(lambda: (s := agent.status()) and s["uploaded_total"] == labelled and s["queues"]["outbox"] == 0,
                 60, "samples uploaded over sftp", agent)
        assert agent.terminate() == 0
    finally:
        agent.close()
    assert_store_consistent(tmp_path / "sftp-store", labelled)
    assert json.loads((tmp_path / "sftp-store" / "status" / "site-1.json").read_text())["site"] == "site-1"


def test_sftp_outage_and_unknown_host_key(tmp_path, sftp_host):
    url, options = sftp_store(sftp_host, tmp_path / "sftp-store")
    outbox = Outbox(tmp_path / "outbox", max_bytes=10**9)
    outbox.put(png(1), {"time": 1.0}, 0.5)
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sftp_host.hosts[0].port} ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIGb8o1ZqZlE6NHCGeU5d0iWdeB2u9xXn7sYr7G2Y3n0m\n")
    with pytest.raises(StoreError, match="host key"):
        Store(url, {**options, "known_hosts": str(wrong)}).put_verified("x.bin", b"x")
    uplink = Uplink(Store(url, options), outbox, "site-1", 100, 10**9, Backoff(base_s=0.01, max_s=0.05))
    host = sftp_host.hosts[0]
    host.kill()
    try:
        result = uplink.pump(UploadLedger())
        assert result.error and result.uploaded == 0 and len(outbox.items()) == 1
    finally:
        host.start()
    import time

    time.sleep(0.1)
    assert uplink.pump(UploadLedger()).uploaded == 1 and not outbox.items()
    assert_store_consistent(tmp_path / "sftp-store", 1)


def test_an_sftp_store_is_verified_by_default_on_both_sides(tmp_path, sftp_host, monkeypatch):
    """No ``known_hosts`` option: the store's key is still checked (the user's known_hosts on the edge, the
    inventory's in the cloud), and provisioning hands each agent the store's key from the inventory."""
    import yaml

    from orchestrator.inventory import load_inventory
    from orchestrator.provision import provision
    from orchestrator.sshfleet import stop_agents

    url, options = sftp_store(sftp_host, tmp_path / "sftp-store")
    options.pop("known_hosts")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a user who never saw this store
    with pytest.raises(StoreError, match="host key"):
        Store(url, options).put_verified("x.bin", b"x")
    assert not (tmp_path / "sftp-store" / "x.bin").exists()

    root = tmp_path / "site"
    inventory_file = tmp_path / "inv.yaml"
    inventory_file.write_text(yaml.safe_dump({
        "cloud": {"store_url": url, "store_options": options},
        "ssh": {"known_hosts": str(sftp_host.known_hosts)},
        "defaults": {"connection": {"type": "local"}, "python": sys.executable,
                     "agent": {"heartbeat_interval_s": 1, "serve": {"port": 0}, "service": "process"}},
        "sites": [{"name": "north", "root": str(root)}]}))
    inventory = load_inventory(inventory_file)
    inventory.store().put_verified("cloud.bin", b"checked against the inventory's known_hosts")
    try:
        report = provision(inventory)
        assert not report.failed, report.recap()
        config = yaml.safe_load((root / "config" / "agent.yaml").read_text())
        assert config["store_options"]["known_hosts"] == str(root / "config" / "store_known_hosts")
        assert f"[127.0.0.1]:{sftp_host.hosts[0].port}" in (root / "config" / "store_known_hosts").read_text()
        status = tmp_path / "sftp-store" / "status" / "north.json"
        deadline = time.time() + 30
        while not status.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert json.loads(status.read_text())["site"] == "north"  # the agent verified the store and wrote
    finally:
        stop_agents(tmp_path)
