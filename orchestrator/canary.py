"""Canary analysis: a site's live window on the new version against its window before the deploy, as tests.

Each heartbeat carries a rolling window of what the site serves, per model (:mod:`edge_agent.window`). After a
canary soaked, the window of the model serving now is compared with the window of the model that served before
the deploy. The rates in the windows are counts, so each is compared with a two-proportion z-test (pooled
variance) at a stated error rate:

- every class's prediction rate (two-sided: a defect rate that halves is as wrong as one that doubles; with two
  classes one test covers both), and the share of inputs that failed (errors + quarantined; one-sided, a rise);
- the site's false-fail rate is ``thresholds.alpha`` in all: each of the m tests runs at alpha / m (Bonferroni).

How much traffic that needs is computed, not guessed: :func:`required_predictions` is the smallest after-window
that catches the effect the operator states (``rate_ratio``: a rate that halves or doubles, never less than
``min_change_points``) with probability ``power``, given the before-window's size and rates (the worst rate in
the before-rate's 90 % interval, since it is an estimate too). A canary with fewer
predictions than that on the new model is not judged: the verdict is *inconclusive* (the inventory says whether
that halts the rollout, extends the soak or lets it go on), never *passed*. Mean confidence, member disagreement
and p95 latency are summaries without their per-prediction values, so they stay guard limits (reported as such).
The version's gate evidence at the site (its fine-tune's paired gate) is one more row, tested at the cloud's
alpha, never the site's own. Every comparison is a :class:`Check`, so the verdict artifact shows site, metric,
before, after, the test and pass/fail.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np
from scipy.stats import binom

from edge_agent.gate import mcnemar_p
from edge_agent.window import WINDOW_SIZE
from orchestrator.inventory import CanaryThresholds

Z = NormalDist()


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
        return f"{self.metric} {self.before} -> {self.after} ({self.threshold})"


def live_window(status: dict | None) -> dict | None:
    """The window of the model a heartbeat says serves (None: none, or it served nothing yet)."""
    if not status:
        return None
    return (status.get("window") or {}).get(status.get("active_version"))


def predictions(status: dict | None) -> int:
    return (live_window(status) or {}).get("predictions", 0)


def class_counts(window: dict) -> dict[str, int]:
    """The exact counts behind a window's class rates (older agents send rates only: rates x n, rounded)."""
    if window.get("class_counts") is not None:
        return dict(window["class_counts"])
    return {c: round(r * window["predictions"]) for c, r in window["class_rates"].items()}


def failures(window: dict) -> tuple[int, int]:
    """(failed inputs, inputs): errors and quarantined inputs among everything the model was given."""
    failed = window.get("errors", 0) + window.get("quarantined", 0)
    return failed, window["predictions"] + failed


# ---- the test and its power ----------------------------------------------------------------------------

def two_proportion_p(x1: int, n1: int, x2: int, n2: int, side: str = "two") -> float:
    """p-value of the pooled two-proportion z-test of x2/n2 against x1/n1 (``side``: two, or greater: a rise)."""
    if n1 == 0 or n2 == 0:
        return 1.0
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0  # both windows all or nothing alike: no difference to see
    z = (x2 / n2 - x1 / n1) / se
    return 2 * (1 - Z.cdf(abs(z))) if side == "two" else 1 - Z.cdf(z)


def power(p0: float, n0: int, p1: float, n1: int, alpha: float, side: str = "two") -> float:
    """Probability that the test at ``alpha`` rejects when the rate moved from p0 (over n0) to p1 (over n1):
    exact, summed over both windows' binomial counts (within 8 standard deviations), not a normal guess that
    is optimistic at the small counts a canary has."""
    if n0 == 0 or n1 == 0 or p0 == p1 or (side != "two" and p1 < p0):
        return 0.0
    x0, w0 = _binomial(n0, p0)
    x1, w1 = _binomial(n1, p1)
    r0, r1 = x0[:, None] / n0, x1[None, :] / n1
    pooled = (x0[:, None] + x1[None, :]) / (n0 + n1)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n0 + 1 / n1))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, (r1 - r0) / np.where(se > 0, se, 1), 0.0)
    crit = Z.inv_cdf(1 - alpha / 2 if side == "two" else 1 - alpha)
    rejects = (np.abs(z) >= crit) if side == "two" else (z >= crit)
    return float((w0[:, None] * w1[None, :] * rejects).sum())


