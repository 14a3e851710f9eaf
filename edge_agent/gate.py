"""The one gate: does a challenger replace the incumbent? Used by the edge (activation, the shadow challenger),
the cloud (promotion, tune) and the rollout's canary verdicts.

It reads each model's answers on the *same* gate images, a split that chose nothing else (no epoch, no
ensemble weight, no precision), and asks whether the challenger's advantage could be noise. Only the discordant
pairs carry evidence: of the images where exactly one model is right, the challenger is right on ``b`` and the
incumbent on ``c``. If the challenger is no better, each discordant pair is a coin that lands for it with
probability p <= 1/2. Two tests of H0: p <= 1/2, one per kind of decision:

**One look: the exact one-sided McNemar test** (:func:`gate`). p = P(X >= b) for X ~ Binomial(b + c, 1/2). The
challenger wins only when its accuracy gain (b - c) / n is more than ``min_gain`` and p <= ``alpha``.

**Many looks: an anytime-valid sequential test** (:func:`sequential_gate`), for evidence that builds up (a site's
shadow challenger judged again as labels come home; a challenger judged every night against one champion). Its
statistic is Robbins' method of mixtures, a mixture likelihood ratio (a betting e-process) on the discordant pairs
in the order they arrive::

    E = integral over p in (1/2, 1] of  p^b (1 - p)^c / (1/2)^(b + c)  dPrior(p)

with Prior = Beta(a, a) restricted to p > 1/2 (:data:`PRIOR_A` = a; it puts its weight on challengers that win
50-75 % of the discordant pairs, the size of gain a fine-tune brings). In closed form
E = 2^(b+c+1) B(b + a, c + a) / B(a, a) * P(Beta(b + a, c + a) > 1/2), computed in log space. For every p0 <= 1/2
and p > 1/2, E_p0[p^X (1 - p)^(1 - X) / (1/2)] = 2(1 - p) + 2 p0 (2p - 1) <= 1, so E is a nonnegative
supermartingale under H0, and by Ville's inequality P(sup over all looks E >= 1/alpha) <= alpha. The challenger
wins when E >= 1/alpha (and the gain is above ``min_gain``): however often it is looked at, a challenger that is
no better is accepted with probability at most alpha in all. The threshold does not depend on the number of
looks (reported only), and E depends on the counts alone, so a look may come at any n. The guarantee needs the
two models fixed and the gate split growing (images added, none removed or swapped) between looks.

Sources: J. Ville, *Étude critique de la notion de collectif* (1939); H. Robbins, "Statistical methods related
to the law of the iterated logarithm" (Ann. Math. Statist. 1970; the method of mixtures); A. Ramdas, P. Grünwald,
V. Vovk, G. Shafer, "Game-theoretic statistics and safe anytime-valid inference" (Statistical Science 2023);
S. Howard, A. Ramdas, J. McAuliffe, J. Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence sequences"
(Ann. Statist. 2021).

**Many candidates against one incumbent** (the cloud's nightly retrain): candidate k (k >= 1) is tried at
:func:`spent_alpha` = alpha / (k (k + 1)); these shares sum to alpha over any number of candidates.

Anything else (a tie included) keeps the incumbent. ``min_gate_images`` (default 1) is kept so that old
configurations parse: both tests are valid at any n, so a thin gate delays nothing but what it cannot yet tell.
Log-loss never decides: on a few dozen images it mostly measures calibration noise. ``bench/gate.py`` measures
both tests' false-promotion rates over repeated looks and the sequential test's power.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

EPS = 1e-12
E_CAP = 1e300  # the largest e-value reported (a finite JSON number); decisions use log E
PRIOR_A = 10.0  # the sequential test's mixing prior: Beta(PRIOR_A, PRIOR_A) restricted to p > 1/2
EXACT_TEST = "exact one-sided McNemar"
SEQUENTIAL_TEST = f"anytime-valid mixture e-process (Beta({PRIOR_A:g},{PRIOR_A:g}) on p > 1/2, Ville)"


class GateRule(BaseModel):
    """How sure a gate must be before a challenger replaces what is in place."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.1, gt=0, lt=1, description="significance of the one-sided test: the highest share of "
                                                      "no-better challengers the gate may let through")
    min_gain: float = Field(0.0, ge=0, description="gate accuracy (0-1) a challenger must add over the incumbent")
    min_gate_images: int = Field(1, ge=1, description="fewer gate images than this: the incumbent stays. Default "
                                                      "1: both tests are valid at any n (kept so that older "
                                                      "configurations parse)")


