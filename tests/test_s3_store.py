"""s3:// stores against a real S3 API on loopback (moto's server, signatures checked), not an in-process mock:
an agent uploads samples and heartbeats, the cloud collects them and reads the fleet's status in one
listing; the server stops mid-upload and comes back; wrong credentials; S3 options in the inventory."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time

import pytest
import yaml
from agent_helpers import AgentProcess, copy_labelled, exam_split, serving_site, wait_for, write_config
from test_agent_uplink import png, sftp_host, sftp_store  # noqa: F401 (sftp_host: a fixture)

from edge_agent.outbox import Outbox
from edge_agent.state import UploadLedger
from edge_agent.store import Store, StoreError
from edge_agent.uplink import Backoff, Uplink
from orchestrator.collect import collect_new
from orchestrator.health import FleetStatus
from orchestrator.labelling import LabelQueue
from orchestrator.samples import collect_samples
from orchestrator.s3local import local_s3


@pytest.fixture(scope="module")
def s3():
    with local_s3() as server:
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The host's credentials, as an edge or the cloud holds them: in the environment only. The bucket starts
    empty: the server is the module's, and side by side its tests run in any order."""
    client = s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket):
        for found in page.get("Contents", []):
            client.delete_object(Bucket=s3.bucket, Key=found["Key"])
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3


def keys(s3, prefix: str) -> list[str]:
    """Every object under ``fleet/<prefix>`` as S3 lists it (boto3's own client, not the store's)."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=f"fleet/{prefix}")
    return sorted(o["Key"].removeprefix("fleet/") for page in pages for o in page.get("Contents", []))


def assert_samples_whole(s3, site: str, expected: int) -> None:
    """``expected`` samples, each image hashing to its name and its sidecar's sha256; nothing else listed."""
    found = keys(s3, f"samples/{site}/")
    images = [k for k in found if k.endswith(".png")]
    assert len(images) == expected and len(found) == 2 * expected, found
    store = Store(s3.url, s3.options())
    for image in images:
        sha = image.rsplit("/", 1)[-1].removesuffix(".png")
        assert hashlib.sha256(store.read(image, max_bytes=10**7)).hexdigest() == sha
        assert json.loads(store.read(image[:-4] + ".json", max_bytes=10**6))["sha256"] == sha


class ListingWatcher(threading.Thread):
    """Lists the bucket as fast as it can, as a reader would, and keeps whatever it should never see:
    a temporary part, or a sidecar whose image is not there yet."""

    def __init__(self, s3):
        super().__init__(daemon=True)
        self.s3, self.stop, self.listings, self.bad = s3, threading.Event(), 0, set()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                found = set(keys(self.s3, ""))
            except Exception:  # the server is down for a moment: keep watching
                time.sleep(0.05)
                continue
            self.listings += 1
            time.sleep(0.05)  # often enough to catch a part; the server shares this process with the test
            self.bad |= {k for k in found if k.rsplit("/", 1)[-1].startswith(".") or k.endswith(".part")}
            self.bad |= {k for k in found if k.endswith(".json") and k.startswith("samples/")
                         and k[:-5] + ".png" not in found}


