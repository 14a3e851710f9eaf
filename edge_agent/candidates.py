"""What could serve a site, scored the same way: the cloud's base as it came, the new ensemble, the active one.

Each candidate is an ensemble folder with an ``ensemble.onnx`` (the base as-is is a one-member ensemble),
scored on the gate split (which decides) and on the test split (which is only reported). INT8 or FP32 is
chosen before, on the val split (:func:`choose_precision`), so the gate scores one precision per candidate.
The simplest alternative, serving the base unchanged, is always on the list, so a fine-tune that does not help
is never served, and every report shows the gain over it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.activation import STAGING_PREFIX, staging_dir
from edge_agent.config import AgentConfig
from edge_agent.datasets import ArraySet
from edge_agent.gate import Score
from edge_agent.layout import AgentPaths
from edge_agent.serving import ENSEMBLE_FILE, validate_ensemble

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 128
FP32_FILE = "ensemble.fp32.onnx"


def base_folder_name(base_version: str) -> str:
    return f"base-{base_version}"


def stage_base_as_is(config: AgentConfig, paths: AgentPaths, base_version: str, base_path: Path,
                     class_names: list[str]) -> tuple[Path, bool]:
    """The base model as a one-member ensemble: (folder, True when it is newly staged, not yet published)."""
    from edge_agent.ensemble import export_ensemble
    from edge_agent.models import load_checkpoint

    name = base_folder_name(base_version)
    if (paths.ensembles / name / ENSEMBLE_FILE).is_file():
        return paths.ensembles / name, False
    staged = staging_dir(paths, name)
    model, meta = load_checkpoint(base_path)
    export_ensemble([model], [meta.normalization], [1.0], staged / ENSEMBLE_FILE, image_size=config.image_size,
                    class_names=class_names, metadata={"version": name, "site": config.site, "base": base_version})
    return staged, True


def score(folder: Path, splits: dict[str, ArraySet], image_size: int, threads: int | None) -> dict[str, Any] | None:
    """Gate and test results of the ensemble in ``folder`` as it serves (its ``ensemble.onnx``: INT8 where
    INT8 serves); the gate result keeps each image's prediction for the paired gate. None when it cannot
    serve at all."""
    from edge_agent.ensemble import evaluate_graph

    try:
        classifier = validate_ensemble(folder / ENSEMBLE_FILE, image_size, threads or 1)
    except ValueError as exc:
        log.warning("candidate %s cannot serve: %s", folder.name, exc)
        return None
    return {"version": folder.name.removeprefix(STAGING_PREFIX), "precision": classifier.metadata.get("precision", "fp32"),
            **{split: evaluate_graph(classifier, splits[split].images, splits[split].labels,
                                     predictions=split == "gate")
               for split in ("gate", "test")}}


def gate_score(result: dict[str, Any], labels: np.ndarray) -> Score:
    """The gate's view of a scored candidate (its predictions leave the result: reports stay small)."""
    return Score.of(np.asarray(result["gate"].pop("predictions"), dtype=np.int64), labels, result["gate"]["nll"])


def gain_over_base(results: dict[str, dict], serving: str) -> dict[str, float | None]:
    """Accuracy points the serving model adds over the base as-is, on gate and on test."""
    if "base" not in results or serving not in results:
        return {"gate": None, "test": None}
    gains = {}
    for split in ("gate", "test"):
        served, base = results[serving][split]["accuracy"], results["base"][split]["accuracy"]
        gains[split] = None if served is None or base is None else round(served - base, 6)  # an empty split
    return gains


def int8_serves(fp32_val: float, int8_val: float, tolerance: float) -> bool:
    """The 0.5-point rule (``tolerance`` 0.005 by default): INT8 serves unless it costs more on the val split."""
    return int8_val >= fp32_val - tolerance - 1e-12


def choose_precision(folder: Path, calibration: np.ndarray, val: ArraySet, tolerance: float,
                     image_size: int, test: ArraySet | None = None) -> dict[str, Any]:
    """Quantise the ensemble in ``folder`` (static, calibrated on the site's own train images); keep INT8 as
    ``ensemble.onnx`` when :func:`int8_serves` on the val split, else keep FP32. Returns what was decided and
    both precisions' val scores (which decide) and test scores (``test``: reported only).

    Why val and not the gate split: a precision picked on the gate split for scoring well there, then gated on
    that same split, is a second try at the test (the null activation rate rose above alpha with 5-10 % INT8
    flips). Chosen on val, the gate meets one precision, scored once (:func:`score`)."""
    from edge_agent.export import quantize_int8

    fp32_path, int8_path = folder / ENSEMBLE_FILE, folder / "ensemble.int8.onnx"
    scores = {"fp32": _accuracies(fp32_path, image_size, val, test)}
    if not len(val):
        return {"serving": "fp32", **_flat(scores), "reason": "no val images to check INT8 against: FP32 serves"}
    try:
        quantize_int8(fp32_path, int8_path, calibration[:CALIBRATION_IMAGES])
        scores["int8"] = _accuracies(int8_path, image_size, val, test)
    except Exception as exc:  # onnxruntime's quantiser fails in many ways on unusual graphs: FP32 it is
        int8_path.unlink(missing_ok=True)
        return {"serving": "fp32", **_flat(scores), "reason": f"INT8 failed: {exc}"}
    fp32, int8 = scores["fp32"]["val"], scores["int8"]["val"]
    if int8_serves(fp32, int8, tolerance):
        os.replace(fp32_path, folder / FP32_FILE)
        os.replace(int8_path, fp32_path)
        return {"serving": "int8", **_flat(scores),
                "reason": f"INT8 val accuracy {int8:.4f} within {tolerance} of FP32 {fp32:.4f}"}
    int8_path.unlink(missing_ok=True)
    return {"serving": "fp32", **_flat(scores),
            "reason": f"INT8 val accuracy {int8:.4f} more than {tolerance} below FP32 {fp32:.4f}"}


def _accuracies(path: Path, image_size: int, val: ArraySet, test: ArraySet | None) -> dict[str, float | None]:
    from edge_agent.ensemble import evaluate_graph

    classifier = validate_ensemble(path, image_size)
    return {"val": evaluate_graph(classifier, val.images, val.labels)["accuracy"],
            "test": evaluate_graph(classifier, test.images, test.labels)["accuracy"] if test is not None else None}


def _flat(scores: dict[str, dict]) -> dict[str, float | None]:
    """{"val_fp32": .., "val_int8": .., "test_fp32": .., "test_int8": ..} (None where not measured)."""
    return {f"{split}_{precision}": (scores.get(precision) or {}).get(split)
            for split in ("val", "test") for precision in ("fp32", "int8")}


def discard(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
