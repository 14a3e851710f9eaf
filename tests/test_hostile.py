"""A hostile or careless environment, fuzzed: malformed images of every format Pillow knows, special files,
and bad sidecars go through the real inbox and the real sample intake. The agent stays up, every bad file
is quarantined or rejected with a reason, and good files queued behind bad ones are classified."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_agent.activation import activate
from edge_agent.inbox import InboxProcessor
from edge_agent.layout import AgentPaths
from edge_agent.serving import EnsembleHandle
from edge_agent.store import Store
from orchestrator.samples import collect_samples

SIZE = 32


@pytest.fixture(scope="module")
def ensemble_file(tmp_path_factory) -> Path:
    """A real fused ensemble graph (two untrained tiny CNNs): what an agent serves."""
    from edge_agent.ensemble import export_ensemble
    from edge_agent.models import ModelSpec, Normalization, build_model

    spec = ModelSpec(arch="tiny_cnn", num_classes=2, image_size=SIZE)
    path = tmp_path_factory.mktemp("ensemble") / "ensemble.onnx"
    return export_ensemble([build_model(spec, seed=i) for i in range(2)], [Normalization()] * 2, [0.5, 0.5], path,
                           image_size=SIZE, class_names=["functional", "defective"], metadata={"version": "good"})


def serve(root: Path, ensemble: Path, version: str = "v1", data: bytes | None = None) -> AgentPaths:
    paths = AgentPaths(root)
    paths.ensure()
    folder = paths.ensembles / version
    folder.mkdir(parents=True)
    (folder / "ensemble.onnx").write_bytes(data if data is not None else ensemble.read_bytes())
    activate(paths, version)
    return paths


def good_png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def saved_formats() -> dict[str, bytes]:
    """One small image in every format this Pillow can write."""
    found = {}
    for name in sorted(Image.SAVE):
        image = Image.fromarray(np.full((24, 24), 128, np.uint8)).convert("RGB" if name not in ("XBM",) else "1")
        out = io.BytesIO()
        try:
            image.save(out, format=name)
        except Exception:  # a format that needs a plugin or a mode we did not give it
            continue
        if out.getvalue():
            found[name] = out.getvalue()
    return found


def corruptions(data: bytes, rng: random.Random) -> list[bytes]:
    flipped = bytearray(data)
    for _ in range(max(1, len(data) // 20)):
        flipped[rng.randrange(len(flipped))] ^= 0xFF
    return [data[:len(data) // 2], data[:16], bytes(flipped), data[:8] + os.urandom(64), data + os.urandom(32)[:0]
            if len(data) < 8 else data[:-4]]


def crafted() -> dict[str, bytes]:
    """Files that made Pillow raise outside its usual errors, and a canvas bomb."""
    header = bytearray(124)
    struct.pack_into("<IIIIIII", header, 0, 124, 0x1007, 4, 4, 0, 0, 0)
    struct.pack_into("<II4s", header, 72, 32, 0x4, b"ZZZZ")
    bomb = io.BytesIO()
    Image.new("1", (1, 1)).save(bomb, "PNG")
    png = bytearray(bomb.getvalue())
    struct.pack_into(">II", png, 16, 60000, 60000)  # IHDR width/height: a 3.6 gigapixel canvas in ~70 bytes
    struct.pack_into(">I", png, 29, zlib.crc32(bytes(png[12:29])))
    return {"unimplemented.dds": b"DDS " + bytes(header) + bytes(64), "bomb.png": bytes(png),
            "blp.blp": b"BLP1" + bytes(64), "empty.png": b"", "text.jpg": b"hello"}


def test_fuzzed_images_and_special_files_never_stall_the_inbox(tmp_path, ensemble_file):
    paths = serve(tmp_path / "site", ensemble_file)
    inbox, rng = paths.inbox, random.Random(0)
    bad: dict[str, bytes] = dict(crafted())
    for fmt, data in saved_formats().items():
        for i, broken in enumerate(corruptions(data, rng)):
            bad[f"{fmt.lower()}-{i}.img"] = broken
    good = {f"good-{i}.png": good_png(i) for i in range(6)}
    order = list(bad.items())
    for i, (name, data) in enumerate(order):  # bad files first (oldest), good ones queued behind them
        (inbox / name).write_bytes(data)
        os.utime(inbox / name, (1000 + i, 1000 + i))
    for name, data in good.items():
        (inbox / name).write_bytes(data)
    outside = tmp_path / "secret.png"
    outside.write_bytes(good_png(99))
    (inbox / "link.png").symlink_to(outside)
    os.mkfifo(inbox / "fifo.png")
    (inbox / "folder.png").mkdir()

    selected = []
    processor = InboxProcessor(paths, EnsembleHandle(paths.active_link, image_size=SIZE), 1_000_000,
                               lambda raw, prediction, name: selected.append(name))
    for _ in range(10):
        processor.process()
        if not any(inbox.iterdir()):
            break
    assert not any(inbox.iterdir()), sorted(p.name for p in inbox.iterdir())
    results = [json.loads(line) for line in (paths.processed / "results.jsonl").read_text().splitlines()]
    classified = {r["file"] for r in results}
    assert set(good) <= classified
    quarantined = {p.name.removesuffix(".reason.json") for p in paths.quarantine.glob("*.reason.json")}
    assert {"link.png", "fifo.png", "folder.png", "unimplemented.dds", "bomb.png", "empty.png",
            "text.jpg"} <= quarantined
    assert quarantined | classified == set(bad) | set(good) | {"link.png", "fifo.png", "folder.png"}
    reasons = {p.name: json.loads(p.read_text())["reason"] for p in paths.quarantine.glob("*.reason.json")}
    assert "symbolic link" in reasons["link.png.reason.json"]
    assert "not a regular file" in reasons["fifo.png.reason.json"]
    assert "pixels" in reasons["bomb.png.reason.json"]
    assert "link.png" not in selected and outside.read_bytes() == good_png(99)  # never read, never uploaded
    assert (paths.quarantine / "link.png").is_symlink()  # the link moved, not its target


def put_sample(store: Path, site: str, image: bytes, sidecar: bytes, name: str | None = None) -> str:
    sha = name or hashlib.sha256(image).hexdigest()
    folder = store / "samples" / site
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{sha}.png").write_bytes(image)
    (folder / f"{sha}.json").write_bytes(sidecar)
    return sha


def test_fuzzed_sidecars_are_rejected_alone_and_good_samples_still_come_in(tmp_path):
    store = tmp_path / "store"
    good = {"site": "a", "time": 1.0, "reasons": ["uncertain"], "probabilities": {"functional": 0.5, "defective": 0.5}}
    bad_sidecars = [b"null", b'"a string"', b"42", b"[1, 2]", b"{", b"\xff\xfe", json.dumps({}).encode(),
                    json.dumps({**good, "time": "yesterday"}).encode(), json.dumps({**good, "reasons": "x"}).encode(),
                    json.dumps({**good, "probabilities": [1, 2]}).encode(), json.dumps({**good, "site": 7}).encode(),
                    json.dumps({**good, "operator_label": {"x": 1}}).encode(),
                    json.dumps({**good, "pad": "x" * 100_000}).encode()]
    rejected = {put_sample(store, "a", good_png(100 + i), data) for i, data in enumerate(bad_sidecars)}
    accepted = {put_sample(store, "a", good_png(i), json.dumps(good).encode()) for i in range(3)}
    put_sample(store, "a", good_png(50), json.dumps(good).encode(), name="0" * 64)  # hash does not match
    (store / "samples" / "a" / f"{'1' * 64}.json").write_bytes(json.dumps(good).encode())  # image missing
    (store / "exams").mkdir()  # site a published its exam list (without one its samples are held)
    (store / "exams" / "a.json").write_text(json.dumps({"site": "a", "sha256": [], "phash": []}))

    collection = collect_samples(Store(f"file://{store}"))
    assert {s.sha256 for s in collection.accepted} == accepted
    reasons = {r["sample"].split("/")[1]: r["reason"] for r in collection.rejected}
    assert set(reasons) == rejected | {"0" * 64, "1" * 64}
    assert all(reasons.values())
    assert sum("not a JSON object" in r for r in reasons.values()) == 4  # null, a string, a number, a list
    assert sum("larger than" in r for r in reasons.values()) == 1


@pytest.mark.parametrize("damage", ["truncated", "wrong input size", "no probabilities", "not onnx"])
def test_a_broken_active_ensemble_is_never_served_the_previous_good_one_is(tmp_path, ensemble_file, damage):
    from edge_agent.ensemble import export_ensemble
    from edge_agent.models import ModelSpec, Normalization, build_model

    paths = serve(tmp_path / "site", ensemble_file, version="20260101T000000-good")
    data = ensemble_file.read_bytes()
    if damage == "truncated":
        broken = data[:len(data) // 2]
    elif damage == "not onnx":
        broken = b"\x00" * 100
    elif damage == "wrong input size":
        spec = ModelSpec(arch="tiny_cnn", num_classes=2, image_size=48)
        broken = export_ensemble([build_model(spec, seed=0)], [Normalization()], [1.0], tmp_path / "w.onnx",
                                 image_size=48, class_names=["functional", "defective"], metadata={}).read_bytes()
    else:  # one output that is not a probability vector
        spec = ModelSpec(arch="tiny_cnn", num_classes=3, image_size=SIZE)
        broken = export_ensemble([build_model(spec, seed=0)], [Normalization()], [1.0], tmp_path / "p.onnx",
                                 image_size=SIZE, class_names=["functional", "defective"], metadata={}).read_bytes()
    folder = paths.ensembles / "20260202T000000-bad"
    folder.mkdir()
    (folder / "ensemble.onnx").write_bytes(broken)
    activate(paths, folder.name)

    handle = EnsembleHandle(paths.active_link, image_size=SIZE)
    classifier = handle.get()
    assert classifier is not None and classifier.version == "good"
    assert "20260202T000000-bad" in handle.problem and "serving 20260101T000000-good" in handle.problem
    (paths.ensembles / "20260101T000000-good" / "ensemble.onnx").write_bytes(b"gone bad too")
    handle = EnsembleHandle(paths.active_link, image_size=SIZE)
    assert handle.get() is None and "no usable ensemble" in handle.problem


def test_long_reused_names_and_unmovable_files_never_stall_the_inbox(tmp_path, ensemble_file):
    from edge_agent.config import ServeConfig

    paths = serve(tmp_path / "site", ensemble_file)
    long = "c" * 240 + ".png"  # near the file system's 255-byte limit: the camera reuses it
    processor = InboxProcessor(paths, EnsembleHandle(paths.active_link, image_size=SIZE), 1_000_000,
                               lambda raw, prediction, name: None, max_pixels=ServeConfig().max_image_pixels)
    for seed in (1, 2):
        (paths.inbox / long).write_bytes(good_png(seed))
        assert processor.process().processed == 1
    (paths.inbox / ("d" * 250 + ".png")).write_bytes(b"not an image")
    wide = io.BytesIO()
    Image.new("I;16", (6000, 5000)).save(wide, "PNG")  # 30 M 16-bit pixels in a few kB: over the HTTP limit
    (paths.inbox / "wide.png").write_bytes(wide.getvalue())
    assert processor.process().quarantined == 2
    lines = (paths.processed / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["file"] for line in lines] == [long, long]  # once each, no duplicate
    assert len(list(paths.processed.glob("c*.png"))) == 2 and not any(paths.inbox.iterdir())
    reasons = [json.loads(p.read_text()) for p in paths.quarantine.glob("*.reason.json")]
    assert {r["file"] for r in reasons} == {"d" * 250 + ".png", "wide.png"}
    assert any("too many pixels: 6000x5000" in r["reason"] for r in reasons)

    shutil.rmtree(paths.quarantine)
    paths.quarantine.write_text("a file where the quarantine folder should be")  # nothing can be set aside
    (paths.inbox / "bad.png").write_bytes(b"broken")
    os.utime(paths.inbox / "bad.png", (1, 1))  # oldest: first in the queue
    (paths.inbox / "good.png").write_bytes(good_png(3))
    for _ in range(3):
        processor.process()
    assert [p.name for p in paths.inbox.iterdir()] == ["bad.png"]  # good.png behind it was classified
    assert len((paths.processed / "results.jsonl").read_text().splitlines()) == 3
    assert list(processor.stuck) == ["bad.png"] and "cannot quarantine" in processor.stuck_summary()


def test_stray_folders_in_the_registry_are_skipped_and_named_by_models_list(tmp_path, capsys):
    from edgeloop.cli import main as cli_main
    from orchestrator.registry import ModelRegistry

    registry = ModelRegistry(tmp_path / "registry")
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    good = registry.register("f", checkpoint, arch="tiny_cnn", dataset_id=None, hyperparameters={}, metrics={})
    (registry.root / "backup-copy").mkdir()  # a stray folder, no record
    (registry.root / "half-written").mkdir()
    (registry.root / "half-written" / "record.json").write_text("{not json")
    assert cli_main(["models", "list", "--registry", str(registry.root)]) == 0
    out, err = capsys.readouterr()
    assert good.version in out and "backup-copy" not in out
    assert "skipped" in err and "backup-copy" in err and "half-written" in err
    assert registry.champion("f") is None and set(registry.skipped) == {"backup-copy", "half-written"}
