"""The edge agent daemon: one loop that keeps a site learning and serving.

One module on purpose (over 450 lines): it is the loop, its steps' glue and its heartbeat, and each step is one
short method that calls its own module (inbox, sampler, outbox, uplink, homelabels, shadow, supervisor,
activation); what decides anything lives there, not here.

Each tick: look for a reason to fine-tune (a new base model from the cloud, enough new operator labels),
start or watch the fine-tune (a separate process, so inference never waits for it), classify the inbox,
queue the samples worth sending, push the outbox to the store, and write the heartbeat. Everything it must
remember lives in ``state.json`` and on disk (inbox, outbox, ensembles), so a restart resumes where it
stopped and a SIGTERM only has to finish the current step.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.activation import EXIT_FENCED, EXIT_HELD, active_graph_hold
from edge_agent.basemodels import verified_base_models
from edge_agent.config import AgentConfig
from edge_agent.fileio import write_json_atomic
from edge_agent.homelabels import SentLog, is_home_label, take_labels
from edge_agent.inbox import InboxProcessor
from edge_agent.layout import AgentPaths
from edge_agent.metrics import AgentMetrics
from edge_agent.outbox import Outbox
from edge_agent.retention import disk_full_message, disk_use, enforce
from edge_agent.sampler import Sampler
from edge_agent.serving import ENSEMBLE_FILE, EnsembleHandle, validate_ensemble
from edge_agent.shadow import ShadowScorer, shadow_record
from edge_agent.sitedata import EXAM_SPLITS, EXAMS_KEY, SplitOf, exam_list, labelled_files
from edge_agent.state import AgentState
from edge_agent.store import Store
from edge_agent.supervisor import FinetuneSupervisor
from edge_agent.uplink import Backoff, Uplink
from edge_agent.window import LiveWindow

log = logging.getLogger("edge_agent")

MAX_FINETUNE_FAILURES = 3
MAX_DEPLOY_RECORD_BYTES = 64 * 1024  # as the host worker's rollback reads them
FINETUNE_RETRY_S = 30.0
FINETUNE_RETRY_MAX_S = 900.0


@dataclass
class Clock:
    heartbeat_due: float = 0.0
    retention_due: float = 0.0
    labels_due: float = 0.0
    finetune_retry_at: float = 0.0
    disk_full_failures: int = 0  # fine-tunes failed for want of space: not the run's fault, never given up


class Agent:
    """The daemon. ``run()`` blocks until ``stop`` is set (SIGTERM/SIGINT), then returns 0."""

    def __init__(self, config: AgentConfig, config_file: Path):
        self.config, self.config_file = config, Path(config_file).resolve()
        self.paths = AgentPaths(Path(config.root))
        self.paths.ensure()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.state = AgentState.load(self.paths.state_file, set_damaged_aside=True)
        self.started = time.time()
        self.clock = Clock()
        self.handle = EnsembleHandle(self.paths.active_link, threads=1, image_size=config.image_size)
        self.outbox = Outbox(self.paths.outbox, config.upload.outbox_max_bytes)
        self.window = LiveWindow()
        self.metrics = AgentMetrics(self.status, self.paths.status_file, self.paths.quarantine)  # GET /metrics
        self.shadow = ShadowScorer(self.paths) if config.profile == "edge" else None
        self.sampler = Sampler(config, self.outbox, self.state, self.lock, self.window, self.shadow)
        self.inbox = InboxProcessor(self.paths, self.handle, config.serve.max_image_bytes,
                                    self.metrics.counting(self.sampler, "inbox"),
                                    max_pixels=config.serve.max_image_pixels)
        self._beat_store = Store(config.store_url, config.store_options)  # heartbeats: own connection, no back-off
        self._beat_lock = threading.Lock()
        self._beats: threading.Thread | None = None
        self._seq = 0
        self.uplink = Uplink(Store(config.store_url, config.store_options), self.outbox, config.site,
                             config.upload.max_samples_per_day, config.upload.max_bytes_per_day,
                             Backoff(config.upload.retry_base_s, config.upload.retry_max_s))
        self.finetune = FinetuneSupervisor(self.config_file, self.paths)
        self.sent = SentLog(self.paths.root / "sent.log")
        # edge-serve: no torch here; the cloud ships each base as its ensemble graph, served as it comes
        self.finetunes = config.profile == "edge"
        self.server = None
        self._pid_lock = None
        self._shadow_due = True  # look at a waiting challenger again: at start, and when labels arrived
        self._exams: bytes | None = b""  # b"": to (re)compute and publish: at start, when the labelled set changes
        self._exams_failed = False

    # ---- lifecycle -------------------------------------------------------------------------------
    def run(self) -> int:
        self._take_pid_lock()
        self.outbox.sweep()
        self._sweep_store_partials()
        from edge_agent.activation import sweep_staging

        sweep_staging(self.paths)
        self._start_server()
        log.info("agent for site %s started (pid %d, root %s)", self.config.site, os.getpid(), self.paths.root)
        self.heartbeat()
        self._beats = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        self._beats.start()
        while not self.stop.is_set():
            self.tick()
            self.stop.wait(self.config.poll_interval_s)
        self.shutdown()
        return 0

    def tick(self) -> None:
        """One pass of the loop; a failing step is logged and the others still run."""
        for step in (self.watch_finetune, self.take_labels_home, self.scan_triggers, self.publish_exams,
                     self.judge_labelled,
                     self.maybe_start_finetune, self.judge_shadow, self.process_inbox,
                     self.pump_uplink, self.maybe_enforce_retention, self.maybe_heartbeat):
            if self.stop.is_set():
                return
            try:
                step()
            except Exception:
                log.exception("step %s failed", step.__name__)

    def shutdown(self) -> None:
        log.info("stopping")
        self.finetune.stop()
        if self.server is not None:
            self.server.stop()
        if self._beats is not None:
            self._beats.join(10)
        self.heartbeat(phase="stopped")
        self.paths.pid_file.unlink(missing_ok=True)
        log.info("stopped")

    def _take_pid_lock(self) -> None:
        handle = open(self.paths.pid_file, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SystemExit(f"another agent holds {self.paths.pid_file}") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        except OSError as exc:  # a full disk: the lock is what counts, the pid in it is for people
            log.error("pid not written to %s: %s", self.paths.pid_file, exc)
        self._pid_lock = handle

    def _sweep_store_partials(self, older_than_s: float = 3600.0) -> None:
        """Leftovers of uploads killed mid-way or cut short by a full store; only this agent writes its own
        folder and status, so once its uploads work again any part left of them is stale. The store may be
        away, which is fine: next time."""
        try:
            removed = self.uplink.store.sweep_partials(f"samples/{self.config.site}", older_than_s) + \
                self.uplink.store.sweep_partials("status", older_than_s, name=f"{self.config.site}.json")
        except Exception as exc:
            log.info("store partials not swept (%s)", exc)
            return
        if removed:
            log.info("removed %d partial uploads left in the store", removed)

    def _start_server(self) -> None:
        if self.config.serve.port == 0:
            return
        from edge_agent.server import Classifier, Server

        def select(raw: bytes, prediction, name: str) -> None:
            self.sampler(raw, prediction, name, source="http")

        classify_body = Classifier(self.handle, self.config.serve.max_image_bytes, select,
                                   self.config.serve.max_image_pixels)
        self.server = Server(self.config.serve, classify_body, self.status, self.metrics).start()
        log.info("serving HTTP on %s:%d%s", *self.server.address,
                 " (bearer token required)" if self.config.serve.token else "")

    # ---- steps -----------------------------------------------------------------------------------
    def scan_triggers(self) -> None:
        """Owe a fine-tune for a new base model or for enough new operator labels (``edge-serve``: serve a
        new base model as it comes)."""
        verified = verified_base_models(self.paths, "model.pt" if self.finetunes else ENSEMBLE_FILE)
        gone = [v for v in self.state.base_versions_seen if v not in verified]
        if gone:  # rolled back (set aside): no longer reported, and fine-tuned again if deployed again
            self.state.base_versions_seen = [v for v in self.state.base_versions_seen if v in verified]
            log.info("base model(s) %s no longer deployed", ", ".join(gone))
            self.save_state()
        fresh = [v for v in verified if v not in self.state.base_versions_seen]
        if fresh:
            self.state.base_versions_seen.extend(fresh)
            if self.finetunes:
                self._owe(f"new base model {fresh[-1]}")
            else:
                self.serve_as_is(fresh[-1])
        seen = set(self.state.labelled_seen)
        new = [(c, f) for c, f in labelled_files(self.paths) if f"{c}/{f.name}" not in seen]
        if not new:
            return
        self._exams, self._shadow_due = b"", True
        for class_name, file in new:
            self.state.labelled_seen.append(f"{class_name}/{file.name}")
            if not is_home_label(file):  # a label that came home is of a sample the store already holds
                self.state.labelled_unjudged.append(f"{class_name}/{file.name}")
        self.state.new_labelled += len(new)
        if self.finetunes and self.state.new_labelled >= self.config.thresholds.min_new_labelled:
            self._owe(f"{self.state.new_labelled} new labelled images")
            self.state.new_labelled = 0
        self.save_state()

    def take_labels_home(self) -> None:
        """Every ``home_labels.poll_s``: file the labels the cloud gave this site's samples
        (:mod:`edge_agent.homelabels`); the scan that follows counts them toward the next fine-tune."""
        classifier = self.handle.get()
        if time.time() < self.clock.labels_due or classifier is None:
            return  # the classes come from what serves
        self.clock.labels_due = time.time() + self.config.home_labels.poll_s
        report = take_labels(self.uplink.store, self.paths, self.config.site, list(classifier.class_names),
                             self.sent, self.config.home_labels.shares, self.config.serve.max_image_bytes)
        totals = self.state.labels_home
        if report.changed or report.refused or report.error != totals.get("error"):
            totals.update(taken=totals.get("taken", 0) + report.taken,
                          relabelled=totals.get("relabelled", 0) + report.relabelled,
                          refused=totals.get("refused", 0) + len(report.refused),
                          last_refused=report.refused[:5], error=report.error, pending=report.pending,
                          last_change=time.time() if report.changed else totals.get("last_change"))
            if report.changed:
                self._shadow_due = True
                log.info("labels home: %d new, %d relabelled, %d refused", report.taken, report.relabelled,
                         len(report.refused))
            if report.error:
                log.warning("labels home: %s", report.error)
            self.save_state()

    def serve_as_is(self, version: str) -> None:
        """Publish the deployed ensemble graph of base ``version`` and switch serving to it atomically
        (checked to load first: a graph that cannot serve never becomes active)."""
        from edge_agent.activation import activate, publish, staging_dir
        from edge_agent.candidates import base_folder_name

        name = base_folder_name(version)
        if not (self.paths.ensembles / name).is_dir():
            staged = staging_dir(self.paths, name)
            shutil.copyfile(self.paths.base_models / version / ENSEMBLE_FILE, staged / ENSEMBLE_FILE)
            try:
                validate_ensemble(staged / ENSEMBLE_FILE, self.config.image_size)
            except ValueError as exc:
                shutil.rmtree(staged, ignore_errors=True)
                log.error("base model %s cannot serve: %s", version, exc)
                return
            publish(self.paths, staged, name)
        activate(self.paths, name, bases=[version])  # the fence holds here too: a rolled-back base never serves
        log.info("serving base model %s as it came (profile %s)", version, self.config.profile)
        self.save_state()
        self.heartbeat()

    def judge_labelled(self) -> None:
        """Offer newly labelled images for upload, once a model serves to judge them with: a labelled image
        goes up only when it is informative (:mod:`edge_agent.select`), never just because it is labelled,
        and never when it is in this site's gate or test split (the exam stays at the site)."""
        if not self.state.labelled_unjudged or self.handle.get() is None:
            return
        split_of = SplitOf(self.paths)
        for relative in self.state.labelled_unjudged:
            class_name, _, name = relative.partition("/")
            self._queue_labelled(class_name, self.paths.labelled / class_name / name, split_of)
        self.state.labelled_unjudged = []
        self.save_state()

    def publish_exams(self) -> None:
        """Put the hashes of this site's gate and test images (never the images) in the store, so the cloud
        refuses to train on them whatever a sidecar says; again whenever the labelled set changed."""
        if self._exams is None:
            return
        if not self._exams:
            self._exams = json.dumps(exam_list(self.paths, self.config.site)).encode()
        try:
            self.uplink.store.put_verified(EXAMS_KEY.format(site=self.config.site), self._exams)
        except Exception as exc:  # the store is away: next tick again (the images themselves never go up)
            log.log(logging.DEBUG if self._exams_failed else logging.WARNING, "exam hashes not published: %s", exc)
            self._exams_failed = True
            return
        log.info("published the hashes of the exam images (gate and test): %d bytes", len(self._exams))
        self._exams, self._exams_failed = None, False

    def _owe(self, reason: str) -> None:
        log.info("fine-tune owed: %s", reason)
        self.state.pending_finetune = reason
        self.state.finetune_failures = 0
        self.save_state()

    def _queue_labelled(self, class_name: str, file: Path, split_of: SplitOf) -> None:
        from edge_agent.imaging import ImageError, decode_image
        from edge_agent.serving import classify

        try:
            raw = file.read_bytes()
            split = split_of(file, raw)
            if split in EXAM_SPLITS:
                return  # the site's exam never leaves it
            classifier = self.handle.get()
            image = decode_image(raw, classifier.image_size, self.config.serve.max_image_bytes)
            self.sampler(raw, classify(classifier, image[None])[0], file.name, operator_label=class_name,
                         source="operator", split=split)
        except (ImageError, OSError) as exc:
            log.warning("labelled file %s/%s not usable: %s", class_name, file.name, exc)

    def judge_shadow(self) -> None:
        """When labels arrived and a challenger waits in shadow, look again (:func:`edge_agent.shadow.rejudge`:
        the sequential test, valid however often it looks). Not while a fine-tune runs: it judges for itself."""
        if not self._shadow_due or self.finetune.running or not self.finetunes:
            return
        self._shadow_due = False
        if shadow_record(self.paths) is None:
            return
        from edge_agent.errors import FinetuneError
        from edge_agent.shadow import rejudge

        try:
            decision = rejudge(self.paths, self.config)
            self.metrics.gate("shadow", decision)
        except FinetuneError as exc:
            log.info("shadow not judged: %s", exc)
            return
        if decision and decision["accept"]:
            self.heartbeat()

    def maybe_start_finetune(self) -> None:
        if self.finetune.running or not self.state.pending_finetune or time.time() < self.clock.finetune_retry_at:
            return
        if not self.state.base_versions_seen or self.disk_full():
            return  # nothing to fine-tune from yet, or no room for it: it stays owed
        if self._held(active_graph_hold(self.paths, self.config.image_size)):
            return  # the active graph breaks the contract: owed, not failed
        self.finetune.start(self.state.pending_finetune)
        self.heartbeat()

    def watch_finetune(self) -> None:
        ended = self.finetune.poll()
        if ended is None:
            return
        code, report = ended
        self.metrics.finetune_ended(code, report)
        if code == EXIT_FENCED:  # its base was rolled back while it ran: nothing is owed for it any more
            self.state.pending_finetune = None
            log.warning("fine-tune %s was fenced by a rollback and did not activate", self.finetune.run_id)
        elif code == 0 and report is not None:
            self.state.last_run = summarise_run(report)
            if self.state.pending_finetune == report.get("reason"):  # owed meanwhile (a new base): still owed
                self.state.pending_finetune = None
            self.state.finetune_failures = 0
            self.state.gate_decisions += report.get("gate") is not None
            self.state.finetune_blocked = report.get("skipped")
            self.clock.disk_full_failures = 0
            log.info("fine-tune %s finished: %s", report.get("run_id"), report.get("decision"))
        elif code == EXIT_HELD:  # the active graph changed under it to one it cannot use: owed, not failed
            self._held((report or {}).get("held") or "the fine-tune cannot use the active ensemble")
            self.clock.finetune_retry_at = time.time() + FINETUNE_RETRY_S
        elif full := self.disk_full():
            delay = min(FINETUNE_RETRY_MAX_S, FINETUNE_RETRY_S * 2 ** self.clock.disk_full_failures)
            self.clock.disk_full_failures += 1
            self.clock.finetune_retry_at = time.time() + delay
            log.error("fine-tune %s failed with the %s; it stays owed and is retried once space returns "
                      "(not before %.0f s)", self.finetune.run_id, full, delay)
        else:
            self.state.finetune_failures += 1
            self.clock.finetune_retry_at = time.time() + FINETUNE_RETRY_S
            log.error("fine-tune %s failed with exit code %s (%d/%d)", self.finetune.run_id, code,
                      self.state.finetune_failures, MAX_FINETUNE_FAILURES)
            if self.state.finetune_failures >= MAX_FINETUNE_FAILURES:
                self.state.pending_finetune = None
        self.save_state()
        self.heartbeat()

    def _held(self, reason: str | None) -> bool:
        """Whether a fine-tune is held (:func:`edge_agent.activation.active_graph_hold`); ``finetune_blocked``
        says why while it is, and is cleared when it no longer is."""
        held = f"held: {reason}" if reason else None
        was = (self.state.finetune_blocked or "").startswith("held: ")
        if held != self.state.finetune_blocked and (held or was):
            self.state.finetune_blocked = held
            log.log(logging.ERROR if held else logging.INFO, "fine-tune %s", held or "no longer held")
            self.save_state()
        return held is not None

    def process_inbox(self) -> None:
        try:
            report = self.inbox.process()
        except Exception:
            self.window.failure(self.handle.serving_version, "error")
            raise
        if report.quarantined:
            self.window.failure(self.handle.serving_version, "quarantined", report.quarantined)
        if report.processed or report.quarantined:
            with self.lock:
                self.state.processed_total += report.processed
                self.state.quarantined_total += report.quarantined
            log.info("inbox: %d classified, %d quarantined", report.processed, report.quarantined)
            self.save_state()

    def pump_uplink(self) -> None:
        dropped = self.outbox.enforce_cap()
        if dropped:
            log.warning("outbox over %d bytes: dropped %d least useful samples",
                        self.config.upload.outbox_max_bytes, dropped)
        waiting = {item.sha256 for item in self.outbox.items()}
        result = self.uplink.pump(self.state.upload_ledger, should_stop=self.stop.is_set,
                                  save_ledger=lambda _: self.save_state())
        self.metrics.upload_pass(result)
        self.sent.add(waiting - {item.sha256 for item in self.outbox.items()})  # what went up: labels may come home
        if result.uploaded and self.state.last_upload_error:  # the store is back (its disk had filled?)
            self._sweep_store_partials(older_than_s=0.0)
        with self.lock:
            self.state.dropped_total += dropped
            self.state.uploaded_total += result.uploaded
            if result.error is not None:
                self.state.last_upload_error = result.error
            elif result.uploaded:
                self.state.last_upload_error = None
        if dropped or result.uploaded or result.skipped_existing or result.error:
            self.save_state()

    def maybe_enforce_retention(self) -> None:
        if time.time() < self.clock.retention_due or self.finetune.running:
            return  # a running fine-tune owns runs/ and the staging of ensembles
        keep = {name for name in (_version_of(self.handle.target()), self.handle.serving_version) if name}
        keep |= restorable_ensembles(self.paths)  # what a rollback of a present base would serve again
        if (waiting := shadow_record(self.paths)) is not None:
            keep.add(waiting["version"])
        enforce(self.paths, self.config.retention, keep)
        self.clock.retention_due = time.time() + self.config.retention.interval_s

    def maybe_heartbeat(self) -> None:
        if time.time() >= self.clock.heartbeat_due:
            self.heartbeat()

    def _heartbeats(self) -> None:
        """The heartbeat's own schedule: every ``heartbeat_interval_s`` whatever a step of the loop is doing
        (a long inbox, a slow store for samples, uploads in back-off), until the agent stops."""
        while not self.stop.wait(min(1.0, self.config.heartbeat_interval_s / 2)):
            if time.time() >= self.clock.heartbeat_due:
                try:
                    self.heartbeat()
                except Exception:  # noqa: BLE001 - a heartbeat that failed is retried on schedule
                    log.exception("heartbeat failed")

    # ---- state and status ------------------------------------------------------------------------
    def save_state(self) -> None:
        with self.lock:
            self.state.save(self.paths.state_file)

    def phase(self) -> str:
        if self.stop.is_set():
            return "stopping"
        if self.finetune.running:
            return "finetuning"
        if self.handle.get() is None:
            return "no-model"
        return "serving-fallback" if self.handle.problem else "serving"

    def status(self, phase: str | None = None) -> dict[str, Any]:
        with self.lock:
            state = self.state.model_dump(mode="json", exclude={"labelled_seen", "labelled_unjudged"})
        return {
            "site": self.config.site, "time": time.time(), "pid": os.getpid(), "state": phase or self.phase(),
            "started": self.started, "active_version": _version_of(self.handle.target()),
            "serving_problem": self.handle.problem, "active_bases": self.handle.bases(),
            "base_versions": state.pop("base_versions_seen"),
            "finetune": {"running": self.finetune.running, "run_id": self.finetune.run_id,
                         "reason": self.finetune.reason, "progress": self.finetune.progress(),
                         "state": "on" if self.finetunes else f"off (profile {self.config.profile})"},
            "queues": {"inbox": _count(self.paths.inbox), "outbox": len(self.outbox),
                       "outbox_bytes": self.outbox.size_bytes()},
            "inbox_stuck": self.inbox.stuck_summary(),
            "upload_backoff_failures": self.uplink.backoff.failures,
            "disk_bytes": disk_use(self.paths, known={"outbox": self.outbox.size_bytes()}),
            "disk_full": self.disk_full(),
            "window": self.window.summary(),
            "shadow": _shadow_summary(self.paths, state.get("shadow_scored") or {}),
            **state,
        }

    def heartbeat(self, phase: str | None = None) -> None:
        """Write the status locally and send it to the store over the heartbeat's own connection (never held
        back by the uploads' back-off); with the disk full it is sent from memory. One at a time (the loop and
        the heartbeat thread both call it); each carries the next sequence number."""
        with self._beat_lock:
            self._seq += 1
            status = {**self.status(phase), "seq": self._seq}
            if status.get("last_upload_error"):
                status["uploads"] = f"uploads failing ({status['last_upload_error']})"
            try:
                write_json_atomic(self.paths.status_file, status)
                self.save_state()
            except OSError as exc:
                log.error("status not written locally (%s); sending it from memory", exc)
            self.uplink.heartbeat(status, self._beat_store)
            self.clock.heartbeat_due = time.time() + self.config.heartbeat_interval_s

    def disk_full(self) -> str | None:
        """``disk full (free X of Y, ...)`` while the agent's disk has less free than ``retention.min_free_bytes``."""
        return disk_full_message(self.paths.root, self.config.retention.min_free_bytes)


