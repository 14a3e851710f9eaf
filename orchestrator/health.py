"""Fleet health from the sites' heartbeats: one row per site, and which sites need a person.

A heartbeat's age is the cloud's, by one clock that no writer sets: the time, by the cloud's own clock, at
which the cloud first saw the site's heartbeat change (:meth:`FleetStatus.age`). An edge clock, a store clock
ahead or behind, or an mtime a writer set (SFTP's utime) changes nothing once the cloud has watched one change.
A heartbeat seen for the first time has only the store's mtime to go by: it counts as written then, never in
the cloud's future; one stamped in the cloud's future has an unknown age and reads stale until the cloud sees
it change. A site is *stale* when that age is over ``cloud.stale_after_s``: its agent is down, its host is off, or its link to
the store is cut. A site with no heartbeat in the store at all is *not provisioned* (or its agent never
reached the store). A live site that serves no model (no base deployed yet, its first fine-tune still running or
owed) is *not serving*. A site that answers but reports trouble (a broken ensemble it fell back from, uploads
failing, fine-tunes failing) is *degraded*.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, model_validator

from edge_agent.sidecar import validate_json_object
from edge_agent.store import Listed, Store, StoreError

MAX_HEARTBEAT_BYTES = 1024 * 1024  # a heartbeat is a few kB; a 200 MB one is an attack, not a status
FUTURE_TOLERANCE_S = 2.0  # an mtime this far past the cloud's now is a clock or a writer lying, not a write
UNKNOWN_AGE = math.inf  # FleetStatus.age of a first-seen heartbeat stamped in the cloud's future


class _Part(BaseModel):
    # strict: "12" is not a pid and "yesterday" not a time; newer agents may say more (extra allowed)
    model_config = ConfigDict(strict=True, extra="allow")


class Accuracy(_Part):
    accuracy: float | None = None  # NaN where a split was empty: compared, never summed


class CandidateScores(_Part):
    gate: Accuracy | None = None
    test: Accuracy | None = None


Rate = Annotated[FiniteFloat, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=0)]
Name = Annotated[str, Field(max_length=256)]  # a site, version or state: no report carries megabytes of one
Text = Annotated[str, Field(max_length=16384)]  # a reason or an error message


class GateEvidence(_Part):
    """The paired gate a site's fine-tune ran (:class:`edge_agent.gate.Decision`): what a canary's gate row
    reads. Its ``alpha`` is the site's, reported only: the cloud judges at its own (``rollout.thresholds``)."""

    accept: bool = False
    n: Count = 0
    challenger_only: Count = 0
    incumbent_only: Count = 0
    alpha: FiniteFloat | None = None
    challenger_accuracy: Rate | None = None
    incumbent_accuracy: Rate | None = None

    @model_validator(mode="after")
    def _pairs_within_n(self) -> "GateEvidence":
        if self.challenger_only + self.incumbent_only > self.n:
            raise ValueError(f"{self.challenger_only} + {self.incumbent_only} discordant pairs among {self.n} images")
        return self


class WindowEntry(_Part):
    """What one model served lately (:meth:`edge_agent.window.LiveWindow.summary`): every number the canary
    analysis reads, finite and in range, so a comparison with NaN or a negative count can never pass."""

    predictions: Count
    class_rates: dict[str, Rate]
    class_counts: dict[str, Count] | None = None  # newer agents: the exact counts behind the rates
    uncertain: Count | None = None  # newer agents: predictions under the window's confidence cut
    mean_confidence: Rate
    mean_disagreement: Rate
    latency_p95_ms: Annotated[FiniteFloat, Field(ge=0)]
    latency_p50_ms: Annotated[FiniteFloat, Field(ge=0)] | None = None
    errors: Count = 0
    quarantined: Count = 0
    first: FiniteFloat | None = None
    last: FiniteFloat | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "WindowEntry":
        if self.predictions and abs(sum(self.class_rates.values()) - 1) > 0.01:
            raise ValueError(f"class rates sum to {sum(self.class_rates.values()):.4g}, not 1")
        if self.class_counts is not None and sum(self.class_counts.values()) != self.predictions:
            raise ValueError(f"class counts sum to {sum(self.class_counts.values())}, not {self.predictions}")
        if self.uncertain is not None and self.uncertain > self.predictions:
            raise ValueError(f"{self.uncertain} uncertain of {self.predictions} predictions")
        return self


class LastRun(_Part):
    run_id: str | None = None
    finished: FiniteFloat | None = None
    bases: list[str] = Field(default_factory=list)
    gate: GateEvidence | None = None
    serving: str | None = None
    candidates: dict[str, CandidateScores | None] = Field(default_factory=dict)
    gain_over_base: dict[str, float | None] | None = None
    precision: dict[str, Any] | None = None


