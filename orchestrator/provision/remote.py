"""Reaching a host: the transports (SSH, or this machine for local sites) and the host worker client.

Provisioning, deploys and stops all talk to a host the same way: start the stdlib-only
:mod:`~orchestrator.provision.hostworker` with the site's base Python and send it one JSON request per line.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Protocol

from orchestrator.inventory import Inventory, Site
from orchestrator.provision import hostworker

log = logging.getLogger(__name__)

# Sent as ``python -c SOURCE``: the host needs nothing of edgeloop installed to run it.
HOSTWORKER_SOURCE = Path(hostworker.__file__).read_text()


IO_TIMEOUT_S = 60.0  # no single read or write on a healthy link takes this long
KEEPALIVE_S = 15


class StepFailed(Exception):
    """A step could not do its job; the message says why (and is printed, masked)."""


class WorkerGone(Exception):
    """The remote worker ended (host went down, connection cut, interpreter missing)."""

    def __init__(self, message: str, exit_status: int | None = None):
        super().__init__(message)
        self.exit_status = exit_status


class Remote(Protocol):
    """What the steps need from a host: a long-lived worker to send requests to, and file upload."""

    def start(self, command: str) -> None: ...

    def request(self, line: str, timeout: float) -> str: ...

    def put(self, local: Path, remote: str, offset: int = 0) -> None: ...

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
        self._in = self.channel.makefile_stdin("wb")
        self._out = self.channel.makefile("rb")

    def request(self, line: str, timeout: float) -> str:
        try:
            self.channel.settimeout(timeout)
            self._in.write(line.encode() + b"\n")
            self._in.flush()
            answer = self._out.readline()
        except TimeoutError:
            raise WorkerGone(f"no answer from the host within {timeout:.0f} s (link stalled or host hung)") from None
        except OSError as exc:
            raise WorkerGone(f"no answer from the host: {exc or type(exc).__name__}") from None
        if not answer:
            status = self.channel.recv_exit_status() if self.channel.exit_status_ready() else None
            err = self.channel.recv_stderr(4000).decode(errors="replace").strip() if self.channel.recv_stderr_ready() \
                else ""
            raise WorkerGone(f"connection to the host lost{': ' + err if err else ''}", status)
        return answer.decode()

    def put(self, local: Path, remote: str, offset: int = 0) -> None:
        """Upload with a deadline per read/write: a stalled link fails this host, never hangs the run.

        ``offset``: the bytes a cut-off upload already left at ``remote``; the rest is appended.
        """
        sftp = self.fab.sftp()
        sftp.get_channel().settimeout(self.io_timeout_s)
        try:
            with open(local, "rb") as src, sftp.open(remote, "ab" if offset else "wb") as dst:
                dst.set_pipelined(True)
                src.seek(offset)
                for block in iter(lambda: src.read(1 << 18), b""):
                    dst.write(block)
            size = sftp.stat(remote).st_size  # pipelined writes are acknowledged by now, or this waits
            if size != local.stat().st_size:
                raise OSError(f"{remote} holds {size} bytes after the upload, expected {local.stat().st_size}")
        except (OSError, EOFError) as exc:  # socket.timeout included
            raise WorkerGone(f"upload to the host stalled or failed: {exc or type(exc).__name__}") from None

    def close(self) -> None:
        """Close the connection; one the host already dropped (it went down mid-step) has nothing to close,
        and its failure is already in the step's result."""
        try:
            self.fab.close()
        except (OSError, EOFError) as exc:
            log.debug("closing a connection the host already dropped: %s", exc or type(exc).__name__)


class LocalRemote:
    """This machine (``connection: local``): the same worker, run as a local process."""

    def start(self, command: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a fresh login would have it
        self.proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=Path.home(), env=env)

    def request(self, line: str, timeout: float) -> str:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        except OSError:
            answer = ""
        if not answer:
            status = self.proc.wait(timeout=5)
            raise WorkerGone(f"worker exited: {self.proc.stderr.read().strip()[-500:]}", status)
        return answer

    def put(self, local: Path, remote: str, offset: int = 0) -> None:
        with open(local, "rb") as src, open(remote, "ab" if offset else "wb") as dst:
            src.seek(offset)
            shutil.copyfileobj(src, dst, 1 << 20)

    def close(self) -> None:
        if getattr(self, "proc", None) and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


class HostWorker:
    """The :mod:`~orchestrator.provision.hostworker` program on one host: one JSON request and one JSON answer per line.

    Started on first use with the site's base Python, so provisioning, deploys and stops all speak
    the same small protocol over one channel.
    """

    def __init__(self, remote: Remote, python: str):
        self.remote, self.python, self.started = remote, python, False

    def call(self, op: str, timeout_s: float | None = None, **req) -> dict:
        """Run one operation; ``timeout_s`` defaults to the link's deadline (long operations pass their own)."""
        timeout_s = timeout_s or getattr(self.remote, "io_timeout_s", IO_TIMEOUT_S)
        if not self.started:
            self.remote.start(f"{shlex.quote(self.python)} -c {shlex.quote(HOSTWORKER_SOURCE)}")
            self.started = True
        try:
            out = json.loads(self.remote.request(json.dumps({"op": op, **req}), timeout=timeout_s))
        except WorkerGone as exc:
            if exc.exit_status == 127:
                raise StepFailed(f"python {self.python!r} not found on the host "
                                 f"(set 'python' in the inventory)") from None
            raise StepFailed(str(exc)) from None
        if "error" in out:
            raise StepFailed(out["error"])
        return out


def open_remote(site: Site, inventory: Inventory, accept_new_host_keys: bool) -> Remote:
    """A transport to the site: SSH with a verified host key, or this machine for ``connection: local``."""
    if site.connection.type == "local":
        return LocalRemote()
    from orchestrator.ssh import connect  # fabric is a cloud-side dependency, imported when needed

    return SshRemote(connect(site.connection, inventory.known_hosts, accept_new_host_keys),
                     site.connection.io_timeout_s)
