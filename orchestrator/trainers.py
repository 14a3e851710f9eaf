"""Pretraining on the inventory's ``cloud.trainers``: one torch.distributed job across them, over SSH.

Each trainer runs ``edgeloop train --nnodes N --rdzv-endpoint FIRST:PORT`` through the provisioning
connection (host keys checked against the inventory's known_hosts); torch's launcher on each host starts
its ranks and they meet at the first trainer. Rank 0, wherever the rendezvous put it, writes the checkpoint;
the cloud fetches it from the trainer that has it. Any trainer failing fails the job, with what it said.
"""

from __future__ import annotations

import shlex
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from edge_agent.ids import new_id
from edge_agent.train import TrainConfig
from orchestrator.inventory import Inventory, Trainer
from orchestrator.ssh import connect
from orchestrator.training import CHECKPOINT, METRICS

# A job that runs longer than this is ended (a hung rendezvous must not hold the flow forever).
JOB_TIMEOUT_S = 24 * 3600


class TrainersFailed(RuntimeError):
    """The distributed job failed on at least one trainer; nothing was fetched."""


@dataclass
class TrainerRun:
    trainer: str
    exit_status: int
    stdout: str
    stderr: str


def train_on_trainers(inventory: Inventory, data: str, arch: str, config: TrainConfig, out: Path, *,
                      image_size: int | None = None, timeout_s: float = JOB_TIMEOUT_S) -> Path:
    """Train across every trainer; rank 0's ``model.pt`` and ``metrics.json`` end up in ``out``."""
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
        return shlex.join(argv + (["--image-size", str(image_size)] if image_size else []))

    def run(trainer: Trainer) -> TrainerRun:
        try:
            with connect(trainer.connection, inventory.known_hosts) as conn:
                done = conn.run(command(trainer), hide=True, warn=True, timeout=timeout_s, in_stream=False)
            return TrainerRun(trainer.name, done.exited, done.stdout, done.stderr)
        except Exception as exc:  # unreachable, refused key, timed out: this trainer failed, with why
            return TrainerRun(trainer.name, -1, "", inventory.mask(f"{type(exc).__name__}: {exc}"))

    # one thread per trainer: a handful of hosts, all needed at once
    with ThreadPoolExecutor(len(trainers), thread_name_prefix="trainer") as pool:
        futures = {pool.submit(run, t): t for t in trainers}
        first_failure = None
        for future in as_completed(futures):
            if future.result().exit_status != 0 and first_failure is None:
                first_failure = future.result()  # the others would wait at the rendezvous: stop them now
                _stop_job(inventory, futures, run_id)
    if first_failure:
        raise TrainersFailed(f"{first_failure.trainer}: {_last_error(first_failure)} (the job was stopped on every "
                             f"trainer; nothing was registered)")
    return _fetch_rank0(inventory, trainers, run_id, out)


def _stop_job(inventory: Inventory, futures: dict[Future, Trainer], run_id: str) -> None:
    """End the job on the trainers still running it (their launcher stops its ranks), until their commands return."""
    while running := [trainer for future, trainer in futures.items() if not future.done()]:
        for trainer in running:
            try:
                with connect(trainer.connection, inventory.known_hosts) as conn:
                    # "[-]-" matches the job's "--rdzv-id" but not this pkill's own command line
                    conn.run(f"pkill -TERM -f -- '[-]-rdzv-id {run_id}'", hide=True, warn=True, in_stream=False)
            except Exception:  # noqa: BLE001 - unreachable now: its own command fails by itself
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
