"""The fleet view: one row per site saying what serves there, on which base, since when, why (the last decision
and its evidence), what came home and what waits to go up; and each site's history, kept durable in the store.

Everything comes from the sites' latest heartbeats (read and aged as :mod:`orchestrator.health` does, by the
cloud's clock) and from ``history/<site>.jsonl`` in the store, which only the cloud writes: one line each time
the cloud sees a site serve another version or report another fine-tune run (deduplicated by run id, bounded to
:data:`MAX_HISTORY` lines), so "since when" and the accuracy over versions survive restarts of the cloud.
"Since" is the cloud's time of first seeing the version serve (a first sighting counts from the store's time of
the heartbeat that showed it, never in the cloud's future), never an edge clock.

A site's accuracy per version is what its own fine-tune reported on its own test split (reported, never used to
decide), beside the cloud's base served as-is on the same images: ``last_run.candidates`` in the heartbeat.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from edge_agent.store import Store, StoreError
from orchestrator import health

HISTORY_KEY = "history/{site}.jsonl"
MAX_HISTORY = 500  # lines per site: years of nightly retrains; the oldest go first
MAX_HISTORY_BYTES = 2 * 1024 * 1024
FLEET_KEY = "fleet"  # the Prefect artifact key of the fleet view


@dataclass(frozen=True)
class FleetRow:
    """One site in the fleet view (also ``edgeloop fleet status --json``)."""

    site: str
    verdict: str  # as orchestrator.health: ok | degraded | not serving | stale | unreadable | not provisioned
    reason: str
    state: str | None
    serving: str | None  # the active ensemble
    bases: str  # the base version(s) what serves is built on ("deployed: ..." where the cloud cannot tell)
    deployed_bases: str  # every base version deployed at the site
    since: float | None  # cloud time the cloud first saw it serve `serving`
    heartbeat_age_s: float | None
    decision: str | None  # the last fine-tune's decision, short
    evidence: str | None  # n, discordant pairs, p or e-value, alpha
    gate: dict | None  # the same evidence as numbers
    test_accuracy: float | None  # what the last run chose to serve, on the site's own test split
    base_test_accuracy: float | None  # the base as-is on the same test images
    test_images: int | None
    labels_home: str | None
    outbox: int | None
    outbox_bytes: int | None
    history: str  # the store key of the site's history (its picture's artifact key is history_artifact_key)

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "since_utc": utc(self.since)}


def utc(stamp: float | None) -> str | None:
    """``2026-12-04 07:12:03Z`` (None for no time)."""
    if stamp is None or not math.isfinite(stamp):
        return None
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(stamp))


def history_artifact_key(site: str) -> str:
    """The Prefect artifact key of ``site``'s history picture (keys take lowercase letters, digits and dashes;
    a name that had to change gets a short hash, so two sites never share a key)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", site.lower()).strip("-") or "site"
    if slug != site:
        slug += "-" + hashlib.sha256(site.encode()).hexdigest()[:6]
    return f"site-history-{slug}"


# ---- history --------------------------------------------------------------------------------------------------
def parse_history(data: bytes) -> list[dict]:
    """The entries of a history file; a line that is not a JSON object (a torn or foreign line) is skipped."""
    entries = []
    for line in data.decode(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("seen"), (int, float)):
            entries.append(entry)
    return entries


