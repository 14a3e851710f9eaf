"""The one gate: does a challenger replace the incumbent? Used by the edge (activation) and the cloud (promotion).

It reads scores on a *gate* split, a split that chose nothing else (no epoch, no ensemble weight), so a
decision is evidence, not an echo of training. One tie rule everywhere: the challenger wins on more than
``min_gain`` accuracy, or on at least ``min_gain`` with a lower log-loss (small splits tie often on accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass

EPS = 1e-12


@dataclass(frozen=True)
class Score:
    """How a model does on one split: accuracy and mean negative log-likelihood."""

    accuracy: float
    nll: float


@dataclass(frozen=True)
class Decision:
    accept: bool
    reason: str


def gate(challenger: Score, incumbent: Score | None, min_gain: float = 0.0) -> Decision:
    """Accept the challenger if nothing is in place, or if it beats the incumbent by the tie rule above."""
    if incumbent is None:
        return Decision(True, "nothing in place")
    gain = challenger.accuracy - incumbent.accuracy
    if gain > min_gain + EPS:
        return Decision(True, f"accuracy {challenger.accuracy:.4f} > {incumbent.accuracy:.4f} + {min_gain}")
    if gain >= min_gain - EPS and challenger.nll < incumbent.nll:
        return Decision(True, f"accuracy {challenger.accuracy:.4f} ties, log-loss {challenger.nll:.4f} "
                              f"< {incumbent.nll:.4f}")
    return Decision(False, f"accuracy {challenger.accuracy:.4f} / log-loss {challenger.nll:.4f} does not beat "
                           f"{incumbent.accuracy:.4f} / {incumbent.nll:.4f} (min gain {min_gain})")


def choose(scores: dict[str, Score], incumbent: str, min_gain: float = 0.0) -> tuple[str, Decision]:
    """Which candidate serves: the best challenger replaces ``incumbent`` only through :func:`gate`.

    ``scores`` must hold the incumbent (the model serving now, or the simplest alternative when nothing
    serves yet). Among challengers the best is taken by accuracy, then log-loss, then insertion order, so
    a tie goes to the candidate listed first (list the simpler ones first).
    """
    challengers = [name for name in scores if name != incumbent]
    if not challengers:
        return incumbent, Decision(False, "no challenger")
    best = max(challengers, key=lambda name: (scores[name].accuracy, -scores[name].nll,
                                              -challengers.index(name)))
    decision = gate(scores[best], scores[incumbent], min_gain)
    if decision.accept:
        return best, Decision(True, f"{best} over {incumbent}: {decision.reason}")
    return incumbent, Decision(False, f"{incumbent} stays over {best}: {decision.reason}")
