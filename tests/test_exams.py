"""No exam leaves a site, and the rule fails closed: the cloud trains on no sample whose site's exam list does
not read, on no image (or near-copy of one) that a site published as its gate or test image, whatever its
sidecar claims; and no site can take another site's samples away for good."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_agent.datasets import open_dataset
from edge_agent.layout import AgentPaths
from edge_agent.sitedata import EXAM_SPLITS, SplitOf, exam_list, labelled_files
from edge_agent.store import Store
from orchestrator.collect import collect_new
from orchestrator.exams import MAX_EXAM_ENTRIES
from orchestrator.labelling import LabelQueue
from orchestrator.samples import OperatorLabels, build_retraining_set, collect_samples


def put_sample(store: Path, site: str, image: bytes, **sidecar) -> str:
    sha = hashlib.sha256(image).hexdigest()
    folder = store / "samples" / site
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{sha}.png").write_bytes(image)
    (folder / f"{sha}.json").write_text(json.dumps({"site": site, "time": 1.0, "reasons": ["operator_label"],
                                                    **sidecar}))
    return sha


def publish(store: Path, site: str, listed: dict) -> None:
    (store / "exams").mkdir(parents=True, exist_ok=True)
    (store / "exams" / f"{site}.json").write_text(json.dumps(listed))


@pytest.fixture
def site_one(tmp_path, elpv_small):
    """site-1's agent root with its labelled set, and its files by split."""
    site = open_dataset(elpv_small / "sites" / "site-1")
    paths = AgentPaths(tmp_path / "agent")
    paths.ensure()
    for record in site.records:
        target = paths.labelled / record["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((site.root / record["file"]).read_bytes())
    (paths.labelled / "manifest.json").write_bytes((site.root / "manifest.json").read_bytes())
    split_of = SplitOf(paths)
    by_split: dict[str, list[Path]] = {}
    for _, file in labelled_files(paths):
        by_split.setdefault(split_of(file), []).append(file)
    assert all(by_split.get(s) for s in ("train", "gate", "test")), {s: len(f) for s, f in by_split.items()}
    return paths, by_split


def _jpeg(data: bytes, quality: int = 70, size: int | None = None) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("L")
    if size:
        image = image.resize((size, size))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def test_a_hostile_sidecar_cannot_smuggle_an_exam_image_into_training(tmp_path, elpv_small, site_one):
    paths, by_split = site_one
    listed = exam_list(paths, "site-1")
    exam_files = by_split["gate"] + by_split["test"]
    assert {hashlib.sha256(f.read_bytes()).hexdigest() for f in exam_files} <= set(listed["sha256"])
    assert not {hashlib.sha256(f.read_bytes()).hexdigest() for f in by_split["train"]} & set(listed["sha256"])
    assert listed["site"] == "site-1" and len(listed["phash"]) >= len(exam_files)

    store = tmp_path / "store"
    publish(store, "site-1", listed)
    publish(store, "site-2", {"site": "site-2", "sha256": [], "phash": []})
    gate_image = by_split["gate"][0]
    smuggled = put_sample(store, "site-1", gate_image.read_bytes(), split="train",
                          operator_label=gate_image.parent.name)  # the sidecar lies
    via_other_site = put_sample(store, "site-2", by_split["test"][0].read_bytes(), split="train",
                                operator_label=by_split["test"][0].parent.name)
    honest = put_sample(store, "site-1", by_split["train"][0].read_bytes(), split="train",
                        operator_label=by_split["train"][0].parent.name)
    collection = collect_samples(Store(f"file://{store}"))
    assert [s.sha256 for s in collection.accepted] == [honest]
    held = {h["sample"].split("/")[1]: h for h in collection.held}
    assert held[smuggled]["kind"] == "exam" and "one of its exam images" in held[smuggled]["reason"]
    assert held[via_other_site]["kind"] == "conflict" and "site site-1" in held[via_other_site]["reason"]
    assert not collection.rejected

    generic = open_dataset(elpv_small / "generic")
    build_retraining_set(generic, collection.accepted, OperatorLabels(generic.classes), tmp_path / "retrain")
    trained = {r["sha256"] for r in open_dataset(tmp_path / "retrain").records}
    assert not trained & set(listed["sha256"]) and hashlib.sha256(by_split["train"][0].read_bytes()).hexdigest() in trained


def test_a_sample_whose_sidecar_says_gate_or_test_is_held(tmp_path, elpv_small):
    image = min((elpv_small / "sites" / "site-2").rglob("*.png")).read_bytes()
    store = tmp_path / "store"
    for split in EXAM_SPLITS:
        put_sample(store, f"site-{split}", image, split=split)
        publish(store, f"site-{split}", {"site": f"site-{split}", "sha256": [], "phash": []})
    collection = collect_samples(Store(f"file://{store}"))
    assert not collection.accepted and len(collection.held) == len(EXAM_SPLITS)
    assert all("split: never trained on" in h["reason"] for h in collection.held)


def test_near_copies_of_exam_images_are_held(tmp_path):
    """JPEG re-encoded (q70), resized, slightly cropped full-size cells: each still matches the exam's perceptual
    hash; distinct cells do not (bench/exam_copies.py measures both rates on the whole set)."""
    from elpv_dataset.utils import load_dataset

    from edge_agent.perceptual import file_phashes

    cells = load_dataset()[0]
    pngs = []
    for pixels in cells[:12]:
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "PNG")
        pngs.append(out.getvalue())
    exam, others = pngs[:6], pngs[6:]
    store = tmp_path / "store"
    publish(store, "site-1", {"site": "site-1", "sha256": [hashlib.sha256(d).hexdigest() for d in exam],
                              "phash": sorted({h for d in exam for h in file_phashes(d)})})
    copies = set()
    for data, pixels in zip(exam, cells[:6]):
        cropped = io.BytesIO()
        Image.fromarray(pixels[6:-6, 6:-6]).save(cropped, "PNG")
        for copy in (_jpeg(data), _jpeg(data, 90, size=200), cropped.getvalue()):
            copies.add(put_sample(store, "site-1", copy, split="train"))
    distinct = {put_sample(store, "site-1", data, split="train") for data in others}
    collection = collect_samples(Store(f"file://{store}"))
    held = {h["sample"].split("/")[1]: h["reason"] for h in collection.held}
    assert copies <= set(held), f"{len(copies - set(held))} of {len(copies)} copies got through"
    assert all("near-copy" in held[sha] for sha in copies)
    assert {s.sha256 for s in collection.accepted} == distinct


