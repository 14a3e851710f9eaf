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
from edge_agent.state import AgentState, UploadLedger


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
        if prediction is None:  # no model to judge with yet: a site's labels are what the cloud lacks most
            chosen, score, reasons, extra = operator_label is not None, 2.0, ["operator_label", "no_model"], {}
        else:
            mistaken = operator_label is not None and prediction.label != operator_label
            selection = self.selector.judge(probs, members, operator_label, mistaken)
            chosen, score, reasons = selection.chosen, selection.score, selection.reasons
            extra = {"uncertainty": round(selection.uncertainty, 6), "disagreement": round(selection.disagreement, 6)}
        if not chosen or not self._allowance(source):
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

    def _allowance(self, source: str) -> bool:
        """Take one of today's slots of the source's share of the budget (HTTP requests and operator labels
        each have a share, so neither can crowd out the inbox's inference samples)."""
        upload = self.config.upload
        share = {"http": upload.http_share, "operator": upload.labelled_share}.get(source)
        if share is None:
            return True
        with self.lock:
            taken = self.state.samples_by_source.setdefault(source, UploadLedger())
            taken.roll(time.time())
            if taken.count >= int(share * upload.max_samples_per_day):
                return False
            taken.count += 1
            return True
