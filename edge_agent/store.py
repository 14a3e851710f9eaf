"""The store: one fsspec URL that edges write samples and status to and the cloud reads them from.

``file://`` for the demo, ``sftp://`` or ``s3://`` for a real fleet; the same class, with the same
options (credentials, known hosts), on both sides. Writes go to a temporary name, are renamed to their
content-addressed name and read back and hashed, so a repeated upload changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from typing import Any

import fsspec

NUMERIC_OPTIONS = {"port", "timeout", "banner_timeout", "auth_timeout", "channel_timeout"}


class StoreError(RuntimeError):
    """The store could not take or return a file (unreachable, unwritable, or a verify mismatch)."""


def entry_mtime(entry: dict[str, Any]) -> float | None:
    """When the store last wrote a listed file, in seconds since the epoch by the *store's* clock (never
    the writer's): local and sftp say ``mtime`` (a number or a datetime), object stores ``LastModified``."""
    value = next((entry[k] for k in ("mtime", "LastModified", "last_modified") if entry.get(k) is not None), None)
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        from datetime import datetime

        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _known_hosts_policy(path: str):
    """A paramiko policy that accepts only the host key recorded for the host in ``path``.

    fsspec's sftp never loads known hosts, so without this every key would be accepted.
    """
    import paramiko

    class KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):  # noqa: D401 - paramiko's interface
            try:
                known = paramiko.HostKeys(path)
            except (OSError, paramiko.SSHException) as exc:
                raise paramiko.SSHException(f"cannot check the host key of {hostname}: cannot read {path}: {exc}") from None
            entry = known.lookup(hostname) or {}
            if entry.get(key.get_name()) != key:
                raise paramiko.SSHException(f"host key for {hostname} not found or changed in {path}")

    return KnownHostsPolicy()


DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


def storage_options(options: dict[str, str], url: str = "") -> dict[str, Any]:
    """Config values are strings; turn the ones that libraries need typed into their types.

    An ``sftp://`` store always has its host key checked: against ``known_hosts`` when given, else against
    the user's ``~/.ssh/known_hosts``. fsspec's own default would trust any key (and any man in the middle).
    """
    out: dict[str, Any] = {}
    if url.startswith("sftp://") and "known_hosts" not in options:
        out["host_key_policy"] = _known_hosts_policy(os.path.expanduser(DEFAULT_KNOWN_HOSTS))
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
            fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **storage_options(self.options, self.url))
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

    def read(self, relative: str, max_bytes: int | None = None) -> bytes:
        """The bytes at ``relative`` (FileNotFoundError when absent, StoreError when the store fails or
        the file is larger than ``max_bytes``: a reader never loads more than it asked for)."""
        try:
            fs, path = self._connect(), self.path(relative)
            if max_bytes is not None and fs.size(path) > max_bytes:
                raise StoreError(f"{relative}: larger than {max_bytes} bytes")
            return fs.cat_file(path)
        except (FileNotFoundError, StoreError):
            raise
        except Exception as exc:
            self.reset()
            raise StoreError(f"{relative}: {type(exc).__name__}: {exc}") from exc

    def list(self, pattern: str) -> list[str]:
        """Relative paths matching a glob ``pattern``, sorted, in one listing of the store."""
        try:
            found = self._connect().glob(self.path(pattern))
        except Exception as exc:
            self.reset()
            raise StoreError(f"{pattern}: {type(exc).__name__}: {exc}") from exc
        prefix = f"{self._root}/" if self._root else ""
        return sorted(p.removeprefix(prefix) for p in found)

    def listing(self, folder: str) -> dict[str, tuple[int | None, float | None]]:
        """``{name: (size, mtime)}`` of the files directly in ``folder``, in one request ({} when absent);
        ``mtime`` by the store's clock (:func:`entry_mtime`)."""
        try:
            entries = self._connect().ls(self.path(folder), detail=True)
        except FileNotFoundError:
            return {}
        except Exception as exc:
            self.reset()
            raise StoreError(f"{folder}: {type(exc).__name__}: {exc}") from exc
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: (e.get("size"), entry_mtime(e))
                for e in entries if e.get("type") == "file"}

    def read_many(self, relatives: list[str]) -> dict[str, bytes]:
        """The bytes of each of ``relatives`` that could be read, in one batched call of the store's driver
        (concurrent where it is asynchronous, one session where it is sftp); the missing are left out."""
        if not relatives:
            return {}
        paths = {self.path(r): r for r in relatives}
        try:
            found = self._connect().cat(list(paths), on_error="omit")
        except Exception as exc:
            self.reset()
            raise StoreError(f"{len(relatives)} files: {type(exc).__name__}: {exc}") from exc
        return {paths[path]: data for path, data in found.items() if path in paths}

    def sweep_partials(self, folder: str, older_than_s: float = 3600.0) -> int:
        """Remove temporary ``.*.part`` files a killed upload left under ``folder``; returns how many.

        A live upload renames its part within seconds, so one older than ``older_than_s`` is a leftover.
        """
        removed = 0
        fs = self._connect()
        for path in fs.glob(self.path(f"{folder}/.*.part")):
            modified = entry_mtime(fs.info(path))
            if modified is not None and time.time() - modified > older_than_s:
                fs.rm_file(path)
                removed += 1
        return removed

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
