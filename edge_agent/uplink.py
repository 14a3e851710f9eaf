"""Getting samples and the status heartbeat to the store (:mod:`edge_agent.store`), within the budget.

A sample leaves the outbox only once the store has it, verified: a store outage or an agent restart at
any moment loses nothing and duplicates nothing. The image goes up before its sidecar, so a reader that
sees a sidecar finds its image.

Outages are handled with exponential backoff between attempts, without sleeping in the caller: the daemon
keeps serving and asks again on its next tick.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from edge_agent.outbox import Outbox, OutboxItem
from edge_agent.state import UploadLedger
from edge_agent.store import Store, StoreError

log = logging.getLogger(__name__)

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
             should_stop: Callable[[], bool] = lambda: False, max_seconds: float = 5.0,
             save_ledger: Callable[[UploadLedger], None] = lambda ledger: None) -> PumpResult:
        """Upload what the budget and the time slice allow, most useful samples first.

        Each sample is counted, and the count saved with ``save_ledger``, *before* it goes up: an agent
        killed mid-upload may count a sample that did not arrive, never send one it did not count, so a
        crash-looping agent cannot overrun a metered link.
        """
        result = PumpResult()
        start = now()
        if not self.backoff.ready(start):
            return result
        ledger.roll(start)
        for item in self.outbox.in_order():
            if should_stop() or now() - start > max_seconds:
                break
            if not self.within_budget(ledger, item):
                result.budget_exhausted = True
                break
            ledger.count, ledger.bytes = ledger.count + 1, ledger.bytes + item.size
            save_ledger(ledger)
            try:
                sent = self.upload(item)
            except (StoreError, OSError) as exc:
                ledger.count, ledger.bytes = ledger.count - 1, ledger.bytes - item.size  # it did not go up
                save_ledger(ledger)
                delay = self.backoff.failed(now())
                result.error = str(exc)
                log.warning("upload failed (%s); next attempt in %.1fs", exc, delay)
                break
            self.backoff.succeeded()
            self.outbox.remove(item)
            result.uploaded += int(sent)
            result.skipped_existing += int(not sent)
        return result

    def upload(self, item: OutboxItem) -> bool:
        """Image first, sidecar last; True if anything new went up."""
        image_path, sidecar_path = self.sample_paths(item)
        sent_image = self.store.put_verified(image_path, item.image.read_bytes())
        sent_sidecar = self.store.put_verified(sidecar_path, item.sidecar.read_bytes())
        return sent_image or sent_sidecar

    def heartbeat(self, status: dict[str, Any], store: Store | None = None) -> bool:
        """Write ``status/<site>.json`` to the store (``store``: the heartbeat's own connection); failures are
        logged, never raised. It never waits on the uploads' back-off: a site whose uploads fail must still say
        so (its status carries the upload error), or the cloud would take it for dead."""
        try:
            (store or self.store).put_verified(f"status/{self.site}.json",
                                               json.dumps(status, sort_keys=True, default=str).encode())
            return True
        except StoreError as exc:
            log.warning("status upload failed: %s", exc)
            return False
