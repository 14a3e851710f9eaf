"""Canary analysis: its false-fail rate on a good version and its catch rate on a bad one, at the computed n.

Each trial is what a canary site goes through, with the agent's own window code (:class:`edge_agent.window.
LiveWindow`, fed real :class:`~edge_agent.serving.Prediction` objects): the model in place serves ``before``
images (each defective with probability p0) and its window goes up in the heartbeat before the deploy; the cloud
computes from that window how many predictions on the new model its tests need
(:func:`orchestrator.canary.plan`: power 0.8 against a defect rate that halves or doubles, at alpha 0.05 over
the tests); the new model then serves exactly that many images in the same window (defective with probability
p1), and the cloud's analysis (:func:`orchestrator.canary.analyse_windows`) fails it or not. A good version
(p1 = p0) must fail at most alpha of the time; one that halves or doubles the defect rate must be caught at
least 80 % of the time.

For reference, the rule it replaced (fail when a class rate moved more than 15 points, once 20 predictions
were served) is scored on the same trials, at its own n of 20.

Run: ``python bench/canary.py`` (``--trials 400`` for a quick look); writes ``bench/results/canary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.serving import Prediction  # noqa: E402
from edge_agent.window import LiveWindow  # noqa: E402
from orchestrator.canary import analyse_windows, plan  # noqa: E402
from orchestrator.inventory import CanaryThresholds  # noqa: E402
from orchestrator.training import machine_info  # noqa: E402

RESULTS = REPO / "bench" / "results"
CLASSES = ("defective", "functional")
OLD_POINTS, OLD_MIN = 15.0, 20


def serve(window: LiveWindow, model: str, n: int, p: float, rng: np.random.Generator) -> None:
    """``n`` predictions by ``model``, each defective with probability ``p`` (confidence and latency alike for
    every model: only the defect rate differs, so the guards never decide here)."""
    for defective in rng.random(n) < p:
        probs = np.array([0.9, 0.1]) if defective else np.array([0.1, 0.9])
        window.record(Prediction(CLASSES[0] if defective else CLASSES[1], {}, probs, np.stack([probs, probs]),
                                 model), 3.0)


def trial(p0: float, p1: float, n_before: int, limits: CanaryThresholds, rng: np.random.Generator
          ) -> tuple[int | None, bool, bool]:
    """(needed n, failed by the tests, failed by the old rule) for one canary."""
    window = LiveWindow()
    serve(window, "old", n_before, p0, rng)
    before = window.summary()["old"]
    needed = plan(before, limits).needed
    if needed is None:
        return None, False, False
    serve(window, "new", max(needed, OLD_MIN), p1, rng)
    after = window.summary()["new"]
    failed = any(c.failed for c in analyse_windows("site", before, after, limits))
    old_after = _first(window, OLD_MIN)
    old = abs(old_after - before["class_rates"].get("defective", 0.0)) * 100 > OLD_POINTS
    return needed, failed, old


def _first(window: LiveWindow, n: int) -> float:
    """The defect rate of the new model's first ``n`` predictions (what the old rule judged on)."""
    rows = [s for s in window._served if s.model == "new"][:n]
    return sum(s.label == "defective" for s in rows) / len(rows)


def scenario(p0: float, ratio: float, n_before: int, trials: int, limits: CanaryThresholds, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    p1 = min(1.0, p0 * ratio)
    needed, fails, old = [], 0, 0
    for _ in range(trials):
        n, failed, old_failed = trial(p0, p1, n_before, limits, rng)
        if n is None:
            continue
        needed.append(n)
        fails += failed
        old += old_failed
    judged = len(needed)
    return {"p0": p0, "p1": round(p1, 4), "ratio": ratio, "before_predictions": n_before, "trials": trials,
            "judged": judged, "inconclusive": trials - judged,
            "needed_median": int(np.median(needed)) if needed else None,
            "needed_range": [int(min(needed)), int(max(needed))] if needed else None,
            "fail_rate": round(fails / judged, 4) if judged else None,
            "old_rule_fail_rate": round(old / judged, 4) if judged else None}


def markdown(result: dict) -> str:
    limits = result["limits"]
    lines = [f"Canary analysis, {result['trials']} trials per row; alpha {limits['alpha']}, power {limits['power']}, "
             f"effect: a defect rate x{limits['rate_ratio']:g} or /{limits['rate_ratio']:g} "
             f"(at least {limits['min_change_points']:g} points)", "",
             "| version | p0 -> p1 | before-window | predictions needed (median, range) | inconclusive | "
             "failed (tests, of those judged) | failed (old rule: 15 points at 20) |", "|---|---|---:|---|---:|---:|---:|"]
    for row in result["rows"]:
        kind = "good" if row["ratio"] == 1 else ("halves" if row["ratio"] < 1 else "doubles")
        lines.append(f"| {kind} | {row['p0']:.2f} -> {row['p1']:.2f} | {row['before_predictions']} | "
                     f"{row['needed_median']} ({row['needed_range'][0]}-{row['needed_range'][1]}) | "
                     f"{100 * row['inconclusive'] / row['trials']:.1f} % | {100 * row['fail_rate']:.1f} % | {100 * row['old_rule_fail_rate']:.1f} % |")
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in result["targets"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    limits = CanaryThresholds()
    started = time.time()
    rows = []
    for i, (p0, n_before) in enumerate([(0.2, 500), (0.2, 250), (0.1, 500), (0.3, 500)]):
        for j, ratio in enumerate((1.0, 0.5, 2.0)):
            row = scenario(p0, ratio, n_before, args.trials, limits, args.seed + 10 * i + j)
            rows.append(row)
            print(row, flush=True)
    # the share of failures is a rate over trials: allow its binomial noise (2 standard errors) on the target
    def slack(rate: float) -> float:
        return 2 * (rate * (1 - rate) / args.trials) ** 0.5

    targets = {}
    for row in rows:
        name = f"p0 {row['p0']}, before {row['before_predictions']}"
        if row["ratio"] == 1:
            targets[f"good version fails at most alpha ({limits.alpha}), {name}"] = \
                row["fail_rate"] <= limits.alpha + slack(limits.alpha)
        else:
            targets[f"x{row['ratio']:g} caught at least {limits.power:.0%} at the computed n, {name}"] = \
                row["fail_rate"] >= limits.power - slack(limits.power)
    result = {"benchmark": "canary", "trials": args.trials, "limits": limits.model_dump(), "rows": rows,
              "targets": targets, "seconds": round(time.time() - started, 1), "machine": machine_info(),
              "command": " ".join(["python bench/canary.py", *sys.argv[1:]])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "canary.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