@dataclass(frozen=True, eq=False)
class Score:
    """A model's answers on the gate images, in the gate split's order: which ones it got right."""

    correct: np.ndarray  # bool, one per gate image
    nll: float | None = None  # reported only

    @classmethod
    def of(cls, predictions: np.ndarray, labels: np.ndarray, nll: float | None = None) -> "Score":
        """From predicted class indices (or an (n, classes) probability array) and the true labels."""
        predictions = np.asarray(predictions)
        if predictions.ndim == 2:
            predictions = predictions.argmax(1) if predictions.size else np.zeros(len(predictions), np.int64)
        return cls(predictions == np.asarray(labels), nll)

    @property
    def n(self) -> int:
        return int(len(self.correct))

    @property
    def accuracy(self) -> float | None:
        return float(np.mean(self.correct)) if self.n else None


@dataclass(frozen=True)
class Decision:
    """A gate's verdict and its evidence. ``reason`` says it in one line (the test, n, discordant counts, p or
    e-value, the threshold; for the sequential test the number of looks)."""

    accept: bool
    reason: str
    n: int = 0
    challenger_only: int = 0  # gate images only the challenger got right (b)
    incumbent_only: int = 0   # gate images only the incumbent got right (c)
    p_value: float | None = None  # exact: McNemar's p; sequential: min(1, 1/E), valid at any look
    alpha: float | None = None
    challenger_accuracy: float | None = None
    incumbent_accuracy: float | None = None
    e_value: float | None = None  # sequential only: the mixture e-value E (accept when E >= 1/alpha)
    looks: int | None = None      # sequential only: how many times this pair has been looked at (reported)
    test: str | None = None       # which test decided (EXACT_TEST or SEQUENTIAL_TEST)

    def as_dict(self) -> dict:
        return asdict(self)


def mcnemar_p(challenger_only: int, incumbent_only: int) -> float:
    """Exact one-sided McNemar p-value: the chance of ``challenger_only`` or more wins among the discordant
    pairs if each were a fair coin (1.0 when there is no discordant pair)."""
    discordant = challenger_only + incumbent_only
    if discordant == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(challenger_only, discordant, 0.5, alternative="greater").pvalue)


def log_e_value(challenger_only, incumbent_only, prior_a: float = PRIOR_A):
    """log E of the mixture e-process (module docstring) after ``challenger_only`` wins and ``incumbent_only``
    losses among the discordant pairs: (n+1) log 2 + log B(b+a, c+a) - log B(a, a) + log P(Beta(b+a, c+a) > 1/2).
    0 (E = 1) with no discordant pair. Counts may be ints (a float comes back) or arrays of them (an array comes
    back: benchmarks and tests judge many sequences at once). Where the tail underflows (far more losses than
    wins) it is taken from the density at 1/2 and its slope there (the tail's leading term), so log E stays
    finite: E then falls only like 1/(c - b), the prior's weight just above 1/2."""
    from scipy.special import betaincc, betaln

    b, c = np.asarray(challenger_only, dtype=float), np.asarray(incumbent_only, dtype=float)
    if np.any(b < 0) or np.any(c < 0):
        raise ValueError(f"discordant counts cannot be negative: {challenger_only}, {incumbent_only}")
    left, right = b + prior_a, c + prior_a
    tail = betaincc(left, right, 0.5)
    approx = ((left + right - 2) * math.log(0.5) - betaln(left, right)
              - np.log(2 * np.maximum(right - left, 1.0)))
    with np.errstate(divide="ignore"):
        log_tail = np.where(tail > 1e-290, np.log(np.maximum(tail, 1e-300)), approx)  # not in subnormal floats
    out = (b + c + 1) * math.log(2) + betaln(left, right) - betaln(prior_a, prior_a) + log_tail
    return float(out) if out.ndim == 0 else out


def e_value(challenger_only: int, incumbent_only: int, prior_a: float = PRIOR_A) -> float:
    """E itself (capped at :data:`E_CAP` so that it stays a finite JSON number)."""
    return _capped(log_e_value(challenger_only, incumbent_only, prior_a))


def _capped(log_e: float) -> float:
    return E_CAP if log_e >= math.log(E_CAP) else math.exp(log_e)


def spent_alpha(alpha: float, k: int) -> float:
    """The share of ``alpha`` for the k-th candidate (k >= 1) tried against one incumbent: alpha / (k (k + 1)).
    These shares sum to alpha over any number of candidates (1/(k(k+1)) = 1/k - 1/(k+1) telescopes), so the chance
    that any no-better candidate gets through stays at most alpha however many are tried."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1): {alpha}")
    if int(k) != k or k < 1:
        raise ValueError(f"the candidate's number k starts at 1: {k}")
    return alpha / (k * (k + 1))


def _evidence(challenger: Score, incumbent: Score) -> tuple[int, int, int]:
    """(n, b, c) of two models' answers on the same gate images."""
    if challenger.n != incumbent.n:
        raise ValueError(f"the gate compares answers on the same images: {challenger.n} vs {incumbent.n} answers")
    b = int(np.sum(challenger.correct & ~incumbent.correct))
    c = int(np.sum(~challenger.correct & incumbent.correct))
    return challenger.n, b, c