def test_agent_uploads_and_the_cloud_collects_over_s3(tmp_path, elpv_small, s3_env):
    """The real daemon pushes samples and heartbeats to S3; a reader listing all along never sees a part
    or a sidecar without its image; the cloud collects every sample, queues them for labelling, and reads
    the fleet's status in one listing with the heartbeat's time from S3's LastModified."""
    s3 = s3_env
    serving_site(tmp_path / "agent", 32)
    config = write_config(tmp_path / "agent", s3.url, store_options=s3.options(), upload={"random_share": 1.0})
    copy_labelled(elpv_small / "sites" / "site-1", tmp_path / "agent", limit=8)
    labelled = exam_split(tmp_path / "agent")[0]  # gate and test images never leave the site
    assert labelled
    unlabelled = sorted((elpv_small / "sites" / "site-2").glob("*/*.png"))[:4]
    for image in unlabelled:  # what the site's camera sees: classified, then sent for a person to label
        shutil.copy(image, tmp_path / "agent" / "data" / "inbox" / image.name)
    total = labelled + len(unlabelled)
    watcher = ListingWatcher(s3)
    watcher.start()
    agent = AgentProcess(config)
    try:
        wait_for(lambda: (s := agent.status()) and s["uploaded_total"] == total and s["queues"]["outbox"] == 0,
                 90, "samples uploaded to S3", agent)
        assert agent.terminate() == 0
    finally:
        agent.close()
        watcher.stop.set()
        watcher.join(10)
    assert watcher.listings > 10 and not watcher.bad, watcher.bad
    assert_samples_whole(s3, "site-1", total)

    store = Store(s3.url, s3.options())
    queue = LabelQueue(tmp_path / "cloud", ["functional", "defective"])
    collected = collect_new(store, tmp_path / "cloud", queue, confidence=1.01)  # no pseudo-labels: all to people
    assert len(collected.new) == total and not collected.rejected and collected.operator_labelled == labelled
    assert {s.site for s in collected.new} == {"site-1"}
    # the labelling page's queue: the inbox images wait for a person, the operator-labelled ones do not
    assert len(queue.pending(collect_samples(store).accepted)) == len(unlabelled) == collected.queued
    assert collect_new(store, tmp_path / "cloud", queue, confidence=1.01).new == []  # the watermark holds

    reader = FleetStatus(store)
    status = reader.read(["site-1", "site-2"])
    assert set(status) == {"site-1"} and status["site-1"]["state"] == "stopped" and reader.fetched == 1
    head = s3.client().head_object(Bucket=s3.bucket, Key="fleet/status/site-1.json")
    assert reader.stored_at(["site-1", "site-2"]) == {"site-1": head["LastModified"].timestamp()}
    assert reader.read(["site-1"]) and reader.fetched == 0  # unchanged: one listing, nothing fetched


def test_s3_server_stopped_mid_upload_loses_nothing_and_duplicates_nothing(tmp_path, s3_env):
    """The uplink pumps 16 samples as the daemon does (a tick at a time, backing off on errors); the S3
    server stops while it uploads and comes back once the uploader has failed. The outbox keeps every
    sample S3 did not confirm, so each is in the bucket exactly once, whole, and counted once."""
    s3, site, n = s3_env, "site-outage", 16
    outbox = Outbox(tmp_path / "outbox", max_bytes=10**9)
    for i in range(n):
        outbox.put(png(1000 + i, size=48), {"time": float(i)}, 0.5)
    expected = {item.sha256 for item in outbox.items()}
    uplink = Uplink(Store(s3.url, {**s3.options(), "timeout": "2"}), outbox, site, 1000, 10**9,
                    Backoff(base_s=0.05, max_s=0.5))
    ledger, results, stop = UploadLedger(), [], threading.Event()

    def pump_until_empty() -> None:
        while outbox.items() and not stop.is_set():
            results.append(uplink.pump(ledger, max_seconds=0.5))
            time.sleep(0.02)

    pump = threading.Thread(target=pump_until_empty, daemon=True)
    pump.start()
    try:
        wait_for(lambda: len(keys(s3, f"samples/{site}/")) >= 6, 60, "the first uploads")
        s3.stop()
        wait_for(lambda: any(r.error for r in results), 30, "the outage to reach the uploader")
        left = len(outbox.items())
        time.sleep(1.0)
        assert len(outbox.items()) == left > 0  # while S3 is down, nothing leaves the outbox
    finally:
        if s3._server is None:
            s3.start()
    pump.join(120)
    stop.set()
    assert not pump.is_alive() and not outbox.items()
    assert_samples_whole(s3, site, n)
    assert {k.rsplit("/", 1)[-1][:-4] for k in keys(s3, f"samples/{site}/") if k.endswith(".png")} == expected
    # each sample left the outbox once and was counted once; one whose PUT landed as the server stopped,
    # unconfirmed, is found whole on the retry and not sent again (skipped_existing)
    assert sum(r.uploaded + r.skipped_existing for r in results) == n and ledger.count == n


