"""The one gate: an exact one-sided McNemar test on the same gate images, checked against hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.gate import (EXACT_TEST, PRIOR_A, SEQUENTIAL_TEST, Decision, GateRule, Score, choose, e_value, gate,
                             log_e_value, mcnemar_p, sequential_gate, spent_alpha)


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


# ---- the sequential test (anytime-valid over looks) -----------------------------------------------------------

def test_the_e_value_is_the_mixture_integral_and_stays_finite():
    from scipy.integrate import quad
    from scipy.stats import beta

    a = PRIOR_A
    for b, c in ((9, 2), (3, 7), (40, 25)):  # E = 2 * integral over (1/2, 1] of p^b (1-p)^c 2^(b+c) Beta(a, a)(p) dp
        integral = quad(lambda p: 2 * p ** b * (1 - p) ** c * 2.0 ** (b + c) * beta.pdf(p, a, a), 0.5, 1)[0]
        assert e_value(b, c) == pytest.approx(integral, rel=1e-6)
    assert e_value(0, 0) == pytest.approx(1.0)  # no evidence: E = 1
    # far more losses than wins: the tail underflows, log E stays finite (about the prior's weight at 1/2 / (c - b))
    assert 0 < e_value(0, 5000) < 1e-3 and np.isfinite(log_e_value(0, 5000))
    assert e_value(0, 5000) < e_value(0, 2000) < e_value(0, 500)
    assert e_value(100, 1500) == pytest.approx(beta.pdf(0.5, a, a) / 1400, rel=0.01)
    assert e_value(5000, 0) == 1e300  # capped: still a finite JSON number
    with pytest.raises(ValueError, match="negative"):
        log_e_value(-1, 3)


def test_sequential_decision_names_the_test_the_looks_the_evidence_and_the_threshold():
    challenger, incumbent = paired(200, 120, 40, 12)
    decision = sequential_gate(challenger, incumbent, GateRule(alpha=0.1), looks=7)
    assert decision.accept and decision.looks == 7 and decision.test == SEQUENTIAL_TEST
    assert decision.e_value == pytest.approx(e_value(40, 12)) and decision.e_value >= 10
    assert decision.p_value == pytest.approx(1 / decision.e_value)
    for fact in ("mixture e-process", "look 7", "n = 200", "40 for / 12 against", "e-value = ",
                 "threshold 1/alpha = 10"):
        assert fact in decision.reason
    # 9 for / 2 against passes the one-shot exact test at 0.1 but is not yet enough evidence for every look
    thin = sequential_gate(*paired(60, 40, 9, 2), GateRule(alpha=0.1))
    assert not thin.accept and "could be noise" in thin.reason and thin.e_value < 10
    assert gate(*paired(60, 40, 9, 2), GateRule(alpha=0.1)).test == EXACT_TEST
    assert not sequential_gate(challenger, incumbent, GateRule(min_gain=0.2)).accept  # gain 0.14
    assert sequential_gate(challenger, None).accept
    with pytest.raises(ValueError, match="looks"):
        sequential_gate(challenger, incumbent, looks=0)
    with pytest.raises(ValueError, match="same images"):
        sequential_gate(Score(np.ones(5, bool)), Score(np.ones(6, bool)))
    assert Decision(**decision.as_dict()) == decision  # records written by older code still load


def simulate_looks(rng: np.random.Generator, runs: int, looks: int, per_look: int, discordance: float,
                   p_win: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Fixed pairs of models on a growing exam: ``per_look`` new gate images a look, each discordant with
    probability ``discordance`` and then won by the challenger with probability ``p_win``. Every look is one
    decision of :func:`sequential_gate` and one of :func:`gate` on the cumulative answers; returns for each run
    whether any look accepted, (sequential, exact)."""
    n = looks * per_look
    sequential, exact = np.zeros(runs, bool), np.zeros(runs, bool)
    rule = GateRule(alpha=alpha)
    for run in range(runs):
        discordant = rng.random(n) < discordance
        wins = rng.random(n) < p_win
        both = rng.random(n) < 0.5  # concordant images: both right or both wrong
        challenger = np.where(discordant, wins, both)
        incumbent = np.where(discordant, ~wins, both)
        for look in range(1, looks + 1):
            seen = look * per_look
            ch, inc = Score(challenger[:seen]), Score(incumbent[:seen])
            sequential[run] |= sequential[run] or sequential_gate(ch, inc, rule, looks=look).accept
            if not exact[run] and mcnemar_p(int(np.sum(ch.correct & ~inc.correct)),
                                            int(np.sum(~ch.correct & inc.correct))) <= alpha:
                exact[run] = gate(ch, inc, rule).accept
    return sequential, exact


def test_a_no_better_challenger_looked_at_30_times_is_accepted_at_most_alpha_in_all():
    # 2000 null sequences x 30 looks (10 new gate images a look, 30 % of them discordant)
    sequential, exact = simulate_looks(np.random.default_rng(24), 2000, 30, 10, 0.3, 0.5, 0.1)
    tolerance = 3 * np.sqrt(0.1 * 0.9 / 2000)  # three standard errors of a rate of 0.1
    assert sequential.mean() <= 0.1 + tolerance, sequential.mean()
    assert exact.mean() > 0.2  # the one-shot test, looked at 30 times, lets far more than alpha through


def test_the_sequential_test_finds_a_clear_effect_quickly():
    # a challenger that wins 75 % of the discordant pairs (+15 points at 30 % discordance): found in nearly
    # every run within 30 looks (about 90 discordant pairs)
    sequential, _ = simulate_looks(np.random.default_rng(7), 200, 30, 10, 0.3, 0.75, 0.1)
    assert sequential.mean() >= 0.95, sequential.mean()


def test_spent_alpha_shares_sum_to_alpha_over_any_number_of_candidates():
    assert spent_alpha(0.1, 1) == pytest.approx(0.05) and spent_alpha(0.1, 4) == pytest.approx(0.005)
    assert sum(spent_alpha(0.1, k) for k in range(1, 10_000)) == pytest.approx(0.1, rel=1e-3)
    assert sum(spent_alpha(0.1, k) for k in range(1, 10_000)) < 0.1
    for bad in ((0.1, 0), (0.1, -2), (1.5, 1), (0.1, 1.5)):
        with pytest.raises(ValueError):
            spent_alpha(*bad)
