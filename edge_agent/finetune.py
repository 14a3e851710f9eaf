"""Fine-tuning K ensemble members in parallel from the cloud's base model(s) and the site's labelled data.

Each member trains in its own process (multiprocessing, spawn context: no forked torch state) on its own
bootstrap resample of the training split with its own augmentation policy, so the members err
independently, which is what makes their average better than any one of them. The cores are split between
them (``threads = cores // K``): the machine is used fully, never oversubscribed.

The whole fine-tune runs in a process of its own (``edgeloop-agent finetune``), started and watched by the
daemon. It stops, terminating its workers, on SIGTERM or when its parent dies; nothing it leaves behind is
visible as a model until :mod:`edge_agent.activation` publishes it with one rename.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_agent.activation import Score, active_dir, activate, gate, publish, staging_dir, sweep_staging
from edge_agent.config import AgentConfig
from edge_agent.layout import AgentPaths
from edge_agent.fileio import read_json, write_json_atomic

log = logging.getLogger(__name__)

SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
LOCK_WAIT_S = 30.0
EXIT_ABANDONED = 3
EXIT_NO_INPUT = 4


class FinetuneError(RuntimeError):
    """A fine-tune that cannot run (no base model, no labelled data) or whose members all failed."""


# ---- inputs ----------------------------------------------------------------------------------------

def base_models(paths: AgentPaths) -> list[tuple[str, Path]]:
    """Deployed base models, oldest first, whose sha256 checks out."""
    from edge_agent.daemon import verified_base_models

    return [(v, paths.base_models / v / "model.pt") for v in verified_base_models(paths)]


def pick_bases(paths: AgentPaths, archs: list[str]) -> list[tuple[str, Path, str]]:
    """For each member arch, the newest base of that arch, else the newest base of any arch.

    Returns (version, checkpoint, arch actually used) per member.
    """
    import torch

    bases = base_models(paths)
    if not bases:
        raise FinetuneError("no verified base model under models/base/")
    arch_of = {}
    for version, path in bases:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        arch_of[version] = payload["meta"]["spec"]["arch"]
    newest = bases[-1]
    chosen = []
    for arch in archs:
        match = [b for b in bases if arch_of[b[0]] == arch]
        version, path = match[-1] if match else newest
        if not match:
            log.warning("no base model of arch %s; member uses %s (%s)", arch, version, arch_of[version])
        chosen.append((version, path, arch_of[version]))
    return chosen


def _split_of(name: str, data: bytes) -> str:
    """Deterministic split for a file no manifest names: by content hash, so it never moves."""
    bucket = int(hashlib.sha256(data).hexdigest()[:8], 16) % 1000 / 1000
    cut1, cut2 = SPLIT_FRACTIONS[0], SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]
    return "train" if bucket < cut1 else "val" if bucket < cut2 else "test"


def load_site_splits(paths: AgentPaths, classes: list[str], size: int):
    """train/val/test ArraySets from the labelled folder.

    A manifest in the folder (a dataset version copied in) fixes the splits of the files it names; files an
    operator added later are split by content hash. An empty val split borrows the train split (noted).
    """
    from edge_agent.datasets import MANIFEST, load_imagefolder

    data, files, skipped = load_imagefolder(paths.labelled, classes, size)
    for path, reason in skipped:
        log.warning("labelled file %s skipped: %s", path, reason)
    manifest = read_json(paths.labelled / MANIFEST, default={}) or {}
    known = {r["file"]: r["split"] for r in manifest.get("records", [])}
    splits = np.array([known.get(f.relative_to(paths.labelled).as_posix()) or _split_of(f.name, f.read_bytes())
                       for f in files])
    out = {s: data.subset(np.flatnonzero(splits == s)) for s in ("train", "val", "test")}
    if len(out["train"]) == 0:
        raise FinetuneError("no labelled training images under data/labelled/")
    if len(out["val"]) == 0:
        log.warning("no validation images; validating on the training split")
        out["val"] = out["train"]
    return out


# ---- members ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemberJob:
    """Everything a member worker needs, picklable for the spawn context."""

    index: int
    arch: str
    policy: str
    base_version: str
    base_path: str
    run_dir: str
    threads: int
    seed: int
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields

    @property
    def checkpoint(self) -> Path:
        return Path(self.run_dir) / f"member-{self.index}.pt"

    @property
    def result_file(self) -> Path:
        return Path(self.run_dir) / f"member-{self.index}.json"


def _exit_with_parent(parent: int) -> None:
    """A worker must not outlive its coordinator (kill -9 of the coordinator leaves no orphans)."""
    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def member_main(job: MemberJob, events) -> None:
    """Worker process: bootstrap-resample, fine-tune from the base, save the member checkpoint."""
    _exit_with_parent(os.getppid())
    import torch

    from edge_agent.datasets import ArraySet
    from edge_agent.models import CheckpointMeta, load_checkpoint, save_checkpoint
    from edge_agent.train import TrainConfig, train_model

    torch.set_num_threads(job.threads)
    run = Path(job.run_dir)
    train = ArraySet(np.load(run / "train_images.npy"), np.load(run / "train_labels.npy"))
    val = ArraySet(np.load(run / "val_images.npy"), np.load(run / "val_labels.npy"))
    rng = np.random.default_rng(job.seed)
    train = train.subset(rng.integers(0, len(train), len(train)))  # bootstrap: same size, with replacement
    model, meta = load_checkpoint(job.base_path)
    config = TrainConfig(**{**job.train, "threads": job.threads, "policy": job.policy, "seed": job.seed})

    def on_epoch(metrics) -> None:
        events.put(("epoch", job.index, asdict(metrics)))

    result = train_model(model, train, val, config, meta.normalization, on_epoch=on_epoch)
    member_meta = CheckpointMeta(spec=meta.spec, class_names=meta.class_names, normalization=meta.normalization,
                                 metrics={"val_acc": float(result.best_val_acc)}, dataset_id=None,
                                 parent=job.base_version, train_config=config.model_dump())
    save_checkpoint(job.checkpoint, model, member_meta)
    summary = {"index": job.index, "arch": meta.spec.arch, "policy": job.policy, "base": job.base_version,
               "best_val_acc": float(result.best_val_acc), "best_epoch": result.best_epoch,
               "epochs": len(result.history), "stopped_early": result.stopped_early,
               "seconds": round(result.seconds, 3), "threads": job.threads}
    write_json_atomic(job.result_file, summary)
    events.put(("done", job.index, summary))


def threads_per_member(cores: int, members: int, parallel: bool) -> int:
    return max(1, cores // members) if parallel else max(1, cores)


def train_members(jobs: list[MemberJob], parallel: bool, should_stop: Callable[[], bool],
                  on_event: Callable[[str, int, dict], None] = lambda *a: None) -> list[dict]:
    """Run the member workers (all at once, or one after another); returns their summaries.

    On ``should_stop`` every worker is terminated and :class:`InterruptedError` raised.
    """
    context = mp.get_context("spawn")
    events = context.Queue()
    waves = [jobs] if parallel else [[job] for job in jobs]
    for wave in waves:
        processes = [context.Process(target=member_main, args=(job, events), name=f"member-{job.index}",
                                     daemon=True) for job in wave]
        for process in processes:
            process.start()
        try:
            while any(p.is_alive() for p in processes):
                if should_stop():
                    raise InterruptedError("fine-tune stopped")
                _drain(events, on_event, timeout=0.2)
        finally:
            _terminate(processes)
        _drain(events, on_event, timeout=0.0)
    summaries = [read_json(job.result_file) for job in jobs]
    failed = [job.index for job, s in zip(jobs, summaries) if s is None or not job.checkpoint.is_file()]
    if failed:
        raise FinetuneError(f"member(s) {failed} failed; see the agent log")
    return summaries


def _drain(events, on_event, timeout: float) -> None:
    try:
        while True:
            kind, index, payload = events.get(timeout=timeout)
            on_event(kind, index, payload)
            timeout = 0.0
    except queue_mod.Empty:
        return


def _terminate(processes: list) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()


# ---- the run ---------------------------------------------------------------------------------------

class Progress:
    """``runs/<id>/progress.json``: what the daemon's status shows while a fine-tune runs."""

    def __init__(self, run_dir: Path, run_id: str, reason: str, members: int):
        self.path = run_dir / "progress.json"
        self.data: dict[str, Any] = {"run_id": run_id, "reason": reason, "phase": "starting", "started": time.time(),
                                     "members": {str(k): {"epoch": 0} for k in range(members)}}
        self.write()

    def phase(self, name: str) -> None:
        self.data["phase"] = name
        self.write()

    def event(self, kind: str, index: int, payload: dict) -> None:
        member = self.data["members"][str(index)]
        if kind == "epoch":
            member.update(epoch=payload["epoch"], val_acc=payload["val_acc"], train_loss=payload["train_loss"])
            log.info("member %d epoch %d: train loss %.4f, val acc %.4f (%.1fs)", index, payload["epoch"],
                     payload["train_loss"], payload["val_acc"], payload["seconds"])
        else:
            member.update(done=True, best_val_acc=payload["best_val_acc"])
        self.write()

    def write(self) -> None:
        write_json_atomic(self.path, self.data)


