"""Members that differ by architecture and input size: a slim ResNet at 96 px trains, fine-tunes, exports and
serves at the edge; a slim_resnet_small member and a member of another size join one fused ensemble that an
agent fine-tune produces, exports (INT8 included), serves and samples from; the ensemble's weights are fitted
on val only when val is large enough to fit them. Real checkpoints, real onnxruntime sessions, real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import deploy_base, write_config

from edge_agent.activation import active_version
from edge_agent.config import load_config
from edge_agent.finetune import run_finetune
from edge_agent.layout import AgentPaths
from edge_agent.train import TrainConfig

CLASSES = ["functional", "defective"]


def base_of(elpv_small: Path, out: Path, arch: str, size: int | None = None) -> Path:
    """A base of ``arch`` trained for one short epoch on the generic pool (resized to ``size``)."""
    from orchestrator.training import train_on_dataset

    train_on_dataset(elpv_small / "generic", arch, out, TrainConfig(epochs=1, batch_size=16, threads=1),
                     image_size=size)
    return out / "model.pt"


def site_with(root: Path, elpv_small: Path, bases: dict[str, Path], **overrides) -> tuple:
    config = load_config(write_config(root, "file:///unused", **overrides))
    paths = AgentPaths(root)
    paths.ensure()
    for version, checkpoint in bases.items():
        deploy_base(root, checkpoint, version)
    for file in sorted((elpv_small / "sites" / "site-1").glob("*/*.png")):
        (paths.labelled / file.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, paths.labelled / file.parent.name / file.name)
    return config, paths


def take_the_new_ensemble(monkeypatch) -> None:
    """The gate is not under test here (tests/test_gate.py): it is made to take the new ensemble, so that what
    serves afterwards is the fine-tune's mixed ensemble, whatever a few dozen gate images would say."""
    import edge_agent.finetune as finetune

    real = finetune.choose
    monkeypatch.setattr(finetune, "choose", lambda answers, incumbent, rule: ("new", real(answers, incumbent, rule)[1]))


def test_a_slim_resnet_at_96_px_trains_exports_and_serves_at_the_edge(tmp_path, elpv_small, monkeypatch):
    from edge_agent.models import load_checkpoint
    from edge_agent.onnx_model import OnnxClassifier, predict_files

    base = base_of(elpv_small, tmp_path / "base", "slim_resnet", 96)
    assert load_checkpoint(base)[1].spec.image_size == 96
    take_the_new_ensemble(monkeypatch)
    config, paths = site_with(tmp_path / "agent", elpv_small, {"v1": base}, image_size=96,
                              members=[{"arch": "slim_resnet", "policy": p} for p in ("flips", "el")],
                              finetune={"epochs": 1, "int8": False, "min_val_for_weights": 1})
    report = run_finetune(config, paths, "r1", "test", lambda: False)
    assert [m["image_size"] for m in report["members"]] == [96, 96] and report["serving"] == "new"
    assert report["ensemble"]["weights_fitted"] and "fitted on" in report["ensemble"]["weights_reason"]
    active = paths.ensembles / active_version(paths) / "ensemble.onnx"
    classifier = OnnxClassifier(active)
    assert classifier.image_size == 96
    files = sorted((elpv_small / "sites" / "site-2").glob("*/*.png"))[:5]  # 32 px files, decoded at 96
    results = list(predict_files(classifier, files))
    assert [r["file"] for r in results] == [str(f) for f in files] and all(r["label"] in CLASSES for r in results)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in results)


def test_members_of_another_arch_and_size_join_one_fused_ensemble_that_serves(tmp_path, elpv_small,
                                                                            tiny_base_model, monkeypatch):
    from edge_agent.serving import EnsembleHandle, classify
    from edge_agent.sidecar import SampleSidecar, parse_sidecar

    slim = base_of(elpv_small, tmp_path / "slim", "slim_resnet_small")
    take_the_new_ensemble(monkeypatch)
    members = [{"arch": "tiny_cnn", "policy": "flips"}, {"arch": "slim_resnet_small", "policy": "el"},
               {"arch": "slim_resnet_small", "policy": "flips", "image_size": 48}]
    config, paths = site_with(tmp_path / "agent", elpv_small, {"v1": tiny_base_model, "v2": slim},
                              members=members, finetune={"epochs": 1, "ema_decay": 0.9, "class_balance": "weighted"})
    report = run_finetune(config, paths, "r1", "test", lambda: False)
    assert [(m["arch"], m["image_size"]) for m in report["members"]] == \
        [("tiny_cnn", 32), ("slim_resnet_small", 32), ("slim_resnet_small", 48)]
    assert report["bases"] == ["v1", "v2", "v2"] and report["serving"] == "new"
    # val holds a few dozen images here: fewer than the 100 needed to fit weights, so they are equal
    ensemble = report["ensemble"]
    assert ensemble["weights"] == pytest.approx([1 / 3] * 3) and not ensemble["weights_fitted"]
    assert f"{report['counts']['val']} val images are fewer than the 100" in ensemble["weights_reason"]
    assert ensemble["member_sizes"] == [32, 32, 48] and len(ensemble["val"]["members"]) == 3
    new = report["candidates"]["new"]  # scored as it serves, INT8 where INT8 serves
    assert len(new["test"]["members"]) == 3 and new["gate"]["n"] == report["counts"]["gate"]
    assert not report["new_precision"]["reason"].startswith("INT8 failed"), report["new_precision"]
    assert report["new_precision"]["val_int8"] is not None
    trained = json.loads((paths.runs / "r1" / "member-2.json").read_text())
    assert trained["image_size"] == 48
    from edge_agent.models import load_checkpoint

    _, meta = load_checkpoint(paths.runs / "r1" / "member-2.pt")  # the recipe's knobs reached the member
    assert meta.spec.image_size == 48 and meta.parent == "v2"
    assert meta.train_config["ema_decay"] == 0.9 and meta.train_config["class_balance"] == "weighted"

    handle = EnsembleHandle(paths.active_link, image_size=config.image_size)
    classifier = handle.get()
    assert handle.problem is None and classifier.version == report["version"]
    assert json.loads(classifier.metadata["member_sizes"]) == [32, 32, 48]
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    predictions = classify(classifier, images)
    assert len(predictions) == 4 and all(p.member_probs.shape == (3, 2) for p in predictions)
    sidecar = SampleSidecar(site="site-1", time=1.0, reasons=["uncertain"], probabilities=predictions[0].probabilities,
                            member_probabilities=predictions[0].member_probs.round(6).tolist())
    parsed = parse_sidecar(json.dumps(sidecar.model_dump(mode="json")).encode())
    assert len(parsed.member_probabilities) == 3 and parsed.fits(CLASSES) is None


