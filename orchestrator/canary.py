"""Canary analysis: a site's live window on the new version against its window before the deploy.

Each heartbeat carries a rolling window of what the site serves, per model (:mod:`edge_agent.window`).
After a canary soaked, the window of the model serving now is compared with the window of the model that
served before the deploy, metric by metric, against the inventory's ``rollout.thresholds``; the version's
gate evidence at the site (what its fine-tune served against what served before) is one more row. Every
comparison is a :class:`Check`, so the verdict artifact shows site, metric, before, after, threshold and
pass/fail, the way a canary judge does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edge_agent.gate import mcnemar_p
from orchestrator.inventory import CanaryThresholds


@dataclass(frozen=True)
class Check:
    site: str
    metric: str
    before: str
    after: str
    threshold: str
    result: str  # pass | fail

    @property
    def failed(self) -> bool:
        return self.result == "fail"

    def row(self) -> dict:
        return asdict(self)

    def why(self) -> str:
        return f"{self.metric} {self.before} -> {self.after} (limit {self.threshold})"


def live_window(status: dict | None) -> dict | None:
    """The window of the model a heartbeat says serves (None: none, or it served nothing yet)."""
    if not status:
        return None
    return (status.get("window") or {}).get(status.get("active_version"))


def predictions(status: dict | None) -> int:
    return (live_window(status) or {}).get("predictions", 0)


def _check(site: str, metric: str, before: float, after: float, change: float, limit: float, unit: str) -> Check:
    return Check(site, metric, f"{before:.4g}{unit}", f"{after:.4g}{unit}", f"{limit:g}",
                 "fail" if change > limit + 1e-9 else "pass")


def analyse(site: str, before_status: dict | None, after_status: dict | None, limits: CanaryThresholds
            ) -> list[Check]:
    """The live-metric checks of one canary (empty when nothing served before the deploy: no baseline)."""
    before, after = live_window(before_status), live_window(after_status)
    if not before or not after or before_status.get("active_version") == after_status.get("active_version"):
        return []
    checks = []
    for cls in sorted(set(before["class_rates"]) | set(after["class_rates"])):
        b, a = 100 * before["class_rates"].get(cls, 0.0), 100 * after["class_rates"].get(cls, 0.0)
        checks.append(_check(site, f"rate of {cls} (points)", b, a, abs(a - b), limits.class_rate_points, "%"))
    b, a = before["latency_p95_ms"], after["latency_p95_ms"]
    growth = 100 * (a / b - 1) if b > 0 else 0.0
    checks.append(_check(site, "latency p95 growth (%)", b, a, growth, limits.latency_p95_growth_pct, " ms"))
    b, a = 100 * before["mean_confidence"], 100 * after["mean_confidence"]
    checks.append(_check(site, "mean confidence drop (points)", b, a, b - a, limits.confidence_drop_points, "%"))
    b, a = 100 * before["mean_disagreement"], 100 * after["mean_disagreement"]
    checks.append(_check(site, "member disagreement rise (points)", b, a, a - b, limits.disagreement_rise_points, "%"))
    b, a = (100 * (w["errors"] + w["quarantined"]) / max(1, w["predictions"]) for w in (before, after))
    checks.append(_check(site, "errors + quarantined per prediction (points)", b, a, a - b,
                         limits.failure_rate_points, "%"))
    return checks


def gate_evidence(site: str, run: dict) -> tuple[Check, bool]:
    """The version's gate evidence at the site, from the shared paired gate (:mod:`edge_agent.gate`) its
    fine-tune ran: its best challenger on the version against what served. Returns the check, failed when
    the challenger is significantly *worse* (the same one-sided McNemar test, roles swapped, at the gate's
    alpha), and whether the gate found an improvement (a challenger built on the version now serves)."""
    decision = run.get("gate") or {}
    n, b, c = (int(decision.get(k) or 0) for k in ("n", "challenger_only", "incumbent_only"))
    alpha = decision.get("alpha") or 0.1
    improved = bool(decision.get("accept")) and run.get("serving") not in (None, "active")
    worse_p = mcnemar_p(c, b)
    regressed = c > b and worse_p <= alpha
    fmt = (lambda v: "-" if v is None else f"{v:.4f}")
    return Check(site, f"gate accuracy, challenger vs incumbent (n {n}, {b} for / {c} against, p worse "
                       f"{worse_p:.3g})", fmt(decision.get("incumbent_accuracy")),
                 fmt(decision.get("challenger_accuracy")), f"not significantly worse (alpha {alpha:g})",
                 "fail" if regressed else "pass"), improved
