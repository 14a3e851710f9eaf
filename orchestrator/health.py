"""Fleet health from the sites' heartbeats: one row per site, and which sites need a person.

A heartbeat's age is the cloud's, never the edge's: it is measured from when the *store* last wrote the
site's status file (the listing's mtime), so an edge clock that is slow or fast changes nothing. A site is
*stale* when that age is over ``cloud.stale_after_s``: its agent is down, its host is off, or its link to
the store is cut. A site with no heartbeat in the store at all is *not provisioned* (or its agent never
reached the store). A site that answers but reports trouble (a broken ensemble it fell back from, uploads
failing, fine-tunes failing) is *degraded*.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from edge_agent.store import Store, StoreError


class FleetStatus:
    """The fleet's latest heartbeats, as cheaply as the store allows at any fleet size.

    Each :meth:`read` lists ``status/`` once and fetches, in one batched call, only the heartbeats whose
    size or time changed since the last read: polling 100 sites is one listing plus what changed, with no
    request and no thread per site.
    """

    def __init__(self, store: Store):
        self.store = store
        self._seen: dict[str, tuple[tuple, dict]] = {}  # site -> (listing entry, heartbeat)
        self.stored_at: dict[str, float] = {}  # site -> when the store wrote its heartbeat (the store's clock)
        self.fetched = 0  # heartbeats fetched by the last read
        self.error = ""  # why the last read could not reach the store

    def read(self, sites: list[str]) -> dict[str, dict]:
        """``{site: heartbeat}`` for the sites in ``sites`` that have a readable one.

        When the store cannot be reached, the heartbeats read before are returned (their times age, so
        the sites turn stale as they would) and :attr:`error` says why.
        """
        try:
            listing = self.store.listing("status")
            changed = [s for s in sites if f"{s}.json" in listing
                       and self._seen.get(s, ((),))[0] != listing[f"{s}.json"]]
            fetched = self.store.read_many([f"status/{s}.json" for s in changed])
        except StoreError as exc:
            self.error, self.fetched = str(exc), 0
            return {s: self._seen[s][1] for s in sites if s in self._seen}
        self.error, self.fetched = "", len(fetched)
        for site in [s for s in self._seen if f"{s}.json" not in listing]:
            del self._seen[site]  # its heartbeat was removed from the store
        self.stored_at = {s: listing[f"{s}.json"][1] for s in sites
                          if f"{s}.json" in listing and listing[f"{s}.json"][1] is not None}
        for site in changed:
            try:
                self._seen[site] = (listing[f"{site}.json"], json.loads(fetched[f"status/{site}.json"]))
            except (KeyError, ValueError):  # gone between the listing and the read, or half-written
                self._seen.pop(site, None)
        return {s: self._seen[s][1] for s in sites if s in self._seen}


    def age(self, site: str, now: float | None = None) -> float | None:
        """Seconds since the store wrote ``site``'s heartbeat, by the cloud's clock (None: never seen)."""
        stored = self.stored_at.get(site)
        return None if stored is None else max(0.0, (time.time() if now is None else now) - stored)


def read_fleet_status(store: Store, sites: list[str]) -> dict[str, dict]:
    """The latest heartbeat each site pushed to the store (missing or unreadable sites are absent)."""
    return FleetStatus(store).read(sites)


def fleet_health(store: Store, sites: list[str], stale_after_s: float) -> list["SiteHealth"]:
    """One :class:`SiteHealth` per site, read and aged by the cloud's clock in one listing of the store."""
    reader = FleetStatus(store)
    status = reader.read(sites)
    now = time.time()
    return assess(status, sites, stale_after_s, {s: reader.age(s, now) for s in sites})


@dataclass(frozen=True)
class SiteHealth:
    site: str
    verdict: str  # ok | degraded | stale | not provisioned
    reason: str
    state: str | None
    heartbeat_age_s: float | None
    active_version: str | None
    base_versions: str
    outbox: int | None
    uploaded_total: int | None

    def row(self) -> dict:
        return asdict(self)


def assess(status: dict[str, dict], sites: list[str], stale_after_s: float, ages: dict[str, float | None]
           ) -> list[SiteHealth]:
    """One :class:`SiteHealth` per site in ``sites``, from its latest heartbeat (``status[site]``) and its age
    by the cloud's clock (``ages[site]``, from :meth:`FleetStatus.age`)."""
    return [_site(site, status.get(site), stale_after_s, ages.get(site)) for site in sites]


NOT_PROVISIONED = "no heartbeat in the store: never provisioned, or its agent never reached the store"


def _site(site: str, s: dict | None, stale_after_s: float, age: float | None) -> SiteHealth:
    if age is None:
        return SiteHealth(site, "not provisioned", NOT_PROVISIONED, None, None, None, "", None, None)
    age = round(age, 1)
    if not s:
        return SiteHealth(site, "stale" if age > stale_after_s else "degraded",
                          f"heartbeat unreadable (written {age:.0f} s ago)", None, age, None, "", None, None)
    verdict, reason = "ok", ""
    if age > stale_after_s or s.get("state") == "stopped":
        verdict, reason = "stale", (f"agent stopped {age:.0f} s ago" if s.get("state") == "stopped"
                                    else f"last heartbeat {age:.0f} s ago (limit {stale_after_s:.0f} s)")
    elif trouble := _trouble(s):
        verdict, reason = "degraded", trouble
    return SiteHealth(site, verdict, reason, s.get("state"), age, s.get("active_version"),
                      ", ".join(s.get("base_versions") or []), (s.get("queues") or {}).get("outbox"),
                      s.get("uploaded_total"))


def _trouble(s: dict) -> str:
    """What a live site reports wrong, in words; empty when nothing."""
    problems = []
    if s.get("serving_problem"):
        problems.append(f"serving a fallback: {s['serving_problem']}")
    if s.get("last_upload_error"):
        problems.append(f"uploads failing: {s['last_upload_error']}")
    if s.get("finetune_failures"):
        problems.append(f"{s['finetune_failures']} fine-tune failure(s) in a row")
    if s.get("recovery"):
        problems.append(s["recovery"])
    return "; ".join(problems)


def summary(rows: list[SiteHealth]) -> str:
    """One line for logs and errors, e.g. ``2 ok, 1 stale (site-c: no heartbeat in the store)``."""
    counts = {v: [r for r in rows if r.verdict == v] for v in ("ok", "degraded", "stale", "not provisioned")}
    parts = [f"{len(counts['ok'])} ok"]
    for verdict in ("degraded", "stale", "not provisioned"):
        if counts[verdict]:
            parts.append(f"{len(counts[verdict])} {verdict} ("
                         + "; ".join(f"{r.site}: {r.reason}" for r in counts[verdict]) + ")")
    return ", ".join(parts)
