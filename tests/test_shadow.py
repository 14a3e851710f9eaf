"""A thin gate delays a decision, never the learning: a small site fine-tunes, the challenger its gate could not
accept waits in shadow, is scored beside what serves on production images (disagreements uploaded first), and
is judged again with the sequential test as gate labels come home, until it serves."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import deploy_base, serving_site, write_config

from edge_agent.activation import active_version
from edge_agent.config import load_config
from edge_agent.ensemble import export_ensemble
from edge_agent.finetune import run_finetune
from edge_agent.homelabels import HomeLabelsBook
from edge_agent.imaging import encode_png
from edge_agent.layout import AgentPaths
from edge_agent.models import ModelSpec, Normalization, build_model
from edge_agent.onnx_model import OnnxClassifier
from edge_agent.outbox import Outbox
from edge_agent.sampler import Sampler
from edge_agent.serving import classify
from edge_agent.shadow import ShadowScorer, rejudge, set_shadow, shadow_record
from edge_agent.state import AgentState

CLASSES = ["functional", "defective"]


def add_ensemble(paths: AgentPaths, version: str, seed: int) -> None:
    (paths.ensembles / version).mkdir(parents=True)
    spec = ModelSpec(arch="tiny_cnn", num_classes=2, image_size=32)
    export_ensemble([build_model(spec, seed=seed)], [Normalization()], [1.0], paths.ensembles / version / "ensemble.onnx",
                    image_size=32, class_names=CLASSES, metadata={"version": version})


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 32, 32), dtype=np.uint8)


def label_gate(paths: AgentPaths, pixels: np.ndarray, labels: list[str], start: int = 0) -> None:
    """Gate-role labels, as labels that came home with the gate role."""
    book = HomeLabelsBook(paths)
    records = book.records()
    for i, (image, label) in enumerate(zip(pixels, labels), start):
        data = encode_png(image)
        relative = f"{label}/home-{i:05d}.png"
        (paths.labelled / label).mkdir(parents=True, exist_ok=True)
        (paths.labelled / relative).write_bytes(data)
        records[relative] = {"sha256": hashlib.sha256(data).hexdigest(), "label": label, "role": "gate",
                             "source": "cloud:people"}
    for i, image in enumerate(images(12, 99)):  # a few train images, so the labelled set loads
        (paths.labelled / CLASSES[i % 2]).mkdir(parents=True, exist_ok=True)
        relative = f"{CLASSES[i % 2]}/home-train-{i:03d}.png"
        (paths.labelled / relative).write_bytes(encode_png(image))
        records[relative] = {"sha256": "", "label": CLASSES[i % 2], "role": "train", "source": "cloud:people"}
    book.save(records)


def predictions(paths: AgentPaths, version: str, pixels: np.ndarray) -> list[str]:
    return [p.label for p in classify(OnnxClassifier(paths.ensembles / version / "ensemble.onnx"), pixels)]


@pytest.fixture
def site_with_shadow(tmp_path):
    paths = serving_site(tmp_path / "agent", 32)  # v1 serves
    add_ensemble(paths, "v2", seed=7)
    set_shadow(paths, "v2", [], {"reason": "one-shot gate: could be noise"})
    config = load_config(write_config(paths.root, "file:///unused", thresholds={"alpha": 0.1}))
    return paths, config


def test_the_shadow_serves_once_the_labelled_disagreements_decide(site_with_shadow):
    """Gate labels that side with the shadow where the two disagree: the sequential test activates it."""
    paths, config = site_with_shadow
    pixels = images(400, 1)
    serving, shadow = predictions(paths, "v1", pixels), predictions(paths, "v2", pixels)
    discordant = [i for i in range(len(pixels)) if serving[i] != shadow[i]]
    assert len(discordant) >= 30, "the two random nets must disagree on enough images for this test"
    chosen = discordant[:3]
    label_gate(paths, pixels[chosen], [shadow[i] for i in chosen])
    first = rejudge(paths, config)
    assert first is not None and not first["accept"] and first["looks"] == 2 and active_version(paths) == "v1"
    more = discordant[3:40]
    label_gate(paths, pixels[more], [shadow[i] for i in more], start=100)
    second = rejudge(paths, config)
    assert second["accept"] and active_version(paths) == "v2" and shadow_record(paths) is None
    assert second["looks"] == 3 and "e" in second["reason"]


def test_a_shadow_no_better_than_what_serves_waits(site_with_shadow):
    """Labels that split the disagreements evenly: however often it looks, the shadow does not serve."""
    paths, config = site_with_shadow
    pixels = images(600, 2)
    serving, shadow = predictions(paths, "v1", pixels), predictions(paths, "v2", pixels)
    discordant = [i for i in range(len(pixels)) if serving[i] != shadow[i]]
    for look, start in enumerate(range(0, min(len(discordant), 60), 10)):
        batch = discordant[start:start + 10]
        label_gate(paths, pixels[batch], [(shadow if j % 2 else serving)[i] for j, i in enumerate(batch)],
                   start=1000 * (look + 1))
        decision = rejudge(paths, config)
        assert not decision["accept"] and active_version(paths) == "v1"
    assert shadow_record(paths)["looks"] == decision["looks"] > 2


def test_production_images_where_the_shadow_disagrees_go_up_first(site_with_shadow, tmp_path):
    paths, config = site_with_shadow
    config = config.model_copy(update={"upload": config.upload.model_copy(update={"random_share": 0.0})})
    outbox = Outbox(tmp_path / "outbox", 10**8)
    state = AgentState()
    import threading

    sampler = Sampler(config.model_copy(update={"thresholds": config.thresholds.model_copy(
        update={"uncertainty": 1.0, "disagreement": 1.0})}), outbox, state, threading.Lock(), shadow=ShadowScorer(paths))
    serving = OnnxClassifier(paths.ensembles / "v1" / "ensemble.onnx")
    pixels = images(60, 3)
    shadow = predictions(paths, "v2", pixels)
    for image, answer, label in zip(pixels, classify(serving, pixels), shadow):
        sampler(encode_png(image), answer, "cam.png")
    disagreeing = sum(a.label != s for a, s in zip(classify(serving, pixels), shadow))
    assert disagreeing and len(outbox) == disagreeing  # nothing else is informative at these thresholds
    sidecars = [item.read_sidecar() for item in outbox.items()]
    assert all(s["shadow"]["disagrees"] and "shadow_disagreement" in s["reasons"] for s in sidecars)
    assert state.shadow_scored["v2"] == [60, disagreeing]


def test_a_small_site_fine_tunes_and_its_challenger_waits_in_shadow(tmp_path, elpv_small, tiny_base_model):
    """40 labelled images (a handful of gate images): the members train; a challenger the one-shot gate cannot
    accept at a tiny alpha is published beside what serves and recorded as the shadow."""
    config = load_config(write_config(tmp_path / "agent", "file:///unused", thresholds={"alpha": 1e-9}))
    paths = AgentPaths(tmp_path / "agent")
    paths.ensure()
    deploy_base(paths.root, tiny_base_model, "v1")
    for file in sorted((elpv_small / "sites" / "site-1").glob("*/*.png"))[:40]:
        (paths.labelled / file.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, paths.labelled / file.parent.name / file.name)
    report = run_finetune(config, paths, "r1", "new base model v1", lambda: False)
    assert len(report["members"]) == 3 and not report.get("skipped")
    assert report["serving"] != "new" and report["shadow"] == report["version"]
    record = shadow_record(paths)
    assert record["version"] == report["version"] and (paths.ensembles / report["version"] / "ensemble.onnx").is_file()
    assert record["bases"] == ["v1"] and active_version(paths) != report["version"]