def read_histories(store: Store, sites: list[str], refused: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """``{site: entries}`` in one batched read; a missing history is empty, and so is one the store refused (too
    large, not a regular file), whose site and reason go into ``refused``."""
    found, why = store.read_many([HISTORY_KEY.format(site=s) for s in sites], MAX_HISTORY_BYTES)
    if refused is not None:
        refused.update({s: why[HISTORY_KEY.format(site=s)] for s in sites if HISTORY_KEY.format(site=s) in why})
    return {s: parse_history(found.get(HISTORY_KEY.format(site=s), b"")) for s in sites}


def run_summary(last_run: dict | None) -> dict | None:
    """What a fine-tune run says for the history: the version it chose to serve, its test accuracy beside the
    base as-is on the same images, the decision and the gate's evidence."""
    if not last_run or not last_run.get("run_id"):
        return None
    candidates = last_run.get("candidates") or {}
    chosen = last_run.get("serving")
    return {"run_id": last_run["run_id"], "finished": last_run.get("finished"),
            "version": last_run.get("serving_version"), "chosen": chosen, "bases": last_run.get("bases") or [],
            "test_accuracy": _test(candidates.get(chosen)), "base_test_accuracy": _test(candidates.get("base")),
            "test_images": ((candidates.get(chosen) or {}).get("test") or {}).get("n"),
            "decision": last_run.get("decision"), "gate": _gate_numbers(last_run.get("gate"))}


def _test(candidate: dict | None) -> float | None:
    accuracy = ((candidate or {}).get("test") or {}).get("accuracy")
    return accuracy if isinstance(accuracy, (int, float)) and math.isfinite(accuracy) else None


def _gate_numbers(gate: dict | None) -> dict | None:
    keys = ("accept", "n", "challenger_only", "incumbent_only", "p_value", "e_value", "alpha", "test")
    return {k: gate.get(k) for k in keys if gate.get(k) is not None} if isinstance(gate, dict) else None


def next_entry(history: list[dict], heartbeat: dict, seen: float) -> dict | None:
    """The line to append for ``heartbeat`` (first seen by the cloud at ``seen``), or None when it says nothing
    new: the same version serving after the same run. A run already in the history is never described twice."""
    last_run = heartbeat.get("last_run") or {}
    serving, run_id = heartbeat.get("active_version"), last_run.get("run_id")
    if history and (history[-1].get("serving"), history[-1].get("run_id")) == (serving, run_id):
        return None
    if not history and serving is None and run_id is None:
        return None  # nothing served and nothing run yet: nothing to remember
    entry = {"seen": seen, "serving": serving, "bases": heartbeat.get("base_versions") or [], "run_id": run_id}
    if heartbeat.get("active_bases"):
        entry["built_on"] = heartbeat["active_bases"]
    if run_id and all(e.get("run_id") != run_id for e in history):
        entry["run"] = run_summary(last_run)
    return entry


def append(store: Store, site: str, history: list[dict], entry: dict) -> list[dict]:
    """``history`` with ``entry`` appended, written whole to the store (verified; the oldest lines beyond
    :data:`MAX_HISTORY` dropped). Only the cloud writes it; of two fleet-health runs at once the later write
    wins, and a line it lacks is written again at the next run that still sees that heartbeat."""
    kept = (history + [entry])[-MAX_HISTORY:]
    store.put_verified(HISTORY_KEY.format(site=site),
                       "".join(json.dumps(e, sort_keys=True) + "\n" for e in kept).encode())
    return kept


def since(history: list[dict], serving: str | None) -> float | None:
    """When the cloud first saw ``serving`` serve, in the run of history lines that ends with it (None when the
    last line names another version: the history is behind)."""
    first = None
    for entry in reversed(history):
        if entry.get("serving") != serving:
            break
        first = entry["seen"]
    return first


def runs(history: list[dict]) -> list[dict]:
    """Each fine-tune run in the history once, oldest first, with when the cloud first saw it."""
    return [{**e["run"], "seen": e["seen"]} for e in history if isinstance(e.get("run"), dict)]


def built_on(serving: str | None, last_run: dict | None, history: list[dict],
             reported: list[str] | None = None) -> list[str] | None:
    """The base version(s) the ensemble ``serving`` was built from: what the agent ``reported`` for it (newer
    agents read it from the graph), or what a history line saw reported for it; a base served as-is
    (``base-<v>``) is ``v``; a fine-tuned ensemble is named for its run, whose report names its bases (the
    latest run, or one in the history); None when nothing tells."""
    if not serving:
        return None
    for said in [reported] + [e.get("built_on") for e in history[::-1] if e.get("serving") == serving]:
        if said and isinstance(said, list) and all(isinstance(b, str) for b in said):
            return list(dict.fromkeys(said))
    if serving.startswith("base-"):
        return [serving.removeprefix("base-")]
    for run in [run_summary(last_run)] + runs(history)[::-1]:
        if run and run.get("run_id") == serving and run.get("bases"):
            return list(dict.fromkeys(run["bases"]))
    return None


def bases_text(serving: str | None, last_run: dict | None, history: list[dict], deployed: list[str],
               reported: list[str] | None = None) -> str:
    known = built_on(serving, last_run, history, reported)
    if known is not None:
        return ", ".join(known)
    return f"deployed: {', '.join(deployed)}" if deployed else ""


# ---- rows -----------------------------------------------------------------------------------------------------
def evidence_text(gate: dict | None) -> str | None:
    """The gate's evidence in one line: ``n = 40, discordant 7 for / 1 against, p = 0.035, alpha = 0.1``."""
    if not isinstance(gate, dict) or not gate.get("n"):
        return None
    if gate.get("challenger_only") is None and gate.get("p_value") is None:
        return f"n = {gate['n']}, nothing in place to compare with"
    text = f"n = {gate['n']}, discordant {gate.get('challenger_only', 0)} for / {gate.get('incumbent_only', 0)} against"
    alpha = gate.get("alpha")
    if gate.get("e_value") is not None:
        text += f", e = {gate['e_value']:.3g}" + (f" (needs {1 / alpha:.3g})" if alpha else "")
    elif gate.get("p_value") is not None:
        text += f", p = {gate['p_value']:.3g}"
    return text + (f", alpha = {alpha:.3g}" if alpha is not None else "")


def short_decision(decision: str | None) -> str | None:
    """The decision without its parenthesised facts (they are in the evidence column)."""
    if not decision:
        return None
    return re.sub(r"\s*\([^()]*\)", "", decision).strip()[:200] or decision[:200]


def labels_text(labels: dict | None) -> str | None:
    """``12 taken, 1 relabelled, 2 refused, 3 pending`` (and the last error), or None when none came home."""
    if not isinstance(labels, dict):
        return None
    parts = [f"{labels.get('taken') or 0} taken"] + [f"{labels[k]} {k}" for k in ("relabelled", "refused", "pending")
                                                if labels.get(k)]
    text = ", ".join(parts)
    return text + (f" (error: {str(labels['error'])[:120]})" if labels.get("error") else "")


def fleet_row(health_row: health.SiteHealth, heartbeat: dict | None, history: list[dict],
              first_seen: float | None) -> FleetRow:
    """One site's row from its health verdict, latest heartbeat and history (``first_seen``: when the cloud
    first saw this heartbeat; "since" when the history has not caught up with it)."""
    beat = heartbeat or {}
    last_run = beat.get("last_run") or {}
    summary = run_summary(last_run) or {}
    serving = beat.get("active_version")
    queues = beat.get("queues") or {}
    return FleetRow(
        site=health_row.site, verdict=health_row.verdict, reason=health_row.reason, state=health_row.state,
        serving=serving,
        bases=bases_text(serving, last_run, history, beat.get("base_versions") or [], beat.get("active_bases")),
        deployed_bases=", ".join(beat.get("base_versions") or []),
        since=(since(history, serving) or first_seen) if serving else None,
        heartbeat_age_s=health_row.heartbeat_age_s, decision=short_decision(last_run.get("decision")),
        evidence=evidence_text(last_run.get("gate")), gate=summary.get("gate"), test_accuracy=summary.get("test_accuracy"),
        base_test_accuracy=summary.get("base_test_accuracy"), test_images=summary.get("test_images"),
        labels_home=labels_text(beat.get("labels_home")) if heartbeat else None,
        outbox=queues.get("outbox") if heartbeat else None, outbox_bytes=queues.get("outbox_bytes") if heartbeat else None,
        history=HISTORY_KEY.format(site=health_row.site))


@dataclass
class FleetView:
    rows: list[FleetRow]
    health: list[health.SiteHealth]  # the same sites' health rows (the fleet-health table)
    histories: dict[str, list[dict]]
    changed: list[str]  # sites whose history got a line in this look
    history_error: str = ""  # why the histories could not be read or written (the rows are still true)

    @property
    def not_ok(self) -> list[FleetRow]:
        return [r for r in self.rows if r.verdict != "ok"]


def look(store: Store, sites: list[str], stale_after_s: float, record: bool = False,
         reader: health.FleetStatus | None = None) -> FleetView:
    """The fleet view now: heartbeats in one listing, histories in one batched read; with ``record`` (the
    fleet-health flow), what is new is appended to the histories. A store that cannot be listed raises
    :class:`StoreError`; one that fails for the histories leaves the rows as true as the heartbeats make them,
    and says why in :attr:`FleetView.history_error`."""
    reader = reader or health.FleetStatus(store)
    status = reader.read(sites)
    if reader.error:  # no listing: every site would read "not provisioned", which would be a lie
        raise StoreError(reader.error)
    now = time.time()
    ages = {s: reader.age(s, now) for s in sites}
    verdicts = health.assess(status, sites, stale_after_s, ages, reader.unreadable)
    seen = {s: now - a for s, a in ages.items() if a is not None and math.isfinite(a)}
    changed: list[str] = []
    refused: dict[str, str] = {}  # a history refused is never overwritten with one line: a person looks first
    try:
        histories = read_histories(store, sites, refused)
    except StoreError as exc:
        histories, refused = {s: [] for s in sites}, dict.fromkeys(sites, str(exc))
    errors = list(dict.fromkeys(refused.values()))
    for site in sites:
        if not record or site in refused or site not in status or site not in seen:
            continue
        entry = next_entry(histories[site], status[site], seen[site])
        if entry is None:
            continue
        try:
            histories[site] = append(store, site, histories[site], entry)
            changed.append(site)
        except StoreError as exc:
            errors.append(str(exc))
    rows = [fleet_row(v, status.get(v.site), histories[v.site], seen.get(v.site)) for v in verdicts]
    return FleetView(rows, verdicts, histories, changed, "; ".join(errors))


# ---- presentation ---------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def accuracy_text(row: FleetRow, short: bool = False) -> str:
    """``84.0 % (base 78.0 %, n = 50)``; ``short``: ``84.0 % (78.0 %, 50)``."""
    if row.test_accuracy is None:
        return ""
    base, n = ("", "") if short else ("base ", "n = ")
    extra = [f"{base}{_pct(row.base_test_accuracy)}"] if row.base_test_accuracy is not None else []
    extra += [f"{n}{row.test_images}"] if row.test_images else []
    return _pct(row.test_accuracy) + (f" ({', '.join(extra)})" if extra else "")


def since_text(stamp: float | None, now: float | None = None, seconds: bool = True) -> str:
    """``2026-12-04 07:12:03Z (5 min ago)``."""
    if stamp is None:
        return ""
    ago = max(0.0, (now or time.time()) - stamp)
    span = f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min" if ago < 7200 else f"{ago / 3600:.1f} h"
    return f"{utc(stamp) if seconds else utc(stamp)[:-4] + 'Z'} ({span} ago)"


COLUMNS = ("site", "verdict", "serving", "bases", "since", "last decision", "evidence", "test accuracy",
           "labels home", "outbox")


def cells(row: FleetRow, now: float | None = None) -> dict[str, str]:
    """The row as the table's text cells (the command line and the artifact show the same)."""
    outbox = "" if row.outbox is None else f"{row.outbox}" + (
        f" ({row.outbox_bytes / 1024:.0f} KiB)" if row.outbox_bytes else "")
    return {"site": row.site, "verdict": row.verdict if row.verdict == "ok" else f"{row.verdict}: {row.reason}",
            "serving": row.serving or "nothing", "bases": row.bases, "since": since_text(row.since, now),
            "last decision": row.decision or "", "evidence": row.evidence or "",
            "test accuracy": accuracy_text(row), "labels home": row.labels_home or "", "outbox": outbox}


def _md(text: str, limit: int = 240) -> str:
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


SERVING_COLUMNS = ("site", "verdict", "serving", "on base", "since (UTC)", "history")
LEARNING_COLUMNS = ("site", "test accuracy (base as-is, n)", "labels home", "uploads waiting")


def markdown(view: FleetView, stale_after_s: float, ui_url: str = "", pictures: dict[str, str] | None = None) -> str:
    """The fleet view as one markdown page that fits a screen (the UI does not wrap table cells): a summary line;
    what serves where (a row per site, its history picture linked where one is published: ``pictures`` maps
    artifact keys to the latest artifact's id); what each site learned and sends (a row per site); each site's
    last decision with its evidence; and why each site not ok is not."""
    now, pictures = time.time(), pictures or {}
    ok = sum(r.verdict == "ok" for r in view.rows)
    lines = [f"**{ok} of {len(view.rows)} sites ok** at {utc(now)} (heartbeats aged by the cloud's clock; stale "
             f"after {stale_after_s:.0f} s)", ""]
    if view.history_error:
        lines += [f"History not updated: {_md(view.history_error)}", ""]
    serving, learning = [], []
    for row in view.rows:
        text = cells(row, now)
        artifact = pictures.get(history_artifact_key(row.site))
        serving.append([row.site, row.verdict if row.verdict == "ok" else f"**{row.verdict}**", text["serving"],
                        row.bases, utc(row.since)[5:-4] + "Z" if row.since else "",
                        f"[picture]({ui_url}/artifacts/artifact/{artifact})" if artifact else ""])
        learning.append([row.site, accuracy_text(row, short=True), text["labels home"], text["outbox"]])
    lines += _md_table(SERVING_COLUMNS, serving) + [""] + _md_table(LEARNING_COLUMNS, learning)
    decided = [r for r in view.rows if r.decision]
    if decided:
        lines += ["", "**Last decision at each site** (its paired gate on its own gate split):", ""]
        lines += [f"- **{_md(r.site)}**: {_md(r.decision)}" + (f" ({_md(r.evidence)})" if r.evidence else "")
                  for r in decided]
    if view.not_ok:
        lines += ["", "**Not ok:**", ""] + [f"- **{_md(r.site)}** {r.verdict}: {_md(r.reason, 400)}"
                                           for r in view.not_ok]
    lines += ["", "Test accuracy: what the site's last fine-tune chose to serve, on the site's own test split "
              "(reported, never used to decide), beside the cloud's base served as-is on the same images, n test "
              "images. Each site's history: `history/<site>.jsonl` in the store; `edgeloop fleet status` prints "
              "these rows."]
    return "\n".join(lines)


def _md_table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(c if c.startswith(("[", "**")) else _md(c, 80) for c in row) + " |" for row in rows])


