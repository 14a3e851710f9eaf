"""One rollout or rollback at a time per fleet: a lease file in the fleet's store.

``leases/fleet.json`` names its holder (what, which version, who, where) and when it expires. It is taken by an
exclusive create (a file store's O_EXCL, SFTP's SSH_FXF_EXCL): of two takers at once exactly one gets it, and the
other is refused with the holder's name. The holder renews it while it works (every poll of a soak); a holder
that crashed blocks the fleet only until the lease expires, and an expired lease is moved aside by one rename
(of two takers, one wins that too) before a new one is created. On S3 the exclusive create is a conditional
write (``If-None-Match: *``): of two PUTs at once one gets 200, the other 412. A rename there is a copy, so
moving an expired lease aside is not atomic: two takers of one expired lease may both move, and the loser's
fresh lease is moved back (see :meth:`Lease._move_aside`).

Expiry compares the cloud's clock with the time written by the holder (a cloud process too): no edge or store
clock is read.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass

from edge_agent.store import Store, StoreError

LEASE = "leases/fleet.json"


class LeaseHeld(RuntimeError):
    """Another rollout or rollback holds the fleet; the message names it and when its lease expires."""


@dataclass
class Lease:
    store: Store
    holder: str
    ttl_s: float
    token: str = ""

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "token": self.token, "pid": os.getpid(),
                           "host": socket.gethostname(), "expires": time.time() + self.ttl_s}).encode()

    def acquire(self) -> "Lease":
        """Take the fleet's lease, or raise :class:`LeaseHeld` naming who holds it."""
        self.token = uuid.uuid4().hex
        for _ in range(3):
            current = self._read()
            if current is not None and current.get("expires", 0) > time.time():
                raise LeaseHeld(f"the fleet is busy: {current.get('holder', '?')} holds {self.store.name}/{LEASE} "
                                f"(expires in {current['expires'] - time.time():.0f} s)")
            if current is not None:
                self._move_aside(current)
            if self._create():
                return self
        raise LeaseHeld(f"the fleet is busy: {(self._read() or {}).get('holder', '?')} took {LEASE} first")

    def renew(self) -> None:
        """Push the expiry on; :class:`LeaseHeld` if the lease is no longer this holder's (it expired and
        another took it: two would act on the fleet at once)."""
        current = self._read()
        if (current or {}).get("token") != self.token:
            raise LeaseHeld(f"lost the fleet's lease to {(current or {}).get('holder', 'nobody')}")
        self.store.put_verified(LEASE, self._body())

    def release(self) -> None:
        """Give the lease back (only this holder's: a lease another took is left alone)."""
        try:
            if (self._read() or {}).get("token") == self.token:
                fs = self.store._connect()
                fs.rm_file(self.store.path(LEASE))
        except (StoreError, OSError) as exc:  # it expires by itself
            print(f"lease not released ({exc}); it expires in {self.ttl_s:.0f} s")

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _read(self) -> dict | None:
        try:
            data = json.loads(self.store.read(LEASE, 64 * 1024))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: treat as expired, it gets moved aside
            return {"holder": "an unreadable lease", "expires": 0}
        return data if isinstance(data, dict) else {"holder": "an unreadable lease", "expires": 0}

    def _create(self) -> bool:
        """Create the lease file only if there is none (True: this holder has it)."""
        fs = self.store._connect()
        path = self.store.path(LEASE)
        if self.store.object_store:
            try:
                fs.pipe_file(path, self._body(), mode="create")  # PUT with If-None-Match: *
                return True
            except Exception as exc:  # noqa: BLE001 - any failure is either "taken" or the store's one-line error
                held = self._read() if isinstance(exc, OSError) else None  # 412: FileExistsError, or EINVAL
                if held is None:  # credentials, transport, a store that refuses the condition
                    raise self.store._failed(LEASE, exc) from exc
                return held.get("token") == self.token
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        try:
            with fs.open(path, "xb") as handle:
                handle.write(self._body())
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or self._read() is not None:
                return False
            raise
        return True

    def _move_aside(self, expired: dict) -> None:
        """Rename an expired lease to a unique name (of two takers one succeeds; the other finds it gone)."""
        fs = self.store._connect()
        aside = f"leases/.expired-{uuid.uuid4().hex[:8]}.json"
        try:
            fs.mv(self.store.path(LEASE), self.store.path(aside))
        except (FileNotFoundError, OSError):
            return
        try:
            moved = json.loads(self.store.read(aside, 64 * 1024))
        except (FileNotFoundError, ValueError):
            return
        if isinstance(moved, dict) and moved.get("token") != expired.get("token"):  # another taker's fresh one
            fs.mv(self.store.path(aside), self.store.path(LEASE))
            raise LeaseHeld(f"the fleet is busy: {moved.get('holder', '?')} took {LEASE} first")
