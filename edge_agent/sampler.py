"""Turns predictions and operator labels into outbox samples: the agent's choice of what is worth sending."""

from __future__ import annotations

import random
import threading
import time

from edge_agent.config import AgentConfig
from edge_agent.serving import Prediction
from edge_agent.outbox import Outbox, as_png
from edge_agent.select import Selector
from edge_agent.sidecar import SampleSidecar
from edge_agent.state import AgentState


class Sampler:
    """Turns predictions (and operator labels) into outbox samples."""

    def __init__(self, config: AgentConfig, outbox: Outbox, state: AgentState, lock: threading.Lock):
        self.config, self.outbox, self.state, self.lock = config, outbox, state, lock
        t, u = config.thresholds, config.upload
        self.selector = Selector(t.uncertainty, t.disagreement, u.random_share, random.Random())

    def __call__(self, raw: bytes, prediction: Prediction | None, name: str, operator_label: str | None = None,
                 source: str = "inbox") -> bool:
        """Queue the sample if it is worth sending; images from the HTTP endpoint (``source="http"``) only
        within their own share of the day's budget, so anonymous requests cannot crowd out the inbox."""
        probs = prediction.probs if prediction is not None else None
        members = prediction.member_probs if prediction is not None else None
        if prediction is None:
            chosen, score, reasons, extra = operator_label is not None, 2.0, ["operator_label"], {}
        else:
            selection = self.selector.judge(probs, members, operator_label)
            chosen, score, reasons = selection.chosen, selection.score, selection.reasons
            extra = {"uncertainty": round(selection.uncertainty, 6), "disagreement": round(selection.disagreement, 6)}
        if not chosen or (source == "http" and not self._http_allowance()):
            return False
        sidecar = SampleSidecar(
            site=self.config.site, time=time.time(), source_file=name, reasons=reasons,
            model_version=prediction.model_version if prediction else None,
            probabilities=prediction.probabilities if prediction else None,
            member_probabilities=members.round(6).tolist() if members is not None else None,
            operator_label=operator_label, source=source, **extra).model_dump(mode="json")
        self.outbox.put(as_png(raw), sidecar, score)
        with self.lock:
            self.state.selected_total += 1
        return True

    def _http_allowance(self) -> bool:
        """Take one of today's HTTP sample slots, if any is left."""
        limit = int(self.config.upload.http_share * self.config.upload.max_samples_per_day)
        with self.lock:
            taken = self.state.http_samples
            taken.roll(time.time())
            if taken.count >= limit:
                return False
            taken.count += 1
            return True
