"""Turns predictions and operator labels into outbox samples: the agent's choice of what is worth sending."""

from __future__ import annotations

import random
import threading
import time

from edge_agent.config import AgentConfig
from edge_agent.outbox import Outbox, as_png
from edge_agent.select import Selector
from edge_agent.serving import Prediction
from edge_agent.shadow import ShadowScorer, ShadowVerdict
from edge_agent.sidecar import SampleSidecar
from edge_agent.state import AgentState, UploadLedger
from edge_agent.window import LiveWindow


class Sampler:
    """Turns predictions (and operator labels) into outbox samples."""

    def __init__(self, config: AgentConfig, outbox: Outbox, state: AgentState, lock: threading.Lock,
                 window: LiveWindow | None = None, shadow: ShadowScorer | None = None):
        self.config, self.outbox, self.state, self.lock = config, outbox, state, lock
        self.shadow = shadow  # the challenger waiting for evidence, scored beside what serves
        self.window = window  # what the site serves, for the heartbeat (operator labels are not serving)
        t, u = config.thresholds, config.upload
        self.selector = Selector(t.uncertainty, t.disagreement, u.random_share, random.Random())

    def __call__(self, raw: bytes, prediction: Prediction, name: str, operator_label: str | None = None,
                 source: str = "inbox", split: str | None = None) -> bool:
        """Queue the sample if the serving model's ``prediction`` says it is worth sending; images from the HTTP endpoint (``source="http"``) only
        within their own share of the day's budget, so anonymous requests cannot crowd out the inbox."""
        if self.window is not None and source != "operator":
            self.window.record(prediction, prediction.latency_ms)
        mistaken = operator_label is not None and prediction.label != operator_label
        members = prediction.member_probs
        shadow = self._shadow(raw, prediction, source)
        selection = self.selector.judge(prediction.probs, members, operator_label, mistaken,
                                        shadow_disagrees=bool(shadow and shadow.disagrees))
        if not selection.chosen or not self._allowance(source):
            return False
        sidecar = SampleSidecar(
            site=self.config.site, time=time.time(), source_file=name, reasons=selection.reasons,
            model_version=prediction.model_version, probabilities=prediction.probabilities,
            member_probabilities=members.round(6).tolist() if members is not None else None,
            operator_label=operator_label, source=source, split=split, uncertainty=round(selection.uncertainty, 6),
            disagreement=round(selection.disagreement, 6),
            **({"shadow": shadow.as_sidecar()} if shadow else {})).model_dump(mode="json")
        self.outbox.put(as_png(raw), sidecar, selection.score)
        with self.lock:
            self.state.selected_total += 1
        return True

    def _shadow(self, raw: bytes, prediction: Prediction, source: str) -> ShadowVerdict | None:
        """The shadow challenger's answer on a production image (never on an operator's labelled one)."""
        if self.shadow is None or source == "operator":
            return None
        verdict = self.shadow(raw, prediction, self.config.serve.max_image_bytes)
        if verdict is not None:
            with self.lock:
                counts = self.state.shadow_scored.setdefault(verdict.version, [0, 0])
                counts[0] += 1
                counts[1] += int(verdict.disagrees)
        return verdict

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