def _verdict(n: int, b: int, c: int, rule: GateRule, significant: bool, facts: str, evidence: dict) -> Decision:
    """The rule shared by both tests: enough images, a gain above ``min_gain``, then the test's own verdict."""
    if n < rule.min_gate_images:
        return Decision(False, f"not enough evidence (n = {n} < {rule.min_gate_images} gate images; {facts})",
                        **evidence)
    gain = (b - c) / n if n else 0.0
    if gain <= rule.min_gain + EPS:
        return Decision(False, f"gain {gain:+.4f} not above min gain {rule.min_gain} ({facts})", **evidence)
    if not significant:
        return Decision(False, f"gain {gain:+.4f} could be noise ({facts})", **evidence)
    return Decision(True, f"gain {gain:+.4f} is significant ({facts})", **evidence)


def gate(challenger: Score, incumbent: Score | None, rule: GateRule | None = None) -> Decision:
    """One look: accept the challenger if nothing is in place, or if the exact McNemar test says it is better."""
    rule = rule or GateRule()
    if incumbent is None:
        return Decision(True, "nothing in place", n=challenger.n, challenger_accuracy=challenger.accuracy)
    n, b, c = _evidence(challenger, incumbent)
    p = mcnemar_p(b, c)
    evidence = dict(n=n, challenger_only=b, incumbent_only=c, p_value=p, alpha=rule.alpha, test=EXACT_TEST,
                    challenger_accuracy=challenger.accuracy, incumbent_accuracy=incumbent.accuracy)
    facts = f"{EXACT_TEST}: n = {n}, discordant {b} for / {c} against, p = {p:.4g}, alpha = {rule.alpha}"
    return _verdict(n, b, c, rule, p <= rule.alpha, facts, evidence)


def sequential_gate(challenger: Score, incumbent: Score | None, rule: GateRule | None = None,
                    looks: int = 1) -> Decision:
    """A look at evidence that builds up: the cumulative answers of the same two models on the gate split as it
    stands at this look (earlier gate images kept, new ones added). Accept when the mixture e-value
    E >= 1/alpha (and the gain is above ``min_gain``); by Ville's inequality a no-better challenger is accepted
    with probability at most alpha over all looks, whatever their number. ``looks`` (>= 1, the how-manieth look
    this is) is reported, never used: the threshold is the same at every look."""
    rule = rule or GateRule()
    if looks < 1:
        raise ValueError(f"looks counts this look too: at least 1, not {looks}")
    if incumbent is None:
        return Decision(True, "nothing in place", n=challenger.n, challenger_accuracy=challenger.accuracy,
                        looks=looks, test=SEQUENTIAL_TEST)
    n, b, c = _evidence(challenger, incumbent)
    log_e = log_e_value(b, c)
    e = _capped(log_e)
    threshold = 1 / rule.alpha
    evidence = dict(n=n, challenger_only=b, incumbent_only=c, p_value=min(1.0, math.exp(-log_e)), alpha=rule.alpha,
                    challenger_accuracy=challenger.accuracy, incumbent_accuracy=incumbent.accuracy, e_value=e,
                    looks=looks, test=SEQUENTIAL_TEST)
    facts = (f"{SEQUENTIAL_TEST}, look {looks}: n = {n}, discordant {b} for / {c} against, e-value = {e:.4g}, "
             f"threshold 1/alpha = {threshold:.4g} (alpha = {rule.alpha:.4g})")
    return _verdict(n, b, c, rule, log_e >= math.log(threshold) - EPS, facts, evidence)


def choose(scores: dict[str, Score], incumbent: str, rule: GateRule | None = None) -> tuple[str, Decision]:
    """Which candidate serves: the best challenger replaces ``incumbent`` only through :func:`gate`.

    ``scores`` must hold the incumbent (the model serving now, or the simplest alternative when nothing serves
    yet). The best challenger is taken by gate accuracy, ties to the one listed first (list the simpler ones
    first). Taking the best of k challengers is k tries at the test, so it is run at ``alpha / k``
    (Bonferroni): the chance that any no-better challenger gets through stays at most ``alpha``.
    """
    rule = rule or GateRule()
    challengers = [name for name in scores if name != incumbent]
    if not challengers:
        return incumbent, Decision(False, "no challenger")
    best = max(challengers, key=lambda name: (scores[name].accuracy or 0.0, -challengers.index(name)))
    corrected = rule.model_copy(update={"alpha": rule.alpha / len(challengers)})
    decision = gate(scores[best], scores[incumbent], corrected)
    verdict = f"{best} over {incumbent}" if decision.accept else f"{incumbent} stays over {best}"
    if len(challengers) > 1:
        verdict += f" (best of {len(challengers)} challengers: alpha {rule.alpha}/{len(challengers)})"
    return (best if decision.accept else incumbent), Decision(**{**decision.as_dict(),
                                                                 "reason": f"{verdict}: {decision.reason}"})
