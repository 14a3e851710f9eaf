"""The store: one fsspec URL that edges write samples and status to and the cloud reads them from.

At about 450 lines it is one job: every write and every bounded read, on every backend, through one class,
so file, sftp and s3 cannot drift apart.

``file://`` for the demo, ``sftp://`` or ``s3://`` (AWS or any S3-compatible service) for a real fleet; the
same class, with the same options (credentials, known hosts), on both sides. A write is never seen half
done: on a filesystem (file, sftp) it goes to a temporary ``.*.part`` name and is renamed; on an object
store one PUT makes the object appear whole (a rename there is a copy and a delete, and the part would be
listed meanwhile). Then it is read back and hashed, and names are content hashes, so a repeated upload
changes nothing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import time
import uuid
from contextlib import contextmanager
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import fsspec

NUMERIC_OPTIONS = {"port", "timeout", "banner_timeout", "auth_timeout", "channel_timeout"}
S3_SCHEMES = ("s3://", "s3a://")
# What an s3:// store takes from the inventory. Credentials are not among them: they come from the
# environment or the host's AWS configuration (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
# ~/.aws/credentials, an instance role), as every AWS tool reads them.
S3_OPTIONS = {"endpoint_url": "an S3-compatible service's URL, e.g. https://minio.example.net:9000",
              "region": "the bucket's region, e.g. eu-central-1",
              "profile": "a profile of the host's AWS configuration (~/.aws/credentials)",
              "timeout": "seconds to connect and to wait for each answer (default 10)"}
S3_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")


class StoreError(RuntimeError):
    """The store could not take or return a file (unreachable, unwritable, or a verify mismatch)."""


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


class Listed(NamedTuple):
    """One file of a listing: what tells a changed file apart, and when the store last wrote it."""

    size: int | None
    mtime: float | None  # seconds since the epoch by the store's clock (S3: LastModified), not the writer's
    tag: str = ""  # S3's ETag: two writes of the same size within LastModified's one second still differ


def modified_time(info: dict[str, Any]) -> float | None:
    """An fsspec ``info``/``ls`` entry's modification time as epoch seconds, whichever the driver:
    a float ``mtime`` (file), a datetime ``mtime`` (sftp) or S3's ``LastModified`` datetime."""
    value = info.get("mtime", info.get("LastModified"))
    if hasattr(value, "timestamp"):
        return value.timestamp()
    return float(value) if isinstance(value, (int, float)) else None


def is_s3(url: str) -> bool:
    return url.startswith(S3_SCHEMES)


def store_option_problems(url: str, options: dict[str, str]) -> list[str]:
    """Why ``options`` cannot go with the store at ``url`` (empty when they can): an S3 store takes only
    :data:`S3_OPTIONS`, and never credentials."""
    if not is_s3(url):
        return []
    problems = []
    for key in sorted(set(options) - set(S3_OPTIONS)):
        if re.search(r"key|secret|token|password|credential", key, re.IGNORECASE):
            problems.append(f"store_options.{key}: S3 credentials never go in the inventory or the agent's config; "
                            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment, or use the "
                            "host's AWS configuration (store_options.profile, ~/.aws/credentials, an instance role)")
        else:
            problems.append(f"store_options.{key}: not an S3 store option (known: {', '.join(S3_OPTIONS)})")
    try:
        if float(options.get("timeout", 10)) <= 0:
            raise ValueError
    except ValueError:
        problems.append(f"store_options.timeout: seconds, a positive number (got {options['timeout']!r})")
    return problems


def display_url(url: str) -> str:
    """``url`` as it may be printed: without a password in its user part."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _mask_credentials(text: str) -> str:
    """``text`` without the AWS credentials of this process's environment (a key id keeps its last 4)."""
    for name in S3_SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, f"…{value[-4:]}" if name == "AWS_ACCESS_KEY_ID" else f"${{{name}}}")
    return text


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
    """Config values are strings; turn them into what the store's driver takes.

    An ``sftp://`` store always has its host key checked: against ``known_hosts`` when given, else against
    the user's ``~/.ssh/known_hosts``. fsspec's own default would trust any key (and any man in the middle).
    """
    if is_s3(url):
        return _s3_options(options)
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