def test_wrong_credentials_are_one_clear_error_naming_the_store_without_the_secret(tmp_path, s3_env, monkeypatch,
                                                                                   capsys):
    s3 = s3_env
    Store(s3.url, s3.options()).put_verified("status/north.json", b"{}")
    wrong_secret = "WrongSecretValue0123456789abcdefghijKLMN"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    store = Store(s3.url, s3.options())
    for attempt in (lambda: store.put_verified("status/north.json", b"{...}"), lambda: store.listing("status"),
                    lambda: store.read("status/north.json", 100), lambda: store.read_many(["status/north.json"], 100),
                    lambda: store.list("samples/*/*.json")):
        with pytest.raises(StoreError) as caught:
            attempt()
        message = str(caught.value)
        assert message.startswith(f"store {s3.url}: ") and "\n" not in message
        assert "AWS_ACCESS_KEY_ID" in message and ("Forbidden" in message or "signature" in message)
        assert wrong_secret not in message and s3.key_id not in message
    reader = FleetStatus(store)
    assert reader.read(["north"]) == {} and reader.error.startswith(f"store {s3.url}: status: PermissionError")

    from edgeloop.cli import main

    inventory = tmp_path / "inv.yaml"
    inventory.write_text(yaml.safe_dump({
        "cloud": {"store_url": s3.url, "store_options": s3.options(), "registry": str(tmp_path / "registry")},
        "defaults": {"connection": {"type": "local"}}, "sites": [{"name": "north", "root": str(tmp_path / "north")}]}))
    assert main(["label", "-i", str(inventory), "--classes", "functional,defective",
                 "--export", str(tmp_path / "tasks.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"edgeloop label: error: store {s3.url}: ") and "\n" not in error
    assert wrong_secret not in error and "Traceback" not in error

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match=f"store {s3.url}: status: NoCredentialsError: Unable to locate credentials"):
        Store(s3.url, s3.options()).listing("status")


def test_s3_options_in_the_inventory_and_the_agent_config(tmp_path, s3_env):
    """endpoint_url and region come from the inventory; credentials there are refused, naming the field."""
    from edge_agent.config import ConfigError, load_config
    from orchestrator.inventory import InventoryError, load_inventory

    s3 = s3_env
    inventory = {"cloud": {"store_url": s3.url, "store_options": s3.options()},
                 "defaults": {"connection": {"type": "local"}}, "sites": [{"name": "north", "root": str(tmp_path)}]}
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inventory))
    store = load_inventory(path).store()
    assert store.put_verified("status/inventory.json", b"{}") and "inventory.json" in store.listing("status")
    assert load_inventory(path).site("north").agent_config(load_inventory(path).cloud).store_options == s3.options()

    inventory["cloud"]["store_options"] = {**s3.options(), "secret": "${SOME_SECRET}", "endpoint": "x"}
    path.write_text(yaml.safe_dump(inventory))
    with pytest.raises(InventoryError) as caught:
        load_inventory(path, env={"SOME_SECRET": "s3cr3t-value"})
    message = str(caught.value)
    assert "store_options.secret: S3 credentials never go in the inventory" in message
    assert "store_options.endpoint: not an S3 store option" in message and "s3cr3t-value" not in message

    config = write_config(tmp_path / "agent", s3.url, store_options={"key": "AKIA0000", "timeout": "soon"})
    with pytest.raises(ConfigError, match="store_options.key: S3 credentials never go") as caught:
        load_config(config)
    assert "store_options.timeout: seconds, a positive number (got 'soon')" in str(caught.value)


def test_partials_swept_and_listing_times_by_the_stores_clock_on_s3(s3_env):
    """A ``.part`` an older agent left is swept by its LastModified; a fresh one and real objects stay."""
    s3 = s3_env
    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key="fleet/samples/north/.abc.png.1234abcd.part", Body=b"half")
    client.put_object(Bucket=s3.bucket, Key="fleet/samples/north/abc.png", Body=b"whole")
    store = Store(s3.url, s3.options())
    listing = store.listing("samples/north")
    assert set(listing) == {".abc.png.1234abcd.part", "abc.png"}
    assert set(store.listing("samples/north", prefix=".")) == {".abc.png.1234abcd.part"}  # S3 filters it
    assert all(abs(entry.mtime - time.time()) < 60 and entry.size for entry in listing.values())
    assert store.sweep_partials("samples/north") == 0  # younger than an hour: may be a live upload
    assert store.sweep_partials("samples/north", older_than_s=-1) == 1
    assert keys(s3, "samples/north/") == ["samples/north/abc.png"]


