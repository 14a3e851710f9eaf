"""Dataset versions: real ELPV images, real files, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_agent.datasets import DatasetError, import_elpv, import_folder, open_dataset
from edge_agent.layout import AgentPaths
from edge_agent.sitedata import load_labelled


def _files(root: Path) -> set[str]:
    return {r["source_file"] for r in open_dataset(root).records}


def test_elpv_sites_are_disjoint_stratified_and_complete(elpv_small):
    parts = [elpv_small / "generic", elpv_small / "sites/site-1", elpv_small / "sites/site-2"]
    sources = [_files(p) for p in parts]
    assert all(a.isdisjoint(b) for i, a in enumerate(sources) for b in sources[i + 1:])
    assert sum(len(s) for s in sources) >= 110  # limit=120, minus rounding per stratum
    generic = open_dataset(parts[0])
    assert generic.classes == ["functional", "defective"]
    for split in ("train", "val", "test"):  # stratified: both classes in every split of the pool
        assert set(generic.counts()[split]) == {"functional", "defective"}
    record = generic.records[0]
    assert set(record) >= {"file", "sha256", "label", "split", "source_probability", "cell_type"}
    assert record["label"] == int(record["source_probability"] >= 0.5)
    with Image.open(generic.root / record["file"]) as image:
        assert image.size == (32, 32) and image.mode == "L"


def test_same_inputs_and_seed_give_the_same_id(tmp_path, elpv_small):
    again = import_elpv(tmp_path / "a", size=32, sites=2, limit=120)
    assert again.children[1].dataset_id == open_dataset(elpv_small / "sites/site-1").id
    other_seed = import_elpv(tmp_path / "b", size=32, sites=2, limit=120, seed=1)
    assert other_seed.dataset_id != again.dataset_id


def test_load_split_decodes_into_memory(elpv_small):
    dataset = open_dataset(elpv_small / "generic")
    train = dataset.load_split("train")
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (32, 32)
    assert len(train) == len(dataset.files("train")) and set(train.labels) == {0, 1}


def _user_tree(src: Path, elpv_small: Path) -> None:
    generic = open_dataset(elpv_small / "generic")
    for record in generic.records[:24]:
        target = src / ("ok" if record["label"] == 0 else "crack") / Path(record["file"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(generic.root / record["file"], target)
    for cls in ("ok", "crack"):
        (src / cls).mkdir(exist_ok=True)
    good = next((src / "ok").iterdir())
    (src / "ok" / "truncated.png").write_bytes(good.read_bytes()[:100])
    (src / "crack" / "garbage.jpg").write_bytes(b"not an image at all")


def test_import_folder_skips_bad_images_with_reasons(tmp_path, elpv_small):
    src = tmp_path / "src"
    _user_tree(src, elpv_small)
    report = import_folder(src, tmp_path / "out", size=48)
    reasons = {Path(s["file"]).name: s["reason"] for s in report.skipped}
    assert set(reasons) == {"truncated.png", "garbage.jpg"}
    assert "truncated" in reasons["truncated.png"] and "not an image" in reasons["garbage.jpg"]
    written = json.loads((tmp_path / "out" / "import_report.json").read_text())
    assert len(written["skipped"]) == 2
    dataset = open_dataset(tmp_path / "out")
    assert dataset.classes == ["crack", "ok"] and dataset.image_size == 48
    assert dataset.id == report.dataset_id


def test_import_folder_clear_errors(tmp_path, elpv_small):
    with pytest.raises(DatasetError, match="does not exist"):
        import_folder(tmp_path / "nowhere", tmp_path / "out")
    src = tmp_path / "src"
    _user_tree(src, elpv_small)
    (src / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images: empty"):
        import_folder(src, tmp_path / "out")


def test_open_dataset_rejects_a_plain_folder(tmp_path):
    with pytest.raises(DatasetError, match="not a dataset version"):
        open_dataset(tmp_path)


def test_a_sites_labelled_folder_reports_unusable_files(tmp_path, elpv_small):
    paths = AgentPaths(tmp_path / "site")
    src = paths.labelled
    _user_tree(src, elpv_small)
    (src / "weird").mkdir()
    shutil.copy(next((src / "ok").glob("cell*.png")), src / "weird" / "x.png")
    arrays, files, skipped = load_labelled(paths, ["ok", "crack"], 32)
    assert len(arrays) == len(files) == 24 and arrays.images.shape[1:] == (32, 32)
    assert {p.name for p, _ in skipped} == {"truncated.png", "garbage.jpg", "x.png"}


def test_val_is_halved_into_val_and_gate_the_same_way_in_the_cloud_and_at_the_edge(elpv_small, tmp_path):
    """What chooses (val) never decides (gate): disjoint halves by content hash, stable, and the same halves
    whether the cloud opens the dataset version or an edge site finds its files in its labelled folder."""
    from edge_agent.sitedata import _split_of

    dataset = open_dataset(elpv_small / "generic")
    val, gate = dataset.files("val"), dataset.files("gate")
    whole = [r for r in dataset.records if r["split"] == "val"]
    assert val and gate and {r["file"] for r in val} | {r["file"] for r in gate} == {r["file"] for r in whole}
    assert not {r["file"] for r in val} & {r["file"] for r in gate}
    assert len(dataset.load_split("gate")) == len(gate)
    for record in whole:
        data = (dataset.root / record["file"]).read_bytes()
        expected = "gate" if record in gate else "val"
        assert _split_of(data, "val") == expected
    assert {_split_of((dataset.root / r["file"]).read_bytes(), "test") for r in dataset.files("test")} == {"test"}