class MemberProgress(_Part):
    epoch: int = Field(0, ge=0)


class FinetuneProgress(_Part):
    members: dict[str, MemberProgress] = Field(default_factory=dict)


class FinetuneStatus(_Part):
    state: str | None = None  # "on", or "off (profile edge-serve)"
    running: bool = False
    run_id: str | None = None
    reason: str | None = None
    progress: FinetuneProgress | None = None


class Queues(_Part):
    inbox: int = Field(0, ge=0)
    outbox: int = Field(0, ge=0)
    outbox_bytes: int = Field(0, ge=0)


class UploadLedger(_Part):
    day: str = ""
    count: int = Field(0, ge=0)
    bytes: int = Field(0, ge=0)


class Heartbeat(_Part):
    """A site's status file as the cloud accepts it: every field the cloud reads, typed.

    One site's malformed heartbeat must not crash fleet-health or a rollout for the others, so each is
    validated here before anything reads it, and one that fails is reported as unreadable, with why.
    """

    time: FiniteFloat
    site: Name | None = None
    seq: Count | None = None  # newer agents: one more per heartbeat, so the cloud sees each one change
    pid: int | None = Field(None, gt=0)
    state: Name = "unknown"
    started: FiniteFloat | None = None
    active_version: Name | None = None
    serving_problem: Text | None = None
    base_versions: list[Name] = Field(default_factory=list, max_length=64)  # every base deployed at the site
    active_bases: list[Name] | None = Field(None, max_length=64)  # the ones the active ensemble is built on
    finetune: FinetuneStatus = Field(default_factory=FinetuneStatus)
    pending_finetune: Text | None = None
    finetune_failures: int = Field(0, ge=0)
    last_run: LastRun | None = None
    queues: Queues = Field(default_factory=Queues)
    upload_ledger: UploadLedger = Field(default_factory=UploadLedger)
    last_upload_error: Text | None = None
    recovery: Text | None = None
    disk_full: Text | None = None
    inbox_stuck: Text | None = None
    processed_total: int = Field(0, ge=0)
    quarantined_total: int = Field(0, ge=0)
    selected_total: int = Field(0, ge=0)
    uploaded_total: int = Field(0, ge=0)
    window: dict[str, WindowEntry] = Field(default_factory=dict)


class UnreadableHeartbeat(ValueError):
    """A heartbeat the cloud cannot use; the message says why."""


def parse_heartbeat(data: bytes, site: str) -> dict[str, Any]:
    """The heartbeat in ``data`` as a dict whose every known field has its type (as the agent wrote it,
    unknown fields kept); :class:`UnreadableHeartbeat` with the first few problems otherwise."""
    try:
        raw, _ = validate_json_object(data, Heartbeat, "status")
    except ValueError as exc:
        raise UnreadableHeartbeat(str(exc)) from None
    if raw.get("site") != site:  # a heartbeat speaks for the site whose path it is under, and says so
        raise UnreadableHeartbeat(f"names site {str(raw.get('site'))[:80]!r}, not {site!r}")
    return raw