def table(rows: list[FleetRow], now: float | None = None) -> str:
    """The rows as aligned text columns for the command line (reasons of sites not ok below the table)."""
    shown = [{**cells(r, now), "verdict": r.verdict} for r in rows]
    widths = {c: max(len(c), *(len(s[c]) for s in shown)) if shown else len(c) for c in COLUMNS}
    out = ["  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip()]
    out += ["  ".join(s[c].ljust(widths[c]) for c in COLUMNS).rstrip() for s in shown]
    out += [f"{r.site}: {r.verdict}: {r.reason}" for r in rows if r.verdict != "ok"]
    return "\n".join(out)


def history_figure(site: str, history: list[dict]):
    """A matplotlib figure of ``site``'s accuracy on its own test split per fine-tune run (x: the version that
    served after the run), beside the base as-is on the same images; None when no run reported one."""
    points = [r for r in runs(history) if r.get("test_accuracy") is not None]
    if not points:
        return None
    from orchestrator.pictures import new_figure

    figure, (axes,) = new_figure(title=f"{site}: accuracy on its own test split, per served version")
    x = list(range(len(points)))
    axes.plot(x, [100 * p["test_accuracy"] for p in points], "o-", linewidth=4, markersize=10, alpha=0.8,
              label="served after the run", gid="served")
    base = [(i, 100 * p["base_test_accuracy"]) for i, p in enumerate(points) if p.get("base_test_accuracy") is not None]
    if base:  # thin and on top: where the base as-is serves, the two lines are one
        axes.plot([i for i, _ in base], [b for _, b in base], "s--", linewidth=1.5, markersize=5, zorder=3,
                  label="newest base as-is (same test images)", gid="base")
    axes.set_xticks(x, [_tick(p.get("version"), history) for p in points], fontsize=8)
    for i, p in enumerate(points):
        if p.get("test_images"):
            axes.annotate(f"n={p['test_images']}", (i, 100 * p["test_accuracy"]), textcoords="offset points",
                          xytext=(0, 7), ha="center", fontsize=8)
    axes.set_ylabel("test accuracy (%)")
    axes.set_xlabel("version served after each fine-tune, on its base")
    low = min([100 * p["test_accuracy"] for p in points] + [b for _, b in base])
    axes.set_ylim(max(0.0, low - 10), 100.5)
    axes.legend(loc="lower right", fontsize=8)
    return figure


def _tick(version: str | None, history: list[dict]) -> str:
    """``<version>`` over ``on <its bases>``."""
    return f"{_short(version)}\non {', '.join(built_on(version, None, history) or ['?'])[:24]}"


def _short(version: str | None) -> str:
    return "?" if not version else version if len(version) <= 22 else version[:10] + "…" + version[-10:]
