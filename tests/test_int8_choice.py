"""INT8 or FP32 is chosen on the val split, never on the gate split that then judges the result (issue 24 item 7):
a choice made on the gate is a second try at it, and lets more than alpha of no-better challengers through."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edge_agent.candidates import choose_precision, int8_serves
from edge_agent.config import AgentConfig
from edge_agent.datasets import ArraySet, open_dataset
from edge_agent.gate import GateRule, Score, gate
from edge_agent.layout import AgentPaths
from edge_agent.serving import ENSEMBLE_FILE

SIZE = 32


def null_activations(rng: np.random.Generator, runs: int, gate_n: int, val_n: int, flips: float,
                     accuracy: float = 0.8) -> tuple[float, float]:
    """Share of runs whose no-better challenger is accepted, precision chosen (on the gate, on val).

    The incumbent and the challenger's FP32 model are equally good (each image right with probability
    ``accuracy``, independently); its INT8 graph answers anew on a random ``flips`` share of images, just as good
    on average. Each run picks a precision with the real 0.5-point rule, then gates the pick on the gate split."""
    rule, tolerance = GateRule(alpha=0.1), 0.005
    on_gate = on_val = 0
    exam, val = slice(0, gate_n), slice(gate_n, gate_n + val_n)
    for _ in range(runs):
        size = gate_n + val_n
        incumbent, fp32 = rng.random(size) < accuracy, rng.random(size) < accuracy
        int8 = np.where(rng.random(size) < flips, rng.random(size) < accuracy, fp32)
        for split, count in ((exam, "gate"), (val, "val")):
            pick = int8 if int8_serves(fp32[split].mean(), int8[split].mean(), tolerance) else fp32
            accepted = gate(Score(pick[exam]), Score(incumbent[exam]), rule).accept
            on_gate, on_val = (on_gate + accepted, on_val) if count == "gate" else (on_gate, on_val + accepted)
    return on_gate / runs, on_val / runs


def test_the_null_activation_rate_with_int8_flips_stays_at_most_alpha_when_val_chooses():
    runs = 4000
    on_gate, on_val = null_activations(np.random.default_rng(24), runs, gate_n=300, val_n=200, flips=0.1)
    assert on_val <= 0.1 + 3 * np.sqrt(0.1 * 0.9 / runs), on_val  # at most alpha (three standard errors)
    assert on_gate > on_val, (on_gate, on_val)  # choosing on the gate is a second try: more gets through


def constant_model(path, says: int) -> None:
    """A one-member ensemble that answers class ``says`` for every image: its accuracy on any split is known."""
    import torch

    from edge_agent.ensemble import export_ensemble
    from edge_agent.models import ModelSpec, Normalization, build_model

    model = build_model(ModelSpec(arch="tiny_cnn", num_classes=2, image_size=SIZE), seed=7)
    with torch.no_grad():
        model[-1].bias.copy_(torch.tensor([5.0, -5.0] if says == 0 else [-5.0, 5.0]))
    export_ensemble([model], [Normalization()], [1.0], path, image_size=SIZE,
                    class_names=["functional", "defective"], metadata={"version": path.parent.name})


@pytest.fixture
def quantised_site(tmp_path, elpv_small, monkeypatch):
    """An FP32 ensemble that says "functional" for everything, and a quantiser whose "INT8" graph says
    "defective" for everything."""
    import edge_agent.export as export

    config = AgentConfig(site="s", root=tmp_path / "site", store_url="file:///unused", image_size=SIZE)
    paths = AgentPaths(config.root)
    paths.ensure()
    data = open_dataset(elpv_small / "sites" / "site-1")
    folder = paths.ensembles / ".tmp-new"
    folder.mkdir()
    constant_model(folder / ENSEMBLE_FILE, says=0)
    constant_model(tmp_path / "defective" / ENSEMBLE_FILE, says=1)
    monkeypatch.setattr(export, "quantize_int8",
                        lambda src, out, calibration: shutil.copy(tmp_path / "defective" / ENSEMBLE_FILE, out))
    return config, paths, folder, {s: data.load_split(s) for s in ("train", "val", "test")}


def test_the_precision_is_decided_by_the_val_split_whatever_the_gate_says(quantised_site):
    """On a val split of defective images the 'INT8' graph is perfect and FP32 wrong throughout: INT8 serves,
    though the gate split (functional images) would have refused it outright; on a functional val split, the
    other way round."""
    from edge_agent.finetune import _precisions

    config, paths, folder, splits = quantised_site
    train = splits["train"]
    defective_only = ArraySet(train.images[train.labels == 1], train.labels[train.labels == 1])
    functional_only = ArraySet(train.images[train.labels == 0], train.labels[train.labels == 0])
    assert len(defective_only) and len(functional_only)
    chosen = _precisions(config, {**splits, "val": defective_only, "gate": functional_only}, {"new": folder})["new"]
    assert chosen["serving"] == "int8" and (chosen["val_int8"], chosen["val_fp32"]) == (1.0, 0.0), chosen
    assert "INT8 val accuracy" in chosen["reason"] and not any(key.startswith("gate_") for key in chosen)
    # the same graph against a val split of functional images: refused, FP32 stays as it was
    fresh = paths.ensembles / "fresh"
    fresh.mkdir()
    shutil.copy(folder / "ensemble.fp32.onnx", fresh / ENSEMBLE_FILE)
    before = (fresh / ENSEMBLE_FILE).read_bytes()
    refused = choose_precision(fresh, train.images, functional_only, 0.005, SIZE)
    assert refused["serving"] == "fp32" and (refused["val_int8"], refused["val_fp32"]) == (0.0, 1.0), refused
    assert (fresh / ENSEMBLE_FILE).read_bytes() == before and not (fresh / "ensemble.int8.onnx").exists()
