"""The agent's Prometheus metrics, served at ``GET /metrics`` in the text format every monitoring stack scrapes.

Two kinds, in one :class:`~prometheus_client.CollectorRegistry` per agent (never the process-global one: a test
or a benchmark runs several servers in one process, and the global registry would mix their counts):

- **events**, counted as they happen: predictions by class, model version and source; inference time per image;
  HTTP requests by endpoint and code, and their duration; sample uploads and their failures; fine-tunes by outcome
  and their duration; gate decisions. These start from zero when the agent starts, as Prometheus expects.
- **levels and lifetime totals, read from the agent's status at scrape time** (:class:`StatusCollector`): inbox,
  outbox and quarantine depths, samples selected and dropped, consecutive store failures, heartbeat age, disk use.
  The status is what the heartbeat carries too, so a scrape and a heartbeat never disagree and nothing is kept in
  step twice. The totals come from ``state.json`` and so survive restarts (a counter that never resets is valid).

A scrape never fails because the status does: the collector then reports ``edgeloop_status_ok 0`` and the event
metrics still come out.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from edge_agent.activation import EXIT_FENCED
from edge_agent.serving import Prediction

log = logging.getLogger(__name__)

# Per image: a tiny CNN takes well under a millisecond, a ResNet ensemble on an ARM board a few hundred.
INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, float("inf"))
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
FINETUNE_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))


class AgentMetrics:
    """The registry of one agent: its event counters, and the status it reads at scrape time."""

    def __init__(self, status: Callable[[], dict[str, Any]] | None = None, status_file: Path | None = None,
                 quarantine: Path | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.predictions = Counter("edgeloop_predictions", "Images classified, by predicted class, model version "
                                   "and source (inbox, http)", ["class", "model_version", "source"], registry=r)
        self.inference = Histogram("edgeloop_inference_seconds", "Inference time per image (its share of the "
                                   "batch's graph run)", ["source"], buckets=INFERENCE_BUCKETS, registry=r)
        self.requests = Counter("edgeloop_http_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.request_seconds = Histogram("edgeloop_http_request_seconds", "Time to answer an HTTP request, from "
                                         "its complete head to the last byte sent", ["endpoint"],
                                         buckets=REQUEST_BUCKETS, registry=r)
        self.uploads = Counter("edgeloop_sample_uploads", "Samples the uplink moved to the store (uploaded, or "
                               "already there) and upload attempts that failed", ["result"], registry=r)
        self.finetunes = Counter("edgeloop_finetunes", "Fine-tunes ended, by outcome (activated, kept, skipped, "
                                 "fenced, failed)", ["outcome"], registry=r)
        self.finetune_seconds = Histogram("edgeloop_finetune_seconds", "Duration of the fine-tunes that wrote a "
                                          "report", buckets=FINETUNE_BUCKETS, registry=r)
        self.gates = Counter("edgeloop_gate_decisions", "Gate decisions, by kind (finetune: a fine-tune's one-shot "
                             "gate; shadow: a waiting challenger judged again) and outcome (accept, keep)",
                             ["kind", "outcome"], registry=r)
        if status is not None:
            r.register(StatusCollector(status, status_file, quarantine))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition (body, content type), in the format the scraper's ``Accept`` header asks for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    # ---- events ----------------------------------------------------------------------------------
    def prediction(self, prediction: Prediction, source: str) -> None:
        self.predictions.labels(prediction.label, prediction.model_version, source).inc()
        self.inference.labels(source).observe(prediction.latency_ms / 1000)

    def counting(self, on_prediction: Callable[..., Any], source: str) -> Callable[..., Any]:
        """``on_prediction`` (sample selection), counting each prediction once it has been offered (for the inbox,
        whose processor calls it once per classified image): a count a scraper sees has its sample queued."""
        def counted(raw: bytes, prediction: Prediction, name: str, *args: Any, **kwargs: Any) -> Any:
            try:
                return on_prediction(raw, prediction, name, *args, **kwargs)
            finally:
                self.prediction(prediction, source)
        return counted

    def request(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        self.request_seconds.labels(endpoint).observe(seconds)

    def upload_pass(self, result: Any) -> None:
        """One pass of the uplink (:class:`edge_agent.uplink.PumpResult`): a pass stops at its first failure."""
        if result.uploaded:
            self.uploads.labels("uploaded").inc(result.uploaded)
        if result.skipped_existing:
            self.uploads.labels("already_there").inc(result.skipped_existing)
        if result.error is not None:
            self.uploads.labels("failed").inc()

    def finetune_ended(self, code: int, report: dict[str, Any] | None) -> None:
        """A fine-tune child ended with exit ``code`` and (when it got that far) its report."""
        if code == EXIT_FENCED:
            outcome = "fenced"
        elif code != 0 or report is None:
            outcome = "failed"
        elif report.get("skipped"):
            outcome = "skipped"
        else:
            outcome = "activated" if report.get("activated") else "kept"
        self.finetunes.labels(outcome).inc()
        if report is not None and isinstance(report.get("seconds"), (int, float)):
            self.finetune_seconds.observe(report["seconds"])
        if code == 0 and report is not None and isinstance(report.get("gate"), dict):
            self.gate("finetune", report["gate"])

    def gate(self, kind: str, decision: dict[str, Any] | None) -> None:
        if decision is not None:
            self.gates.labels(kind, "accept" if decision.get("accept") else "keep").inc()


class StatusCollector:
    """Gauges and lifetime totals read from the agent's status at each scrape (see the module doc)."""

    def __init__(self, status: Callable[[], dict[str, Any]], status_file: Path | None, quarantine: Path | None):
        self.status, self.status_file, self.quarantine = status, status_file, quarantine

    def describe(self) -> list[Metric]:
        return []  # names are not checked against the registry's: collect() is called at scrape time only

    def collect(self) -> Iterator[Metric]:
        try:
            status = self.status()
        except Exception:  # a scrape must still answer: the event metrics are worth having alone
            log.exception("status unavailable for /metrics")
            yield _gauge("edgeloop_status_ok", "1 when the agent's status could be read for this scrape", 0)
            return
        yield _gauge("edgeloop_status_ok", "1 when the agent's status could be read for this scrape", 1)
        yield from _levels(status)
        yield from _totals(status)
        if self.quarantine is not None:
            yield _gauge("edgeloop_quarantine_files", "Files set aside in data/quarantine (unreadable inputs)",
                         _count_quarantined(self.quarantine))
        if self.status_file is not None:
            age = _age(self.status_file)
            if age is not None:
                yield _gauge("edgeloop_heartbeat_age_seconds", "Seconds since the agent last wrote its heartbeat "
                             "(status.json; the same status goes to the store)", age)


