"""Reaching a host: the transports (SSH, or this machine for local sites) and the host worker client.

Provisioning, deploys and stops all talk to a host the same way: start the stdlib-only
:mod:`~orchestrator.provision.hostworker` with the site's base Python and send it one JSON request per line.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from orchestrator.inventory import Inventory, Site
from orchestrator.provision import hostworker

log = logging.getLogger(__name__)

# Sent as ``python -c SOURCE``: the host needs nothing of edgeloop installed to run it.
HOSTWORKER_SOURCE = Path(hostworker.__file__).read_text()


IO_TIMEOUT_S = 60.0  # no single read or write on a healthy link takes this long
KEEPALIVE_S = 15
# The largest answer a healthy worker gives is a few KiB (facts, a log tail): anything near this is not the worker.
MAX_ANSWER_BYTES = 4 << 20
EXIT_STATUS_WAIT_S = 5.0  # after the worker's output ended: how long its exit status may take to arrive


class StepFailed(Exception):
    """A step could not do its job; the message says why (and is printed, masked)."""


class WorkerGone(Exception):
    """The remote worker ended (host went down, connection cut, interpreter missing)."""

    def __init__(self, message: str, exit_status: int | None = None):
        super().__init__(message)
        self.exit_status = exit_status


class AnswerTooLong(WorkerGone):
    """The host sent more than :data:`MAX_ANSWER_BYTES` without ending its line: not the worker talking."""


def read_line(recv: Callable[[float], bytes], buffer: bytearray, timeout: float,
              limit: int = MAX_ANSWER_BYTES) -> bytes:
    """One line from ``recv``, within ``timeout`` seconds in all and ``limit`` bytes; b"" at end of output.

    ``recv(seconds)`` returns the next bytes (b"" at the end) or raises ``TimeoutError``. The deadline is
    for the whole line, not each read, so a host that trickles bytes cannot hold a step open; each byte is
    scanned once (linear in the line's length, unlike re-scanning a growing buffer). Bytes after the line
    stay in ``buffer`` for the next call.
    """
    deadline, scanned = time.monotonic() + timeout, 0
    while True:
        end = buffer.find(b"\n", scanned)
        if end >= 0:
            line = bytes(buffer[:end + 1])
            del buffer[:end + 1]
            return line
        if len(buffer) > limit:
            raise AnswerTooLong(f"the host sent over {limit >> 20} MiB without ending its answer line: that is not "
                                f"the edgeloop worker answering (is 'python' in the inventory really a Python?)")
        scanned = len(buffer)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        chunk = recv(left)
        if not chunk:
            return b""
        buffer += chunk


def _timeout_message(timeout: float, buffer: bytearray) -> str:
    got = f" ({len(buffer)} bytes came without a line end)" if buffer else ""
    return f"no answer from the host within {timeout:.0f} s{got} (link stalled or host hung)"


def _copy(src, dst, offset: int, block_size: int, on_bytes: Callable[[int], None] | None) -> None:
    """``src`` from ``offset`` into ``dst`` block by block, telling ``on_bytes`` each block's size as it goes."""
    src.seek(offset)
    for block in iter(lambda: src.read(block_size), b""):
        dst.write(block)
        if on_bytes:
            on_bytes(len(block))


class Remote(Protocol):
    """What the steps need from a host: a long-lived worker to send requests to, and file upload."""

    def start(self, command: str) -> None: ...

    def request(self, line: str, timeout: float) -> str: ...

    def put(self, local: Path, remote: str, offset: int = 0,
            on_bytes: Callable[[int], None] | None = None) -> None: ...

    def close(self) -> None: ...


class SshRemote:
    """A host reached through an open Fabric connection (host key already verified).

    The worker runs on one SSH channel for the whole visit: a step costs one line each way instead of
    a new session (a new session costs OpenSSH a fork and setup, about 0.3 s on a small machine).
    """

    def __init__(self, fab, io_timeout_s: float = IO_TIMEOUT_S):
        self.fab, self.io_timeout_s = fab, io_timeout_s
        self.channel = None
        # A link that stalls (no RST, no FIN) is found by keepalives and by a deadline on every read/write.
        fab.client.get_transport().set_keepalive(KEEPALIVE_S)

    def start(self, command: str) -> None:
        self.channel = self.fab.client.get_transport().open_session(timeout=self.io_timeout_s)
        self.channel.exec_command(command)
        self._buffer = bytearray()  # read straight off the channel: paramiko's readline re-scans what it holds

    def _recv(self, seconds: float) -> bytes:
        self.channel.settimeout(seconds)
        return self.channel.recv(1 << 16)

    def request(self, line: str, timeout: float) -> str:
        try:
            self.channel.settimeout(timeout)
            self.channel.sendall(line.encode() + b"\n")
            answer = read_line(self._recv, self._buffer, timeout)
        except TimeoutError:
            raise WorkerGone(_timeout_message(timeout, self._buffer)) from None
        except OSError as exc:  # the channel closed under us: by a worker that exited, or a link that went
            status, err = self._ended()
            if status is None:
                raise WorkerGone(f"no answer from the host: {exc or type(exc).__name__}") from None
            raise WorkerGone(f"connection to the host lost{': ' + err if err else ''}", status) from None
        if not answer:
            status, err = self._ended()
            raise WorkerGone(f"connection to the host lost{': ' + err if err else ''}", status)
        return answer.decode(errors="replace")

    def _ended(self) -> tuple[int | None, str]:
        """The worker's exit status (None: the connection went without one) and the end of its stderr.

        The status arrives just after the end of output: wait for it briefly, or a missing interpreter
        (exit status 127) would read as a lost connection. A host that went down leaves no status (None)."""
        deadline = time.monotonic() + EXIT_STATUS_WAIT_S
        while not self.channel.exit_status_ready() and not self.channel.closed and time.monotonic() < deadline:
            time.sleep(0.02)
        status = self.channel.recv_exit_status() if self.channel.exit_status_ready() else None
        status = None if status == -1 else status  # paramiko's -1: the channel closed without a status
        err = b""
        while self.channel.recv_stderr_ready() and len(err) < 8000:
            err += self.channel.recv_stderr(4000)
        return status, err.decode(errors="replace").strip()[-2000:]

    def put(self, local: Path, remote: str, offset: int = 0,
            on_bytes: Callable[[int], None] | None = None) -> None:
        """Upload with a deadline per read/write: a stalled link fails this host, never hangs the run.

        ``offset``: the bytes a cut-off upload already left at ``remote``; the rest is appended. ``on_bytes``
        hears each block's size as it is written (progress of a long upload).
        """
        sftp = self.fab.sftp()
        sftp.get_channel().settimeout(self.io_timeout_s)
        try:
            with open(local, "rb") as src, sftp.open(remote, "ab" if offset else "wb") as dst:
                dst.set_pipelined(True)
                _copy(src, dst, offset, 1 << 18, on_bytes)
            size = sftp.stat(remote).st_size  # pipelined writes are acknowledged by now, or this waits
            if size != local.stat().st_size:
                raise OSError(f"{remote} holds {size} bytes after the upload, expected {local.stat().st_size}")
        except (OSError, EOFError) as exc:  # socket.timeout included
            raise WorkerGone(f"upload to the host stalled or failed: {exc or type(exc).__name__}") from None

    def close(self) -> None:
        """Close the worker's channel, then the connection; one the host already dropped (it went down
        mid-step) has nothing to close, and its failure is already in the step's result. Closed here, in
        order, so that nothing is left for the garbage collector to close after the recap (paramiko then
        prints an "Exception ignored" traceback)."""
        for close in (getattr(self.channel, "close", None), self.fab.close):
            try:
                if close:
                    close()
            except (OSError, EOFError) as exc:
                log.debug("closing a connection the host already dropped: %s", exc or type(exc).__name__)


class LocalRemote:
    """This machine (``connection: local``): the same worker, run as a local process, read with the same
    bounds (size, deadline) as a remote one."""

    def start(self, command: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a fresh login would have it
        self.proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=Path.home(), env=env)
        self._buffer = bytearray()

    def _recv(self, seconds: float) -> bytes:
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], seconds)[0]:
            raise TimeoutError
        return os.read(fd, 1 << 16)

    def request(self, line: str, timeout: float) -> str:
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
            answer = read_line(self._recv, self._buffer, timeout)
        except TimeoutError:
            raise WorkerGone(_timeout_message(timeout, self._buffer)) from None
        except OSError:
            answer = b""
        if not answer:
            try:
                status = self.proc.wait(timeout=EXIT_STATUS_WAIT_S)
            except subprocess.TimeoutExpired:  # it closed its output but lives on: not a worker to wait for
                self.proc.kill()
                status = self.proc.wait()
            err = self._stderr_tail()
            raise WorkerGone(f"worker exited{': ' + err if err else ''}", status)
        return answer.decode(errors="replace")

    def _stderr_tail(self) -> str:
        """What the worker wrote to stderr, at most 64 KiB read and never waiting for more."""
        fd, err = self.proc.stderr.fileno(), b""
        while len(err) < 1 << 16 and select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 1 << 14)
            if not chunk:
                break
            err += chunk
        return err.decode(errors="replace").strip()[-500:]

    def put(self, local: Path, remote: str, offset: int = 0,
            on_bytes: Callable[[int], None] | None = None) -> None:
        with open(local, "rb") as src, open(remote, "ab" if offset else "wb") as dst:
            _copy(src, dst, offset, 1 << 20, on_bytes)

    def close(self) -> None:
        """End the worker: close its pipes (a worker still writing gets SIGPIPE) and kill one that lingers."""
        proc = getattr(self, "proc", None)
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class HostWorker:
    """The :mod:`~orchestrator.provision.hostworker` program on one host: one JSON request and one JSON answer per line.

    Started on first use with the site's base Python, so provisioning, deploys and stops all speak
    the same small protocol over one channel.
    """

    def __init__(self, remote: Remote, python: str):
        self.remote, self.python, self.started = remote, python, False

    def call(self, op: str, timeout_s: float | None = None, **req) -> dict:
        """Run one operation; ``timeout_s`` defaults to the link's deadline (long operations pass their own).

        The answer must come whole within ``timeout_s`` and :data:`MAX_ANSWER_BYTES`, and be one JSON object;
        anything else fails this call (and so this host's step) with a one-line reason."""
        timeout_s = timeout_s or getattr(self.remote, "io_timeout_s", IO_TIMEOUT_S)
        if not self.started:
            self.remote.start(f"{shlex.quote(self.python)} -c {shlex.quote(HOSTWORKER_SOURCE)}")
            self.started = True
        try:
            answer = self.remote.request(json.dumps({"op": op, **req}), timeout=timeout_s)
        except WorkerGone as exc:
            raise StepFailed(self._gone(exc)) from None
        try:
            out = json.loads(answer)
        except ValueError:
            out = None
        if not isinstance(out, dict):
            raise StepFailed(f"the host answered {op!r} with something that is not the worker's JSON: "
                             f"{answer.strip()[:120]!r} (is {self.python!r} the site's Python?)")
        if "error" in out:
            raise StepFailed(str(out["error"]))
        return out

    def _gone(self, exc: WorkerGone) -> str:
        """Why the worker ended, as a person reads it: a missing or broken interpreter is named as such."""
        status = exc.exit_status
        if status == 127:
            return f"python {self.python!r} not found on the host (set 'python' in the inventory)"
        if status == 126:
            return f"python {self.python!r} cannot be run on the host (not executable; set 'python' in the inventory)"
        if status is not None and str(exc).startswith(("connection to the host lost", "worker exited")):
            detail = str(exc).partition(": ")[2]
            return (f"python {self.python!r} exited with status {status} before answering"
                    + (f": {detail}" if detail else ""))
        return str(exc)


def open_remote(site: Site, inventory: Inventory, accept_new_host_keys: bool) -> Remote:
    """A transport to the site: SSH with a verified host key, or this machine for ``connection: local``."""
    if site.connection.type == "local":
        return LocalRemote()
    from orchestrator.ssh import connect  # fabric is a cloud-side dependency, imported when needed

    return SshRemote(connect(site.connection, inventory.known_hosts, accept_new_host_keys),
                     site.connection.io_timeout_s)