def make_jobs(config: AgentConfig, bases: list[tuple[str, Path, str]], run_dir: Path, parallel: bool = True,
              cores: int | None = None) -> list[MemberJob]:
    cores = cores or config.workers or os.cpu_count() or 1
    k = len(config.members)
    ft = config.finetune
    budget = ft.time_budget_s if parallel or ft.time_budget_s is None else ft.time_budget_s / k
    train = {"epochs": ft.epochs, "batch_size": ft.batch_size, "lr": ft.lr, "weight_decay": ft.weight_decay,
             "label_smoothing": ft.label_smoothing, "time_budget_s": budget}
    return [MemberJob(i, arch, member.policy, version, str(path), str(run_dir),
                      threads_per_member(cores, k, parallel), ft.seed + 1000 * (i + 1), train)
            for i, (member, (version, path, arch)) in enumerate(zip(config.members, bases))]


def save_splits(run_dir: Path, splits: dict) -> None:
    for name in ("train", "val"):
        np.save(run_dir / f"{name}_images.npy", splits[name].images)
        np.save(run_dir / f"{name}_labels.npy", splits[name].labels)


def active_score(paths: AgentPaths, val) -> tuple[str | None, Score | None]:
    """The serving ensemble's score on today's validation split (re-measured: the split grows)."""
    from edge_agent.ensemble import evaluate_graph
    from edge_agent.infer import OnnxClassifier

    folder = active_dir(paths)
    if folder is None or not (folder / "ensemble.onnx").is_file():
        return None, None
    try:
        classifier = OnnxClassifier(folder / "ensemble.onnx")
    except ValueError as exc:
        log.warning("active ensemble unreadable (%s): treated as none", exc)
        return folder.name, None
    if classifier.image_size != val.images.shape[-1]:
        return folder.name, None
    result = evaluate_graph(classifier, val.images, val.labels)
    return folder.name, Score(result["accuracy"], result["nll"])


