"""SSH connections to edge sites, with host keys verified against the inventory's known_hosts file.

Fabric's ``Connection`` always installs paramiko's ``AutoAddPolicy`` and never loads a known_hosts file,
which would trust any server that answers. :func:`connect` replaces its client with one that loads the
inventory's known_hosts and decides for itself:

- a known host presenting its recorded key: connect;
- a known host presenting a *different* key: always refused (:class:`HostKeyChanged`);
- an unknown host: refused (:class:`UnknownHostKey`) unless the user passed ``--accept-new-host-keys``,
  in which case the key is trusted on first use and appended to the known_hosts file.

Connection problems (host down, timeout, key refused by the server) raise :class:`ConnectError`, which
callers may retry; host-key refusals are never worth retrying.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from pathlib import Path

import paramiko
from fabric import Config
from fabric import Connection as FabricConnection

from orchestrator.inventory import Connection, JumpHost
from orchestrator.known_hosts import known_hosts_name, load_known_hosts


class SshError(Exception):
    """A problem reaching a host (message is safe to print)."""


class ConnectError(SshError):
    """The host could not be reached or refused our credentials: may succeed on a retry."""


class HostKeyRefused(SshError):
    """The host's key is not the one we trust: never retried."""


class UnknownHostKey(HostKeyRefused):
    pass


class HostKeyChanged(HostKeyRefused):
    pass


def fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


_FILE_LOCK = threading.Lock()


class TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Accept an unknown host's key and record it in ``known_hosts`` (only when the user asked)."""

    def __init__(self, known_hosts: Path):
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        with _FILE_LOCK:  # threads in this process, then other processes
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with open(self.known_hosts, "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                fh.write(line)
                fcntl.flock(fh, fcntl.LOCK_UN)


class RefuseUnknown(paramiko.MissingHostKeyPolicy):
    """Refuse an unknown host, saying how to check and accept it."""

    def __init__(self, known_hosts: Path, bad_lines: list[int] | None = None):
        self.known_hosts, self.bad_lines = known_hosts, bad_lines or []

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        skipped = (f" (lines {', '.join(map(str, self.bad_lines))} of that file are malformed and were skipped: "
                   f"was one of them this host's?)") if self.bad_lines else ""
        raise UnknownHostKey(
            f"host key of {hostname} is not in {self.known_hosts}{skipped} (it offers {fingerprint(key)}); "
            f"check that fingerprint on the host (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), then rerun "
            f"with --accept-new-host-keys to trust it and record it")


def make_client(known_hosts: Path, accept_new: bool) -> paramiko.SSHClient:
    """A paramiko client that trusts exactly the keys in ``known_hosts`` (plus TOFU when asked)."""
    client = paramiko.SSHClient()
    keys, bad_lines = load_known_hosts(known_hosts)  # a malformed line is reported per host, not fatal
    for name in keys.keys():
        for kind, key in keys.lookup(name).items():
            client.get_host_keys().add(name, kind, key)
    client.set_missing_host_key_policy(TrustOnFirstUse(known_hosts) if accept_new
                                       else RefuseUnknown(known_hosts, bad_lines))
    return client


def _connect_kwargs(conn: Connection | JumpHost) -> dict:
    key_file = os.path.expanduser(conn.key_file) if conn.key_file else None
    if key_file and not Path(key_file).exists():
        raise ConnectError(f"key file {conn.key_file} does not exist on this machine")
    return {"key_filename": key_file, "allow_agent": conn.use_agent, "look_for_keys": False,
            "banner_timeout": 30, "auth_timeout": 30}


def _fabric(host: str, port: int, user: str | None, connect_kwargs: dict, timeout: float, known_hosts: Path,
            accept_new: bool, gateway: FabricConnection | None = None) -> FabricConnection:
    config = Config(overrides={"load_ssh_configs": False, "run": {"hide": True, "warn": True}})
    fab = FabricConnection(host, user=user or None, port=port, config=config, connect_kwargs=connect_kwargs,
                           connect_timeout=int(max(1, timeout)), gateway=gateway)
    fab.client = make_client(known_hosts, accept_new)  # replaces Fabric's AutoAddPolicy client
    return fab


def connect(conn: Connection, known_hosts: Path, accept_new: bool = False) -> FabricConnection:
    """An open Fabric connection to the site, host key verified; raises a :class:`SshError` subclass."""
    gateway = None
    if conn.jump:
        gateway = _fabric(conn.jump.host, conn.jump.port, conn.jump.user or conn.user, _connect_kwargs(conn.jump),
                          conn.connect_timeout_s, known_hosts, accept_new)
    fab = _fabric(conn.host or "", conn.port, conn.user, _connect_kwargs(conn), conn.connect_timeout_s, known_hosts,
                  accept_new, gateway)
    target = f"{known_hosts_name(conn.host or '', conn.port)}"
    try:
        fab.open()
    except HostKeyRefused:
        fab.close()
        raise
    except paramiko.BadHostKeyException as exc:
        fab.close()
        raise HostKeyChanged(
            f"host key of {target} has CHANGED: {known_hosts} records {fingerprint(exc.expected_key)}, the host "
            f"offers {fingerprint(exc.key)}; refusing to connect (a reinstalled host, or someone in the middle). "
            f"If the host was reinstalled, check the new fingerprint and remove the old line from {known_hosts}"
        ) from None
    except paramiko.AuthenticationException as exc:
        fab.close()
        raise ConnectError(f"{target}: the host refused our key ({exc})") from None
    except (OSError, socket.timeout, paramiko.SSHException, EOFError) as exc:
        fab.close()
        raise ConnectError(f"{target}: cannot connect: {exc or type(exc).__name__}") from None
    return fab
