"""The one gate: does a challenger replace the incumbent? Used by the edge (activation), the cloud (promotion,
tune) and the rollout's canary verdicts.

It reads each model's answers on the *same* gate images, a split that chose nothing else (no epoch, no
ensemble weight), and asks whether the challenger's advantage could be noise: an exact one-sided McNemar test
on the discordant pairs. Of the images where exactly one model is right, the challenger is right on ``b`` and
the incumbent on ``c``; if the two models were equally good each such image would be a fair coin, so the
p-value is P(X >= b) for X ~ Binomial(b + c, 1/2). The challenger wins only when

- there are at least ``min_gate_images`` gate images (else: "not enough evidence (n = ...)");
- its accuracy gain (b - c) / n is more than ``min_gain``;
- p <= ``alpha``.

Anything else (a tie included) keeps the incumbent. So a challenger that is no better than the incumbent is
promoted with probability at most ``alpha``, whatever the size of the split (``bench/gate.py`` measures it).
Log-loss never decides: on a few dozen images it mostly measures calibration noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

EPS = 1e-12


class GateRule(BaseModel):
    """How sure a gate must be before a challenger replaces what is in place."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.1, gt=0, lt=1, description="significance of the one-sided McNemar test: the highest "
                                                      "share of no-better challengers the gate may let through")
    min_gain: float = Field(0.0, ge=0, description="gate accuracy (0-1) a challenger must add over the incumbent")
    min_gate_images: int = Field(50, ge=1, description="fewer gate images than this: the incumbent stays "
                                                       "(not enough evidence to change anything)")


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
    """A gate's verdict and its evidence. ``reason`` says it in one line (n, discordant counts, p, alpha)."""

    accept: bool
    reason: str
    n: int = 0
    challenger_only: int = 0  # gate images only the challenger got right (b)
    incumbent_only: int = 0   # gate images only the incumbent got right (c)
    p_value: float | None = None
    alpha: float | None = None
    challenger_accuracy: float | None = None
    incumbent_accuracy: float | None = None

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


def gate(challenger: Score, incumbent: Score | None, rule: GateRule | None = None) -> Decision:
    """Accept the challenger if nothing is in place, or if the paired test above says it is better."""
    rule = rule or GateRule()
    if incumbent is None:
        return Decision(True, "nothing in place", n=challenger.n, challenger_accuracy=challenger.accuracy)
    if challenger.n != incumbent.n:
        raise ValueError(f"the gate compares answers on the same images: {challenger.n} vs {incumbent.n} answers")
    n = challenger.n
    b = int(np.sum(challenger.correct & ~incumbent.correct))
    c = int(np.sum(~challenger.correct & incumbent.correct))
    p = mcnemar_p(b, c)
    evidence = dict(n=n, challenger_only=b, incumbent_only=c, p_value=p, alpha=rule.alpha,
                    challenger_accuracy=challenger.accuracy, incumbent_accuracy=incumbent.accuracy)
    facts = f"n = {n}, discordant {b} for / {c} against, p = {p:.4g}, alpha = {rule.alpha}"
    if n < rule.min_gate_images:
        return Decision(False, f"not enough evidence (n = {n} < {rule.min_gate_images} gate images; {facts})",
                        **evidence)
    gain = (b - c) / n
    if gain <= rule.min_gain + EPS:
        return Decision(False, f"gain {gain:+.4f} not above min gain {rule.min_gain} ({facts})", **evidence)
    if p > rule.alpha:
        return Decision(False, f"gain {gain:+.4f} could be noise ({facts})", **evidence)
    return Decision(True, f"gain {gain:+.4f} is significant ({facts})", **evidence)


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
