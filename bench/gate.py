"""The gate's false-promotion rate, measured with candidates known to be no better (issue 16).

Null candidates: the incumbent's own recipe on the same data with other seeds, so no candidate is better than
another except by chance. Every ordered pair (challenger, incumbent) is gated twice on the same answers:

- the old rule: higher gate accuracy, or equal accuracy and lower log-loss, promotes (min_gain 0, any n);
- the new rule (:mod:`edge_agent.gate`): exact one-sided McNemar on the discordant pairs at ``alpha``, with
  ``min_gate_images``; ties keep the incumbent.

In the cloud the models are trained on the generic pool and gated on its gate split (FP32, as promoted). At one
edge site (the mono site) ensembles are fine-tuned from the same base with the real edge code (members in
parallel, fused ensemble, INT8 rule) and gated on the site's gate split at the precision each would serve.
Every pair's test-split accuracies are recorded too, to count promotions that are worse on test.

Pairs share models, so they are not independent draws: the rate's interval (Clopper-Pearson) is indicative.
Models are CPU-sized (32 px, few epochs): it is the rule that is measured, not the models.

    .venv/bin/python bench/gate.py                 # 9 models per setting (72 ordered pairs each)
    .venv/bin/python bench/gate.py --quick         # 4 models, 1 epoch (a smoke run)

Writes bench/results/gate.json and gate.md.
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
from edge_agent.gate import GateRule, Score, gate  # noqa: E402
from edge_agent.layout import AgentPaths  # noqa: E402
from orchestrator.demo import shifted_fleet  # noqa: E402
from orchestrator.training import machine_info  # noqa: E402

RESULTS = REPO / "bench" / "results"


@dataclass
class Settings:
    models: int = 9
    size: int = 32
    arch: str = "resnet18"
    cloud_epochs: int = 3
    edge_epochs: int = 2
    alpha: float = 0.1
    min_gate_images: int = 50
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

def cloud_models(generic: Path, settings: Settings, out: Path, log) -> list[Answers]:
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

def edge_models(site_data: Path, base: Path, settings: Settings, out: Path, log) -> list[Answers]:
    """Null ensembles at one site: the edge's own fine-tune steps, seeds 0..models-1, each scored as it serves."""
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
        precision = choose_precision(staged, splits["train"].images, splits["gate"],
                                     seeded.thresholds.int8_tolerance, settings.size)
        result = score(staged, splits, settings.size, None)
        models.append(Answers(f"edge-{seed}", gate_score(result, splits["gate"].labels), result["test"]["accuracy"]))
        log(f"edge ensemble {seed} ({precision['serving']}): gate {models[-1].gate.accuracy:.3f}, "
            f"test {models[-1].test_accuracy:.3f} ({time.time() - started:.0f} s)")
    return models


# ---- the run ---------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Null candidates: {s['models']} models per setting ({s['arch']}, {s['size']} px, seeds "
             f"0..{s['models'] - 1}), every ordered pair gated; new rule alpha {s['alpha']}, "
             f"min_gate_images {s['min_gate_images']}.", "",
             "| setting | gate images | pairs | old rule: promoted | new rule: promoted | old: promoted & worse on "
             "test | new: promoted & worse on test |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["settings_results"].items():
        lines.append(f"| {name} | {r['gate_n']} | {r['pairs']} | {r['old']['promoted']} "
                     f"({100 * r['old']['rate']:.1f} %, 90 % CI {100 * r['old']['rate_ci90'][0]:.0f}–"
                     f"{100 * r['old']['rate_ci90'][1]:.0f}) | {r['new']['promoted']} ({100 * r['new']['rate']:.1f} %, "
                     f"90 % CI {100 * r['new']['rate_ci90'][0]:.0f}–{100 * r['new']['rate_ci90'][1]:.0f}) | "
                     f"{r['old']['worse_on_test']} | {r['new']['worse_on_test']} |")
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in result["targets"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", type=int)
    parser.add_argument("--arch")
    args = parser.parse_args()
    settings = Settings(models=4, cloud_epochs=1, edge_epochs=1) if args.quick else Settings()
    if args.models:
        settings.models = args.models
    if args.arch:
        settings.arch = args.arch
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

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
    results = {"cloud (generic pool)": pairwise(cloud, rule), "edge (mono site)": pairwise(edge, rule)}
    targets = {f"new rule promotes at most alpha ({settings.alpha}) of null pairs, {name}": r["new"]["rate"]
               <= settings.alpha for name, r in results.items()}
    result = {"benchmark": "gate", "settings": settings.__dict__, "settings_results": results, "targets": targets,
              "seconds": round(time.time() - started, 1), "machine": machine_info(),
              "command": " ".join(["python bench/gate.py", *sys.argv[1:]])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gate.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "gate.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
