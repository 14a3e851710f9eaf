"""The gate's error over repeated looks and its power (issues 16 and 24), from real models' answers.

**Looks** (the default; issue 24). Per seed, ELPV is split (train 50 %, val 10 %, the rest a pool that stands for
production images) and a few real models are trained with the project's own training code (``Settings.recipes``:
architectures, epochs and augmentation policies that differ, as a challenger and an incumbent do). Each model's
right/wrong answer on every pool image is kept; decisions are then replayed on exams drawn from the pool
(with replacement: the pool is the population, so its accuracies are the models' true ones):

- *null*: every ordered pair whose challenger is no better on the pool, looked at ``looks`` (30) times while the
  exam grows by ``per_look`` (20) gate images a look; P(any promotion) under the exact one-shot test applied at
  every look (:func:`edge_agent.gate.gate`) and under the sequential test (:func:`edge_agent.gate.sequential_gate`).
  Also the exact boundary of H0 with the real pairs' discordance: each image's two answers swapped by a coin
  ("coin-swapped": P(challenger wins a discordant pair) = 1/2 exactly), and pure simulation at stated discordance.
- *power*: each ordered pair's challenger made exactly +3 and +5 points better on the pool (its answers set right,
  or wrong, at random pool images until its pool accuracy is the incumbent's + gain; real discordance otherwise),
  and simulated pairs at stated discordance. Two ways labels arrive: *disagreements first* (the shadow
  challenger: only images where the two disagree are labelled, ``labels_per_look`` a look; in a two-class task
  each is one discordant pair) and *random* (every labelled production image joins the gate). Reported: the
  share promoted within the budget and the labels (disagreements, gate images) spent until the decision.

**One-shot pairs** (``--oneshot``; issue 16): null candidates (the incumbent's recipe, other seeds) in the cloud
(generic pool) and at one edge site (real fine-tuned ensembles, INT8 chosen on val), every ordered pair gated once
with the old rule (higher gate accuracy, or equal accuracy and lower log-loss) and the exact test.

Pairs share models, so they are not independent draws: intervals are indicative. Models are CPU-sized (32 px, a
few epochs): it is the rule that is measured, not the models.

    .venv/bin/python bench/gate.py                 # looks: 3 seeds x 5 models (~15-20 min on 2 busy cores)
    .venv/bin/python bench/gate.py --reuse         # replay the decisions on the saved answers (seconds)
    .venv/bin/python bench/gate.py --quick         # 2 seeds x 3 tiny models, fewer sequences (a smoke run)
    .venv/bin/python bench/gate.py --oneshot --arch tiny_cnn   # also the issue-16 one-shot pairs (~15 min more)

Writes bench/results/gate.json and gate.md (the answers: gate_answers.npz). The issue-16 run is kept in
gate-issue16.json / gate-issue16.md.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.config import AgentConfig, FinetuneConfig, MemberConfig, ServeConfig  # noqa: E402
from edge_agent.datasets import ELPV_CLASSES, elpv_images, open_dataset, write_version  # noqa: E402
from edge_agent.gate import GateRule, Score, gate, log_e_value, sequential_gate  # noqa: E402
from edge_agent.layout import AgentPaths  # noqa: E402
from orchestrator.demo import shifted_fleet  # noqa: E402
from orchestrator.training import machine_info  # noqa: E402

RESULTS = REPO / "bench" / "results"


@dataclass
class OneShot:
    """The issue-16 one-shot pairs (``--oneshot``)."""

    models: int = 9
    size: int = 32
    arch: str = "resnet18"
    cloud_epochs: int = 3
    edge_epochs: int = 2
    alpha: float = 0.1
    min_gate_images: int = 1
    seed: int = 0


@dataclass
class Answers:
    """One model's gate answers and its test accuracy (reported only)."""

    name: str
    gate: Score
    test_accuracy: float