def build_ensemble(config: AgentConfig, jobs: list[MemberJob], splits: dict, version: str, staged: Path,
                   class_names: list[str], extra_meta: dict[str, str]) -> dict[str, Any]:
    """Fit the weights on val, export the fused graph into ``staged``, evaluate it on val and test."""
    from edge_agent.ensemble import evaluate_graph, export_ensemble, fit_weights
    from edge_agent.infer import OnnxClassifier
    from edge_agent.models import load_checkpoint
    from edge_agent.train import predict_proba

    loaded = [load_checkpoint(job.checkpoint) for job in jobs]
    val = splits["val"]
    member_val = np.stack([predict_proba(m, val.images, meta.normalization) for m, meta in loaded], axis=1)
    fit = fit_weights(member_val, val.labels, seed=config.finetune.seed)
    path = export_ensemble([m for m, _ in loaded], [meta.normalization for _, meta in loaded], fit.weights,
                           staged / "ensemble.onnx", image_size=config.image_size, class_names=class_names,
                           metadata={"version": version, "site": config.site, **extra_meta})
    classifier = OnnxClassifier(path, threads=config.workers)
    return {"weights": fit.weights, "val": evaluate_graph(classifier, val.images, val.labels),
            "test": evaluate_graph(classifier, splits["test"].images, splits["test"].labels)}


