"""Getting samples and the status heartbeat to the store, and knowing that they arrived.

The store is any fsspec URL (``file://`` for the demo, ``sftp://`` or ``s3://`` for a real fleet).
Each file is written under a temporary name, renamed to its content-addressed name, and read back and
hashed before the outbox lets go of it: a store outage or an agent restart at any moment loses nothing and
duplicates nothing (the final name is the content hash; an upload that finds the same bytes already there
is a no-op). The image goes up before its sidecar, so a reader that sees a sidecar finds its image.

Outages are handled with exponential backoff between attempts, without sleeping in the caller: the daemon
keeps serving and asks again on its next tick.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec

from edge_agent.outbox import Outbox, OutboxItem
from edge_agent.state import UploadLedger

log = logging.getLogger(__name__)

NUMERIC_OPTIONS = {"port", "timeout", "banner_timeout", "auth_timeout", "channel_timeout"}


class StoreError(RuntimeError):
    """The store could not take or return a file (unreachable, unwritable, or a verify mismatch)."""


def _known_hosts_policy(path: str):
    """A paramiko policy that accepts only the host key recorded for the host in ``path``.

    fsspec's sftp never loads known hosts, so without this every key would be accepted.
    """
    import paramiko

    class KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):  # noqa: D401 - paramiko's interface
            known = paramiko.HostKeys(path)
            entry = known.lookup(hostname) or {}
            if entry.get(key.get_name()) != key:
                raise paramiko.SSHException(f"host key for {hostname} not found or changed in {path}")

    return KnownHostsPolicy()


def storage_options(options: dict[str, str]) -> dict[str, Any]:
    """Config values are strings; turn the ones that libraries need typed into their types."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key == "known_hosts":
            out["host_key_policy"] = _known_hosts_policy(value)
        elif key in NUMERIC_OPTIONS:
            out[key] = float(value) if "." in str(value) else int(value)
        else:
            out[key] = value
    return out


class Store:
    """One fsspec store with verified, atomic, idempotent writes."""

    def __init__(self, url: str, options: dict[str, str] | None = None):
        self.url = url
        self.options = dict(options or {})
        self._fs = None
        self._root = ""

    def _connect(self):
        if self._fs is None:
            fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **storage_options(self.options))
            self._fs, self._root = fs, root.rstrip("/")
        return self._fs

    def reset(self) -> None:
        """Forget the connection (a dead sftp session must not be reused after an outage)."""
        self._fs = None

    def path(self, relative: str) -> str:
        self._connect()
        return f"{self._root}/{relative}" if self._root else relative

    def _matches(self, path: str, digest: str, size: int) -> bool:
        fs = self._connect()
        try:
            if fs.size(path) != size:
                return False
            return hashlib.sha256(fs.cat_file(path)).hexdigest() == digest
        except FileNotFoundError:
            return False

    def put_verified(self, relative: str, data: bytes) -> bool:
        """Make ``relative`` hold exactly ``data``; returns False if it already did (nothing sent)."""
        try:
            fs = self._connect()
            final = self.path(relative)
            digest = hashlib.sha256(data).hexdigest()
            if self._matches(final, digest, len(data)):
                return False
            folder, name = final.rsplit("/", 1) if "/" in final else ("", final)
            if folder:
                fs.makedirs(folder, exist_ok=True)
            temp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.part" if folder else f".{name}.part"
            with fs.open(temp, "wb") as handle:
                handle.write(data)
            fs.mv(temp, final)
            if not self._matches(final, digest, len(data)):
                raise StoreError(f"{relative}: read-back does not match what was written")
            return True
        except StoreError:
            self.reset()
            raise
        except Exception as exc:  # any transport or filesystem failure is an outage to retry later
            self.reset()
            raise StoreError(f"{relative}: {type(exc).__name__}: {exc}") from exc


@dataclass
class Backoff:
    """Exponential backoff between attempts, kept as a due time so nothing sleeps."""

    base_s: float = 1.0
    max_s: float = 60.0
    failures: int = 0
    next_at: float = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.next_at

    def failed(self, now: float) -> float:
        delay = min(self.max_s, self.base_s * (2 ** self.failures))
        self.failures += 1
        self.next_at = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures, self.next_at = 0, 0.0


@dataclass
class PumpResult:
    uploaded: int = 0
    skipped_existing: int = 0
    budget_exhausted: bool = False
    error: str | None = None


@dataclass
class Uplink:
    """Moves outbox samples to ``<store>/samples/<site>/`` within the daily budget."""

    store: Store
    outbox: Outbox
    site: str
    max_samples_per_day: int
    max_bytes_per_day: int
    backoff: Backoff = field(default_factory=Backoff)

    def sample_paths(self, item: OutboxItem) -> tuple[str, str]:
        base = f"samples/{self.site}/{item.sha256}"
        return f"{base}.png", f"{base}.json"

    def within_budget(self, ledger: UploadLedger, item: OutboxItem) -> bool:
        return (ledger.count + 1 <= self.max_samples_per_day
                and ledger.bytes + item.size <= self.max_bytes_per_day)

    def pump(self, ledger: UploadLedger, *, now: Callable[[], float] = time.time,
             should_stop: Callable[[], bool] = lambda: False, max_seconds: float = 5.0) -> PumpResult:
        """Upload what the budget and the time slice allow, most useful samples first."""
        result = PumpResult()
        start = now()
        if not self.backoff.ready(start):
            return result
        ledger.roll(start)
        for item in self.outbox.items():
            if should_stop() or now() - start > max_seconds:
                break
            if not self.within_budget(ledger, item):
                result.budget_exhausted = True
                break
            try:
                sent = self.upload(item)
            except (StoreError, OSError) as exc:
                delay = self.backoff.failed(now())
                result.error = str(exc)
                log.warning("upload failed (%s); next attempt in %.1fs", exc, delay)
                break
            self.backoff.succeeded()
            self.outbox.remove(item)
            ledger.count += 1
            ledger.bytes += item.size
            result.uploaded += int(sent)
            result.skipped_existing += int(not sent)
        return result

    def upload(self, item: OutboxItem) -> bool:
        """Image first, sidecar last; True if anything new went up."""
        image_path, sidecar_path = self.sample_paths(item)
        sent_image = self.store.put_verified(image_path, item.image.read_bytes())
        sent_sidecar = self.store.put_verified(sidecar_path, item.sidecar.read_bytes())
        return sent_image or sent_sidecar

    def heartbeat(self, status: dict[str, Any]) -> None:
        """Write ``status/<site>.json`` to the store; failures are logged, never raised."""
        if not self.backoff.ready(time.time()):
            return
        try:
            self.store.put_verified(f"status/{self.site}.json", json.dumps(status, sort_keys=True, default=str).encode())
        except StoreError as exc:
            self.backoff.failed(time.time())
            log.warning("status upload failed: %s", exc)