def old_rule(challenger: tuple[float, float], incumbent: tuple[float, float]) -> bool:
    """The gate before issue 16 on (accuracy, log-loss): more gate accuracy, or as much with a lower log-loss."""
    gain = challenger[0] - incumbent[0]
    return gain > 1e-12 or (gain >= -1e-12 and challenger[1] < incumbent[1])


def pairwise(models: list[Answers], rule: GateRule) -> dict:
    """Gate every ordered pair with both rules; the promotion rate and how many promotions were worse on test."""
    from scipy.stats import binomtest

    rows = []
    for challenger, incumbent in itertools.permutations(models, 2):
        new = gate(challenger.gate, incumbent.gate, rule)
        rows.append({"challenger": challenger.name, "incumbent": incumbent.name,
                     "old": old_rule((challenger.gate.accuracy, challenger.gate.nll),
                                       (incumbent.gate.accuracy, incumbent.gate.nll)), "new": new.accept, "p_value": new.p_value,
                     "discordant": [new.challenger_only, new.incumbent_only],
                     "test_gain": round(challenger.test_accuracy - incumbent.test_accuracy, 4)})
    out = {"pairs": len(rows), "gate_n": models[0].gate.n, "rows": rows}
    for name in ("old", "new"):
        promoted = [r for r in rows if r[name]]
        ci = binomtest(len(promoted), len(rows)).proportion_ci(0.90)
        out[name] = {"promoted": len(promoted), "rate": round(len(promoted) / len(rows), 4),
                     "rate_ci90": [round(ci.low, 4), round(ci.high, 4)],
                     "worse_on_test": sum(r["test_gain"] < 0 for r in promoted)}
    return out


# ---- the cloud -------------------------------------------------------------------------------------

def cloud_models(generic: Path, settings: OneShot, out: Path, log) -> list[Answers]:
    from edge_agent.ensemble import log_loss
    from edge_agent.models import load_checkpoint
    from edge_agent.train import TrainConfig, predict_proba
    from orchestrator.training import train_on_dataset

    pool, models = open_dataset(generic), []
    gate_split, test_split = pool.load_split("gate"), pool.load_split("test")
    for seed in range(settings.models):
        started = time.time()
        folder = out / f"cloud-{seed}"
        train_on_dataset(generic, settings.arch, folder, TrainConfig(epochs=settings.cloud_epochs, batch_size=64,
                                                                     lr=3e-3, seed=seed))
        model, meta = load_checkpoint(folder / "model.pt")
        probs = predict_proba(model, gate_split.images, meta.normalization)
        test = predict_proba(model, test_split.images, meta.normalization)
        models.append(Answers(f"cloud-{seed}", Score.of(probs, gate_split.labels, log_loss(probs, gate_split.labels)),
                              float((test.argmax(1) == test_split.labels).mean())))
        log(f"cloud model {seed}: gate {models[-1].gate.accuracy:.3f}, test {models[-1].test_accuracy:.3f} "
            f"({time.time() - started:.0f} s)")
    return models


# ---- one edge site ---------------------------------------------------------------------------------

