"""The cloud's own records and forms made hostile: a labels record cut short, a damaged quarantine or watermark,
labels for samples that do not exist, Label Studio files that are deep, huge or of the wrong types, sidecar
scores out of range, and search bounds. Real files, a real labelling page over HTTP (``edgeloop label`` as a
subprocess), real Label Studio exports and real SQLite databases; faults injected on purpose."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from agent_helpers import REPO, free_port, ours, parent_pid, wait_for_url
from test_labelling import CLASSES, _store_with_samples

from edge_agent.store import Store
from orchestrator.collect import WATERMARK, collect_new
from orchestrator.labelling import LABELS_FILE, MAX_IMPORT_BYTES, LabelError, LabelQueue
from orchestrator.ledger import RecordError
from orchestrator.samples import Quarantine, collect_samples


def _legacy_labels(n: int) -> dict:
    """A ``labels.json`` as the queue wrote it before SQLite: ``n`` people's labels."""
    return {hashlib.sha256(str(i).encode()).hexdigest(): {"label": CLASSES[i % 2], "by": "web", "time": 1000.0 + i}
            for i in range(n)}


def _request(url: str, data: bytes | None = None, **headers) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def fleet(tmp_path, elpv_small) -> Path:
    """A store with three pending samples (and one an operator labelled) and an inventory naming it."""
    _store_with_samples(tmp_path / "store", elpv_small)
    (tmp_path / "registry").mkdir()
    inventory = tmp_path / "fleet.yaml"
    inventory.write_text(f"""
cloud: {{store_url: "{(tmp_path / 'store').as_uri()}", registry: "{tmp_path / 'registry'}"}}
defaults: {{connection: {{type: local}}}}
sites: [{{name: site-1, root: "{tmp_path / 'site-1'}"}}]
""")
    return inventory


@pytest.fixture
def page(fleet):
    """``edgeloop label`` on a free port, started with the registry as the test left it."""
    procs = []

    def start() -> str:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "edgeloop", "label", "-i", str(fleet), "--classes",
                                 ",".join(CLASSES), "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_for_url(url + "/openapi.json", proc, "edgeloop label", timeout=60)
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _form(url: str) -> tuple[str, str]:
    """(sample, CSRF token) of the page's current card."""
    status, body = _request(url + "/")
    assert status == 200, body
    return (re.search(r'name=sha256 value="([0-9a-f]{64})"', body).group(1),
            re.search(r'name=csrf value="([^"]+)"', body).group(1))


def _answer(url: str, sha: str, csrf: str, label: str = "defective") -> tuple[int, str]:
    return _request(url + "/label", f"sha256={sha}&label={label}&csrf={csrf}".encode())


# ---- item 3: a person's labels are never overwritten from a read that failed ------------------------------------
def test_a_truncated_labels_json_refuses_the_answer_and_loses_nothing(fleet, page):
    """The issue's case: labels.json with its last 40 bytes lost, then an answer. Before, the file read as empty
    and was rewritten with that one label (50 -> 1)."""
    home = fleet.parent / "registry"
    whole = (json.dumps(_legacy_labels(50), indent=2) + "\n").encode()
    (home / LABELS_FILE).write_bytes(whole[:-40])
    url = page()
    for path in ("/", "/api/queue"):  # the page cannot show a card, so no answer can be given
        status, body = _request(url + path)
        assert status == 503 and "labels.json does not read" in body and "nothing was written" in body, body
        assert "\n" not in body.strip()  # one line
    sha = next(s.sha256 for s in collect_samples(Store((fleet.parent / "store").as_uri())).accepted
               if not s.sidecar.get("operator_label"))
    with pytest.raises(RecordError, match="labels.json does not read"):  # nor through the library
        LabelQueue(home, CLASSES).set(sha, "defective")
    assert (home / LABELS_FILE).read_bytes() == whole[:-40]  # untouched
    assert (home / f"{LABELS_FILE}.damaged").read_bytes() == whole[:-40]  # and a copy kept beside
    assert not (home / "labels.sqlite3").exists()  # nothing started from the unreadable record

    (home / LABELS_FILE).write_bytes(whole)  # the person restores the file: the next view migrates it once
    sha, csrf = _form(url)
    assert _answer(url, sha, csrf)[0] == 200
    labels = LabelQueue(home, CLASSES).labels()
    assert len(labels) == 51 and labels[sha]["label"] == "defective"  # 50 kept + the new answer
    assert (home / f"{LABELS_FILE}.migrated").read_bytes() == whole and not (home / LABELS_FILE).exists()

    db = home / "labels.sqlite3"  # now the database loses its last 40 bytes under a running page
    sha, csrf = _form(url)
    intact = db.read_bytes()
    db.write_bytes(intact[:-40])
    status, body = _answer(url, sha, csrf)
    assert status == 503 and "does not read (cut short" in body and "\n" not in body.strip(), body
    assert db.read_bytes() == intact[:-40] and (home / "labels.sqlite3.damaged").read_bytes() == intact[:-40]
    db.write_bytes(intact)  # restored from the copy a person took: all 51 are there, and the answer is taken
    assert _answer(url, sha, csrf)[0] == 200 and len(LabelQueue(home, CLASSES).labels()) == 52


