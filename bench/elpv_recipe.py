"""Choosing the ELPV training recipe by measurement, on the validation share only (issue 20).

The same 75/25 split as bench/train_elpv.py (val = 7.5 % carved from the 75 %; the test quarter is never
read here). Round 1 changes one knob at a time from a base recipe and trains every variant with several
seeds; round 2 trains the base plus every change that raised the mean val accuracy by at least
``--min-gain`` points (for a knob with several values, the best one), keeping only combinations whose
projected time on the target CPU fits the budget. The cost of an epoch on the CPU comes from ``--cost``:
measured on the 2-core machine with ``--cost-only`` (a few timed training steps per architecture and size).

    .venv/bin/python bench/elpv_recipe.py --cost-only             # on the 2-core machine: bench/results/elpv_cost.json
    python bench/elpv_recipe.py --jobs 24 --seeds 2               # the search (a GPU makes it take minutes)

Writes bench/results/elpv_recipe.json: every run's val accuracy, the per-variant mean and spread, the chosen
recipe and the machine. bench/train_elpv.py's defaults are the chosen recipe; its test figure is the one
look at the test quarter.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_agent.datasets import import_elpv  # noqa: E402
from orchestrator.training import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FULL_SIZE = 300  # ELPV cells are 300 x 300; every size is resized from this one import
BUDGET_S = 30 * 60
SPLIT = (67.5, 7.5, 25)

BASE = {"arch": "slim_resnet", "size": 256, "epochs": 30, "policy": "flips", "lr": 3e-3, "label_smoothing": 0.0,
        "class_balance": "none", "ema_decay": None, "schedule": "onecycle", "weight_decay": 5e-4}
# one knob at a time; knobs with several values compete with each other in round 2
VARIANTS = {
    "previous best (ResNet-18, 96 px, 20 epochs)": {"arch": "resnet18", "size": 96, "epochs": 20},
    "128 px": {"size": 128}, "192 px": {"size": 192}, "300 px": {"size": 300},
    "slim_resnet_small": {"arch": "slim_resnet_small"},
    "EL augmentation": {"policy": "el"}, "contrast augmentation": {"policy": "contrast"},
    "label smoothing 0.1": {"label_smoothing": 0.1},
    "class-weighted loss": {"class_balance": "weighted"},
    "EMA of weights (0.99 per step)": {"ema_decay": 0.99},
    "cosine schedule": {"schedule": "cosine"},
    "lr 1e-3": {"lr": 1e-3},
    "60 epochs": {"epochs": 60},
}
COST_SHAPES = [("resnet18", 96), ("slim_resnet", 128), ("slim_resnet", 192), ("slim_resnet", 256),
               ("slim_resnet", 300), ("slim_resnet_small", 256), ("slim_resnet_small", 300)]


def recipe_config(recipe: dict, **extra):
    """The TrainConfig of a recipe (a BASE-shaped dict: arch and size go to the model, the rest here)."""
    from edge_agent.train import TrainConfig

    knobs = {key: recipe[key] for key in BASE if key not in ("arch", "size")}
    return TrainConfig(**{"batch_size": 64, **knobs, **extra})


def train_run(data: str, recipe: dict, seed: int, work: str, threads: int) -> dict:
    """One training run (in a worker process); returns its val figures, never its test figure."""
    from orchestrator.training import train_on_dataset

    config = recipe_config(recipe, seed=seed, threads=threads)
    out = Path(tempfile.mkdtemp(dir=work))
    metrics = train_on_dataset(data, recipe["arch"], out, config, image_size=recipe["size"])
    history = metrics["history"]
    return {"seed": seed, "val_acc": metrics["val_acc"], "best_epoch": metrics["best_epoch"],
            "last_val_acc": history[-1]["val_acc"], "seconds_per_epoch": round(metrics["seconds_per_epoch"], 2)}


def cost_per_epoch(arch: str, size: int, train_images: int, steps: int = 3) -> float:
    """Seconds one epoch of ``train_images`` takes here (forward + backward + step at batch 64, bf16 where
    native), from a few timed steps: augmentation and validation add a little on top."""
    import torch

    from edge_agent.models import ModelSpec, build_model
    from edge_agent.train import TrainConfig, _mixed_precision

    model = build_model(ModelSpec(arch=arch, num_classes=2, image_size=size)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(64, 1, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (64,))
    autocast, _ = _mixed_precision(TrainConfig(), torch.device("cpu"))
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps / 64 * train_images


def projected_seconds(recipe: dict, cost: dict) -> float | None:
    per_epoch = cost.get(f"{recipe['arch']}@{recipe['size']}")
    return None if per_epoch is None else per_epoch * recipe["epochs"]


def summarise(runs: list[dict]) -> dict:
    values = [r["val_acc"] for r in runs]
    return {"mean": round(statistics.mean(values), 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "runs": runs}


def run_round(pool, data: Path, work: Path, recipes: dict[str, dict], seeds: int, threads: int) -> dict[str, dict]:
    futures = {pool.submit(train_run, str(data), recipe, seed, str(work), threads): name
               for name, recipe in recipes.items() for seed in range(seeds)}
    runs: dict[str, list[dict]] = {name: [] for name in recipes}
    for future in as_completed(futures):  # each run printed as it ends: a cut-short search still tells
        name, run = futures[future], future.result()
        runs[name].append(run)
        print(f"  {name:<48} seed {run['seed']}: val {run['val_acc']:.4f} (epoch {run['best_epoch']}, "
              f"{run['seconds_per_epoch']} s/epoch)", flush=True)
    results = {name: {"recipe": recipes[name], **summarise(sorted(r, key=lambda x: x["seed"]))}
               for name, r in runs.items()}
    for name, result in results.items():
        print(f"  {name:<48} mean val {result['mean']:.4f} ({result['min']:.4f}-{result['max']:.4f})", flush=True)
    return results


def combine(round1: dict[str, dict], min_gain: float, cost: dict) -> dict:
    """The base plus each knob's best value, where it beat the base by ``min_gain``, within the CPU budget."""
    base = round1["base"]["mean"]
    best_per_knob: dict[tuple, tuple[float, dict]] = {}
    for name, result in round1.items():
        change = VARIANTS.get(name)
        if change is None or result["mean"] < base + min_gain / 100:
            continue
        knob = tuple(sorted(change))
        if knob not in best_per_knob or result["mean"] > best_per_knob[knob][0]:
            best_per_knob[knob] = (result["mean"], change)
    recipe = dict(BASE)
    for _, change in sorted(best_per_knob.values(), key=lambda item: -item[0]):
        trial = {**recipe, **change}
        seconds = projected_seconds(trial, cost)
        if seconds is None or seconds <= 0.9 * BUDGET_S:
            recipe = trial
    return recipe


