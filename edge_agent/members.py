"""Ensemble members: one worker process each, fine-tuned in parallel from a base model.

Each member trains in its own process on its own
bootstrap resample of the training split with its own augmentation policy, and may have its own
architecture (the newest base of that arch) and input size (the site's images resized to it), so the members err
independently, which is what makes their average better than any one of them. The cores are split between
them (``threads = cores // K``): the machine is used fully, never oversubscribed.

Workers start from a forkserver that imported torch once (``PRELOAD``): a fresh interpreter per member
paid the torch import (seconds on an edge CPU) K times per fine-tune, all at once, on the cores the
members need. Forking the preloaded server is safe where forking a process that has run torch is not: the
server never computes, so no thread pool exists yet to be copied.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_agent.config import AgentConfig
from edge_agent.errors import FinetuneError
from edge_agent.fileio import read_json, write_json_atomic

PRELOAD = ["edge_agent.train", "edge_agent.models", "edge_agent.datasets"]
START_METHOD = "forkserver"  # "spawn" only to measure what the forkserver saves (bench/finetune_speed.py)


def worker_context() -> mp.context.BaseContext:
    """The process context member workers start from: a forkserver with the ML stack preloaded."""
    context = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        context.set_forkserver_preload(PRELOAD)
    return context


@dataclass(frozen=True)
class MemberJob:
    """Everything a member worker needs (picklable: it crosses to the worker process)."""

    index: int
    arch: str
    policy: str
    base_version: str
    base_path: str
    run_dir: str
    threads: int
    seed: int
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    image_size: int | None = None  # the member's own input size; None: its base's

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
    spec = meta.spec.model_copy(update={"image_size": job.image_size or meta.spec.image_size})
    if spec.image_size != train.images.shape[-1]:  # the site's images, resized as the ensemble's graph will
        from edge_agent.export import resize_images
        train, val = (ArraySet(resize_images(d.images, spec.image_size), d.labels) for d in (train, val))
    config = TrainConfig(**{**job.train, "threads": job.threads, "policy": job.policy, "seed": job.seed})

    def on_epoch(metrics) -> None:
        events.put(("epoch", job.index, asdict(metrics)))

    result = train_model(model, train, val, config, meta.normalization, on_epoch=on_epoch)
    member_meta = CheckpointMeta(spec=spec, class_names=meta.class_names, normalization=meta.normalization,
                                 metrics={"val_acc": float(result.best_val_acc)}, dataset_id=None,
                                 parent=job.base_version, train_config=config.model_dump())
    save_checkpoint(job.checkpoint, model, member_meta)
    summary = {"index": job.index, "arch": spec.arch, "image_size": spec.image_size, "policy": job.policy,
               "base": job.base_version,
               "best_val_acc": float(result.best_val_acc), "best_epoch": result.best_epoch,
               "epochs": len(result.history), "stopped_early": result.stopped_early,
               "seconds": round(result.seconds, 3), "threads": job.threads}
    write_json_atomic(job.result_file, summary)
    events.put(("done", job.index, summary))


def available_memory() -> int | None:
    """The host's available memory now (``MemAvailable``, bytes); None where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def members_at_once(k: int, member_bytes: int, available: int | None) -> int:
    """How many of the K members train at the same time: all of them when the host's available memory
    holds K training processes of ``member_bytes`` each, else as many as it holds, and at least one
    (one member at a time is slower, never out of memory). Unknown memory: all K."""
    if available is None:
        return k
    return max(1, min(k, available // max(1, member_bytes)))


def threads_per_member(cores: int, at_once: int) -> int:
    return max(1, cores // max(1, at_once))


def train_members(jobs: list[MemberJob], at_once: int, should_stop: Callable[[], bool],
                  on_event: Callable[[str, int, dict], None] = lambda *a: None) -> list[dict]:
    """Run the member workers, ``at_once`` at a time (in waves); returns their summaries.

    On ``should_stop`` every worker is terminated and :class:`InterruptedError` raised.
    """
    context = worker_context()
    events = context.Queue()
    waves = [jobs[i:i + at_once] for i in range(0, len(jobs), max(1, at_once))]
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


def make_jobs(config: AgentConfig, bases: list[tuple[str, Path, str]], run_dir: Path, at_once: int,
              cores: int | None = None) -> list[MemberJob]:
    """One job per member; the cores are shared among the members that train at once, and the time
    budget among the waves."""
    cores = cores or config.workers or os.cpu_count() or 1
    k = len(config.members)
    ft = config.finetune
    waves = -(-k // max(1, at_once))
    budget = None if ft.time_budget_s is None else ft.time_budget_s / waves
    train = {"epochs": ft.epochs, "batch_size": ft.batch_size, "lr": ft.lr, "weight_decay": ft.weight_decay,
             "label_smoothing": ft.label_smoothing, "class_balance": ft.class_balance, "ema_decay": ft.ema_decay,
             "time_budget_s": budget, "keep": ft.keep, "precision": ft.precision}
    return [MemberJob(i, arch, member.policy, version, str(path), str(run_dir),
                      threads_per_member(cores, at_once), ft.seed + 1000 * (i + 1), train, member.image_size)
            for i, (member, (version, path, arch)) in enumerate(zip(config.members, bases))]


def member_sizes(config: AgentConfig, bases: list[tuple[str, Path, str]]) -> list[int]:
    """Each member's input size (its own, else its base's), checked before any member trains: a member
    fine-tunes its base's network, so its size must build that same network (resnet18 and the slim nets
    change their stem at 64 px; a size across that line would load the base's weights into another net)."""
    import torch

    from edge_agent.models import ModelSpec, build_model

    sizes = []
    for index, (member, (version, path, _)) in enumerate(zip(config.members, bases)):
        spec = ModelSpec.model_validate(torch.load(path, map_location="cpu", weights_only=True)["meta"]["spec"])
        size = member.image_size or spec.image_size
        if size != spec.image_size:
            own = spec.model_copy(update={"image_size": size})
            if repr(build_model(own)) != repr(build_model(spec)):
                raise FinetuneError(f"member {index} ({spec.arch} at {size} px) is not the network of its base "
                                    f"{version} at {spec.image_size} px; choose a size on the same side of "
                                    f"64 px as the base's, or a base of that size")
        sizes.append(size)
    return sizes
