"""Durable records the cloud keeps beside its registry: people's labels, the quarantine, the collect watermark.

Each is a small SQLite database with a rollback journal: a change is one transaction, so a crash or a full disk
leaves the record as it was before or after the change, never half of it, and nothing is ever rewritten whole
from what a read returned. A record that does not read (a file cut short, bytes that are not a database, a JSON
file from before it moved here that does not parse) is never taken as empty: the reader refuses with one
:class:`RecordError` that names the file and why, writes nothing, and keeps a copy of the damaged file beside it
(``<name>.damaged``) so that moving the original away to start over loses nothing.

A database is created whole (schema and migrated rows in a temporary file, then renamed into place), so a file
at the path that is empty or shorter than its own header says is damage, not a new record.
"""

from __future__ import annotations

import fcntl
import filecmp
import json
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_agent.fileio import fsync_dir

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0  # another writer (the labelling page beside a collect) holds the lock for milliseconds
MAX_LEGACY_BYTES = 1 << 30  # a JSON record from before SQLite, read once to migrate it
_DAMAGE_CODES = {getattr(sqlite3, "SQLITE_CORRUPT", 11), getattr(sqlite3, "SQLITE_NOTADB", 26)}
_checked: dict[str, tuple[int, int, int]] = {}  # path -> (inode, size, mtime) last found sound, per process
_checked_lock = threading.Lock()


class RecordError(ValueError):
    """A record that does not read: nothing was written over it, and a copy of it is kept beside."""


def keep_damaged(path: Path) -> Path:
    """A copy of the damaged ``path`` beside it (``<name>.damaged``, or ``.damaged-<n>`` when an earlier copy
    holds other bytes); the original stays where it is. Returns the copy's path."""
    path = Path(path)
    for n in range(1000):
        copy = path.with_name(f"{path.name}.damaged" + (f"-{n}" if n else ""))
        if not copy.exists():
            shutil.copy2(path, copy)
            fsync_dir(copy.parent)
            return copy
        if filecmp.cmp(path, copy, shallow=False):
            return copy  # this damage was kept already
    raise RecordError(f"{path}: too many damaged copies beside it; clear them")


def damaged(path: Path, what: str, why: str) -> RecordError:
    """The one error for an unreadable record: the damaged copy is kept first."""
    copy = keep_damaged(path)
    return RecordError(f"{what} {path} does not read ({why}); nothing was written and nothing is taken from it. "
                       f"A copy is kept at {copy}: repair the file, or move it away to start {what} empty")