def _s3_options(options: dict[str, str]) -> dict[str, Any]:
    """s3fs's arguments for the inventory's S3 options (checked by :func:`store_option_problems`)."""
    problems = store_option_problems("s3://", options)
    if problems:
        raise StoreError("; ".join(problems))
    timeout = float(options.get("timeout", 10))
    out: dict[str, Any] = {
        "use_listings_cache": False,  # each poll must see the heartbeats written since the last one
        # The uplink backs off and retries by itself: an outage should fail a call in seconds, not minutes.
        "config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                          "retries": {"max_attempts": 3, "mode": "standard"}},
    }
    if options.get("endpoint_url"):
        out["endpoint_url"] = options["endpoint_url"]
    if options.get("region"):
        out["client_kwargs"] = {"region_name": options["region"]}
    if options.get("profile"):
        out["profile"] = options["profile"]
    return out


CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "PermissionError"}  # s3fs: 403 -> PermissionError


class Store:
    """One fsspec store with verified, atomic, idempotent writes."""

    def __init__(self, url: str, options: dict[str, str] | None = None):
        self.url = url
        self.options = dict(options or {})
        self.name = display_url(url)
        self._fs = None
        self._root = ""

    def _connect(self):
        if self._fs is None:
            fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **storage_options(self.options, self.url))
            self._fs, self._root = fs, root.rstrip("/")
        return self._fs

    @property
    def object_store(self) -> bool:
        """True where one PUT writes a whole object and a rename would be a copy (S3)."""
        return is_s3(self.url)

    def reset(self) -> None:
        """Forget the connection (a dead sftp session must not be reused after an outage)."""
        self._fs = None

    def _failed(self, what: str, exc: BaseException) -> StoreError:
        """One line naming the store and what failed, never a credential; the connection is dropped."""
        self.reset()
        if isinstance(exc, StoreError):
            return exc
        why = f"{type(exc).__name__}: {exc}"
        if self.object_store and type(exc).__name__ in CREDENTIAL_ERRORS:
            why += (" (S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the host's AWS "
                    "configuration; check them and that they may read and write this bucket)")
        return StoreError(_mask_credentials(f"store {self.name}: {what}: {why}"))

    def path(self, relative: str) -> str:
        self._connect()
        return f"{self._root}/{relative}" if self._root else relative

    def _matches(self, path: str, digest: str, size: int) -> bool:
        fs = self._connect()
        try:
            # A file's size is a cheap first check; on S3 the GET alone is one request (a HEAD of a missing
            # key costs a listing too)
            if not self.object_store and fs.size(path) != size:
                return False
            data = fs.cat_file(path)
        except FileNotFoundError:
            return False
        return len(data) == size and hashlib.sha256(data).hexdigest() == digest

    def read(self, relative: str, max_bytes: int, deadline_s: float = READ_DEADLINE_S) -> bytes:
        """The bytes at ``relative``, read under a bound: never more than ``max_bytes`` whatever size the
        store reports, only from a regular file (a link, FIFO, device or folder is refused before it is
        opened), and within ``deadline_s``.

        FileNotFoundError when absent; :class:`UnreadableFile` for a file that must not be read (reject it
        alone); :class:`StoreError` when the store fails or is too slow (try again later).
        """
        if self.object_store:
            found, refused = self._read_objects([relative], max_bytes, deadline_s)
            if relative in refused:
                raise UnreadableFile(refused[relative])
            if relative not in found:
                raise FileNotFoundError(relative)
            return found[relative]
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
            raise self._failed(relative, exc) from exc

    def _read_objects(self, relatives: list[str], max_bytes: int, deadline_s: float
                      ) -> tuple[dict[str, bytes], dict[str, str]]:
        """:meth:`read_many` on an object store: one ranged GET per object, all at once, each asking for
        ``max_bytes + 1`` bytes at most, the whole batch within ``deadline_s`` (objects are always plain)."""
        try:
            paths = [self.path(r) for r in relatives]
            data = self._connect().cat_ranges(paths, [0] * len(paths), [max_bytes + 1] * len(paths),
                                              on_error="return", timeout=deadline_s)
        except Exception as exc:
            raise self._failed(relatives[0] if len(relatives) == 1 else f"{len(relatives)} files", exc) from exc
        found: dict[str, bytes] = {}
        refused: dict[str, str] = {}
        for relative, got in zip(relatives, data):
            if isinstance(got, FileNotFoundError):
                continue
            if isinstance(got, OSError) and "range is not satisfiable" in str(got):
                found[relative] = b""  # S3 answers a range on an empty object with 416 InvalidRange
            elif isinstance(got, BaseException):
                raise self._failed(relative, got)
            elif len(got) > max_bytes:
                refused[relative] = f"{relative}: larger than {max_bytes} bytes"
            else:
                found[relative] = got
        return found, refused

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
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnreadableFile(f"{relative}: not a regular file (symbolic link)") from None
                raise
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
            raise self._failed(pattern, exc) from exc
        prefix = f"{self._root}/" if self._root else ""
        return sorted(p.removeprefix(prefix) for p in found)

    def listing(self, folder: str, prefix: str = "") -> dict[str, Listed]:
        """``{name: Listed(size, mtime, tag)}`` of the entries directly in ``folder`` other than folders whose
        names start with ``prefix``, in one listing ({} when absent; on S3 the server filters by ``prefix``,
        so a sweep does not list every sample). Links and special files are listed too, so that a reader
        can refuse them by name. ``mtime`` is the store's own clock on every driver (file, sftp, S3's
        LastModified)."""
        try:
            fs = self._connect()
            if self.object_store and prefix:
                entries = list(fs.find(self.path(folder), maxdepth=1, prefix=prefix, detail=True).values())
            else:
                entries = fs.ls(self.path(folder), detail=True)
        except FileNotFoundError:
            return {}
        except Exception as exc:
            raise self._failed(folder, exc) from exc
        named = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries if e.get("type") != "directory"}
        return {name: Listed(e.get("size"), modified_time(e), e.get("ETag", ""))
                for name, e in named.items() if name.startswith(prefix)}

    def read_many(self, relatives: list[str], max_bytes: int, deadline_s: float = READ_DEADLINE_S
                  ) -> tuple[dict[str, bytes], dict[str, str]]:
        """``(read, refused)``: the bytes of each of ``relatives`` that could be read under the bounds of
        :meth:`read`, and why each refused one was (the missing are in neither), over one connection (on
        an object store, concurrently)."""
        if self.object_store:
            return self._read_objects(relatives, max_bytes, deadline_s) if relatives else ({}, {})
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
        left in ``folder``; returns how many.

        A live upload renames its part within seconds, so one older than ``older_than_s`` (by the store's
        clock, compared with ours) is a leftover. An object store gets no parts from this class (one PUT
        per object), but one left by an older agent is swept all the same.
        """
        removed = 0
        for entry_name, entry in self.listing(folder, prefix=f".{name}").items():
            if not entry_name.endswith(".part"):
                continue
            if entry.mtime is not None and time.time() - entry.mtime > older_than_s:
                try:
                    self._connect().rm_file(self.path(f"{folder}/{entry_name}"))
                except FileNotFoundError:
                    continue  # another sweeper was first
                except Exception as exc:
                    raise self._failed(f"{folder}/{entry_name}", exc) from exc
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
            if self.object_store:
                fs.pipe_file(final, data)  # one PUT: the object is listed whole or not at all
            else:
                self._write_and_rename(fs, final, data)
            if not self._matches(final, digest, len(data)):
                raise StoreError(f"store {self.name}: {relative}: read-back does not match what was written")
            return True
        except Exception as exc:  # any transport or filesystem failure is an outage to retry later
            raise self._failed(relative, exc) from exc

    @staticmethod
    def _write_and_rename(fs, final: str, data: bytes) -> None:
        """A filesystem's atomic write: a hidden ``.part`` name, then a rename (what a reader never lists
        half-written). A part that fails is removed (a full store must not keep what it could not finish);
        one a killed upload left is for :meth:`sweep_partials`."""
        folder, name = final.rsplit("/", 1) if "/" in final else ("", final)
        if folder:
            fs.makedirs(folder, exist_ok=True)
        temp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.part" if folder else f".{name}.part"
        try:
            with fs.open(temp, "wb") as handle:
                handle.write(data)
            fs.mv(temp, final)
        except Exception:
            _remove_quietly(fs, temp)
            raise


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