def edge_models(site_data: Path, base: Path, settings: OneShot, out: Path, log) -> list[Answers]:
    """Null ensembles at one site: the edge's own fine-tune steps, seeds 0..models-1, each scored as it serves
    (INT8 or FP32 chosen on val, as the agent does)."""
    from edge_agent.activation import staging_dir
    from edge_agent.basemodels import pick_bases
    from edge_agent.candidates import choose_precision, gate_score, score
    from edge_agent.finetune import build_ensemble, save_splits
    from edge_agent.members import make_jobs, train_members
    from edge_agent.sitedata import load_site_splits

    root = out / "edge"
    paths = AgentPaths(root)
    paths.ensure()
    shutil.copytree(site_data, paths.labelled, dirs_exist_ok=True)
    folder = paths.base_models / "v1"
    folder.mkdir(parents=True)
    shutil.copyfile(base, folder / "model.pt")
    (folder / "model.pt.sha256").write_text(hashlib.sha256(base.read_bytes()).hexdigest())
    config = AgentConfig(site="bench", root=root, store_url=f"file://{out / 'store'}", image_size=settings.size,
                         members=[MemberConfig(arch=settings.arch, policy=p) for p in ("flips", "noise", "none")],
                         finetune=FinetuneConfig(epochs=settings.edge_epochs, batch_size=32, lr=1e-3),
                         serve=ServeConfig(port=0))
    bases = pick_bases(paths, [m.arch for m in config.members])
    splits = load_site_splits(paths, ELPV_CLASSES, settings.size)
    models = []
    for seed in range(settings.models):
        started = time.time()
        seeded = config.model_copy(update={"finetune": config.finetune.model_copy(update={"seed": seed})})
        run_dir = paths.runs / f"null-{seed}"
        run_dir.mkdir(parents=True)
        save_splits(run_dir, splits)
        jobs = make_jobs(seeded, bases, run_dir, len(seeded.members))  # all members at once, as a site does
        train_members(jobs, len(seeded.members), lambda: False)
        staged = staging_dir(paths, f"null-{seed}")
        build_ensemble(seeded, jobs, splits, f"null-{seed}", staged, ELPV_CLASSES, {})
        precision = choose_precision(staged, splits["train"].images, splits["val"],
                                     seeded.thresholds.int8_tolerance, settings.size)
        result = score(staged, splits, settings.size, None)
        models.append(Answers(f"edge-{seed}", gate_score(result, splits["gate"].labels), result["test"]["accuracy"]))
        log(f"edge ensemble {seed} ({precision['serving']}): gate {models[-1].gate.accuracy:.3f}, "
            f"test {models[-1].test_accuracy:.3f} ({time.time() - started:.0f} s)")
    return models


# ---- looks: real models' answers on a pool of production images -------------------------------------------

@dataclass
class Looks:
    seeds: int = 3
    size: int = 32
    recipes: tuple[tuple[str, int, str], ...] = (("tiny_cnn", 3, "flips"), ("tiny_cnn", 3, "noise"),
                                                  ("tiny_cnn", 5, "flips"), ("tiny_cnn", 2, "none"),
                                                  ("resnet18", 2, "flips"))  # (arch, epochs, policy)
    alpha: float = 0.1
    looks: int = 30
    per_look: int = 20          # new gate images a look (random labels)
    labels_per_look: int = 10   # new labelled disagreements a look (disagreements first): 300 in 30 looks
    sequences: int = 400        # exams drawn per pair and setting
    gains: tuple[float, ...] = (0.03, 0.05)
    discordance: tuple[float, ...] = (0.1, 0.2, 0.3)  # simulated pairs
    simulated: int = 4000       # simulated sequences per setting


def pool_answers(settings: Looks, seed: int, work: Path, log) -> dict:
    """Train each recipe on this seed's split; every model's answers (right or wrong) on the pool."""
    from edge_agent.models import load_checkpoint
    from edge_agent.train import TrainConfig, predict_proba
    from orchestrator.training import train_on_dataset

    images, skipped = elpv_images(settings.size, seed)
    data = work / f"elpv-{seed}"
    write_version(data, images, ELPV_CLASSES, (0.5, 0.1, 0.4), seed, settings.size, f"elpv:seed-{seed}", skipped)
    pool = open_dataset(data).load_split("test")
    correct, names = [], []
    for index, (arch, epochs, policy) in enumerate(settings.recipes):
        started = time.time()
        folder = work / f"model-{seed}-{index}"
        train_on_dataset(data, arch, folder, TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, policy=policy,
                                                         seed=100 * seed + index))
        model, meta = load_checkpoint(folder / "model.pt")
        correct.append(predict_proba(model, pool.images, meta.normalization).argmax(1) == pool.labels)
        names.append(f"{arch}-{epochs}ep-{policy}")
        log(f"seed {seed} model {names[-1]}: pool accuracy {correct[-1].mean():.3f} ({time.time() - started:.0f} s)")
    return {"names": names, "correct": np.array(correct)}


