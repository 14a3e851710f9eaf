"""A fleet of real OpenSSH servers on loopback ports: provisioning tried on one machine.

Each host is its own ``sshd -D`` process with its own host key, key authentication only, on
127.0.0.1:<free port>. They all run on this machine, so each site gets its own agent root. Works as root
and as an ordinary user (``-oStrictModes=no``, own pid file). The tests' ``sshd_fleet`` fixture and
``bench/provision.py`` use it; so can anyone who wants to see provisioning work before pointing it at a fleet.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"


def sshd_available() -> bool:
    return Path(SSHD).exists() and Path(SSH_KEYGEN).exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path, kind: str = "ed25519") -> Path:
    """A fresh key pair at ``path`` (+ ``.pub``), no passphrase."""
    path.unlink(missing_ok=True)
    Path(f"{path}.pub").unlink(missing_ok=True)
    subprocess.run([SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


def _descendants(pid: int) -> list[int]:
    """Pids whose parent chain leads to ``pid`` (per-connection sshd children and their shells)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class SshdHost:
    """One sshd: its port, host key, and process."""

    name: str
    port: int
    workdir: Path
    authorized_keys: Path
    env: dict[str, str] = field(default_factory=dict)  # set in every session (sshd's SetEnv)
    host_key: Path = field(init=False)
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host_key = keygen(self.workdir / "ssh_host_ed25519_key")

    @property
    def host_pub(self) -> str:
        """``type base64`` of the host key, as known_hosts stores it."""
        return " ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])

    def start(self, timeout: float = 10.0) -> None:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        cmd = [SSHD, "-D", "-e", "-f", "/dev/null", "-p", str(self.port),
               "-h", str(self.host_key),
               "-oListenAddress=127.0.0.1",
               f"-oPidFile={self.workdir / 'sshd.pid'}",
               f"-oAuthorizedKeysFile={self.authorized_keys}",
               "-oStrictModes=no", "-oPasswordAuthentication=no", "-oKbdInteractiveAuthentication=no",
               "-oPubkeyAuthentication=yes", "-oUsePAM=no", "-oPermitRootLogin=prohibit-password",
               "-oSubsystem=sftp internal-sftp", "-oMaxStartups=100", "-oMaxSessions=50",
               "-oLogLevel=ERROR"]
        if self.env:
            cmd.append("-oSetEnv=" + " ".join(f"{k}={v}" for k, v in self.env.items()))
        with open(self.workdir / "sshd.log", "ab") as log:  # sshd keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd {self.name} exited: {(self.workdir / 'sshd.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd {self.name} did not listen on port {self.port}")

    def kill(self) -> None:
        """Take the host down hard: the listener and every session it serves (SIGKILL)."""
        if self.proc is None:
            return
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=5)
        self.proc = None

    def rekey(self) -> None:
        """Restart with a brand-new host key (a reinstalled host, or a man in the middle)."""
        self.kill()
        self.host_key = keygen(self.host_key)
        self.start()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class SshdFleet:
    """``n`` sshd hosts sharing one client key; ``known_hosts`` lists all their host keys."""

    workdir: Path
    n: int = 3
    user: str = field(default_factory=getpass.getuser)
    hosts: list[SshdHost] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # every host's session environment

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_key = keygen(self.workdir / "client_ed25519")
        self.authorized_keys = self.workdir / "authorized_keys"
        self.authorized_keys.write_text(Path(f"{self.client_key}.pub").read_text())
        self.known_hosts = self.workdir / "known_hosts"
        for i in range(self.n):
            self.hosts.append(SshdHost(f"host{i}", free_port(), self.workdir / f"host{i}", self.authorized_keys,
                                       self.env))

    def start(self) -> SshdFleet:
        for host in self.hosts:
            host.start()
        self.write_known_hosts()
        return self

    def write_known_hosts(self, path: Path | None = None) -> Path:
        path = path or self.known_hosts
        path.write_text("".join(f"[127.0.0.1]:{h.port} {h.host_pub}\n" for h in self.hosts))
        return path

    def stop(self) -> None:
        for host in self.hosts:
            host.kill()


def sshd_fleet_at(workdir: Path, n: int) -> Iterator[SshdFleet]:
    fleet = SshdFleet(workdir, n).start()
    try:
        yield fleet
    finally:
        fleet.stop()


def fleet_inventory(fleet: SshdFleet, path: Path, roots: Path, python: str | None = None,
                    concurrency: int = 8, extra_site: str = "", known_hosts: Path | None = None,
                    install: str = "{mode: system}") -> Path:
    """Write an inventory for ``fleet`` (one site per sshd, agent roots under ``roots``) and return its path.

    The agents heartbeat every second and serve no HTTP, so many of them share this machine quietly.
    ``python`` is the base interpreter of the site venvs (default: the one running the tests); ``install``
    the sites' install settings: by default they reuse that interpreter's packages (``system``), which
    keeps a test fleet from installing torch once per host; a bare interpreter wants a wheelhouse.
    """
    import sys

    python = python or sys.executable
    sites = "".join(
        f"  - name: {host.name}\n"
        f"    connection: {{host: 127.0.0.1, port: {host.port}}}\n"
        f"    root: {roots / host.name}\n"
        f"    labels: {{sshd: \"{host.port}\"}}\n{extra_site}"
        for host in fleet.hosts)
    path.write_text(
        "cloud:\n"
        f"  store_url: file://{roots / 'store'}\n"
        "ssh:\n"
        f"  known_hosts: {known_hosts or fleet.known_hosts}\n"
        f"  concurrency: {concurrency}\n"
        "defaults:\n"
        f"  connection: {{type: ssh, user: {fleet.user}, key_file: {fleet.client_key}, connect_timeout_s: 5}}\n"
        f"  python: {python}\n"
        f"  install: {install}\n"
        "  learning:\n"
        "    members: [{arch: resnet18, policy: flips}, {arch: resnet18, policy: contrast}]\n"
        "  agent: {heartbeat_interval_s: 1, poll_interval_s: 1, serve: {port: 0}, service: process,"
        " health_timeout_s: 60}\n"
        f"sites:\n{sites}")
    return path


def stop_agents(roots: Path) -> None:
    """Stop every supervised agent started under ``roots`` (their process groups), for test teardown."""
    for pidfile in roots.glob("*/supervisor.pid"):
        try:
            os.killpg(int(pidfile.read_text().strip()), signal.SIGTERM)
        except (ValueError, ProcessLookupError, PermissionError):
            pass