@pytest.mark.parametrize("problem", ["missing", "not json", "other site's name", "over the entry cap",
                                     "a bad hash", "a link"])
def test_a_site_whose_exam_list_does_not_read_has_its_samples_held_until_it_does(tmp_path, site_one, problem):
    paths, by_split = site_one
    store = tmp_path / "store"
    train = by_split["train"][0]
    sha = put_sample(store, "site-1", train.read_bytes(), split="train", operator_label=train.parent.name)
    listed = exam_list(paths, "site-1")
    target = store / "exams" / "site-1.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    if problem == "not json":
        target.write_text(json.dumps(listed)[:-40])
    elif problem == "other site's name":
        target.write_text(json.dumps({**listed, "site": "site-2"}))
    elif problem == "over the entry cap":
        target.write_text(json.dumps({**listed, "sha256": ["0" * 64] * (MAX_EXAM_ENTRIES + 1)}))
    elif problem == "a bad hash":
        target.write_text(json.dumps({**listed, "phash": ["zz"]}))
    elif problem == "a link":
        target.symlink_to("/dev/zero")
    home = tmp_path / "cloud"
    queue = LabelQueue(home, ["functional", "defective"])
    result = collect_new(Store(f"file://{store}"), home, queue, 0.95)
    assert not result.new and [h["sample"] for h in result.held] == [f"site-1/{sha}"]
    assert result.held[0]["kind"] == "held" and "site-1" in result.held[0]["reason"]
    assert not result.rejected, "a list that does not read must never quarantine the site's samples"
    assert result.by_site()[0]["held"] == 1

    target.unlink(missing_ok=True)
    publish(store, "site-1", listed)  # the list reads now: the sample is collected, nothing was lost
    again = collect_new(Store(f"file://{store}"), home, queue, 0.95)
    assert [s.sha256 for s in again.new] == [sha] and not again.held


def test_another_sites_list_holds_a_conflict_only_until_it_changes(tmp_path, site_one):
    """A site that lists another site's sample hashes keeps them out of training, and nothing more."""
    paths, by_split = site_one
    store = tmp_path / "store"
    publish(store, "site-1", exam_list(paths, "site-1"))
    shas = [put_sample(store, "site-1", f.read_bytes(), split="train", operator_label=f.parent.name)
            for f in by_split["train"][:5]]
    publish(store, "site-x", {"site": "site-x", "sha256": shas, "phash": []})
    home = tmp_path / "cloud"
    queue = LabelQueue(home, ["functional", "defective"])
    store_ = Store(f"file://{store}")
    first = collect_new(store_, home, queue, 0.95)
    assert not first.new and {h["kind"] for h in first.held} == {"conflict"} and len(first.held) == 5
    assert "site site-x" in first.held[0]["reason"] and not first.rejected
    publish(store, "site-x", {"site": "site-x", "sha256": [], "phash": []})
    second = collect_new(store_, home, queue, 0.95)
    assert sorted(s.sha256 for s in second.new) == sorted(shas) and not second.held


def test_exam_lists_are_parsed_once_per_change(tmp_path, site_one, monkeypatch):
    from orchestrator import exams

    paths, by_split = site_one
    store = tmp_path / "store"
    publish(store, "site-1", exam_list(paths, "site-1"))
    put_sample(store, "site-1", by_split["train"][0].read_bytes(), split="train")
    parsed = []
    real = exams.parse_exam_list
    monkeypatch.setattr(exams, "parse_exam_list", lambda data, site: parsed.append(site) or real(data, site))
    for _ in range(3):
        assert len(collect_samples(Store(f"file://{store}")).accepted) == 1
    assert parsed == ["site-1"]