def run_finetune(config: AgentConfig, paths: AgentPaths, run_id: str, reason: str,
                 should_stop: Callable[[], bool], parallel: bool = True) -> dict[str, Any]:
    """One complete fine-tune: members → ensemble → gate → (publish + activate). Returns the report."""
    started = time.time()
    run_dir = paths.runs / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(run_dir, run_id, reason, len(config.members))
    bases = pick_bases(paths, [m.arch for m in config.members])
    import torch

    class_names = torch.load(bases[-1][1], map_location="cpu", weights_only=True)["meta"]["class_names"]
    progress.phase("loading data")
    splits = load_site_splits(paths, class_names, config.image_size)
    save_splits(run_dir, splits)
    jobs = make_jobs(config, bases, run_dir, parallel)
    log.info("fine-tune %s: %d members (%s), %d threads each, train/val/test %d/%d/%d", run_id, len(jobs),
             "parallel" if parallel else "sequential", jobs[0].threads, *(len(splits[s]) for s in ("train", "val", "test")))
    progress.phase("training")
    train_start = time.time()
    members = train_members(jobs, parallel, should_stop, progress.event)
    train_seconds = time.time() - train_start
    progress.phase("ensembling")
    version = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + run_id[-6:]
    staged = staging_dir(paths, version)
    ensemble = build_ensemble(config, jobs, splits, version, staged, class_names,
                              {"run_id": run_id, "bases": json.dumps(sorted({b[0] for b in bases}))})
    for member, val_m, test_m in zip(members, ensemble["val"]["members"], ensemble["test"]["members"]):
        member.update(val_accuracy=val_m["accuracy"], test_accuracy=test_m["accuracy"])
    if should_stop():
        shutil.rmtree(staged, ignore_errors=True)
        raise InterruptedError("fine-tune stopped")
    progress.phase("gating")
    before, before_score = active_score(paths, splits["val"])
    decision = gate(Score(ensemble["val"]["accuracy"], ensemble["val"]["nll"]), before_score,
                    config.thresholds.min_gain)
    report = {"run_id": run_id, "reason": reason, "version": version, "site": config.site, "started": started,
              "bases": [b[0] for b in bases], "parallel": parallel, "train_seconds": round(train_seconds, 3),
              "members": members, "ensemble": ensemble, "active_before": before,
              "active_before_val": asdict(before_score) if before_score else None,
              "decision": decision.reason, "activated": decision.accept,
              "counts": {s: len(splits[s]) for s in ("train", "val", "test")}}
    write_json_atomic(staged / "report.json", report)
    if decision.accept:
        publish(paths, staged, version)
        activate(paths, version)
        log.info("ensemble %s activated: %s", version, decision.reason)
    else:
        shutil.rmtree(staged, ignore_errors=True)
        log.info("ensemble %s rejected: %s", version, decision.reason)
    report.update(finished=time.time(), seconds=round(time.time() - started, 3))
    progress.phase("done")
    write_json_atomic(run_dir / "report.json", report)
    for name in ("train_images.npy", "train_labels.npy", "val_images.npy", "val_labels.npy"):
        (run_dir / name).unlink(missing_ok=True)
    return report


# ---- the process -----------------------------------------------------------------------------------

class RunLock:
    """One fine-tune per agent root at a time (a restarted daemon may race a dying orphan)."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = None

    def acquire(self, wait_s: float, should_stop: Callable[[], bool]) -> bool:
        self.handle = open(self.path, "a+")
        deadline = time.time() + wait_s
        while True:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                if time.time() > deadline or should_stop():
                    return False
                time.sleep(0.2)


def run_finetune_process(config: AgentConfig, paths: AgentPaths, run_id: str | None, reason: str,
                         parent_pid: int | None = None, parallel: bool = True) -> int:
    """Entry point of ``edgeloop-agent finetune``: 0 done (activated or not), 3 stopped, 4 cannot run."""
    from edge_agent.daemon import new_run_id

    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if parent_pid is not None:
        def watch_parent():
            while not stop.is_set():
                if os.getppid() != parent_pid:
                    log.warning("the agent that started this fine-tune is gone; stopping")
                    stop.set()
                time.sleep(0.5)
        threading.Thread(target=watch_parent, daemon=True).start()
    lock = RunLock(paths.runs / ".finetune.lock")
    if not lock.acquire(LOCK_WAIT_S, stop.is_set):
        log.error("another fine-tune holds %s", lock.path)
        return EXIT_ABANDONED
    run_id = run_id or new_run_id()
    sweep_staging(paths)  # under the lock: whatever is staged was left by a killed run
    try:
        report = run_finetune(config, paths, run_id, reason, stop.is_set, parallel)
    except InterruptedError:
        log.warning("fine-tune %s abandoned", run_id)
        return EXIT_ABANDONED
    except FinetuneError as exc:
        log.error("fine-tune %s cannot run: %s", run_id, exc)
        return EXIT_NO_INPUT
    print(json.dumps({k: report[k] for k in ("run_id", "version", "activated", "decision")}))
    return 0
