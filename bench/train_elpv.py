"""The ELPV binary task (defective if p >= 0.5), 75/25 image-level split as in Deitsch et al. 2019.

Trains ``--models`` networks from scratch with the recipe bench/elpv_recipe.py chose on val (``RECIPE``
below; ``--recipe FILE`` takes another result's choice, each flag overrides one knob) and reports, on the
25 % test quarter, what each step buys: one model, one model with test-time augmentation (the 8 turns and
flips of a square cell, averaged), and the equal-weight ensemble with and without it. Nothing is chosen on
the test quarter: each model's best epoch and whether TTA is used are chosen on the validation share carved
from the 75 % training share; ``test_accuracy`` is that choice's figure.

Prints and writes bench/results/train_elpv.json (with the machine and the wall time against the 30-minute
budget of issue 20).

    .venv/bin/python bench/train_elpv.py                   # the recorded run: the chosen recipe, one model
    .venv/bin/python bench/train_elpv.py --arch resnet18 --size 96 --epochs 20   # the best recipe before issue 20
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_agent.datasets import import_elpv, open_dataset
from edge_agent.models import load_checkpoint
from bench.elpv_recipe import recipe_config
from edge_agent.train import predict_proba, uses_bf16
from orchestrator.training import machine_info, train_on_dataset

RESULTS = Path(__file__).resolve().parent / "results"
BUDGET_S = 30 * 60
ANCHORS = {"Deitsch et al. 2019 CNN (published)": 0.8842, "Deitsch et al. 2019 SVM (published)": 0.8244,
           "SETUP-NOTES reference, ResNet-18 96 px, 10 epochs": 0.829,
           "edgeloop before issue 9 (96 px, 10 epochs, fp32, one model, no TTA)": 0.818}


def dihedral(images: np.ndarray) -> list[np.ndarray]:
    """The 8 turns and flips of square cells: a cell's defect class does not change under any of them."""
    turns = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    return [np.ascontiguousarray(v) for t in turns for v in (t, t[:, :, ::-1])]


def probabilities(model, normalization, images: np.ndarray, tta: bool) -> np.ndarray:
    views = dihedral(images) if tta else [images]
    return np.mean([predict_proba(model, v, normalization) for v in views], axis=0)


# the recipe bench/elpv_recipe.py chose on the validation share (its round 2); see BENCHMARKS section 1
RECIPE = {"arch": "slim_resnet", "size": 128, "epochs": 30, "policy": "flips", "lr": 3e-3, "label_smoothing": 0.0,
          "class_balance": "none", "ema_decay": None, "schedule": "onecycle", "weight_decay": 5e-4}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, help="take the defaults from a bench/elpv_recipe.py result ('chosen')")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--arch")
    parser.add_argument("--policies", help="augmentation policy per model, in turn (edge_agent/augment.py)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--class-balance", choices=("none", "weighted"))
    parser.add_argument("--ema-decay", type=float)
    parser.add_argument("--schedule", choices=("onecycle", "cosine", "constant"))
    parser.add_argument("--models", type=int, default=3, help="models trained (different seed, policy and size)")
    parser.add_argument("--sizes", default="128,192,256",
                        help="input size per model, in turn (the three sizes that tied or beat the base on val)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "train_elpv.json")
    args = parser.parse_args()
    recipe = json.loads(args.recipe.read_text())["chosen"] if args.recipe else dict(RECIPE)
    for key in RECIPE:
        if getattr(args, key, None) is not None:
            recipe[key] = getattr(args, key)
    policies = (args.policies or recipe["policy"]).split(",")

    sizes = [int(v) for v in args.sizes.split(",")] if args.sizes else [recipe["size"]]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-elpv-") as tmp:
        data = Path(tmp) / "data"
        import_elpv(data, size=max(sizes), seed=args.seed, fractions=(67.5, 7.5, 25))
        dataset = open_dataset(data)
        runs, probs = [], {(split, tta): [] for split in ("val", "test") for tta in (False, True)}
        for index in range(args.models):
            policy, size = policies[index % len(policies)], sizes[index % len(sizes)]
            config = recipe_config(recipe, batch_size=args.batch_size, seed=args.seed + index, policy=policy,
                                   precision=args.precision, device=args.device)
            print(f"model {index + 1}/{args.models}: {recipe['arch']} {size}px, policy {policy}, "
                  f"{'bf16' if uses_bf16(config) else 'fp32'}", flush=True)
            metrics = train_on_dataset(
                data, recipe["arch"], Path(tmp) / f"model-{index}", config, image_size=size,
                on_epoch=lambda m: print(f"  epoch {m.epoch:>2}  loss {m.train_loss:.4f}  val_acc {m.val_acc:.3f}  "
                                         f"{m.seconds:.1f}s", flush=True))
            model, meta = load_checkpoint(Path(tmp) / f"model-{index}" / "model.pt")
            for split, tta in probs:
                images = dataset.load_split(split, size).images
                probs[split, tta].append(probabilities(model, meta.normalization, images, tta))
            runs.append({"policy": policy, "size": size, "seed": config.seed, "best_epoch": metrics["best_epoch"],
                         "val_accuracy": metrics["val_acc"], "test_accuracy": metrics["test_acc"],
                         "seconds": metrics["seconds"], "seconds_per_epoch": metrics["seconds_per_epoch"],
                         "bf16": uses_bf16(config), "history": metrics["history"]})
        labels = {split: dataset.load_split(split).labels for split in ("val", "test")}
        wall = time.monotonic() - started
    # every candidate: each model alone and the equal-weight ensemble, each with and without TTA
    candidates = {f"model {i + 1} ({r['size']} px)": [i] for i, r in enumerate(runs)}
    if args.models > 1:
        candidates[f"ensemble of {args.models}"] = list(range(args.models))
    steps, val_steps = {}, {}
    for name, members in candidates.items():
        for tta in (False, True):
            key = name + (" + TTA" if tta else "")
            for split, table in (("val", val_steps), ("test", steps)):
                table[key] = _accuracy(np.mean([probs[split, tta][m] for m in members], axis=0), labels[split])
    # the test quarter chooses nothing: the headline is the candidate best on val (ties: the simpler one first)
    headline = max(val_steps, key=lambda k: val_steps[k])
    result = {"benchmark": "train_elpv", "arch": recipe["arch"], "image_sizes": sizes, "recipe": recipe,
              "split": "75/25 image-level (val 7.5 % carved from the training share)", "test_images": len(labels["test"]),
              "test_accuracy": steps[headline], "headline": headline, "chosen_on": "val", "val_steps": val_steps,
              "steps": steps, "models": runs,
              "wall_seconds": round(wall, 1), "budget_seconds": BUDGET_S, "within_budget": wall <= BUDGET_S,
              "anchors": ANCHORS, "machine": machine_info(),
              "command": "python bench/train_elpv.py " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print()
    for name, value in steps.items():
        print(f"  {name:<32} val {val_steps[name]:.4f}  test {value:.4f}")
    print(f"headline ({headline}, chosen on val): {steps[headline]:.4f}")
    print(f"wall time {wall / 60:.1f} min ({'within' if wall <= BUDGET_S else 'OVER'} the 30-minute budget) "
          f"on {result['machine']['cpus']} cores")
    for name, value in ANCHORS.items():
        print(f"  {name}: {value:.4f}")
    print(f"wrote {args.out}")
    return 0


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


if __name__ == "__main__":
    sys.exit(main())