def test_listing_times_are_the_stores_clock_in_epoch_seconds_on_every_kind(tmp_path, s3_env, sftp_host):
    """One ``Listed.mtime`` for file, sftp and S3 alike (what heartbeat freshness is read from)."""
    stores = {"file": Store(f"file://{tmp_path / 'file-store'}"), "s3": Store(s3_env.url, s3_env.options()),
              "sftp": Store(*sftp_store(sftp_host, tmp_path / "sftp-store"))}
    for kind, store in stores.items():
        before = time.time()
        store.put_verified("status/clock.json", f'{{"kind": "{kind}"}}'.encode())
        entry = store.listing("status")["clock.json"]
        assert isinstance(entry.mtime, float) and before - 2 <= entry.mtime <= time.time() + 1, (kind, entry)
        assert entry.size == len(f'{{"kind": "{kind}"}}'), kind


def test_the_bounded_reader_on_s3_reads_no_more_than_its_cap(s3_env):
    """The cloud's one reader: on S3 a ranged GET of cap + 1 bytes, so an oversized heartbeat is refused
    (named, alone) after reading 1 MiB and a byte, not 3 MiB; an empty object reads as empty."""
    from orchestrator.health import MAX_HEARTBEAT_BYTES

    s3 = s3_env
    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key="fleet/status/huge.json", Body=b" " * (3 * MAX_HEARTBEAT_BYTES))
    client.put_object(Bucket=s3.bucket, Key="fleet/status/empty.json", Body=b"")
    Store(s3.url, s3.options()).put_verified("status/fine.json", json.dumps({"site": "fine", "time": 1.0}).encode())
    store = Store(s3.url, s3.options())
    assert store.read("status/empty.json", 10) == b""
    with pytest.raises(FileNotFoundError):
        store.read("status/absent.json", 10)
    reader = FleetStatus(store)
    assert set(reader.read(["huge", "empty", "fine", "absent"])) == {"fine"}
    assert reader.unreadable["huge"] == f"unreadable heartbeat: larger than {MAX_HEARTBEAT_BYTES} bytes"
    assert reader.unreadable["empty"].startswith("unreadable heartbeat: status is not JSON")


def test_of_eight_rollouts_taking_the_fleets_lease_at_once_on_s3_exactly_one_gets_it(s3_env, monkeypatch):
    """S3's conditional write (If-None-Match: *) is the lease's exclusive create on an object store, as O_EXCL is on
    a file store: eight takers released together (each its own connection, as eight cloud processes), one wins,
    seven are refused naming it; four rounds, so a write-then-read-back race would show."""
    from orchestrator.lease import Lease, LeaseHeld

    s3 = s3_env
    for round_ in range(4):
        start, results = threading.Barrier(8), {}

        def take(i: int) -> None:
            lease = Lease(Store(s3.url, s3.options()), f"rollout {round_}.{i}", 30)
            start.wait()
            try:
                results[i] = lease.acquire()
            except LeaseHeld as exc:
                results[i] = exc

        threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        won = [r for r in results.values() if isinstance(r, Lease)]
        assert len(results) == 8 and len(won) == 1, (round_, results)
        assert all(f"{won[0].holder} " in str(r) or "took" in str(r) for r in results.values() if r is not won[0])
        won[0].release()
        assert keys(s3, "leases/") == []  # given back: the next round starts from a free fleet
    from orchestrator.storepolicy import site_s3_policy

    for name, value in s3.add_user("site-a-lease", site_s3_policy(s3.url, "a")).items():
        monkeypatch.setenv(name, value)  # a site's own key may read the fleet's lease but never take it
    with pytest.raises(StoreError, match=f"^store {s3.url}: leases/fleet.json: PermissionError"):
        Lease(Store(s3.url, s3.options()), "a rollout with a site's key", 30).acquire()