def _binomial(n: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    """The counts of Binomial(n, p) within 8 standard deviations of the mean, and their probabilities."""
    spread = 8 * math.sqrt(n * p * (1 - p)) + 2
    x = np.arange(max(0, math.floor(n * p - spread)), min(n, math.ceil(n * p + spread)) + 1)
    return x, binom.pmf(x, n, p)


def alternatives(p0: float, limits: CanaryThresholds, side: str) -> list[float]:
    """The rates the operator wants caught: p0 halved and doubled (``rate_ratio``), each at least
    ``min_change_points`` away from p0, within [0, 1] (a rise only for a one-sided test); one that [0, 1] cuts
    below ``min_change_points`` is left out."""
    floor = limits.min_change_points / 100
    up = min(1.0, max(p0 * limits.rate_ratio, p0 + floor))
    down = max(0.0, min(p0 / limits.rate_ratio, p0 - floor))
    # a change cut short by 0 or 1 (a rate of 98 % cannot double) is smaller than the one to catch: not asked
    return [p for p in ([up] if side == "greater" else [down, up]) if p != p0 and abs(p - p0) >= floor - 1e-12]


def required_n(p0: float, n0: int, alpha: float, limits: CanaryThresholds, side: str = "two",
               most: int = WINDOW_SIZE) -> int | None:
    """The smallest after-window (at most ``most``) whose test at ``alpha`` catches each alternative of
    :func:`alternatives` with probability ``limits.power``; None when even ``most`` would not."""
    need = 1
    for p1 in alternatives(p0, limits, side):
        if power(p0, n0, p1, most, alpha, side) < limits.power:
            return None
        lo, hi = need, most  # power grows with n: the smallest n that reaches it, by bisection
        while lo < hi:
            mid = (lo + hi) // 2
            if power(p0, n0, p1, mid, alpha, side) >= limits.power:
                hi = mid
            else:
                lo = mid + 1
        need = max(need, lo)
    return need


BAND_Z = Z.inv_cdf(0.95)  # the before-rate is itself an estimate: power is asked over its 90 % interval


def _required_over_band(x: int, n: int, alpha: float, limits: CanaryThresholds, side: str) -> int | None:
    """:func:`required_n` for the worst rate in the before-window's 90 % interval (x of n): a rate estimated
    too high would otherwise size the test for a larger change than the one to catch."""
    p = x / n
    half = BAND_Z * math.sqrt(max(p * (1 - p), 1 / n) / n)
    needs = [required_n(q, n, alpha, limits, side) for q in {p, max(0.0, p - half), min(1.0, p + half)}]
    return None if None in needs else max(needs)


@dataclass(frozen=True)
class Plan:
    """The tests a canary's live windows get, and how many predictions on the new model they need."""

    tests: list[tuple[str, str]]  # (metric, side): ("class:<name>", "two") or ("failures", "greater")
    alpha_each: float
    needed: int | None  # None: the before-window is too thin for any after-window to reach the power
    why: str = ""


def plan(before: dict, limits: CanaryThresholds, also: list[str] | tuple = ()) -> Plan:
    """Which tests, at which alpha each, and the predictions needed to reach ``limits.power`` on each; the
    classes are those the before-window predicted and those in ``also`` (what the new model predicted)."""
    counts = class_counts(before)
    counts = {c: counts.get(c, 0) for c in sorted(set(counts) | set(also))}
    classes = sorted(counts)
    if len(classes) == 2:  # one test covers both: each rate is the other's complement
        classes = [min(classes, key=lambda c: (counts[c], c))]
    tests = [(f"class:{c}", "two") for c in classes] + [("failures", "greater")]
    alpha_each = limits.alpha / len(tests)
    n0 = before["predictions"]
    needed = limits.min_predictions
    for metric, side in tests:
        if metric == "failures":
            x, n = failures(before)
        else:
            x, n = counts.get(metric.split(":", 1)[1], 0), n0
        if n == 0:
            return Plan(tests, alpha_each, None, "no predictions in the window before the deploy")
        one = _required_over_band(x, n, alpha_each, limits, side)
        if one is None:
            return Plan(tests, alpha_each, None,
                        f"{metric.replace('class:', 'rate of ')} ({x}/{n} before): no window of up to "
                        f"{WINDOW_SIZE} predictions reaches power {limits.power:g} at alpha {alpha_each:.3g}")
        needed = max(needed, one)
    return Plan(tests, alpha_each, needed)


def analyse(site: str, before_status: dict | None, after_status: dict | None, limits: CanaryThresholds
            ) -> list[Check]:
    """The live checks of one canary from its heartbeats before the deploy and now (empty when either has no
    window of the model it serves: no baseline, or no traffic)."""
    before, after = live_window(before_status), live_window(after_status)
    if not before or not after or not before["predictions"]:
        return []
    return analyse_windows(site, before, after, limits)


def analyse_windows(site: str, before: dict, after: dict, limits: CanaryThresholds) -> list[Check]:
    """The tests of :func:`plan` on the windows of the model that served before and the one serving now, then
    the guard limits."""
    test_plan = plan(before, limits, list(after["class_rates"]))
    checks = []
    b_counts, a_counts = class_counts(before), class_counts(after)
    for metric, side in test_plan.tests:
        if metric == "failures":
            (xb, nb), (xa, na) = failures(before), failures(after)
            name = "errors + quarantined per input"
        else:
            cls = metric.split(":", 1)[1]
            (xb, nb), (xa, na) = (b_counts.get(cls, 0), before["predictions"]), (a_counts.get(cls, 0),
                                                                                  after["predictions"])
            name = f"rate of {cls}"
        p = two_proportion_p(xb, nb, xa, na, side)
        checks.append(Check(site, name, _share(xb, nb), _share(xa, na),
                            f"{'two-sided' if side == 'two' else 'rise'} two-proportion test p = {p:.3g}, "
                            f"fails at p <= {test_plan.alpha_each:.3g} (alpha {limits.alpha:g} over "
                            f"{len(test_plan.tests)} tests)", "fail" if p <= test_plan.alpha_each else "pass"))
    return checks + guards(site, before, after, limits)


def guards(site: str, before: dict, after: dict, limits: CanaryThresholds) -> list[Check]:
    """Fixed limits on what the windows summarise without per-prediction values (no test is possible)."""
    def limit(metric: str, b: float, a: float, change: float, bound: float, unit: str) -> Check:
        return Check(site, metric, f"{b:.4g}{unit}", f"{a:.4g}{unit}", f"guard limit {bound:g}",
                     "fail" if change > bound + 1e-9 else "pass")

    b, a = before["latency_p95_ms"], after["latency_p95_ms"]
    rows = [limit("latency p95 growth (%)", b, a, 100 * (a / b - 1) if b > 0 else 0.0,
                  limits.latency_p95_growth_pct, " ms")]
    b, a = 100 * before["mean_confidence"], 100 * after["mean_confidence"]
    rows.append(limit("mean confidence drop (points)", b, a, b - a, limits.confidence_drop_points, "%"))
    b, a = 100 * before["mean_disagreement"], 100 * after["mean_disagreement"]
    rows.append(limit("member disagreement rise (points)", b, a, a - b, limits.disagreement_rise_points, "%"))
    return rows


def _share(x: int, n: int) -> str:
    return f"{x}/{n} ({100 * x / n:.3g}%)" if n else "0/0"


def implausible(window: dict | None, since: float, now: float, max_rate: float) -> str | None:
    """Why a window on the new model claims more than can be true (None: it does not): more predictions than
    the agent's window holds, or than the time since the deploy (by the cloud's clock) allows at the rate
    ``rollout.max_predictions_per_s``."""
    if not window:
        return None
    n = window["predictions"] + window.get("errors", 0) + window.get("quarantined", 0)
    if window["predictions"] > WINDOW_SIZE:
        return f"window claims {window['predictions']} predictions; the agent's window holds {WINDOW_SIZE}"
    allowed = max(0.0, now - since) * max_rate + 1
    if n > allowed:
        return (f"window claims {n} inputs on the new model {now - since:.0f} s after the deploy (at most "
                f"{allowed:.0f} at rollout.max_predictions_per_s {max_rate:g})")
    return None


def gate_evidence(site: str, run: dict, alpha: float) -> tuple[Check, bool]:
    """The version's gate evidence at the site, from the shared paired gate (:mod:`edge_agent.gate`) its
    fine-tune ran: its best challenger on the version against what served. Returns the check, failed when
    the challenger is significantly *worse* (the same one-sided McNemar test, roles swapped) at the cloud's
    ``alpha`` (the site's own is shown, never used), and whether the gate found an improvement (a challenger
    built on the version now serves)."""
    decision = run.get("gate") or {}
    n, b, c = (int(decision.get(k) or 0) for k in ("n", "challenger_only", "incumbent_only"))
    improved = bool(decision.get("accept")) and run.get("serving") not in (None, "active")
    worse_p = mcnemar_p(c, b)
    regressed = c > b and worse_p <= alpha
    fmt = (lambda v: "-" if v is None else f"{v:.4f}")
    site_alpha = decision.get("alpha")
    said = f"; the site's own alpha {site_alpha:g} not used" if site_alpha not in (None, alpha) else ""
    return Check(site, f"gate accuracy, challenger vs incumbent (n {n}, {b} for / {c} against, p worse "
                       f"{worse_p:.3g})", fmt(decision.get("incumbent_accuracy")),
                 fmt(decision.get("challenger_accuracy")), f"not significantly worse (alpha {alpha:g}{said})",
                 "fail" if regressed else "pass"), improved
