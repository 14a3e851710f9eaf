"""Pretraining on the inventory's ``cloud.trainers``: one torch.distributed job across them, over SSH.

Each trainer runs ``edgeloop train --nnodes N --rdzv-endpoint FIRST:PORT`` through the provisioning
connection (host keys checked against the inventory's known_hosts); torch's launcher on each host starts
its ranks and they meet at the first trainer. Rank 0, wherever the rendezvous put it, writes the checkpoint;
the cloud fetches it from the trainer that has it. Any trainer failing fails the job, with what it said.

A remote job must never outlive the flow that started it: each runs in a session of its own under
``timeout`` (its deadline, enforced on the trainer even if the cloud is gone) with its process group in a
pidfile (``<workdir>/<run id>.pid``), and a job that fails, is cancelled (SIGTERM, as Prefect cancels) or
interrupted is stopped on every trainer through that pidfile before the error goes on.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from edge_agent.ids import new_id
from edge_agent.train import TrainConfig
from orchestrator.inventory import Inventory, Trainer
from orchestrator.ssh import connect
from orchestrator.training import CHECKPOINT, METRICS

# A job that runs longer than this is ended on the trainer itself (a hung rendezvous must not hold anything).
JOB_TIMEOUT_S = 6 * 3600
STOP_GRACE_S = 30  # SIGTERM, then this long before SIGKILL


class TrainersFailed(RuntimeError):
    """The distributed job failed on at least one trainer; nothing was fetched."""


@dataclass
class TrainerRun:
    trainer: str
    exit_status: int
    stdout: str
    stderr: str


def train_on_trainers(inventory: Inventory, data: str, arch: str, config: TrainConfig, out: Path, *,
                      image_size: int | None = None, timeout_s: float = JOB_TIMEOUT_S,
                      on_epoch: Callable[[int, int, str], None] | None = None) -> Path:
    """Train across every trainer; rank 0's ``model.pt`` and ``metrics.json`` end up in ``out``.

    ``on_epoch(epoch, epochs, line)`` hears each epoch line rank 0 prints, as the job's output streams back."""
    trainers = inventory.cloud.trainers
    if not trainers:
        raise ValueError(f"{inventory.path}: cloud.trainers lists no hosts to train on")
    run_id = f"edgeloop-{new_id()}"
    endpoint = f"{trainers[0].connection.host}:{inventory.cloud.rendezvous_port}"

    def command(trainer: Trainer) -> str:
        argv = [trainer.python, "-m", "edgeloop", "train", "--data", data, "--arch", arch,
                "--out", f"{trainer.workdir}/{run_id}", "--config-json", config.model_dump_json(),
                "--nnodes", str(len(trainers)), "--nproc-per-node", str(trainer.nproc_per_node),
                "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
        job = shlex.join(["timeout", "--kill-after", str(STOP_GRACE_S), str(int(timeout_s))] + argv
                         + (["--image-size", str(image_size)] if image_size else []))
        pidfile = shlex.quote(_pidfile(trainer, run_id))
        # a session of its own (its pid is its process group), recorded before the job starts
        return (f"mkdir -p {shlex.quote(trainer.workdir)} && setsid -w sh -c "
                + shlex.quote(f"echo $$ > {pidfile}; exec {job}") + f"; status=$?; rm -f {pidfile}; exit $status")

    def run(trainer: Trainer) -> TrainerRun:
        try:
            with connect(trainer.connection, inventory.known_hosts) as conn:
                done = conn.run(command(trainer), hide=True, warn=True, timeout=timeout_s, in_stream=False,
                                out_stream=EpochLines(on_epoch) if on_epoch else None)
            return TrainerRun(trainer.name, done.exited, done.stdout, done.stderr)
        except Exception as exc:  # unreachable, refused key, timed out: this trainer failed, with why
            return TrainerRun(trainer.name, -1, "", inventory.mask(f"{type(exc).__name__}: {exc}"))

    # one thread per trainer: a handful of hosts, all needed at once
    pool = ThreadPoolExecutor(len(trainers), thread_name_prefix="trainer")
    futures = {pool.submit(run, t): t for t in trainers}
    first_failure = None
    try:
        for future in as_completed(futures):
            if future.result().exit_status != 0 and first_failure is None:
                first_failure = future.result()  # the others would wait at the rendezvous: stop them now
                _stop_job(inventory, futures, run_id)
    except BaseException:  # cancelled (Prefect's SIGTERM), interrupted, or the cloud side failed: stop them all
        _stop_job(inventory, futures, run_id)
        raise
    finally:
        pool.shutdown(wait=True)
    if first_failure:
        raise TrainersFailed(f"{first_failure.trainer}: {_last_error(first_failure)} (the job was stopped on every "
                             f"trainer; nothing was registered)")
    return _fetch_rank0(inventory, trainers, run_id, out)


class EpochLines:
    """A trainer's stdout as it arrives (a stream for Fabric): each ``epoch N/M ...`` line that ``edgeloop train``
    prints goes to ``on_epoch(N, M, line)``; the output is still captured whole for the error message."""

    LINE = re.compile(r"^epoch\s+(\d+)/(\d+)\b")

    def __init__(self, on_epoch: Callable[[int, int, str], None]):
        self.on_epoch, self.buffer = on_epoch, ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            if match := self.LINE.match(line.strip()):
                try:
                    self.on_epoch(int(match[1]), int(match[2]), line.strip())
                except Exception:  # noqa: BLE001 - progress must never stop the job's output being read
                    pass
        return len(text)

    def flush(self) -> None:
        pass


def _pidfile(trainer: Trainer, run_id: str) -> str:
    return f"{trainer.workdir}/{run_id}.pid"


def _stop_job(inventory: Inventory, futures: dict[Future, Trainer], run_id: str) -> None:
    """End the job's process group on the trainers still running it (SIGTERM, then SIGKILL after the grace),
    until their commands return; a trainer that cannot be reached ends by its own deadline."""
    deadline = time.monotonic() + STOP_GRACE_S + 15
    while (running := [trainer for future, trainer in futures.items() if not future.done()]) \
            and time.monotonic() < deadline:
        signal = "TERM" if time.monotonic() < deadline - 15 else "KILL"
        for trainer in running:
            pidfile = shlex.quote(_pidfile(trainer, run_id))
            # the job's process group, then its ranks (the launcher starts each in a session of its own; should
            # it be gone, they are found by their --out, which "[-]" keeps from matching this command itself)
            ranks = shlex.quote(f"[-]-out {trainer.workdir}/{run_id}( |$)")
            try:
                with connect(trainer.connection, inventory.known_hosts) as conn:
                    conn.run(f"test -f {pidfile} && kill -{signal} -- -$(cat {pidfile}); "
                             f"pkill -{signal} -f -- {ranks}; rm -f {pidfile}", hide=True, warn=True, in_stream=False,
                             timeout=30)
            except Exception:  # noqa: BLE001 - unreachable now: its deadline ends it
                pass
        time.sleep(1.0)


def _last_error(run: TrainerRun) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [f"exit status {run.exit_status}"])[-1].strip()


def _fetch_rank0(inventory: Inventory, trainers: list[Trainer], run_id: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for trainer in trainers:
        folder = f"{trainer.workdir}/{run_id}"
        with connect(trainer.connection, inventory.known_hosts) as conn:
            if conn.run(f"test -f {shlex.quote(folder)}/{CHECKPOINT}", hide=True, warn=True, in_stream=False).exited:
                continue
            for name in (METRICS, CHECKPOINT):
                conn.get(f"{folder}/{name}", str(out / name))
            return out
    raise TrainersFailed(f"the job ended well but no trainer holds {run_id}/{CHECKPOINT}")