def decisions(b: np.ndarray, c: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    """Each test's verdict at every look, from the cumulative discordant counts (sequences x looks): the same
    arithmetic as :func:`gate` and :func:`sequential_gate` (min_gain 0), vectorised; checked against them."""
    from scipy.stats import binom

    ahead = b > c
    with np.errstate(invalid="ignore"):
        p = np.where(b + c > 0, binom.sf(b - 1, b + c, 0.5), 1.0)
    return {"exact": ahead & (p <= alpha), "sequential": ahead & (log_e_value(b, c) >= np.log(1 / alpha) - 1e-12)}


def check_against_the_gate(challenger: np.ndarray, incumbent: np.ndarray, alpha: float, verdicts: dict) -> None:
    """The vectorised verdicts must be the product's own (one sequence's every look)."""
    rule = GateRule(alpha=alpha)
    for look in range(len(challenger)):
        ch, inc = Score(challenger[look]), Score(incumbent[look])
        assert gate(ch, inc, rule).accept == verdicts["exact"][look], look
        assert sequential_gate(ch, inc, rule, looks=look + 1).accept == verdicts["sequential"][look], look


def growing_exams(challenger: np.ndarray, incumbent: np.ndarray, settings: Looks, rng: np.random.Generator,
                  check: bool = False) -> dict[str, np.ndarray]:
    """Random labels: exams of ``per_look`` more pool images a look; (sequences x looks) verdicts and counts."""
    draws = rng.integers(0, len(challenger), (settings.sequences, settings.looks * settings.per_look))
    won, lost = challenger & ~incumbent, ~challenger & incumbent
    at = np.arange(1, settings.looks + 1) * settings.per_look - 1
    b, c = np.cumsum(won[draws], 1)[:, at], np.cumsum(lost[draws], 1)[:, at]
    verdicts = decisions(b, c, settings.alpha)
    if check:
        exams = [draws[0, :end + 1] for end in at]
        check_against_the_gate([challenger[e] for e in exams], [incumbent[e] for e in exams], settings.alpha,
                               {k: v[0] for k, v in verdicts.items()})
    return {**verdicts, "b": b, "c": c, "images": np.broadcast_to(at + 1, b.shape)}


def disagreements_first(p_win: float, settings: Looks, rng: np.random.Generator, runs: int) -> dict[str, np.ndarray]:
    """Disagreements first: ``labels_per_look`` labelled disagreements a look, each won by the challenger with
    probability ``p_win`` (its share of the pool's discordant pairs)."""
    wins = rng.random((runs, settings.looks * settings.labels_per_look)) < p_win
    at = np.arange(1, settings.looks + 1) * settings.labels_per_look - 1
    b = np.cumsum(wins, 1)[:, at]
    c = (at + 1) - b
    return {**decisions(b, c, settings.alpha), "b": b, "c": c}


def first_look(accepted: np.ndarray) -> np.ndarray:
    """Index of the first accepting look per sequence (-1: never)."""
    return np.where(accepted.any(1), accepted.argmax(1), -1)


def summary(out: dict[str, np.ndarray], test: str, labels: np.ndarray | None = None) -> dict:
    """Share of sequences ever promoted under ``test``, and what was spent until the decision (medians)."""
    first = first_look(out[test])
    hit = first >= 0
    rows = np.flatnonzero(hit)
    spent = {"discordant": np.median((out["b"] + out["c"])[rows, first[hit]]) if hit.any() else None}
    if labels is not None:
        spent["labels"] = np.median(labels[first[hit]]) if hit.any() else None
    if "images" in out:
        spent["gate_images"] = np.median(out["images"][rows, first[hit]]) if hit.any() else None
    return {"promoted": round(float(hit.mean()), 4), "sequences": int(len(first)),
            "median_spent": {k: None if v is None else float(v) for k, v in spent.items()}}


def adjusted(challenger: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """The challenger's answers set right (or wrong) at random pool images until its pool accuracy is
    ``target``: a model truly that good on the population, with the real one's discordance otherwise."""
    out = challenger.copy()
    want = int(round(target * len(out))) - int(out.sum())
    pick = np.flatnonzero(~out if want > 0 else out)
    out[rng.choice(pick, abs(want), replace=False)] = want > 0
    return out


def seed_results(answers: dict, settings: Looks, seed: int) -> dict:
    """Null and power, from one seed's real answers."""
    rng = np.random.default_rng(1000 + seed)
    correct, names = answers["correct"], answers["names"]
    accuracy = correct.mean(1)
    null, coin, power = [], [], {g: [] for g in settings.gains}
    for i, j in itertools.permutations(range(len(names)), 2):
        ch, inc = correct[i], correct[j]
        if accuracy[i] <= accuracy[j]:  # no better on the population: any promotion is a false one
            out = growing_exams(ch, inc, settings, rng, check=not null)
            null.append({"challenger": names[i], "incumbent": names[j], "pool_gain": round(float(accuracy[i] -
                         accuracy[j]), 4), "discordance": round(float(np.mean(ch != inc)), 4),
                         **{t: summary(out, t)["promoted"] for t in ("exact", "sequential")}})
        if i < j:  # the boundary of H0 with this pair's real discordance: each image's answers swapped by a coin
            swap = rng.random((8, len(ch))) < 0.5  # 8 swaps x ``sequences`` exams each
            b_c = [growing_exams(np.where(s, inc, ch), np.where(s, ch, inc), settings, rng) for s in swap]
            coin.append({t: float(np.mean([summary(o, t)["promoted"] for o in b_c])) for t in ("exact", "sequential")})
        for gain in settings.gains:
            better = adjusted(ch, accuracy[j] + gain, rng)
            discordant = better != inc
            p_win = float(np.mean(better[discordant])) if discordant.any() else 0.5
            labels = (np.arange(settings.looks) + 1) * settings.labels_per_look
            shadow = disagreements_first(p_win, settings, rng, settings.sequences)
            random_labels = growing_exams(better, inc, settings, rng)
            power[gain].append({"challenger": names[i], "incumbent": names[j],
                                "discordance": round(float(discordant.mean()), 4), "p_win": round(p_win, 4),
                                "disagreements_first": summary(shadow, "sequential", labels),
                                "disagreements_first_exact_once": round(float(
                                    shadow["exact"][:, -1].mean()), 4),
                                "random_labels": summary(random_labels, "sequential")})
    return {"models": {n: round(float(a), 4) for n, a in zip(names, accuracy)}, "null_pairs": null,
            "null": {t: round(float(np.mean([r[t] for r in null])), 4) for t in ("exact", "sequential")},
            "coin_swapped": {t: round(float(np.mean([r[t] for r in coin])), 4) for t in ("exact", "sequential")},
            "power": {f"+{round(100 * g)}": pooled_power(rows) for g, rows in power.items()},
            "power_pairs": {f"+{round(100 * g)}": rows for g, rows in power.items()}}


def pooled_power(rows: list[dict]) -> dict:
    """Across pairs: the mean share promoted and the median of the pairs' median labels spent."""
    def med(values):
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else None

    return {"disagreements_first": {"promoted": round(float(np.mean([r["disagreements_first"]["promoted"]
                                                                       for r in rows])), 4),
                                    "median_labels": med([r["disagreements_first"]["median_spent"]["labels"]
                                                          for r in rows]),
                                    "exact_once_at_budget": round(float(np.mean(
                                        [r["disagreements_first_exact_once"] for r in rows])), 4)},
            "random_labels": {"promoted": round(float(np.mean([r["random_labels"]["promoted"] for r in rows])), 4),
                              "median_gate_images": med([r["random_labels"]["median_spent"]["gate_images"]
                                                         for r in rows]),
                              "median_discordant": med([r["random_labels"]["median_spent"]["discordant"]
                                                        for r in rows])},
            "discordance": [min(r["discordance"] for r in rows), max(r["discordance"] for r in rows)]}


def simulated(settings: Looks) -> dict:
    """Pairs at stated discordance rates (no model): the null over growing exams, and power with disagreements
    first (P(challenger wins a disagreement) = 1/2 + gain / (2 x discordance))."""
    rng = np.random.default_rng(24)
    sims = Looks(**{**settings.__dict__, "sequences": settings.simulated})
    out = {}
    for d in settings.discordance:
        n = 10_000  # a population of images: a share d discordant, exactly half of those won by each model
        discordant, side = np.arange(n) < round(d * n), np.arange(n) % 2 == 0
        ch, inc = np.where(discordant, side, True), np.where(discordant, ~side, True)
        null = growing_exams(ch, inc, sims, rng)
        row = {"null": {t: summary(null, t)["promoted"] for t in ("exact", "sequential")}}
        labels = (np.arange(settings.looks) + 1) * settings.labels_per_look
        for gain in settings.gains:
            shadow = disagreements_first(min(1.0, 0.5 + gain / (2 * d)), settings, rng, settings.simulated)
            row[f"+{round(100 * gain)}"] = {**summary(shadow, "sequential", labels),
                                            "exact_once_at_budget": round(float(shadow["exact"][:, -1].mean()), 4)}
        out[f"discordance {d}"] = row
    return out


def across(per_seed: list[dict], *path: str) -> dict:
    """Mean and standard deviation of a figure over seeds."""
    values = []
    for result in per_seed:
        for key in path:
            result = result[key]
        values.append(result)
    return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values)), 4),
            "per_seed": values}