def test_a_damaged_labels_database_refuses_every_write_and_keeps_a_copy(tmp_path):
    queue = LabelQueue(tmp_path, CLASSES)
    queue.set_many({sha: entry["label"] for sha, entry in _legacy_labels(300).items()}, by="web")
    db = tmp_path / "labels.sqlite3"
    whole = db.read_bytes()
    for damage, why in ((lambda b: b[:-40], "cut short"), (lambda b: b"\0" * len(b), "not a.* database"),
                        (lambda b: b[:100] + os.urandom(len(b) - 100), "")):
        db.write_bytes(damage(whole))
        before = db.read_bytes()
        for act in (queue.labels, lambda: queue.set(hashlib.sha256(b"new").hexdigest(), "defective"),
                    queue.count, queue.discarded):
            with pytest.raises(RecordError, match=f"the labels database {db} does not read .*{why}") as refused:
                act()
            assert "nothing was written" in str(refused.value) and "\n" not in str(refused.value)
        assert db.read_bytes() == before  # not a byte changed
        assert (tmp_path / "labels.sqlite3.damaged").exists()
        for copy in tmp_path.glob("labels.sqlite3.damaged*"):
            copy.unlink()
    db.write_bytes(whole)  # restored: every label is there
    assert len(queue.labels()) == 300


def test_two_writers_at_once_lose_no_label(tmp_path):
    """The page and a collect write at the same time: every label of both lands (one transaction each)."""
    script = ("import sys, hashlib; from orchestrator.labelling import LabelQueue; q = LabelQueue(sys.argv[1], "
              "['functional', 'defective']); [q.set(hashlib.sha256(f'{sys.argv[2]}-{i}'.encode()).hexdigest(), "
              "'defective', by=sys.argv[2]) for i in range(150)]")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), who], cwd=REPO) for who in ("a", "b")]
    assert [p.wait(120) for p in procs] == [0, 0]
    assert len(LabelQueue(tmp_path, CLASSES).labels()) == 300


def test_a_damaged_quarantine_or_watermark_refuses_the_collect_and_keeps_its_copy(tmp_path, elpv_small):
    store = _store_with_samples(tmp_path / "store", elpv_small)
    home = tmp_path / "registry"
    home.mkdir()
    queue = LabelQueue(home, CLASSES)
    for name, content in ((Quarantine.FILE, json.dumps({"site-1/" + "0" * 64: "a reason"})[:-5]),
                          (WATERMARK, json.dumps(["1" * 64, "2" * 64])[:-3]),
                          (Quarantine.FILE, json.dumps(["not", "an", "object"])),
                          (WATERMARK, json.dumps({"not": "a list"}))):
        (home / name).write_text(content)
        with pytest.raises(RecordError, match=f"{name} does not read") as refused:
            collect_new(store, home, queue, confidence=0.5)
        assert "\n" not in str(refused.value)
        assert (home / name).read_text() == content and (home / f"{name}.damaged").read_text() == content
        assert queue.count() == 0  # nothing collected, pseudo-labelled or queued
        assert not (home / name.replace(".json", ".sqlite3")).exists()  # nor started from the unreadable record
        for made in [home / name, home / f"{name}.damaged", *home.glob("*.sqlite3")]:
            made.unlink()
    (home / WATERMARK).write_text(json.dumps([]))  # sound legacy records are migrated once, kept as backups
    (home / Quarantine.FILE).write_text(json.dumps({"site-1/" + "0" * 64: "an old reason"}))
    assert len(collect_new(store, home, queue, confidence=0.5).new) == 4
    assert (home / f"{WATERMARK}.migrated").exists() and (home / f"{Quarantine.FILE}.migrated").exists()
    assert Quarantine(home).reasons()["site-1/" + "0" * 64] == "an old reason"

    db = home / "collected.sqlite3"  # the database itself damaged: refused, never restarted empty
    whole = db.read_bytes()
    db.write_bytes(whole[:-40])
    with pytest.raises(RecordError, match="the collect watermark .* does not read .*cut short"):
        collect_new(store, home, queue, confidence=0.5)
    db.write_bytes(whole)
    assert collect_new(store, home, queue, confidence=0.5).new == []  # nothing collected twice


