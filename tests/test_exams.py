"""No exam leaves a site: the cloud refuses any sample whose hash a site published as its gate or test image,
whatever its sidecar claims, so no retraining set ever holds one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edge_agent.datasets import open_dataset
from edge_agent.layout import AgentPaths
from edge_agent.sitedata import EXAM_SPLITS, SplitOf, exam_hashes, labelled_files
from edge_agent.store import Store
from orchestrator.samples import OperatorLabels, build_retraining_set, collect_samples


def put_sample(store: Path, site: str, image: bytes, **sidecar) -> str:
    sha = hashlib.sha256(image).hexdigest()
    folder = store / "samples" / site
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{sha}.png").write_bytes(image)
    (folder / f"{sha}.json").write_text(json.dumps({"site": site, "time": 1.0, "reasons": ["operator_label"],
                                                    **sidecar}))
    return sha


def test_a_hostile_sidecar_cannot_smuggle_an_exam_image_into_training(tmp_path, elpv_small):
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
    hashes = exam_hashes(paths)
    exam_files = by_split["gate"] + by_split["test"]
    assert {hashlib.sha256(f.read_bytes()).hexdigest() for f in exam_files} <= set(hashes)
    assert not {hashlib.sha256(f.read_bytes()).hexdigest() for f in by_split["train"]} & set(hashes)

    store = tmp_path / "store"
    (store / "exams").mkdir(parents=True)
    (store / "exams" / "site-1.json").write_text(json.dumps({"site": "site-1", "sha256": hashes}))
    gate_image = by_split["gate"][0]
    smuggled = put_sample(store, "site-1", gate_image.read_bytes(), split="train",
                          operator_label=gate_image.parent.name)  # the sidecar lies
    via_other_site = put_sample(store, "site-2", by_split["test"][0].read_bytes(), split="train",
                                operator_label=by_split["test"][0].parent.name)
    honest = put_sample(store, "site-1", by_split["train"][0].read_bytes(), split="train",
                        operator_label=by_split["train"][0].parent.name)
    collection = collect_samples(Store(f"file://{store}"))
    assert [s.sha256 for s in collection.accepted] == [honest]
    reasons = {r["sample"].split("/")[1]: r["reason"] for r in collection.rejected}
    assert "an exam image of site site-1" in reasons[smuggled] and "never trained on" in reasons[via_other_site]

    generic = open_dataset(elpv_small / "generic")
    build_retraining_set(generic, collection.accepted, OperatorLabels(generic.classes), tmp_path / "retrain")
    trained = {r["sha256"] for r in open_dataset(tmp_path / "retrain").records}
    assert not trained & set(hashes) and hashlib.sha256(by_split["train"][0].read_bytes()).hexdigest() in trained


def test_a_sample_whose_sidecar_says_gate_or_test_is_refused(tmp_path, elpv_small):
    image = min((elpv_small / "sites" / "site-2").rglob("*.png")).read_bytes()
    store = tmp_path / "store"
    for split in EXAM_SPLITS:
        put_sample(store, f"site-{split}", image, split=split)
    collection = collect_samples(Store(f"file://{store}"))
    assert not collection.accepted and len(collection.rejected) == len(EXAM_SPLITS)
    assert all("split: never trained on" in r["reason"] for r in collection.rejected)
