"""What serves a site: the base as-is is always a candidate, the gate split decides, the test split never
does, and INT8 serves only within 0.5 points of FP32 on the val split (never chosen on the gate)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edge_agent.activation import activate
from edge_agent.candidates import choose_precision, int8_serves, stage_base_as_is
from edge_agent.config import AgentConfig
from edge_agent.datasets import ArraySet, open_dataset
from edge_agent.finetune import choose_serving
from edge_agent.layout import AgentPaths
from edge_agent.onnx_model import OnnxClassifier
from edge_agent.serving import ENSEMBLE_FILE

SIZE = 32


@pytest.mark.parametrize("fp32, int8, serves", [(0.900, 0.900, True), (0.900, 0.8951, True), (0.900, 0.895, True),
                                                 (0.900, 0.8949, False), (0.900, 0.91, True)])
def test_the_half_point_int8_rule(fp32, int8, serves):
    assert int8_serves(fp32, int8, 0.005) is serves


@pytest.fixture
def site(tmp_path, elpv_small, tiny_base_model):
    """A site with the cloud's base model, its own splits, and a 'new' ensemble that learnt nothing."""
    from edge_agent.ensemble import export_ensemble
    from edge_agent.models import ModelSpec, Normalization, build_model

    config = AgentConfig(site="s", root=tmp_path / "site", store_url="file:///unused", image_size=SIZE)
    paths = AgentPaths(config.root)
    paths.ensure()
    data = open_dataset(elpv_small / "sites" / "site-1")
    train, val, test = (data.load_split(s) for s in ("train", "val", "test"))
    gate = ArraySet(np.concatenate([val.images, train.images]), np.concatenate([val.labels, train.labels]))
    splits = {"train": train, "val": val, "gate": gate, "test": test}
    base_folder, _ = stage_base_as_is(config, paths, "v1", tiny_base_model, ["functional", "defective"])
    bad = paths.ensembles / ".tmp-bad"
    bad.mkdir()
    spec = ModelSpec(arch="tiny_cnn", num_classes=2, image_size=SIZE)
    worse = build_model(spec, seed=7)
    with __import__("torch").no_grad():
        worse[-1].bias.copy_(__import__("torch").tensor([-5.0, 5.0]))  # says "defective" for everything
    export_ensemble([worse], [Normalization()], [1.0], bad / ENSEMBLE_FILE, image_size=SIZE,
                    class_names=["functional", "defective"], metadata={"version": "bad"})
    return config, paths, splits, base_folder, bad


def test_the_base_keeps_serving_when_the_new_ensemble_is_worse_and_the_test_split_decides_nothing(site):
    config, paths, splits, base_folder, bad = site
    first = choose_serving(config, paths, splits, {"base": base_folder, "new": bad})
    assert first["chosen"] == "base" and set(first["results"]) == {"base", "new"}
    assert first["results"]["base"]["gate"]["accuracy"] > first["results"]["new"]["gate"]["accuracy"]

    rng = np.random.default_rng(0)
    scrambled = ArraySet(rng.integers(0, 255, splits["test"].images.shape, dtype=np.uint8),
                         1 - splits["test"].labels)  # a test split that would favour anything else
    again = choose_serving(config, paths, {**splits, "test": scrambled}, {"base": base_folder, "new": bad})
    assert (again["chosen"], again["decision"]) == (first["chosen"], first["decision"])
    assert again["results"]["base"]["test"] != first["results"]["base"]["test"]  # test was scored, not used

    published = paths.ensembles / "base-v1"
    shutil.move(base_folder, published)
    activate(paths, "base-v1")  # now the base serves: a worse new ensemble does not replace it
    later = choose_serving(config, paths, splits, {"base": published, "new": bad})
    assert later["chosen"] == "active" and later["version"] == "base-v1"


def test_int8_serves_within_the_rule_and_is_refused_beyond_it(site, monkeypatch):
    config, paths, splits, base_folder, bad = site
    checked = splits["train"]  # stands in for val here (this small site's val split has 2 images)
    within = choose_precision(base_folder, splits["train"].images, checked, 0.005, SIZE)
    if within["serving"] == "int8":  # the real quantiser kept the accuracy: INT8 now serves, FP32 kept aside
        assert OnnxClassifier(base_folder / ENSEMBLE_FILE).metadata["precision"] == "int8"
        assert (base_folder / "ensemble.fp32.onnx").is_file()
        assert within["val_int8"] >= within["val_fp32"] - 0.005
    else:
        assert within["val_int8"] < within["val_fp32"] - 0.005

    import edge_agent.export as export

    folder = paths.ensembles / "fresh"
    folder.mkdir()
    fp32 = base_folder / "ensemble.fp32.onnx"
    shutil.copy(fp32 if fp32.exists() else base_folder / ENSEMBLE_FILE, folder / ENSEMBLE_FILE)
    before = (folder / ENSEMBLE_FILE).read_bytes()
    # a quantiser that loses accuracy (it hands back the model that learnt nothing)
    monkeypatch.setattr(export, "quantize_int8", lambda src, out, calibration: shutil.copy(bad / ENSEMBLE_FILE, out))
    refused = choose_precision(folder, splits["train"].images, checked, 0.005, SIZE)
    assert refused["serving"] == "fp32" and refused["val_int8"] < refused["val_fp32"] - 0.005
    assert (folder / ENSEMBLE_FILE).read_bytes() == before and not (folder / "ensemble.int8.onnx").exists()


def test_a_resnet_ensemble_quantises_and_its_int8_graph_passes_the_serving_check(tmp_path):
    """INT8 probabilities come out in 1/255 steps; the serving check must not take them for a broken graph
    (it did, and every ResNet ensemble silently stayed FP32: bench/loop.py showed no INT8 figure)."""
    from edge_agent.datasets import ArraySet
    from edge_agent.ensemble import export_ensemble
    from edge_agent.models import ModelSpec, Normalization, build_model

    spec = ModelSpec(arch="resnet18", num_classes=2, image_size=32)
    export_ensemble([build_model(spec, seed=i) for i in range(2)], [Normalization()] * 2, [0.5, 0.5],
                    tmp_path / "ensemble.onnx", image_size=32, class_names=["functional", "defective"],
                    metadata={"version": "r"})
    rng = np.random.default_rng(0)
    images = ArraySet(rng.integers(0, 255, (24, 32, 32), dtype=np.uint8), rng.integers(0, 2, 24))
    result = choose_precision(tmp_path, images.images, images, 1.0, 32, test=images)
    assert result["val_int8"] is not None and result["serving"] == "int8", result["reason"]
    assert result["test_int8"] is not None and result["test_fp32"] is not None