def _levels(status: dict[str, Any]) -> Iterator[Metric]:
    queues = status.get("queues") or {}
    for key, name, doc in (("inbox", "edgeloop_inbox_files", "Files waiting in the inbox"),
                           ("outbox", "edgeloop_outbox_samples", "Samples waiting in the outbox"),
                           ("outbox_bytes", "edgeloop_outbox_bytes", "Bytes waiting in the outbox")):
        if isinstance(queues.get(key), (int, float)):
            yield _gauge(name, doc, queues[key])
    if "upload_backoff_failures" in status:
        yield _gauge("edgeloop_store_consecutive_failures", "Store writes (uploads, heartbeats) failed in a row; "
                     "0 once one succeeds", status["upload_backoff_failures"] or 0)
    if "last_upload_error" in status:
        yield _gauge("edgeloop_upload_error", "1 while the last upload attempt failed", int(bool(status["last_upload_error"])))
    finetune = status.get("finetune") or {}
    if "running" in finetune:
        yield _gauge("edgeloop_finetune_running", "1 while a fine-tune runs", int(bool(finetune["running"])))
    if "finetune_failures" in status:
        yield _gauge("edgeloop_finetune_consecutive_failures", "Fine-tunes failed in a row (given up at 3)",
                     status["finetune_failures"] or 0)
    if "disk_full" in status:
        yield _gauge("edgeloop_disk_full", "1 while free disk is under retention.min_free_bytes",
                     int(bool(status["disk_full"])))
    disk = status.get("disk_bytes")
    if isinstance(disk, dict):
        family = GaugeMetricFamily("edgeloop_disk_bytes", "Bytes used per area of the agent root", labels=["area"])
        for area, n in sorted(disk.items()):
            if isinstance(n, (int, float)):
                family.add_metric([area], n)
        yield family
    if "site" in status:
        info = GaugeMetricFamily("edgeloop_agent_info", "The site, the agent's state and the active ensemble "
                                 "(always 1)", labels=["site", "state", "active_version"])
        info.add_metric([str(status.get("site")), str(status.get("state")), str(status.get("active_version") or "")], 1)
        yield info
    if isinstance(status.get("started"), (int, float)):
        yield _gauge("edgeloop_agent_start_time_seconds", "When the agent started (Unix time)", status["started"])


def _totals(status: dict[str, Any]) -> Iterator[Metric]:
    """Lifetime totals from ``state.json`` (they survive restarts)."""
    for key, name, doc in (("processed_total", "edgeloop_inbox_processed", "Inbox images classified (lifetime)"),
                           ("quarantined_total", "edgeloop_inbox_quarantined", "Inbox files quarantined (lifetime)"),
                           ("selected_total", "edgeloop_samples_selected", "Samples selected for upload (lifetime)"),
                           ("uploaded_total", "edgeloop_samples_uploaded", "Samples uploaded to the store (lifetime)"),
                           ("dropped_total", "edgeloop_outbox_dropped", "Samples dropped from a full outbox (lifetime)")):
        if isinstance(status.get(key), (int, float)):
            yield CounterMetricFamily(name, doc, value=status[key])


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _count_quarantined(folder: Path) -> int:
    """The quarantined inputs (each has a ``.reason.json`` beside it, not counted)."""
    try:
        with os.scandir(folder) as entries:
            return sum(1 for e in entries if not e.name.endswith(".reason.json") and not e.name.startswith("."))
    except OSError:
        return 0


def _age(path: Path) -> float | None:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return None
