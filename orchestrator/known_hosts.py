"""Reading an OpenSSH known_hosts file tolerantly: one malformed line is reported, never fatal to a run.

Used for the fleet's SSH connections (:mod:`orchestrator.ssh`) and to hand each agent its store's host key.
"""

from __future__ import annotations

from pathlib import Path

import paramiko
from paramiko.hostkeys import HostKeyEntry


def known_hosts_name(host: str, port: int) -> str:
    """The name known_hosts files use: ``host`` on port 22, ``[host]:port`` elsewhere (as OpenSSH)."""
    return host if port == 22 else f"[{host}]:{port}"


def load_known_hosts(path: Path) -> tuple[paramiko.HostKeys, list[int]]:
    """The keys in ``path`` and the numbers of the lines that could not be read (skipped)."""
    keys, bad = paramiko.HostKeys(), []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return keys, bad
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entry = HostKeyEntry.from_line(line, number)
        except Exception:  # paramiko raises several types (InvalidHostKey, binascii errors, ...)
            entry = None
        if entry is None:
            bad.append(number)
            continue
        for name in entry.hostnames:
            keys.add(name, entry.key.get_name(), entry.key)
    return keys, bad


def known_host_lines(path: Path, name: str) -> str:
    """The known_hosts lines for one host (hashed names included), as text; empty when it is not there."""
    keys, _ = load_known_hosts(path)
    found = keys.lookup(name) or {}
    return "".join(f"{name} {kind} {key.get_base64()}\n" for kind, key in found.items())