def test_the_48_px_member_resizes_inside_the_graph_as_it_was_trained(tmp_path):
    """The fused graph's member of another size sees what its fine-tune saw: the same bilinear resize, in
    torch and in onnxruntime, FP32 and INT8."""
    import torch

    from edge_agent.ensemble import export_ensemble
    from edge_agent.export import quantize_int8, resize_images
    from edge_agent.models import ModelSpec, Normalization, build_model
    from edge_agent.onnx_model import OnnxClassifier
    from edge_agent.train import predict_proba

    small = build_model(ModelSpec(arch="slim_resnet_small", num_classes=2, image_size=48), seed=1).eval()
    tiny = build_model(ModelSpec(arch="tiny_cnn", num_classes=2, image_size=32), seed=2).eval()
    with torch.no_grad():  # a net that is not the identity at init: the resize must matter to the answer
        for block in small.features[3:]:
            torch.nn.init.normal_(block.bn2.weight, 1.0, 0.1)
    path = export_ensemble([tiny, small], [Normalization()] * 2, [0.5, 0.5], tmp_path / "e.onnx", image_size=32,
                           class_names=CLASSES, metadata={"version": "t"}, sizes=[None, 48])
    images = np.random.default_rng(1).integers(0, 256, (16, 32, 32), dtype=np.uint8)
    member = OnnxClassifier(path).run(images)["member_probs"][:, 1]
    expected = predict_proba(small, resize_images(images, 48), Normalization())
    assert np.abs(member - expected).max() < 0.02  # uint8 rounding of the resized training images only
    int8 = quantize_int8(path, tmp_path / "e.int8.onnx", images)
    out = OnnxClassifier(int8).run(images)
    assert out["member_probs"].shape == (16, 2, 2) and np.isfinite(out["probs"]).all()


def test_a_member_size_that_changes_its_base_network_fails_before_training(tmp_path, tiny_base_model):
    from edge_agent.config import AgentConfig, MemberConfig
    from edge_agent.errors import FinetuneError
    from edge_agent.members import member_sizes
    from edge_agent.models import CheckpointMeta, ModelSpec, build_model, save_checkpoint

    spec = ModelSpec(arch="slim_resnet_small", num_classes=2, image_size=32)
    slim = save_checkpoint(tmp_path / "slim.pt", build_model(spec), CheckpointMeta(spec=spec, class_names=CLASSES))
    bases = [("v1", tiny_base_model, "tiny_cnn"), ("v2", slim, "slim_resnet_small"), ("v2", slim, "slim_resnet_small")]

    def config(*members):
        return AgentConfig(site="s", root=tmp_path, store_url="file:///unused", image_size=32, members=list(members))

    fine = config(MemberConfig(arch="tiny_cnn", image_size=96), MemberConfig(arch="slim_resnet_small"),
                  MemberConfig(arch="slim_resnet_small", image_size=48))
    assert member_sizes(fine, bases) == [96, 32, 48]  # tiny_cnn is the same net at any size
    across = config(MemberConfig(arch="tiny_cnn"), MemberConfig(arch="slim_resnet_small"),
                    MemberConfig(arch="slim_resnet_small", image_size=96))
    with pytest.raises(FinetuneError, match="member 2 .slim_resnet_small at 96 px. is not the network of its base"):
        member_sizes(across, bases)


def test_ensemble_weights_are_fitted_only_on_a_val_split_large_enough_to_fit_them():
    from edge_agent.ensemble import equal_or_fitted

    rng = np.random.default_rng(0)
    for n, fitted in ((40, False), (99, False), (100, True), (300, True)):
        labels = rng.integers(0, 2, n)
        right, wrong = np.eye(2)[labels] * 0.8 + 0.1, np.eye(2)[1 - labels] * 0.8 + 0.1
        fit, why = equal_or_fitted(np.stack([right, wrong, wrong], axis=1), labels, min_val=100)
        if fitted:  # two members wrong everywhere: a large val shows it, and they are left out
            assert fit.weights == pytest.approx([1, 0, 0]) and why.startswith(f"fitted on {n} val images")
        else:
            assert fit.weights == pytest.approx([1 / 3] * 3) and f"{n} val images are fewer than the 100" in why
