"""The one gate: an exact one-sided McNemar test on the same gate images, checked against hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.gate import GateRule, Score, choose, gate, mcnemar_p


def paired(n: int, both: int, challenger_only: int, incumbent_only: int) -> tuple[Score, Score]:
    """Scripted answers on n images: both right on ``both``, one right on the discordant ones, the rest wrong."""
    ch = np.zeros(n, bool)
    inc = np.zeros(n, bool)
    ch[:both] = inc[:both] = True
    ch[both:both + challenger_only] = True
    inc[both + challenger_only:both + challenger_only + incumbent_only] = True
    return Score(ch), Score(inc)


def test_p_value_and_decision_match_the_hand_computation():
    # 9 discordant images for the challenger, 2 against: P(X >= 9 | Bin(11, 1/2)) = (55 + 11 + 1) / 2048
    challenger, incumbent = paired(60, 40, 9, 2)
    decision = gate(challenger, incumbent, GateRule(alpha=0.1))
    assert decision.p_value == pytest.approx(67 / 2048)
    assert decision.accept and (decision.n, decision.challenger_only, decision.incumbent_only) == (60, 9, 2)
    for fact in ("n = 60", "9 for / 2 against", "p = 0.03271", "alpha = 0.1"):
        assert fact in decision.reason
    # the same gain is not enough at alpha = 0.01
    assert not gate(challenger, incumbent, GateRule(alpha=0.01)).accept
    # 6 for / 2 against: P(X >= 6 | Bin(8, 1/2)) = (28 + 8 + 1) / 256 = 0.1445: could be noise
    noisy = gate(*paired(60, 40, 6, 2))
    assert noisy.p_value == pytest.approx(37 / 256) and not noisy.accept and "could be noise" in noisy.reason


def test_ties_keep_the_incumbent_and_log_loss_never_decides():
    challenger, incumbent = paired(80, 60, 5, 5)
    tie = gate(Score(challenger.correct, nll=0.01), Score(incumbent.correct, nll=3.0))
    assert not tie.accept and tie.p_value == pytest.approx(0.623046875)  # P(X >= 5 | Bin(10, 1/2))
    assert not gate(*paired(80, 80, 0, 0)).accept  # identical answers: p = 1
    assert mcnemar_p(0, 0) == 1.0


def test_the_gate_refuses_below_min_gate_images():
    challenger, incumbent = paired(30, 10, 20, 0)  # 20 for, 0 against: p ~ 1e-6, but only 30 images
    decision = gate(challenger, incumbent, GateRule(min_gate_images=50))
    assert not decision.accept and "not enough evidence (n = 30" in decision.reason
    assert gate(challenger, incumbent, GateRule(min_gate_images=30)).accept


def test_min_gain_and_nothing_in_place():
    challenger, incumbent = paired(100, 70, 12, 2)  # gain 0.10, p = 0.0065
    assert gate(challenger, incumbent).accept
    assert not gate(challenger, incumbent, GateRule(min_gain=0.1)).accept
    assert gate(challenger, None).accept
    with pytest.raises(ValueError, match="same images"):
        gate(Score(np.ones(5, bool)), Score(np.ones(6, bool)))


def test_choose_tests_the_best_challenger_at_alpha_over_k():
    incumbent = Score(np.r_[np.ones(40, bool), np.zeros(20, bool)])
    better = Score(np.r_[np.ones(40, bool), np.ones(9, bool), np.zeros(11, bool)])  # 9 for, 0 against
    weaker = Score(np.r_[np.ones(35, bool), np.zeros(25, bool)])
    chosen, decision = choose({"base": weaker, "active": incumbent, "new": better}, "active")
    assert chosen == "new" and "alpha 0.1/2" in decision.reason and decision.alpha == pytest.approx(0.05)
    assert choose({"base": incumbent, "new": Score(incumbent.correct.copy())}, "base")[0] == "base"
    assert Score.of(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 0])).correct.tolist() == [True, False]