class FleetStatus:
    """The fleet's latest heartbeats, as cheaply as the store allows at any fleet size.

    Each :meth:`read` lists ``status/`` once and fetches, in one batched call, only the heartbeats whose
    size or time changed since the last read (and those with no time or one in the cloud's future, whose
    listing cannot tell a change): polling 100 sites is one listing plus what changed, with no request and no thread per site.
    It keeps, by ``clock`` (the cloud's), when it first saw each heartbeat's content change: the only time
    :meth:`age` trusts, so a reader kept across polls ages heartbeats by one clock no writer sets.
    """

    def __init__(self, store: Store, clock=time.time):
        self.store = store
        self.clock = clock
        self._seen: dict[str, tuple[Listed, dict | str]] = {}  # site -> (listing entry, heartbeat or why not)
        self._changed: dict[str, tuple[str, float]] = {}  # site -> (content digest, cloud time it was first seen)
        self.fetched = 0  # heartbeats fetched by the last read
        self.error = ""  # why the last read could not reach the store

    @property
    def unreadable(self) -> dict[str, str]:
        """``{site: why}`` for the sites whose latest heartbeat the last read refused (not a regular file,
        too large, not JSON, a field of the wrong type). It is not read again until it changes."""
        return {site: f"unreadable heartbeat: {seen}" for site, (_, seen) in self._seen.items()
                if isinstance(seen, str)}

    def read(self, sites: list[str]) -> dict[str, dict]:
        """``{site: heartbeat}`` for the sites in ``sites`` that have a valid one (see :attr:`unreadable`).

        When the store cannot be reached, the heartbeats read before are returned (their times age, so
        the sites turn stale as they would) and :attr:`error` says why.
        """
        try:
            listing = self.store.listing("status")
            now = self.clock()
            changed = [s for s in sites if f"{s}.json" in listing
                       and (self._seen.get(s, ((),))[0] != listing[f"{s}.json"]
                            or _untimed(listing[f"{s}.json"].mtime, now))]
            fetched, refused = self.store.read_many([f"status/{s}.json" for s in changed], MAX_HEARTBEAT_BYTES)
        except StoreError as exc:
            self.error, self.fetched = str(exc), 0
            return self._valid(sites)
        self.error, self.fetched = "", len(fetched)
        for site in [s for s in self._seen if f"{s}.json" not in listing]:
            del self._seen[site]  # its heartbeat was removed from the store
            self._changed.pop(site, None)
        for site in changed:
            name = f"status/{site}.json"
            if name in refused:
                self._seen[site] = (listing[f"{site}.json"], refused[name].removeprefix(f"{name}: "))
                self._saw(site, f"refused {listing[f'{site}.json']}", listing[f"{site}.json"].mtime, now)
            elif name not in fetched:  # gone between the listing and the read
                self._seen.pop(site, None)
                self._changed.pop(site, None)
            else:
                self._saw(site, hashlib.sha256(fetched[name]).hexdigest(), listing[f"{site}.json"].mtime, now)
                try:
                    self._seen[site] = (listing[f"{site}.json"], parse_heartbeat(fetched[name], site))
                except UnreadableHeartbeat as exc:
                    self._seen[site] = (listing[f"{site}.json"], str(exc))
        return self._valid(sites)

    def _saw(self, site: str, digest: str, mtime: float | None, now: float) -> None:
        """Record when the cloud first saw ``site``'s heartbeat as ``digest``: now for a change it watched
        happen; for the first sighting, the store's mtime clamped to now (a store clock behind makes a live
        site look old only until its next heartbeat), unknown (-inf) if stamped in the cloud's future."""
        if site in self._changed:
            if self._changed[site][0] != digest:  # same content with a new mtime (touched) is no heartbeat
                self._changed[site] = (digest, now)
            return
        first = -math.inf if mtime is None or _in_future(mtime, now) else min(mtime, now)
        self._changed[site] = (digest, first)

    def _valid(self, sites: list[str]) -> dict[str, dict]:
        return {s: self._seen[s][1] for s in sites if s in self._seen and isinstance(self._seen[s][1], dict)}

    def stored_at(self, sites: list[str]) -> dict[str, float]:
        """When the store last wrote each site's heartbeat, by the store's clock (file and sftp mtime, S3's
        LastModified), from the last :meth:`read`'s listing: a heartbeat's age that trusts no edge clock."""
        return {s: self._seen[s][0].mtime for s in sites if s in self._seen and self._seen[s][0].mtime is not None}

    def age(self, site: str, now: float | None = None) -> float | None:
        """Seconds since the cloud first saw ``site``'s heartbeat as it is now, by the cloud's clock (None:
        none in the store; :data:`UNKNOWN_AGE` (inf): seen once, stamped in the cloud's future)."""
        if site not in self._seen or site not in self._changed:
            return None
        return max(0.0, (self.clock() if now is None else now) - self._changed[site][1])


def _in_future(mtime: float | None, now: float) -> bool:
    return mtime is not None and mtime > now + FUTURE_TOLERANCE_S


def _untimed(mtime: float | None, now: float) -> bool:
    """A listing time that cannot tell a change (none, or in the cloud's future): fetch at every read."""
    return mtime is None or _in_future(mtime, now)