# ---- the run ---------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    s, looks = result["looks_settings"], result["looks"]
    lines = [f"Gate over repeated looks (alpha {s['alpha']}): {s['seeds']} seeds; per seed the models "
             f"{', '.join(f'{a} {e} ep {p}' for a, e, p in s['recipes'])} ({s['size']} px), answers on a pool of "
             f"{looks['pool_images']} ELPV images; {s['looks']} looks, {s['per_look']} new gate images a look "
             f"(random labels) or {s['labels_per_look']} labelled disagreements a look; {s['sequences']} exams per "
             "pair. Mean ± sd over seeds.", "",
             "| no-better challenger, 30 looks | P(any promotion): exact test at every look | sequential |",
             "|---|---:|---:|"]
    for name, key in (("real pairs, challenger no better on the pool", "null"),
                      ("real pairs, answers coin-swapped (exactly p = 1/2)", "coin_swapped")):
        e, q = looks[key]["exact"], looks[key]["sequential"]
        lines.append(f"| {name} | {e['mean']:.3f} ± {e['sd']:.3f} | {q['mean']:.3f} ± {q['sd']:.3f} |")
    for name, row in looks["simulated"].items():
        lines.append(f"| simulated, {name} | {row['null']['exact']:.3f} | {row['null']['sequential']:.3f} |")
    lines += ["", f"| challenger truly better on the pool | promoted within {s['looks'] * s['labels_per_look']} "
              "labelled disagreements (sequential) | median disagreements spent | exact test once at "
              f"{s['looks'] * s['labels_per_look']} | promoted within {s['looks'] * s['per_look']} random "
              "labels | median gate images (discordant) spent | discordance |", "|---|---:|---:|---:|---:|---:|---|"]
    for gain, row in looks["power"].items():
        lines.append(f"| {gain} points, real pairs | {row['disagreements_first']['mean']:.3f} ± "
                     f"{row['disagreements_first']['sd']:.3f} | {row['median_labels']} | {row['exact_once']['mean']:.3f}"
                     f" | {row['random_labels']['mean']:.3f} ± {row['random_labels']['sd']:.3f} | "
                     f"{row['median_gate_images']} ({row['median_discordant']}) | {row['discordance']} |")
    for name, row in looks["simulated"].items():
        for gain in (k for k in row if k.startswith("+")):
            g = row[gain]
            lines.append(f"| {gain} points, simulated {name} | {g['promoted']:.3f} | "
                         f"{g['median_spent']['labels']} | {g['exact_once_at_budget']:.3f} | | | |")
    if result.get("oneshot"):
        lines += ["", oneshot_markdown(result["oneshot"])]
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in result["targets"].items()]
    return "\n".join(lines) + "\n"


