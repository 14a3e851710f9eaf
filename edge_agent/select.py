"""Which inference samples are worth sending to the cloud.

The cloud learns most from what the site's ensemble finds hard: high normalised entropy of the ensemble
output, or members that disagree with each other. A small random share of ordinary samples goes too so
that the cloud still sees the normal case (otherwise its picture of the site drifts toward the odd cases).
Operator-labelled images always qualify: a human said what they are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

OPERATOR_SCORE = 2.0  # above every model-derived score (those are within 0..1)
SHADOW_SCORE = 1.5  # a disagreement with the shadow challenger: after operator labels, before everything else


def normalised_entropy(probs: np.ndarray) -> float:
    """Entropy of a probability vector divided by its maximum (log C): 0 = certain, 1 = uniform."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    if p.size < 2:
        return 0.0
    return float(-(p * np.log(p)).sum() / np.log(p.size))


def disagreement(member_probs: np.ndarray) -> float:
    """Mean total-variation distance of each member's output from the members' mean (0..1)."""
    m = np.asarray(member_probs, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] < 2:
        return 0.0
    mean = m.mean(axis=0, keepdims=True)
    return float(0.5 * np.abs(m - mean).sum(axis=1).mean())


@dataclass(frozen=True)
class Selection:
    chosen: bool
    score: float
    reasons: list[str] = field(default_factory=list)
    uncertainty: float = 0.0
    disagreement: float = 0.0


@dataclass
class Selector:
    uncertainty_threshold: float
    disagreement_threshold: float
    random_share: float
    rng: random.Random = field(default_factory=random.Random)

    def judge(self, probs: np.ndarray, member_probs: np.ndarray | None = None,
              operator_label: str | None = None, mistaken: bool = False, shadow_disagrees: bool = False) -> Selection:
        """Is this image worth sending? An operator's label alone is not a reason: a labelled image goes
        up when the model is unsure of it, its members disagree, it got it wrong (``mistaken``), or by the
        random share, like any other; when chosen, its label makes it rank first."""
        unc = normalised_entropy(probs)
        dis = disagreement(member_probs) if member_probs is not None else 0.0
        reasons = []
        if mistaken:
            reasons.append("mistaken")
        if unc >= self.uncertainty_threshold:
            reasons.append("uncertain")
        if dis >= self.disagreement_threshold:
            reasons.append("disagreement")
        if shadow_disagrees:  # labelled, it is one discordant pair for the waiting challenger's decision
            reasons.append("shadow_disagreement")
        if not reasons and self.rng.random() < self.random_share:
            reasons.append("random")
        score = OPERATOR_SCORE if operator_label is not None else SHADOW_SCORE if shadow_disagrees else max(unc, dis)
        if reasons and operator_label is not None:
            reasons.insert(0, "operator_label")
        return Selection(bool(reasons), score, reasons, unc, dis)
