"""Labels go home: a label given in the cloud reaches the site that sent the sample, through real store files,
is checked there, lands in the site's labelled set with a role by content hash, and an exam-role label never
reaches any training set. Hostile label files are refused with a reason and lose nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import AgentProcess, serving_site, wait_for, write_config

from edge_agent.datasets import open_dataset
from edge_agent.homelabels import (HOME_FILE, LABELS_KEY, MAX_ENTRIES, HomeLabelsBook, SentLog, role_by_hash,
                                   take_labels)
from edge_agent.imaging import encode_png
from edge_agent.layout import AgentPaths
from edge_agent.sitedata import SplitOf, exam_list, labelled_files
from edge_agent.store import Store
from orchestrator.labelhome import send_labels_home
from orchestrator.labelling import LabelQueue
from orchestrator.samples import OperatorLabels, build_retraining_set, collect_samples, first_label

CLASSES = ["functional", "defective"]
SHARES = {"train": 0.55, "val": 0.15, "gate": 0.15, "test": 0.15}


def upload(store: Path, site: str, seed: int) -> str:
    """A sample as an agent uploads it: image first, sidecar last."""
    image = encode_png(np.random.default_rng(seed).integers(0, 255, (32, 32), dtype=np.uint8))
    sha = hashlib.sha256(image).hexdigest()
    folder = store / "samples" / site
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{sha}.png").write_bytes(image)
    (folder / f"{sha}.json").write_text(json.dumps({"site": site, "time": 1.0, "reasons": ["uncertain"],
                                                    "sha256": sha}))
    return sha


@pytest.fixture
def site(tmp_path):
    paths = serving_site(tmp_path / "agent", 32)
    store = tmp_path / "store"
    shas = [upload(store, "site-1", seed) for seed in range(40)]
    sent = SentLog(paths.root / "sent.log")
    sent.add(set(shas))
    return paths, store, shas, sent


def take(paths, store, sent):
    return take_labels(Store(f"file://{store}"), paths, "site-1", CLASSES, sent, SHARES, 10**6)


def test_people_labels_come_home_with_a_role_by_hash_and_their_provenance(tmp_path, site):
    paths, store, shas, sent = site
    queue = LabelQueue(tmp_path / "cloud", CLASSES)
    for i, sha in enumerate(shas):
        queue.set(sha, CLASSES[i % 2], by="web")
    home = send_labels_home(Store(f"file://{store}"), queue)
    assert home.rows == [{"site": "site-1", "people's labels": 40, "pseudo-labels": 0, "written": True}]
    assert not send_labels_home(Store(f"file://{store}"), queue).changed  # unchanged: not rewritten

    report = take(paths, store, sent)
    assert (report.taken, report.refused, report.error) == (40, [], None)
    split_of, roles = SplitOf(paths), {}
    for class_name, file in labelled_files(paths):
        sha = hashlib.sha256(file.read_bytes()).hexdigest()
        assert CLASSES[shas.index(sha) % 2] == class_name
        roles[sha] = split_of(file)
        assert roles[sha] == role_by_hash(sha, SHARES)
    assert set(roles.values()) == {"train", "val", "gate", "test"}, roles  # every split grows
    records = json.loads((paths.labelled / HOME_FILE).read_text())
    assert {r["by"] for r in records.values()} == {"web"} and {r["source"] for r in records.values()} == {"cloud:people"}
    exams = set(exam_list(paths, "site-1")["sha256"])
    assert {sha for sha, role in roles.items() if role in ("gate", "test")} <= exams
    assert not {sha for sha, role in roles.items() if role in ("train", "val")} & exams

    assert take(paths, store, sent).taken == 0  # nothing new: nothing fetched again
    queue.set(shas[0], "defective" if CLASSES[0] == "functional" else "functional", by="web")
    send_labels_home(Store(f"file://{store}"), queue)
    again = take(paths, store, sent)
    assert (again.taken, again.relabelled) == (0, 1)
    moved = [f for c, f in labelled_files(paths) if hashlib.sha256(f.read_bytes()).hexdigest() == shas[0]]
    assert len(moved) == 1 and moved[0].parent.name == "defective" and split_of(moved[0]) == roles[shas[0]]


def test_an_exam_role_label_never_reaches_a_training_set(tmp_path, site, elpv_small):
    """The site files it as gate or test, publishes its hash, and the cloud holds the sample from then on."""
    paths, store, shas, sent = site
    queue = LabelQueue(tmp_path / "cloud", CLASSES)
    for sha in shas:
        queue.set(sha, "defective", by="web")
    send_labels_home(Store(f"file://{store}"), queue)
    take(paths, store, sent)
    exam = {sha for sha in shas if role_by_hash(sha, SHARES) in ("gate", "test")}
    assert exam, "the fixture's 40 samples give the gate and test roles some"
    (store / "exams").mkdir(exist_ok=True)
    (store / "exams" / "site-1.json").write_text(json.dumps(exam_list(paths, "site-1")))
    collection = collect_samples(Store(f"file://{store}"))
    assert {h["sample"].split("/")[1] for h in collection.held} == exam
    generic = open_dataset(elpv_small / "generic")
    build_retraining_set(generic, collection.accepted, first_label(OperatorLabels(CLASSES), queue), tmp_path / "r")
    trained = {r["sha256"] for r in open_dataset(tmp_path / "r").records}
    assert not trained & exam and (set(shas) - exam) <= trained


def test_pseudo_labels_are_kept_apart_and_only_ever_train(tmp_path, site):
    paths, store, shas, sent = site
    queue = LabelQueue(tmp_path / "cloud", CLASSES)
    for sha in shas:
        queue.set(sha, "functional", by="pseudo")
    rows = send_labels_home(Store(f"file://{store}"), queue).rows
    assert rows[0]["pseudo-labels"] == 40 and rows[0]["people's labels"] == 0
    report = take(paths, store, sent)
    train = [sha for sha in shas if role_by_hash(sha, SHARES) == "train"]
    assert report.taken == len(train) < len(shas)
    split_of = SplitOf(paths)
    assert {split_of(f) for _, f in labelled_files(paths)} == {"train"}
    assert {r["source"] for r in HomeLabelsBook(paths).records().values()} == {"cloud:pseudo"}
    assert not exam_list(paths, "site-1")["sha256"], "a model's guess is never exam evidence"


@pytest.mark.parametrize("hostile", ["another site's file", "a million entries", "not json", "a link to /dev/zero",
                                     "a list of labels that is a string"])
def test_a_hostile_labels_file_is_refused_whole_and_loses_nothing(tmp_path, site, hostile):
    paths, store, shas, sent = site
    queue = LabelQueue(tmp_path / "cloud", CLASSES)
    queue.set(shas[0], "defective", by="web")
    send_labels_home(Store(f"file://{store}"), queue)
    assert take(paths, store, sent).taken == 1
    before = sorted(str(f) for _, f in labelled_files(paths)), (paths.labelled / HOME_FILE).read_bytes()
    target = store / LABELS_KEY.format(site="site-1")
    good = [{"sha256": sha, "label": "functional", "by": "web", "time": 1.0} for sha in shas[1:]]
    target.unlink()
    if hostile == "another site's file":
        target.write_text(json.dumps({"site": "site-2", "labels": good}))
    elif hostile == "a million entries":
        target.write_text(json.dumps({"site": "site-1", "labels": [good[0]] * (MAX_ENTRIES + 1)}))
    elif hostile == "not json":
        target.write_text(json.dumps({"site": "site-1", "labels": good})[:-30])
    elif hostile == "a link to /dev/zero":
        target.symlink_to("/dev/zero")
    else:
        target.write_text(json.dumps({"site": "site-1", "labels": "x"}))
    report = take(paths, store, sent)
    assert report.taken == 0 and report.error and report.error.startswith("labels file refused")
    assert (sorted(str(f) for _, f in labelled_files(paths)), (paths.labelled / HOME_FILE).read_bytes()) == before


def test_bad_entries_are_refused_one_by_one_with_a_reason(tmp_path, site):
    paths, store, shas, sent = site
    foreign = upload(store, "site-2", 999)  # in the store, but site-2 sent it
    unsent = upload(store, "site-1", 1000)  # under site-1's path, but this agent never sent it
    tampered = upload(store, "site-1", 1001)
    sent.add({tampered})
    (store / "samples" / "site-1" / f"{tampered}.png").write_bytes(b"\x89PNG not the same bytes")
    entries = [{"sha256": shas[0], "label": "functional", "by": "web", "time": 1.0},
               {"sha256": shas[1], "label": "cracked", "by": "web", "time": 1.0},
               {"sha256": "f" * 63, "label": "functional"},
               {"sha256": foreign, "label": "functional"},
               {"sha256": unsent, "label": "functional"},
               {"sha256": tampered, "label": "functional"},
               {"sha256": shas[2], "label": "functional", "time": float("inf")},
               "not an entry"]
    (store / "labels").mkdir()
    (store / LABELS_KEY.format(site="site-1")).write_text(json.dumps({"site": "site-1", "labels": entries}))
    report = take(paths, store, sent)
    reasons = {r["sample"]: r["reason"] for r in report.refused}
    assert report.taken == 1 and len(report.refused) == 7
    assert "unknown class 'cracked'" in reasons[shas[1]]
    assert reasons[foreign] == reasons[unsent] == "not a sample this site sent"
    assert "does not hash to its name" in reasons[tampered]
    assert "time is not a number" in reasons[shas[2]]


def test_a_real_agent_takes_labels_home_and_owes_a_fine_tune(tmp_path, tiny_base_model):
    """The daemon: samples it uploads are labelled in the cloud; the labels come home, are counted in its status
    and toward a fine-tune, and the exam-role ones appear in the exam list it publishes."""
    store = tmp_path / "store"
    root = tmp_path / "agent"
    serving_site(root, 32)
    config = write_config(root, f"file://{store}", thresholds={"min_new_labelled": 5, "uncertainty": 0.0},
                          upload={"random_share": 1.0}, home_labels={"poll_s": 0.5})
    agent = AgentProcess(config)
    try:
        for seed in range(30):
            (root / "data" / "inbox" / f"cam-{seed:03d}.png").write_bytes(
                encode_png(np.random.default_rng(seed).integers(0, 255, (32, 32), dtype=np.uint8)))
        wait_for(lambda: len(list((store / "samples" / "site-1").glob("*.json"))) >= 30, 90, "uploads", agent)
        wait_for(lambda: (root / "sent.log").exists() and len((root / "sent.log").read_text().split()) >= 30, 30,
                 "the sent log", agent)
        queue = LabelQueue(tmp_path / "cloud", CLASSES)
        shas = sorted(p.stem for p in (store / "samples" / "site-1").glob("*.png"))
        for i, sha in enumerate(shas):
            queue.set(sha, CLASSES[i % 2], by="web")
        send_labels_home(Store(f"file://{store}"), queue)
        status = wait_for(lambda: (s := agent.status()) and s["labels_home"]["taken"] == len(shas) and s, 60,
                          "labels to come home", agent)
        assert status["labels_home"]["refused"] == 0
        exam = {sha for sha in shas if role_by_hash(sha, SHARES) in ("gate", "test")}
        published = wait_for(lambda: (p := store / "exams" / "site-1.json").exists() and
                             exam <= set(json.loads(p.read_text())["sha256"]) and p, 30, "the exam list", agent)
        assert json.loads(published.read_text())["site"] == "site-1"
        assert len(list(AgentPaths(root).labelled.rglob("home-*.png"))) == len(shas)
        wait_for(lambda: "new labelled images" in agent.tail(200), 30, "a fine-tune owed", agent)
    finally:
        agent.close()


def test_disagreements_with_the_shadow_head_the_labelling_queue(tmp_path):
    """A labelled disagreement decides the waiting challenger, so people see those first."""
    from orchestrator.samples import Sample

    def sample(i: int, uncertainty: float, shadow: dict | None) -> Sample:
        sidecar = {"site": "site-1", "time": float(i), "reasons": ["uncertain"], "uncertainty": uncertainty}
        return Sample(f"{i:064x}", "site-1", b"", {**sidecar, **({"shadow": shadow} if shadow else {})})

    samples = [sample(1, 0.99, None), sample(2, 0.1, {"version": "v2", "label": "defective", "disagrees": True}),
               sample(3, 0.5, {"version": "v2", "label": "functional", "disagrees": False})]
    order = [p.sha256 for p in LabelQueue(tmp_path / "cloud", CLASSES).pending(samples)]
    assert order == [samples[1].sha256, samples[0].sha256, samples[2].sha256]
