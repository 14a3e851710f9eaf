"""ONNX export, INT8, onnxruntime prediction and the edgeloop CLI, on real images and real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_agent.datasets import open_dataset
from edge_agent.onnx_model import OnnxClassifier, predict_files
from orchestrator.training import export_checkpoint, max_abs_difference, quantize_with_report

EDGELOOP = [sys.executable, "-m", "edgeloop"]


@pytest.fixture(scope="module")
def exported(tiny_base_model, tmp_path_factory) -> Path:
    return export_checkpoint(tiny_base_model, tmp_path_factory.mktemp("onnx") / "model.onnx", version="v-test")


def test_onnx_matches_pytorch_on_real_images(tiny_base_model, exported, elpv_small):
    images = open_dataset(elpv_small / "sites/site-1").load_split("train").images
    assert max_abs_difference(tiny_base_model, exported, images) <= 1e-4


def test_onnx_has_a_dynamic_batch_axis_and_metadata(exported, elpv_small):
    classifier = OnnxClassifier(exported)
    assert classifier.class_names == ["functional", "defective"] and classifier.image_size == 32
    assert classifier.version == "v-test"
    images = open_dataset(elpv_small / "generic").load_split("test").images
    for batch in (1, 7):
        probs = classifier.predict(images[:batch])
        assert probs.shape == (batch, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    props = {p.key for p in onnx.load(str(exported)).metadata_props}
    assert {"class_names", "image_size", "normalization", "version"} <= props


def test_int8_quantisation_reports_both_accuracies(exported, elpv_small, tmp_path):
    report = quantize_with_report(exported, tmp_path / "m.int8.onnx", elpv_small / "generic")
    assert 0 <= report["int8_accuracy"] <= 1 and 0 <= report["fp32_accuracy"] <= 1
    assert report["int8_bytes"] < report["fp32_bytes"]
    int8 = OnnxClassifier(tmp_path / "m.int8.onnx")
    assert int8.metadata["precision"] == "int8"
    images = open_dataset(elpv_small / "generic").load_split("test").images
    difference = np.abs(int8.predict(images) - OnnxClassifier(exported).predict(images))
    assert difference.mean() < 0.05  # 8-bit weights and activations: close to FP32, not equal


def test_predict_files_survives_corrupt_files(exported, elpv_small, tmp_path):
    good = sorted((elpv_small / "generic" / "defective").glob("*.png"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(good[0].read_bytes()[:80])
    results = list(predict_files(OnnxClassifier(exported), [good[0], broken, good[1], tmp_path / "nope.png", good[2]],
                                 batch_size=2))
    assert [("error" in r) for r in results] == [False, True, False, True, False]
    assert [Path(r["file"]).name for r in results] == [good[0].name, "broken.png", good[1].name, "nope.png",
                                                       good[2].name]
    assert "truncated" in results[1]["error"]


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*EDGELOOP, *args], capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_cli_import_train_export_predict(tmp_path):
    data = tmp_path / "data"
    imported = _cli("data", "import", "elpv", "--out", str(data), "--size", "32", "--sites", "1", "--limit", "60")
    assert "sites/site-1: dataset" in imported.stdout
    model = tmp_path / "model"
    trained = _cli("train", "--data", str(data / "generic"), "--arch", "tiny_cnn", "--epochs", "2",
                   "--batch-size", "8", "--out", str(model))
    assert "epoch   1/2" in trained.stdout and "epoch   2/2" in trained.stdout
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and len(metrics["history"]) == 2 and "seconds_per_epoch" in metrics
    exported = _cli("export", "--model", str(model), "--out", str(tmp_path / "m.onnx"), "--int8",
                    "--calibration", str(data / "sites/site-1"))
    report = json.loads(exported.stdout)
    assert report["max_abs_difference_vs_torch"] <= 1e-4 and "int8_accuracy" in report
    images = sorted((data / "sites/site-1").rglob("*.png"))[:2]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    predicted = _cli("predict", "--model", str(tmp_path / "m.onnx"), str(images[0]), str(corrupt), str(images[1]))
    lines = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert len(lines) == 3 and "error" in lines[1] and lines[0]["label"] in ("functional", "defective")
    only_bad = _cli("predict", "--model", str(tmp_path / "m.onnx"), str(corrupt), check=False)
    assert only_bad.returncode == 1 and "error" in json.loads(only_bad.stdout)


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    missing = _cli("data", "import", "folder", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    no_model = _cli("predict", "--model", str(tmp_path / "none.onnx"), "x.png", check=False)
    assert no_model.returncode == 2 and "no ONNX model" in no_model.stderr
