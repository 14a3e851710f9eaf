"""Training past one process: torch.distributed (DDP), started by torch's own elastic launcher (torchrun).

``edgeloop train --nproc-per-node N`` calls :func:`launch`, which runs N copies of ``edgeloop train`` on
this host (and joins ``--nnodes`` hosts through a c10d rendezvous); each copy calls :func:`process_group`
and runs the one training loop, which sees the group and trains data-parallel. The launcher watches its
ranks: when one dies it stops the others and :func:`launch` raises :class:`RankFailed` naming the rank.
Rank 0 writes the checkpoint atomically after the last epoch, so a failed job leaves the previous one as it was.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from edge_agent.train import Ranks, resolve_device

# How long a rank waits for its peers in one collective before giving up (a hung peer, not a slow epoch).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
# How long a rendezvous port held by someone may take to answer as a torch rendezvous.
RENDEZVOUS_PROBE_S = 5.0


class RankFailed(RuntimeError):
    """A rank of a distributed job died or raised; the job was stopped and wrote nothing."""


@dataclass(frozen=True)
class Launch:
    """Where the ranks run: ``nproc_per_node`` on each of ``nnodes`` hosts that meet at ``rdzv_endpoint``."""

    nproc_per_node: int
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # HOST:PORT of the rendezvous; none = this host alone (standalone)
    rdzv_id: str | None = None  # the same on every host of one job
    oversubscribe: bool = False  # allow more ranks on this host than it has cores

    def __post_init__(self):
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError("--nproc-per-node and --nnodes must be at least 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (where the hosts meet)")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if self.nproc_per_node > cores and not self.oversubscribe:
            raise ValueError(f"--nproc-per-node {self.nproc_per_node} is more ranks than this host's {cores} "
                             "cores (they would only slow each other down); pass --oversubscribe to mean it")

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node * self.nnodes > 1


def launch(spec: Launch, worker_args: list[str]) -> None:
    """Run ``python <worker_args>`` as the ranks of one job; returns when every rank has finished."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    standalone = spec.rdzv_endpoint is None
    if not standalone:
        check_rendezvous(spec.rdzv_endpoint)
    config = LaunchConfig(
        min_nodes=spec.nnodes, max_nodes=spec.nnodes, nproc_per_node=spec.nproc_per_node,
        run_id=spec.rdzv_id or f"edgeloop-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if standalone else spec.rdzv_endpoint,
        max_restarts=0,  # a rank that dies ends the job: a restart would start the epochs over anyway
        monitor_interval=0.5)
    # the launcher logs each failure at length; RankFailed says it once, in a line
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)(*worker_args)
    except ChildFailedError as exc:
        raise RankFailed(describe_failure(exc)) from None
    except RendezvousError as exc:
        raise RankFailed(f"the hosts did not meet at {spec.rdzv_endpoint or 'localhost'}: {exc}") from None


def check_rendezvous(endpoint: str, probe_s: float = RENDEZVOUS_PROBE_S) -> None:
    """Fail within seconds, naming the port, when the rendezvous port on this host is held by a program that
    is not a torch rendezvous (torch would take it for one and wait on it for minutes).

    The port is free (this launcher will serve it), held by the launcher of another host of the same job
    (it answers as a torch store), or held by something else: then :class:`RankFailed`.
    """
    host, _, port_text = endpoint.rpartition(":")
    try:
        port = int(port_text)
        address = socket.gethostbyname(host or "localhost")
    except (ValueError, OSError) as exc:
        raise RankFailed(f"--rdzv-endpoint {endpoint!r}: not HOST:PORT ({exc})") from None
    if not _is_local(address) or _can_bind(address, port):
        return
    outcome: list[BaseException | None] = []

    def probe() -> None:
        from torch.distributed import TCPStore

        try:
            TCPStore(address, port, is_master=False, timeout=datetime.timedelta(seconds=probe_s))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    thread = threading.Thread(target=probe, daemon=True)  # torch's client can hang past its own timeout
    thread.start()
    thread.join(probe_s + 1)
    if outcome == [None]:
        return
    why = f"{type(outcome[0]).__name__}: {str(outcome[0]).splitlines()[0]}" if outcome else \
        f"no answer in {probe_s:.0f} s"
    raise RankFailed(f"the rendezvous port {port} on {host} is held by another program that is not a torch "
                     f"rendezvous ({why}); free it or choose another --rdzv-endpoint")


def _is_local(address: str) -> bool:
    """Is ``address`` one of this host's (so that its launcher would serve the rendezvous)?"""
    return _can_bind(address, 0)


def _can_bind(address: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


# What a rank says when a peer died under it: a consequence, not the cause.
PEER_LOST = ("connection reset by peer", "connection closed by peer", "socket timeout", "broken pipe")


def _cause_first(item) -> tuple:
    """Order failures cause first: a rank killed from outside (or crashed), then one that raised on its own,
    then the ranks that only lost a peer or that the launcher stopped with SIGTERM; then by time and rank."""
    rank, failure = item
    message = str(failure.message).lower()
    if failure.exitcode < 0:
        kind = 2 if failure.exitcode == -signal.SIGTERM else 0
    else:
        kind = 2 if any(words in message for words in PEER_LOST) else 1
    return kind, failure.timestamp, rank


def describe_failure(exc) -> str:
    """The rank that failed first, how, and that no checkpoint was written, in one line.

    When one rank dies the others fail too (their peer is gone, then the launcher stops them), within the
    same second; the one named is the cause, not a casualty.
    """
    rank, failure = min(exc.failures.items(), key=_cause_first)
    if failure.exitcode < 0:
        how = f"was killed by {signal.Signals(-failure.exitcode).name}"
    else:  # the rank's exception, as torch's @record wrote it to the error file
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        detail = str(message or "").strip().splitlines()
        how = f"exited with code {failure.exitcode}" + (f": {detail[-1]}" if detail and failure.error_file else "")
    return (f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) {how}; "
            f"the job was stopped and no checkpoint was written")


def torch_distributed_rank() -> bool:
    """Is this process a rank that torch's launcher started (rather than the command a user typed)?"""
    return dist.is_torchelastic_launched()


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Ranks]:
    """Join the job torchrun started this process in (gloo on the CPU, NCCL on GPUs), and leave it after.

    Outside a torchrun job this is a no-op that yields rank 0 of 1, so callers need no second path.
    """
    if not torch_distributed_rank() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield Ranks()
        return
    if resolve_device(device).type == "cuda":
        local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= gpus:  # NCCL needs a GPU per rank; without this check CUDA fails with a device assert
            raise ValueError(f"{os.environ.get('LOCAL_WORLD_SIZE', '?')} processes per node, but this host has "
                             f"{gpus} GPU(s): use --nproc-per-node {gpus} (or --device cpu)")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield Ranks.current()
    finally:
        dist.destroy_process_group()