def read_legacy_json(path: Path, what: str) -> Any | None:
    """The content of a JSON record from before SQLite, None when there is none; :class:`RecordError` (its copy
    kept) when it does not parse."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if not path.is_file() or size > MAX_LEGACY_BYTES:
        raise RecordError(f"{what} {path} is not a regular file of at most {MAX_LEGACY_BYTES} bytes; "
                          "nothing was written")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise damaged(path, what, f"not JSON: {exc}") from None


class Ledger:
    """One SQLite record at ``path`` with ``schema`` (CREATE statements). When the database is first created, the
    JSON record it replaces (``legacy``) is migrated once: ``convert`` turns its content into ``{table: rows}`` or
    raises ValueError saying why the shape is wrong (then nothing is created and the damaged copy is kept); the
    JSON file stays beside as ``<name>.migrated``, a backup.

    Connections are opened per use (a ledger travels to Prefect tasks and process pools, and is cheap to open).
    """

    def __init__(self, path: str | Path, schema: str, what: str, legacy: Path | None = None,
                 convert: Callable[[Any], dict[str, Iterable[tuple]]] | None = None):
        self.path = Path(path)
        self.schema, self.what, self.legacy, self.convert = schema, what, legacy, convert

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A connection for queries (autocommit: no lock is held between statements)."""
        with self._open() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or none of it."""
        with self._open() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def connect(self) -> sqlite3.Connection:
        """A checked connection the caller closes (for many lookups in a row); damage raises RecordError."""
        self._ensure()
        conn = sqlite3.connect(self.path.as_uri() + "?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S,
                               isolation_level=None, check_same_thread=False)
        try:
            self._check(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def _open(self) -> Iterator[sqlite3.Connection]:
        conn = self.connect()
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            raise self._damage_or(exc) from None
        finally:
            conn.close()

    def _damage_or(self, exc: sqlite3.DatabaseError) -> Exception:
        if getattr(exc, "sqlite_errorcode", None) in _DAMAGE_CODES or type(exc) is sqlite3.DatabaseError:
            _forget(self.path)
            return damaged(self.path, self.what, str(exc))
        return exc  # locked, disk full, read-only: not damage, the record is as it was

    def _check(self, conn: sqlite3.Connection) -> None:
        """Refuse a damaged file: cut short (its header says more pages than it holds), not a database, or
        failing SQLite's quick check. Checked again only when the file changed since it was last found sound."""
        try:
            conn.execute("BEGIN")  # a shared lock: no writer changes the file while it is measured
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            info = self.path.stat()
            key = (info.st_ino, info.st_size, info.st_mtime_ns)
            with _checked_lock:
                if _checked.get(str(self.path)) == key:
                    return
            with open(self.path, "rb") as handle:
                header = handle.read(100)
            if why := _short(header, info.st_size):
                raise damaged(self.path, self.what, why)
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise damaged(self.path, self.what, "; ".join(problems)[:300])
            with _checked_lock:
                _checked[str(self.path)] = key
        except sqlite3.DatabaseError as exc:
            raise self._damage_or(exc) from None
        finally:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")  # it only read
                except sqlite3.Error:
                    pass  # a damaged file: the error above says so

    def _ensure(self) -> None:
        """Create the database whole when there is none (the migration's rows included), under a lock."""
        if self.path.exists():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                return
            rows = self._legacy_rows()
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
            tmp.unlink(missing_ok=True)
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=DELETE")
                conn.execute("BEGIN")
                for statement in filter(str.strip, self.schema.split(";")):
                    conn.execute(statement)
                for table, items in rows.items():
                    items = list(items)
                    if items:
                        marks = ",".join("?" * len(items[0]))
                        conn.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({marks})", items)
                conn.execute("COMMIT")
            finally:
                conn.close()
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            if self.legacy is not None and self.legacy.exists():
                self.legacy.replace(self.legacy.with_name(self.legacy.name + ".migrated"))
                log.info("%s: migrated %s into %s (kept as %s.migrated)", self.what, self.legacy, self.path,
                         self.legacy.name)
            fsync_dir(self.path.parent)

    def _legacy_rows(self) -> dict[str, Iterable[tuple]]:
        """The rows of the JSON record this database replaces ({} when there is none)."""
        if self.legacy is None or self.convert is None:
            return {}
        data = read_legacy_json(self.legacy, self.what)
        if data is None:
            return {}
        try:
            return self.convert(data)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise damaged(self.legacy, self.what, f"not the record's shape: {exc}") from None


class TableView(Mapping):
    """One table of a ledger as a read-only mapping ``key -> value``, looked up as asked over one open connection
    (a million rows cost no memory); closed with the view, and pickled as a plain dict."""

    def __init__(self, ledger: Ledger, table: str, key: str, value: str):
        self._ledger, self._conn, self._lock = ledger, None, threading.Lock()
        self._get = f"SELECT {value} FROM {table} WHERE {key} = ?"
        self._keys, self._count = f"SELECT {key} FROM {table}", f"SELECT count(*) FROM {table}"

    def _query(self, sql: str, *args: Any) -> list[tuple]:
        with self._lock:
            if self._conn is None:
                self._conn = self._ledger.connect()
            try:
                return self._conn.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise self._ledger._damage_or(exc) from None

    def __getitem__(self, key: Any) -> Any:
        rows = self._query(self._get, key) if isinstance(key, str) else []
        if not rows:
            raise KeyError(key)
        return rows[0][0]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self._query(self._get, key))

    def __iter__(self) -> Iterator[str]:
        return iter([k for (k,) in self._query(self._keys)])

    def __len__(self) -> int:
        return self._query(self._count)[0][0]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __del__(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)


def _short(header: bytes, size: int) -> str | None:
    """Why a database file with this 100-byte header and size is cut short or not SQLite's, or None."""
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return "not an SQLite database (empty or cut short)"
    page = int.from_bytes(header[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(header[28:32], "big")
    if header[92:96] == header[24:28] and pages and size < pages * page:  # the header's page count is valid
        return f"cut short: {size} bytes where its header says {pages * page}"
    if size % page:
        return f"cut short: {size} bytes is not a whole number of {page}-byte pages"
    return None


def _forget(path: Path) -> None:
    with _checked_lock:
        _checked.pop(str(path), None)