def oneshot_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"One-shot null pairs: {s['models']} models per setting ({s['arch']}, {s['size']} px), every ordered "
             f"pair gated once; exact test at alpha {s['alpha']}.", "",
             "| setting | gate images | pairs | old rule: promoted | exact test: promoted | old: promoted & worse on "
             "test | exact: promoted & worse on test |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["settings_results"].items():
        lines.append(f"| {name} | {r['gate_n']} | {r['pairs']} | {r['old']['promoted']} ({100 * r['old']['rate']:.1f} %)"
                     f" | {r['new']['promoted']} ({100 * r['new']['rate']:.1f} %) | {r['old']['worse_on_test']} | "
                     f"{r['new']['worse_on_test']} |")
    return "\n".join(lines)


def run_looks(settings: Looks, reuse: bool, saved: Path, log) -> dict:
    """Answers (trained now, or the ones saved in ``saved`` with ``reuse``), then every seed's decisions, then
    across seeds."""
    if reuse:
        stored = np.load(saved)
        answers = [{"names": list(stored[f"names_{s}"]), "correct": stored[f"correct_{s}"]}
                   for s in range(settings.seeds)]
        provenance = json.loads(str(stored["provenance"])) if "provenance" in stored else None
    else:
        started = time.time()
        with tempfile.TemporaryDirectory(prefix="edgeloop-bench-gate-") as tmp:
            answers = [pool_answers(settings, seed, Path(tmp), log) for seed in range(settings.seeds)]
        provenance = {"command": " ".join(["python bench/gate.py", *sys.argv[1:]]), "machine": machine_info(),
                      "training_s": round(time.time() - started, 1)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(saved, provenance=json.dumps(provenance),
                            **{f"{k}_{s}": np.asarray(a[k]) for s, a in enumerate(answers) for k in ("names", "correct")})
    per_seed = []
    for seed, a in enumerate(answers):
        started = time.time()
        per_seed.append(seed_results(a, settings, seed))
        log(f"seed {seed}: null exact {per_seed[-1]['null']['exact']:.3f}, sequential "
            f"{per_seed[-1]['null']['sequential']:.3f}; power {per_seed[-1]['power']} ({time.time() - started:.0f} s)")
    power = {}
    for gain in per_seed[0]["power"]:
        rows = [r["power"][gain] for r in per_seed]
        power[gain] = {"disagreements_first": across(per_seed, "power", gain, "disagreements_first", "promoted"),
                       "median_labels": float(np.median([r["disagreements_first"]["median_labels"] for r in rows])),
                       "exact_once": across(per_seed, "power", gain, "disagreements_first", "exact_once_at_budget"),
                       "random_labels": across(per_seed, "power", gain, "random_labels", "promoted"),
                       "median_gate_images": float(np.median([r["random_labels"]["median_gate_images"] for r in rows])),
                       "median_discordant": float(np.median([r["random_labels"]["median_discordant"] for r in rows])),
                       "discordance": [min(r["discordance"][0] for r in rows), max(r["discordance"][1] for r in rows)]}
    return {"pool_images": int(answers[0]["correct"].shape[1]), "answers_from": provenance,
            "null": {t: across(per_seed, "null", t) for t in ("exact", "sequential")},
            "coin_swapped": {t: across(per_seed, "coin_swapped", t) for t in ("exact", "sequential")},
            "power": power, "simulated": simulated(settings), "per_seed": per_seed}


def run_oneshot(settings: OneShot, log) -> dict:
    """The issue-16 measurement: every ordered pair of null models gated once (cloud and one edge site)."""
    rule = GateRule(alpha=settings.alpha, min_gate_images=settings.min_gate_images)
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-gate-") as tmp:
        work = Path(tmp)
        images, skipped = elpv_images(settings.size, settings.seed)
        parts = shifted_fleet(images, 1, settings.seed)  # the generic pool and the mono site
        generic, site = work / "generic", work / "site"
        write_version(generic, parts[0], ELPV_CLASSES, (0.7, 0.15, 0.15), settings.seed, settings.size,
                      "elpv:shifted:generic", skipped)
        write_version(site, parts[1], ELPV_CLASSES, (0.4, 0.4, 0.2), settings.seed + 1, settings.size,
                      "elpv:shifted:site-1", [])
        cloud = cloud_models(generic, settings, work, log)
        edge = edge_models(site, work / "cloud-0" / "model.pt", settings, work, log)
    return {"settings": settings.__dict__,
            "settings_results": {"cloud (generic pool)": pairwise(cloud, rule), "edge (mono site)": pairwise(edge, rule)}}


def targets(result: dict, settings: Looks) -> dict[str, bool]:
    budget = settings.looks * settings.labels_per_look
    looks = result["looks"]
    out = {f"sequential: a no-better challenger looked at {settings.looks} times is promoted at most alpha "
           f"({settings.alpha}) of the time (real pairs, mean over seeds)": looks["null"]["sequential"]["mean"]
           <= settings.alpha,
           f"sequential: at most alpha at the exact boundary p = 1/2 (coin-swapped real pairs)":
           looks["coin_swapped"]["sequential"]["mean"] <= settings.alpha,
           **{f"sequential: at most alpha, simulated {k}": v["null"]["sequential"] <= settings.alpha
              for k, v in looks["simulated"].items()}}
    if "+5" in looks["power"]:
        out[f"+5 points: >= 80 % promoted within {budget} labelled disagreements (real pairs)"] = \
            looks["power"]["+5"]["disagreements_first"]["mean"] >= 0.8
        for k, v in looks["simulated"].items():
            out[f"+5 points: >= 80 % promoted within {budget} labelled disagreements (simulated {k})"] = \
                v["+5"]["promoted"] >= 0.8
    if result.get("oneshot"):
        out.update({f"exact test promotes at most alpha of one-shot null pairs, {name}": r["new"]["rate"]
                    <= settings.alpha for name, r in result["oneshot"]["settings_results"].items()})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 seeds x 3 tiny models, fewer sequences")
    parser.add_argument("--reuse", action="store_true", help="replay on bench/results/gate_answers.npz")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--oneshot", action="store_true", help="also the issue-16 one-shot pairs")
    parser.add_argument("--arch", help="the one-shot pairs' architecture (default resnet18)")
    parser.add_argument("--models", type=int, help="the one-shot pairs' models per setting (default 9)")
    args = parser.parse_args()
    settings = Looks()
    if args.quick:
        settings = Looks(seeds=2, recipes=(("tiny_cnn", 1, "flips"), ("tiny_cnn", 1, "noise"),
                                           ("tiny_cnn", 2, "none")), sequences=100, simulated=500)
    if args.seeds:
        settings.seeds = args.seeds
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    name = "gate-quick" if args.quick else "gate"
    result = {"benchmark": "gate", "looks_settings": settings.__dict__,
              "looks": run_looks(settings, args.reuse, RESULTS / f"{name}_answers.npz", log)}
    if args.oneshot:
        oneshot = OneShot(models=args.models or OneShot.models, arch=args.arch or OneShot.arch)
        result["oneshot"] = run_oneshot(oneshot, log)
    result.update(targets=targets(result, settings), seconds=round(time.time() - started, 1),
                  machine=machine_info(), command=" ".join(["python bench/gate.py", *sys.argv[1:]]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
