"""The shadow challenger: a fine-tuned ensemble the gate could not accept yet, waiting for evidence.

A thin gate delays a decision, never the learning. When a fine-tune's new ensemble does not win its one-shot
gate (the exact test, at half the site's alpha), it is published beside the serving one and recorded in
``models/shadow.json``. From then on:

- the agent scores production images with it too (:class:`ShadowScorer`); where the two disagree, the sample is
  uploaded first and heads the labelling queue, because in a two-class task a labelled disagreement is exactly one
  discordant pair: labels go where they decide;
- each time the site's gate split grows (labels came home), :func:`rejudge` looks again with the anytime-valid
  sequential test (:func:`edge_agent.gate.sequential_gate`, the other half of alpha): however many looks it takes,
  a challenger that is no better is activated with probability at most alpha in all.

A newer fine-tune's challenger replaces the shadow (its sequential test starts afresh); an activation, a rollback
of a base it was built on, or a missing folder clears it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.activation import Fenced, activate, active_dir, fenced_versions
from edge_agent.fileio import read_json, write_json_atomic
from edge_agent.layout import AgentPaths
from edge_agent.serving import ENSEMBLE_FILE, Prediction, classify, validate_ensemble

log = logging.getLogger(__name__)

SHADOW_FILE = "shadow.json"
ONE_SHOT_SHARE = 0.5  # of the site's alpha: the fine-tune's one-shot gate; the rest: the shadow's looks


def _record_path(paths: AgentPaths) -> Path:
    return paths.models / SHADOW_FILE


def shadow_record(paths: AgentPaths) -> dict[str, Any] | None:
    """The shadow challenger's record, or None (also when its folder is gone or a base of it was rolled back)."""
    record = read_json(_record_path(paths), default=None)
    if not isinstance(record, dict) or not isinstance(record.get("version"), str):
        return None
    if not (paths.ensembles / record["version"] / ENSEMBLE_FILE).is_file():
        return None
    if fenced_versions(paths) & set(record.get("bases") or []):
        return None
    return record


def set_shadow(paths: AgentPaths, version: str, bases: list[str], decision: dict[str, Any]) -> None:
    write_json_atomic(_record_path(paths), {"version": version, "bases": bases, "since": time.time(), "looks": 1,
                                            "last": decision, "against": active_dir(paths).name
                                            if active_dir(paths) else None})


def clear_shadow(paths: AgentPaths) -> None:
    _record_path(paths).unlink(missing_ok=True)


def rejudge(paths: AgentPaths, config, splits: dict | None = None) -> dict[str, Any] | None:
    """Look again: score the serving ensemble and the shadow on today's gate split and decide with the
    sequential test. Activates the shadow when it wins. Returns the decision (None when there is no shadow)."""
    from edge_agent.candidates import gate_score, score
    from edge_agent.gate import sequential_gate

    record = shadow_record(paths)
    current = active_dir(paths)
    if record is None or current is None or current.name == record["version"]:
        if record is not None:
            clear_shadow(paths)
        return None
    if splits is None:
        from edge_agent.sitedata import load_site_splits

        classes = _class_names(paths.ensembles / record["version"])
        splits = load_site_splits(paths, classes, config.image_size)
    results = {name: score(folder, splits, config.image_size, config.workers)
               for name, folder in (("active", current), ("shadow", paths.ensembles / record["version"]))}
    if any(r is None for r in results.values()):
        clear_shadow(paths)
        return None
    labels = splits["gate"].labels
    looks = int(record.get("looks", 1)) + 1
    rule = config.thresholds.gate_rule()
    rule = rule.model_copy(update={"alpha": rule.alpha * (1 - ONE_SHOT_SHARE)})
    decision = sequential_gate(gate_score(results["shadow"], labels), gate_score(results["active"], labels), rule,
                               looks=looks).as_dict()
    decision["test_accuracy"] = {name: r["test"]["accuracy"] for name, r in results.items()}
    if decision["accept"]:
        try:
            activate(paths, record["version"], expected=current.name, bases=record.get("bases") or [])
        except Fenced as exc:
            decision = {**decision, "accept": False, "reason": f"fenced: {exc}"}
        else:
            log.info("shadow %s activated: %s", record["version"], decision["reason"])
            clear_shadow(paths)
            return decision
    write_json_atomic(_record_path(paths), {**record, "looks": looks, "last": decision, "against": current.name})
    log.info("shadow %s still waits: %s", record["version"], decision["reason"])
    return decision


def _class_names(folder: Path) -> list[str]:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(folder / ENSEMBLE_FILE), load_external_data=False).metadata_props}
    return json.loads(meta["class_names"])


@dataclass
class ShadowVerdict:
    version: str
    label: str
    disagrees: bool

    def as_sidecar(self) -> dict[str, Any]:
        return {"version": self.version, "label": self.label, "disagrees": self.disagrees}


class ShadowScorer:
    """Classifies a production image with the shadow challenger too (when there is one); the record is looked
    at every :attr:`refresh_s` at most, so an image costs one more graph run and nothing else."""

    refresh_s = 2.0

    def __init__(self, paths: AgentPaths, threads: int = 1):
        self.paths = paths
        self.threads = threads
        self._classifier = None
        self._version: str | None = None
        self._checked = 0.0

    def _current(self):
        if time.monotonic() - self._checked < self.refresh_s:
            return self._classifier
        self._checked = time.monotonic()
        record = shadow_record(self.paths)
        version = record["version"] if record else None
        if version != self._version:
            self._version, self._classifier = version, None
            if version is not None:
                try:
                    self._classifier = validate_ensemble(self.paths.ensembles / version / ENSEMBLE_FILE, None,
                                                         self.threads)
                except ValueError as exc:
                    log.warning("shadow %s cannot be scored: %s", version, exc)
        return self._classifier

    def __call__(self, raw: bytes, serving: Prediction, max_bytes: int) -> ShadowVerdict | None:
        from edge_agent.imaging import ImageError, decode_image

        classifier = self._current()
        if classifier is None:
            return None
        try:
            image = decode_image(raw, classifier.image_size, max_bytes)
            shadow = classify(classifier, image[None])[0]
        except (ImageError, OSError, ValueError) as exc:
            log.debug("shadow did not score an image: %s", exc)
            return None
        return ShadowVerdict(self._version, shadow.label, shadow.label != serving.label)