def best_within_budget(results: dict[str, dict], cost: dict) -> dict:
    """The recipe with the highest mean val accuracy among those that fit the CPU budget."""
    fits = {name: r for name, r in results.items()
            if (projected_seconds(r["recipe"], cost) or 0) <= 0.9 * BUDGET_S}
    return max(fits.values(), key=lambda r: r["mean"])["recipe"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--min-gain", type=float, default=0.5, help="points of mean val accuracy a change must add")
    parser.add_argument("--cost", type=Path, default=RESULTS / "elpv_cost.json")
    parser.add_argument("--cost-only", action="store_true", help="only time an epoch per shape on this machine")
    parser.add_argument("--out", type=Path, default=RESULTS / "elpv_recipe.json")
    args = parser.parse_args()
    train_images = round(2624 * SPLIT[0] / 100)
    if args.cost_only:
        cost = {f"{arch}@{size}": round(cost_per_epoch(arch, size, train_images), 1) for arch, size in COST_SHAPES}
        args.cost.write_text(json.dumps({"seconds_per_epoch": cost, "machine": machine_info()}, indent=1))
        print(json.dumps(cost, indent=1), f"\nwrote {args.cost}")
        return 0
    cost = json.loads(args.cost.read_text())["seconds_per_epoch"] if args.cost.is_file() else {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp:
        data = Path(tmp) / "data"
        import_elpv(data, size=FULL_SIZE, seed=0, fractions=SPLIT)
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            print("round 1: one knob at a time", flush=True)
            round1 = run_round(pool, data, Path(tmp), {"base": BASE} | {n: {**BASE, **c} for n, c in VARIANTS.items()},
                               args.seeds, args.threads)
            partial = {"benchmark": "elpv_recipe", "round1": round1, "machine": machine_info(), "incomplete": True}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(partial, indent=1))  # round 1 survives a cut-short round 2
            chosen = combine(round1, args.min_gain, cost)
            print(f"round 2: the combination {chosen}", flush=True)
            round2 = run_round(pool, data, Path(tmp), {"combined": chosen}, args.seeds, args.threads)
    chosen = best_within_budget(round1 | round2, cost)
    result = {"benchmark": "elpv_recipe", "split": "75/25 image-level; val 7.5 % carved from the 75 %",
              "judged_on": "validation share only (the test quarter is not read)", "base": BASE,
              "round1": round1, "round2": round2, "chosen": chosen,
              "chosen_projected_cpu_seconds": projected_seconds(chosen, cost), "cpu_cost_per_epoch": cost,
              "min_gain_points": args.min_gain, "seeds": args.seeds, "wall_seconds": round(time.monotonic() - started, 1),
              "machine": machine_info(), "command": "python bench/elpv_recipe.py " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"chosen: {chosen}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