def restorable_ensembles(paths: AgentPaths) -> set[str]:
    """The ensembles the deploy records of still-deployed bases name as what served before them."""
    keep = set()
    for record in paths.deploy_records.glob("*.json"):
        try:  # a regular file of a deploy record's size only: a link to /dev/zero costs nothing
            if record.is_symlink() or not record.is_file():
                continue
            with open(record, "rb") as handle:
                raw = handle.read(MAX_DEPLOY_RECORD_BYTES + 1)
            if len(raw) > MAX_DEPLOY_RECORD_BYTES:
                continue
            data = json.loads(raw)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("before_active"), str) \
                and (paths.base_models / record.stem).is_dir():
            keep.add(data["before_active"])
    return keep


def _shadow_summary(paths: AgentPaths, scored: dict[str, list[int]]) -> dict[str, Any] | None:
    """The waiting challenger: which, since when, how often judged, the last verdict, and how often it
    disagreed with what serves on production images."""
    record = shadow_record(paths)
    if record is None:
        return None
    images, disagreed = scored.get(record["version"], [0, 0])
    last = record.get("last") or {}
    return {"version": record["version"], "since": record.get("since"), "looks": record.get("looks"),
            "last_reason": last.get("reason"), "production_images": images, "disagreements": disagreed}


def summarise_run(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("run_id", "reason", "version", "bases", "decision", "gate", "activated", "skipped", "finished", "seconds", "ensemble", "shadow",
            "members", "candidates", "serving", "serving_version", "gain_over_base", "precision", "new_precision",
            "counts")
    return {k: report.get(k) for k in keys if k in report}


def _version_of(target: str | None) -> str | None:
    return Path(target).name if target else None


def _count(folder: Path) -> int:
    try:
        return sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return 0


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT only set a flag: the loop finishes its step and shuts down cleanly."""
    def handler(signum, _frame):
        log.info("signal %d received", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
