"""The serving ensemble: whatever ``models/active`` points at, checked before it serves a single image.

:class:`EnsembleHandle` reads the link on every use and reloads when its target changed, so a newly
activated ensemble serves from the next image on, in the inbox loop and in the HTTP server alike, with no
restart. A truncated graph, one for another input size, or one without the expected outputs is never
served (:func:`validate_ensemble`); the previous good ensemble serves instead and the status says so.

:func:`validate_ensemble` is the one graph contract: what serving, sample selection and the next fine-tune
read from a graph (class probabilities *and* each member's, which the gate, the members' accuracies and the
disagreement score need). Every way an ensemble becomes active in the agent checks it first, so a graph a
fine-tune could not use is never activated, and one activated by hand is refused with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.onnx_model import OnnxClassifier

log = logging.getLogger(__name__)

ENSEMBLE_FILE = "ensemble.onnx"


PROBS_SUM_TOLERANCE = 0.02
PROBS_OUTPUT, MEMBERS_OUTPUT = "probs", "member_probs"


class GraphContractError(ValueError):
    """A graph that loads but lacks something serving or the fine-tune reads from it; the message says what."""


def validate_ensemble(path: Path, image_size: int | None = None, threads: int = 1) -> OnnxClassifier:
    """Load an ensemble graph and run it once; ValueError saying why it cannot serve.

    Checked: it loads, its metadata names classes and an input size (the site's, when given), and a batch
    of two images gives ``probs`` [2, C] that sum to one and ``member_probs`` [2, K, C] of probabilities, K
    as its ``members`` metadata says (:class:`GraphContractError` when an output is missing or misshapen).
    """
    try:
        classifier = OnnxClassifier(path, threads=threads)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None
    if image_size is not None and classifier.image_size != image_size:
        raise ValueError(f"{path.name} takes {classifier.image_size} px images, the site uses {image_size} px")
    probe = np.zeros((2, classifier.image_size, classifier.image_size), np.uint8)
    try:
        outputs = classifier.run(probe)
    except Exception as exc:  # onnxruntime's own error types
        raise ValueError(f"{path.name} fails on a test batch ({type(exc).__name__}: {exc})") from None
    check_outputs(path.name, outputs, len(classifier.class_names), classifier.metadata.get("members"))
    return classifier


def check_outputs(name: str, outputs: dict[str, np.ndarray], classes: int, members: str | None = None) -> None:
    """The contract's outputs for a batch of two: GraphContractError naming what is missing or wrong."""
    have = ", ".join(outputs) or "none"
    for needed, why in ((PROBS_OUTPUT, "class probabilities"),
                        (MEMBERS_OUTPUT, "each member's probabilities (sample selection's disagreement, the "
                                         "fine-tune's gate and member scores read them)")):
        if needed not in outputs:
            raise GraphContractError(f"{name} has no {needed} output ({why}); its outputs: {have}")
    probs, member_probs = outputs[PROBS_OUTPUT], outputs[MEMBERS_OUTPUT]
    # An INT8 graph's probabilities come out in 1/255 steps, so they sum to one only within a few steps.
    if probs.shape != (2, classes) or not np.allclose(probs.sum(1), 1.0, atol=PROBS_SUM_TOLERANCE):
        raise GraphContractError(f"{name} does not output class probabilities (got shape {probs.shape}, "
                                 f"row sums {np.round(probs.sum(1), 4).tolist() if probs.ndim == 2 else '-'})")
    if member_probs.ndim != 3 or member_probs.shape[0] != 2 or member_probs.shape[2] != classes \
            or member_probs.shape[1] < 1:
        raise GraphContractError(f"{name}: {MEMBERS_OUTPUT} has shape {member_probs.shape}, not "
                                 f"[images, members, {classes}]")
    if members is not None and members.isdigit() and int(members) != member_probs.shape[1]:
        raise GraphContractError(f"{name}: its metadata says {members} members, {MEMBERS_OUTPUT} has "
                                 f"{member_probs.shape[1]}")
    tolerance = PROBS_SUM_TOLERANCE
    if not np.all(np.isfinite(member_probs)) or member_probs.min() < -tolerance or member_probs.max() > 1 + tolerance:
        raise GraphContractError(f"{name}: {MEMBERS_OUTPUT} are not probabilities (range "
                                 f"{float(np.nanmin(member_probs)):.4g} to {float(np.nanmax(member_probs)):.4g})")


def built_on(metadata: dict[str, str]) -> list[str] | None:
    """The base version(s) an ensemble was built on, as its graph says: a fine-tuned ensemble lists its
    ``bases``, the base served as-is names its ``base``. None when the graph does not say (an older one)."""
    if metadata.get("base"):
        return [metadata["base"][:128]]
    try:
        bases = json.loads(metadata.get("bases") or "null")
    except ValueError:
        return None
    return [b[:128] for b in bases if isinstance(b, str)][:64] if isinstance(bases, list) else None


class EnsembleHandle:
    """The serving ensemble, reloaded when the active link moves (thread-safe).

    A target that fails :func:`validate_ensemble` is never served: the newest other published ensemble
    that passes is served instead, and :attr:`problem` says which and why (the status shows it).
    """

    def __init__(self, active_link: Path, threads: int = 1, image_size: int | None = None):
        self.active_link = Path(active_link)
        self.threads = threads
        self.image_size = image_size
        self._lock = threading.Lock()
        self._target: str | None = None
        self._classifier = None
        self.problem: str | None = None
        self.serving_version: str | None = None  # the ensemble folder actually serving (a fallback, say)

    def target(self) -> str | None:
        try:
            return os.readlink(self.active_link)
        except OSError:
            return None

    def get(self):
        """The classifier for the active ensemble, or None when nothing is active."""
        target = self.target()
        with self._lock:
            if target != self._target:
                self._classifier = self._load(target)
                self._target = target
            return self._classifier

    def bases(self) -> list[str] | None:
        """The base version(s) the active ensemble was built on; None when nothing is active, a fallback serves
        instead of it, or its graph does not say."""
        with self._lock:
            if self._classifier is None or self.problem or self._target != self.target():
                return None  # nothing, a fallback or an ensemble the link has since left: not the active one's
            return built_on(self._classifier.metadata)

    def _load(self, target: str | None):
        self.problem, self.serving_version = None, None
        if target is None:
            return None
        active = (self.active_link.parent / target).resolve()
        try:
            classifier = validate_ensemble(active / ENSEMBLE_FILE, self.image_size, self.threads)
            log.info("serving ensemble %s", classifier.version)
            self.serving_version = active.name
            return classifier
        except ValueError as exc:
            reason = str(exc)
        for folder in sorted((p for p in active.parent.iterdir() if p != active and not p.name.startswith(".")),
                             reverse=True):
            try:
                classifier = validate_ensemble(folder / ENSEMBLE_FILE, self.image_size, self.threads)
            except ValueError:
                continue
            self.problem = f"active ensemble {active.name} unusable ({reason}); serving {folder.name} instead"
            self.serving_version = folder.name
            log.error("%s", self.problem)
            return classifier
        self.problem = f"active ensemble {active.name} unusable ({reason}); no usable ensemble to serve"
        log.error("%s", self.problem)
        return None


@dataclass(frozen=True)
class Prediction:
    """One classified image: what the result line says plus what sample selection needs."""

    label: str
    probabilities: dict[str, float]
    probs: np.ndarray
    member_probs: np.ndarray | None
    model_version: str
    latency_ms: float = 0.0  # this image's share of the graph's run time

    def as_result(self, file: str) -> dict[str, Any]:
        return {"file": file, "label": self.label, "probabilities": self.probabilities,
                "model_version": self.model_version, "time": round(time.time(), 3)}


def classify(classifier, images: np.ndarray) -> list[Prediction]:
    """Run the ensemble graph on uint8 images [N,H,W]."""
    started = time.perf_counter()
    outputs = classifier.run(images)
    latency_ms = (time.perf_counter() - started) * 1000 / max(1, len(images))
    probs = outputs.get(PROBS_OUTPUT, outputs[classifier.output_names[0]])
    members = outputs.get(MEMBERS_OUTPUT)
    names = classifier.class_names
    return [Prediction(names[int(p.argmax())], {c: round(float(v), 6) for c, v in zip(names, p)}, p,
                       None if members is None else members[i], classifier.version, latency_ms)
            for i, p in enumerate(probs)]
