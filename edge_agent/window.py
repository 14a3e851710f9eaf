"""What a site served lately, per model: the rolling window each heartbeat carries.

The cloud's canary analysis (:mod:`orchestrator.canary`) compares the window of the model a new version
made with the same site's window before the deploy: how often each class is predicted, how confident and
how much in agreement the members are, how long inference takes, and how many inputs failed. Only the
serving path records here (inbox and HTTP), never the operator's labelled images.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from edge_agent.select import disagreement
from edge_agent.serving import Prediction

WINDOW_SIZE = 500  # predictions kept: enough for a rate to a few points, small enough for every heartbeat


@dataclass(frozen=True)
class Served:
    time: float
    model: str
    label: str
    confidence: float
    disagreement: float
    latency_ms: float


class LiveWindow:
    """The last :data:`WINDOW_SIZE` predictions and input failures, summarised per model (thread-safe)."""

    def __init__(self, size: int = WINDOW_SIZE):
        self._served: deque[Served] = deque(maxlen=size)
        self._failures: deque[tuple[float, str | None, str]] = deque(maxlen=size)  # (time, model, kind)
        self._lock = threading.Lock()

    def record(self, prediction: Prediction, latency_ms: float) -> None:
        members = prediction.member_probs
        served = Served(time.time(), prediction.model_version, prediction.label, float(np.max(prediction.probs)),
                        disagreement(members) if members is not None else 0.0, latency_ms)
        with self._lock:
            self._served.append(served)

    def failure(self, model: str | None, kind: str, count: int = 1) -> None:
        """``kind``: ``error`` (classification raised) or ``quarantined`` (an input that could not be read)."""
        with self._lock:
            self._failures.extend([(time.time(), model, kind)] * count)

    def summary(self) -> dict[str, dict]:
        """``{model: {predictions, class_rates, class_counts, mean_confidence, mean_disagreement, latency_p50_ms,
        latency_p95_ms, errors, quarantined, first, last}}`` over the window."""
        with self._lock:
            served, failures = list(self._served), list(self._failures)
        out: dict[str, dict] = {}
        for model in dict.fromkeys(s.model for s in served):
            rows = [s for s in served if s.model == model]
            labels = [s.label for s in rows]
            latency = np.array([s.latency_ms for s in rows])
            out[model] = {
                "predictions": len(rows),
                "class_rates": {c: round(labels.count(c) / len(rows), 4) for c in sorted(set(labels))},
                "class_counts": {c: labels.count(c) for c in sorted(set(labels))},  # the canary's tests read these
                "mean_confidence": round(float(np.mean([s.confidence for s in rows])), 4),
                "mean_disagreement": round(float(np.mean([s.disagreement for s in rows])), 4),
                "latency_p50_ms": round(float(np.percentile(latency, 50)), 3),
                "latency_p95_ms": round(float(np.percentile(latency, 95)), 3),
                "errors": sum(1 for _, m, k in failures if m == model and k == "error"),
                "quarantined": sum(1 for _, m, k in failures if m == model and k == "quarantined"),
                "first": round(rows[0].time, 3), "last": round(rows[-1].time, 3)}
        return out