def read_fleet_status(store: Store, sites: list[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """``(heartbeats, unreadable)``: the latest valid heartbeat each site pushed to the store, and why
    each site whose heartbeat is not valid was refused (sites with no heartbeat are in neither)."""
    fleet = FleetStatus(store)
    return fleet.read(sites), fleet.unreadable


def fleet_health(store: Store, sites: list[str], stale_after_s: float) -> list["SiteHealth"]:
    """One :class:`SiteHealth` per site, read and aged by the cloud's clock in one listing of the store."""
    reader = FleetStatus(store)
    status = reader.read(sites)
    now = time.time()
    return assess(status, sites, stale_after_s, {s: reader.age(s, now) for s in sites}, reader.unreadable)


@dataclass(frozen=True)
class SiteHealth:
    site: str
    verdict: str  # ok | degraded | stale | unreadable | not provisioned
    reason: str
    state: str | None
    heartbeat_age_s: float | None
    active_version: str | None
    base_versions: str
    outbox: int | None
    uploaded_total: int | None
    finetune: str | None = None  # "fine-tune: off (profile edge-serve)" where the site does not fine-tune

    def row(self) -> dict:
        return asdict(self)


def assess(status: dict[str, dict], sites: list[str], stale_after_s: float, ages: dict[str, float | None],
           unreadable: dict[str, str] | None = None) -> list[SiteHealth]:
    """One :class:`SiteHealth` per site in ``sites``, from its latest heartbeat (``status[site]``) and its age
    by the cloud's clock (``ages[site]``, from :meth:`FleetStatus.age`); a site in ``unreadable`` (see
    :attr:`FleetStatus.unreadable`) is shown with why its heartbeat was refused."""
    unreadable = unreadable or {}
    return [SiteHealth(site, "unreadable", unreadable[site], None, ages.get(site), None, "", None, None)
            if site in unreadable else _site(site, status.get(site), stale_after_s, ages.get(site)) for site in sites]


VERDICTS = ("ok", "degraded", "not serving", "stale", "unreadable", "not provisioned")
SERVING_STATES = ("serving", "serving-fallback")
NOT_PROVISIONED = "no heartbeat in the store: never provisioned, or its agent never reached the store"


def _site(site: str, s: dict | None, stale_after_s: float, age: float | None) -> SiteHealth:
    if age is None:
        return SiteHealth(site, "not provisioned", NOT_PROVISIONED, None, None, None, "", None, None)
    if math.isinf(age):
        return SiteHealth(site, "stale", "heartbeat stamped in the cloud's future (a store clock ahead or an mtime "
                          "a writer set): stale until the cloud sees it change", (s or {}).get("state"), None,
                          (s or {}).get("active_version"), "", None, None)
    age = round(age, 1)
    if not s:
        return SiteHealth(site, "stale" if age > stale_after_s else "degraded",
                          f"heartbeat unreadable (written {age:.0f} s ago)", None, age, None, "", None, None)
    verdict, reason = "ok", ""
    if age > stale_after_s or s.get("state") == "stopped":
        verdict, reason = "stale", (f"agent stopped {age:.0f} s ago" if s.get("state") == "stopped"
                                    else f"last heartbeat {age:.0f} s ago (limit {stale_after_s:.0f} s)")
    elif idle := _not_serving(s):
        verdict, reason = "not serving", "; ".join(filter(None, (idle, _trouble(s))))
    elif trouble := _trouble(s):
        verdict, reason = "degraded", trouble
    finetune = (s.get("finetune") or {}).get("state")
    return SiteHealth(site, verdict, reason, s.get("state"), age, s.get("active_version"),
                      ", ".join(s.get("base_versions") or []), (s.get("queues") or {}).get("outbox"),
                      s.get("uploaded_total"), f"fine-tune: {finetune}" if finetune else None)


def _not_serving(s: dict) -> str:
    """Why a live site serves no model, in words; empty when it serves one (an older heartbeat without
    ``active_version`` that says it serves is taken at its word)."""
    if s.get("state") != "no-model" and (s.get("active_version") or s.get("state") in SERVING_STATES):
        return ""
    if (s.get("finetune") or {}).get("running"):
        return "serves no model yet: its first fine-tune is running"
    if s.get("finetune_blocked"):
        return f"serves no model: {s['finetune_blocked']}"
    if s.get("pending_finetune"):
        return f"serves no model: a fine-tune is owed ({s['pending_finetune']})"
    if not s.get("base_versions"):
        return "serves no model: no base model deployed yet (roll one out: `edgeloop rollout`)"
    return "serves no model"


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
    for key in ("disk_full", "inbox_stuck"):
        if s.get(key):
            problems.append(s[key])
    return "; ".join(problems)


def summary(rows: list[SiteHealth]) -> str:
    """One line for logs and errors, e.g. ``2 ok, 1 stale (site-c: no heartbeat in the store)``."""
    counts = {v: [r for r in rows if r.verdict == v] for v in VERDICTS}
    parts = [f"{len(counts['ok'])} ok"]
    for verdict in VERDICTS[1:]:
        if counts[verdict]:
            parts.append(f"{len(counts[verdict])} {verdict} ("
                         + "; ".join(f"{r.site}: {r.reason}" for r in counts[verdict]) + ")")
    return ", ".join(parts)