def test_a_large_quarantine_costs_little_per_collect(tmp_path, elpv_small):
    """200,000 quarantined samples (a hostile site's flood): a collect looks them up in the database instead of
    loading them, so its time and memory do not grow with the quarantine."""
    store = _store_with_samples(tmp_path / "store", elpv_small)
    home = tmp_path / "registry"
    home.mkdir()
    Quarantine(home).add({f"evil/{i:064x}": "hostile" for i in range(200_000)})
    script = ("import json, resource, sys, time; from edge_agent.store import Store; "
              "from orchestrator.collect import collect_new; from orchestrator.labelling import LabelQueue; "
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; t = time.monotonic(); "
              "r = collect_new(Store(sys.argv[1]), sys.argv[2], LabelQueue(sys.argv[2], ['functional', 'defective']),"
              " 0.5); print(json.dumps({'new': len(r.new), 's': time.monotonic() - t, "
              "'mb': (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))")
    done = subprocess.run([sys.executable, "-c", script, store.url, str(home)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["new"] == 4 and out["mb"] < 30 and out["s"] < 10, out


# ---- item 7: labels only for samples the store holds; hostile Label Studio files --------------------------------
def test_the_page_refuses_a_label_for_a_sample_the_store_does_not_hold(fleet, page):
    url = page()
    sha, csrf = _form(url)
    unknown = hashlib.sha256(b"no such image").hexdigest()
    status, body = _answer(url, unknown, csrf)
    assert status == 404 and "no checked sample" in body
    assert _answer(url, "../../etc/passwd", csrf)[0] == 404
    home = fleet.parent / "registry"
    assert LabelQueue(home, CLASSES).labels() == {}  # nothing stored
    assert _answer(url, sha, csrf)[0] == 200 and set(LabelQueue(home, CLASSES).labels()) == {sha}


def _tasks(samples, choice: str = "defective") -> list[dict]:
    return [{"data": {"sha256": s.sha256}, "annotations": [{"result": [{"value": {"choices": [choice]}}]}]}
            for s in samples]


def _import(fleet: Path, export: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeloop", "label", "-i", str(fleet), "--classes",
                           ",".join(CLASSES), "--import", str(export)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_hostile_label_studio_files_are_refused_in_one_line_before_anything_is_written(fleet, tmp_path):
    home = fleet.parent / "registry"
    samples = collect_samples(Store((fleet.parent / "store").as_uri())).accepted
    unknown = [type(samples[0])(hashlib.sha256(bytes([i])).hexdigest(), "site-1", b"", {}) for i in range(5)]
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as handle:
        handle.truncate(MAX_IMPORT_BYTES + 1)
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    cases = {
        "unknown samples": (_tasks(samples[:1]) + _tasks(unknown), "5 task(s) refused: task 2: sample "),
        "result is a string": ([{"data": {"sha256": samples[0].sha256}, "annotations": [{"result": "x"}]}],
                               "annotation 1's result is not a list (got str)"),
        "annotations a number": ([{"data": {"sha256": samples[0].sha256}, "annotations": 5}],
                                 "annotations is not a list (got int)"),
        "choices not names": ([{"data": {"sha256": samples[0].sha256},
                                "annotations": [{"result": [{"value": {"choices": [1, {"a": 2}]}}]}]}],
                              "value.choices is not a list of class names"),
        "data a string": ([{"data": "x", "annotations": []}], "data is not an object"),
        "choice without a sample": ([{"data": {}, "annotations": [{"result": [{"value": {"choices": ["defective"]}}]}]}],
                                    "data.sha256 names no sample"),
        "not a list": ({"tasks": []}, "expected a list of tasks (got dict)"),
    }
    for name, (content, why) in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.json"
        path.write_text(json.dumps(content))
        with pytest.raises(LabelError, match=re.escape(why)):
            LabelQueue(home, CLASSES).import_label_studio(path, {s.sha256 for s in samples})
    for path, why in ((deep, "nested too deeply"), (huge, "larger than"), (zero, "not a regular file")):
        started = time.monotonic()
        with pytest.raises(LabelError, match=why) as refused:
            LabelQueue(home, CLASSES).import_label_studio(path)
        assert time.monotonic() - started < 5 and "\n" not in str(refused.value)
    assert LabelQueue(home, CLASSES).labels() == {}  # nothing at all was written

    for path, why in ((tmp_path / "unknown-samples.json", "not a checked sample in the store"),
                      (deep, "nested too deeply"), (tmp_path / "result-is-a-string.json", "not a list")):
        done = _import(fleet, path)  # the command: exit 2, one line, no traceback
        assert done.returncode == 2 and why in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_tasks(samples[:2])))
    done = _import(fleet, good)
    assert done.returncode == 0 and "took 2 labels" in done.stdout, done.stderr
    assert set(LabelQueue(home, CLASSES).labels()) == {s.sha256 for s in samples[:2]}


# ---- item 9: sidecar scores and names bounded; the page never waits on the store after its first load -------------
def test_out_of_range_scores_and_long_names_are_refused_at_intake(tmp_path, elpv_small):
    store = _store_with_samples(tmp_path / "store", elpv_small)
    folder = tmp_path / "store" / "samples" / "site-1"
    sidecars = sorted(folder.glob("*.json"))
    for path, change in zip(sidecars, ({"uncertainty": 1e308}, {"disagreement": -1.0},
                                       {"model_version": "v" * 20_000})):
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    collection = collect_samples(store)
    reasons = sorted(r["reason"] for r in collection.rejected)
    assert len(collection.accepted) == 1 and len(reasons) == 3
    assert any("uncertainty: Input should be less than or equal to 1" in r for r in reasons)
    assert any("disagreement: Input should be greater than or equal to 0" in r for r in reasons)
    assert any("model_version: String should have at most 256 characters" in r for r in reasons)


def test_the_page_answers_from_its_cache_while_the_store_is_read_again(tmp_path):
    from orchestrator.labelpage import CachedSamples

    calls = []

    def slow_load():
        calls.append(time.monotonic())
        if len(calls) > 1:
            time.sleep(1.5)  # a store with thousands of samples
        return [len(calls)]

    cached = CachedSamples(slow_load, ttl_s=0.2)
    assert cached() == [1]
    time.sleep(0.3)
    started = time.monotonic()
    # expired: answered at once from the cache, not after the 1.5 s reload, which goes on behind
    assert cached() == [1] and time.monotonic() - started < 1.0
    deadline = time.monotonic() + 15
    while (value := cached()) == [1] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert value == [2]  # the background load landed (and, expired again, the next one started)


# ---- item 8: search bounds, a trial's memory, a worker that dies -------------------------------------------------
@pytest.mark.parametrize("fields, why", [
    ({"space": {"lr": (1e30, 1e30)}}, "space.lr: lr (1e+30, 1e+30) is outside its range 1e-07..1"),
    ({"space": {"lr": (1e-320, 1e-320)}}, "space.lr: lr (9.99989e-321, 9.99989e-321) is outside its range"),
    ({"space": {"weight_decay": (1e-300, 1e300)}}, "space.weight_decay: weight_decay (1e-300, 1e+300) is outside "
                                                   "its range 1e-08..1"),
    ({"concurrency": 1_000_000}, "concurrency: Input should be less than or equal to 64 (its range: 1..64)"),
    ({"space": {"arch": ["tiny_cnn"] * 10_000}}, "space.arch: List should have at most 32 items"),
    ({"space": {"image_size": [4096]}}, "its range is 16..1024"),
    ({"halving": {"max_epochs": 10**6}}, "halving.max_epochs: Input should be less than or equal to 1000 (its "
                                         "range: 1..1000)"),
    ({"trial_memory_mb": 1}, "trial_memory_mb: Input should be greater than or equal to 64"),
])
def test_a_search_out_of_its_documented_range_is_refused_naming_the_field(fields, why):
    from pydantic import ValidationError

    from flows.tune import TuneSettings
    from orchestrator.tune import refusal

    with pytest.raises(ValidationError) as refused:
        TuneSettings.model_validate(fields)
    assert why in refusal(refused.value, TuneSettings)


def test_the_tune_command_refuses_out_of_range_knobs_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "edgeloop", "tune", "--data", str(tmp_path), "--concurrency",
                           "1000000", "--max-epochs", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "concurrency: Input should be less than or equal to 64 (its range: 1..64)" in done.stderr
    assert "halving.max_epochs: Input should be greater than or equal to 1 (its range: 1..1000)" in done.stderr


def test_a_trial_over_its_memory_budget_is_killed_and_recorded_failed(elpv_small, tmp_path):
    """The form's own maximum size (1024 px) grew a trial to 5 GB in 15 s: now it is killed at its budget, and a
    trial that fits trains beside it."""
    from orchestrator.tune import Trial, run_trial, trial_memory_budget

    params = {"lr": 1e-3, "weight_decay": 1e-4, "policy": "none", "arch": "tiny_cnn"}
    started = time.monotonic()
    big = run_trial(elpv_small / "generic", Trial(0, {**params, "image_size": 1024}), 0, 1, tmp_path, threads=1,
                    memory_mb=1500)
    assert big.error.startswith("killed: the trial held ") and "over its memory budget of 1500 MB" in big.error
    assert 1500 < big.peak_mb < 1500 + 400 and time.monotonic() - started < 120
    assert not Path(f"/proc/{big.process}").exists()  # gone, not left holding the memory
    small = run_trial(elpv_small / "generic", Trial(1, {**params, "image_size": 24}), 0, 1, tmp_path, threads=1)
    assert not small.error and 0 < small.peak_mb < trial_memory_budget(1) and small.val_acc >= 0


def _trial_processes(marker: str) -> list[int]:
    """This test's processes running ``marker`` (a trial's rung)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes() and ours(int(proc.name)):
                found.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_a_worker_killed_under_its_trial_is_a_failed_trial_not_a_failed_tune(prefect_harness, elpv_small, tmp_path):
    """A Dask worker killed (SIGKILL, as the OOM killer does) every time it runs trial 1: Dask tries the trial once
    more on a fresh worker, then trial 1 is recorded failed with why; its training process dies with its worker
    (no orphan), and the tune goes on to register the best of the others."""
    import signal
    import threading

    import dask
    from distributed import LocalCluster

    from flows.tune import TuneSettings, tune
    from orchestrator.tune import Halving, SearchSpace

    stop, kills = threading.Event(), []

    def kill_the_worker_of_trial_1():
        while not stop.is_set():
            for pid in _trial_processes("trial-001-rung-0"):
                try:
                    worker = parent_pid(pid)
                    if worker > 1 and worker != os.getpid() and worker not in kills:  # never init, never us
                        os.kill(worker, signal.SIGKILL)
                        kills.append(worker)
                except (OSError, ValueError, IndexError):
                    continue
            time.sleep(0.05)

    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(f"""
cloud: {{store_url: "file://{tmp_path / 'store'}", registry: "{tmp_path / 'registry'}"}}
defaults: {{connection: {{type: local}}}}
sites: [{{name: only, root: "{tmp_path / 'only'}"}}]
""")
    with dask.config.set({"distributed.scheduler.allowed-failures": 1, "distributed.scheduler.worker-saturation": 1.0}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        settings = TuneSettings(data=str(elpv_small / "generic"), family="tuned", trials=3, seed=0,
                                space=SearchSpace(arch=["tiny_cnn"], policy=["none"], image_size=[24]),
                                halving=Halving(min_epochs=1, max_epochs=1), dask_address=cluster.scheduler_address)
        killer = threading.Thread(target=kill_the_worker_of_trial_1, daemon=True)
        killer.start()
        try:
            result = tune(str(inventory), settings)
        finally:
            stop.set()
    assert len(kills) == 2  # its worker died under it twice
    from agent_helpers import latest_table

    rows = {int(r["trial"]): r for r in latest_table("tune-trials")}
    assert "its worker failed, not the trial" in rows[1]["error"] and "KilledWorker" in rows[1]["error"], rows[1]
    assert all(not rows[n]["error"] for n in (0, 2)), rows
    assert result["best_trial"]["trial"] != 1 and result["candidate"]
    time.sleep(1)
    assert _trial_processes("trial-001-rung-0") == []  # the trial died with its worker: nothing trains unseen
