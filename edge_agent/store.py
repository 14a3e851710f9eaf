"""The store: one fsspec URL that edges write samples and status to and the cloud reads them from.

``file://`` for the demo, ``sftp://`` or ``s3://`` for a real fleet; the same class, with the same
options (credentials, known hosts), on both sides. Writes go to a temporary name, are renamed to their
content-addressed name and read back and hashed, so a repeated upload changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
import uuid
from contextlib import contextmanager
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


class UnreadableFile(ValueError):
    """One file in the store that the cloud must not read (not a regular file, or over its kind's size
    cap): the store itself works, so the caller rejects this file alone and goes on with the others."""


READ_DEADLINE_S = 30.0
READ_CHUNK = 256 * 1024

_KINDS = ((stat.S_ISREG, "file"), (stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"),
          (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
          (stat.S_ISSOCK, "socket"))


def _kind_of_mode(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "special file")


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))


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

    def read(self, relative: str, max_bytes: int, deadline_s: float = READ_DEADLINE_S) -> bytes:
        """The bytes at ``relative``, read under a bound: never more than ``max_bytes`` whatever size the
        store reports, only from a regular file (a link, FIFO, device or folder is refused before it is
        opened), and within ``deadline_s``.

        FileNotFoundError when absent; :class:`UnreadableFile` for a file that must not be read (reject it
        alone); :class:`StoreError` when the store fails or is too slow (try again later).
        """
        try:
            fs, path = self._connect(), self.path(relative)
            kind = self._kind(fs, path)
            if kind != "file":
                raise UnreadableFile(f"{relative}: not a regular file ({kind})")
            with self._open_regular(fs, path, relative, deadline_s) as handle:
                return _read_capped(handle, relative, max_bytes, time.monotonic() + deadline_s)
        except (FileNotFoundError, StoreError, UnreadableFile):
            raise
        except Exception as exc:
            self.reset()
            raise StoreError(f"{relative}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _kind(fs, path: str) -> str:
        """What ``path`` is, without following a link: ``lstat`` where the backend has one (local, sftp),
        else the backend's own type (an object store holds only plain objects)."""
        if _is_local(fs):
            return _kind_of_mode(os.lstat(path).st_mode)
        if getattr(fs, "ftp", None) is not None:  # sftp: fsspec's info() follows links and calls a FIFO a file
            return _kind_of_mode(fs.ftp.lstat(path).st_mode)
        return str(fs.info(path).get("type", "unknown"))

    @staticmethod
    @contextmanager
    def _open_regular(fs, path: str, relative: str, deadline_s: float):
        """Open ``path`` for reading and check again, on the open handle, that it is a regular file (a
        site could swap the file for a link or FIFO between the check and the open)."""
        if _is_local(fs):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            handle = os.fdopen(fd, "rb", buffering=0)
            mode = os.fstat(fd).st_mode
        else:
            handle = fs.open(path, "rb")
            mode = handle.stat().st_mode if hasattr(handle, "stat") else stat.S_IFREG
        channel = fs.ftp.get_channel() if getattr(fs, "ftp", None) is not None else None
        previous = channel.gettimeout() if channel is not None else None
        try:
            if not stat.S_ISREG(mode):
                raise UnreadableFile(f"{relative}: not a regular file ({_kind_of_mode(mode)})")
            if channel is not None:  # a stalled sftp read raises after the deadline instead of hanging
                channel.settimeout(deadline_s)
            yield handle
        finally:
            if channel is not None:
                channel.settimeout(previous)
            handle.close()

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
        """``{name: (size, mtime)}`` of the entries directly in ``folder`` other than folders, in one request
        ({} when absent); ``mtime`` by the store's clock (:func:`entry_mtime`). Links and special files are
        listed too, so that a reader can refuse them by name."""
        try:
            entries = self._connect().ls(self.path(folder), detail=True)
        except FileNotFoundError:
            return {}
        except Exception as exc:
            self.reset()
            raise StoreError(f"{folder}: {type(exc).__name__}: {exc}") from exc
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: (e.get("size"), entry_mtime(e))
                for e in entries if e.get("type") != "directory"}

    def read_many(self, relatives: list[str], max_bytes: int, deadline_s: float = READ_DEADLINE_S
                  ) -> tuple[dict[str, bytes], dict[str, str]]:
        """``(read, refused)``: the bytes of each of ``relatives`` that could be read under the bounds of
        :meth:`read`, and why each refused one was (the missing are in neither), over one connection."""
        found: dict[str, bytes] = {}
        refused: dict[str, str] = {}
        for relative in relatives:
            try:
                found[relative] = self.read(relative, max_bytes, deadline_s)
            except FileNotFoundError:
                continue
            except UnreadableFile as exc:
                refused[relative] = str(exc)
        return found, refused

    def sweep_partials(self, folder: str, older_than_s: float = 3600.0, name: str = "") -> int:
        """Remove temporary ``.*.part`` files (of ``name`` only, when given) that a killed or failed upload
        left under ``folder``; returns how many.

        A live upload renames its part within seconds, so one older than ``older_than_s`` is a leftover.
        """
        removed = 0
        fs = self._connect()
        for path in fs.glob(self.path(f"{folder}/.{name}*.part")):
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
            try:
                with fs.open(temp, "wb") as handle:
                    handle.write(data)
                fs.mv(temp, final)
            except Exception:
                _remove_quietly(fs, temp)  # a full store must not keep what it could not finish
                raise
            if not self._matches(final, digest, len(data)):
                raise StoreError(f"{relative}: read-back does not match what was written")
            return True
        except StoreError:
            self.reset()
            raise
        except Exception as exc:  # any transport or filesystem failure is an outage to retry later
            self.reset()
            raise StoreError(f"{relative}: {type(exc).__name__}: {exc}") from exc


def _remove_quietly(fs, path: str) -> None:
    try:
        fs.rm_file(path)
    except Exception:  # noqa: BLE001 - the store is failing; the sweep after it comes back removes it
        pass


def _read_capped(handle, relative: str, max_bytes: int, deadline: float) -> bytes:
    """Read ``handle`` to its end, never asking for more than ``max_bytes + 1`` bytes in all."""
    chunks, total = [], 0
    while block := handle.read(min(READ_CHUNK, max_bytes + 1 - total)):
        total += len(block)
        if total > max_bytes:
            raise UnreadableFile(f"{relative}: larger than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise StoreError(f"{relative}: not read within the deadline")
        chunks.append(block)
    return b"".join(chunks)
