"""ResNet-18 on the ELPV binary task (defective if p >= 0.5), 75/25 image-level split as in Deitsch et al. 2019.

Trains ``--models`` networks (different seeds and augmentation policies) from scratch and reports, on the
25 % test quarter, what each step buys: one model, one model with test-time augmentation (the 8 turns and
flips of a square cell, averaged), and the equal-weight ensemble with and without it. Nothing is chosen on
the test quarter: each model's best epoch is chosen on a validation share carved from the 75 % training
share, the ensemble has equal weights and TTA is fixed.

Prints and writes bench/results/train_elpv.json (with the machine and the wall time against the 30-minute
budget of issue 9).

    .venv/bin/python bench/train_elpv.py                   # the recorded run (2 models, 128 px, 24 epochs)
    .venv/bin/python bench/train_elpv.py --models 1 --size 96 --epochs 10 --policies flips --precision fp32
                                                            # the recipe before issue 9 (--precision bf16: its A/B)
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
from edge_agent.train import TrainConfig, predict_proba, uses_bf16
from orchestrator.training import machine_info, train_on_dataset

RESULTS = Path(__file__).resolve().parent / "results"
BUDGET_S = 30 * 60
ANCHORS = {"Deitsch et al. 2019 CNN (published)": 0.8842, "Deitsch et al. 2019 SVM (published)": 0.8244,
           "SETUP-NOTES reference, ResNet-18 96 px, 10 epochs": 0.829,
           "edgeloop before issue 9 (96 px, 10 epochs, fp32, one model, no TTA)": 0.818}
POLICIES = ("flips", "noise", "geometric")


def dihedral(images: np.ndarray) -> list[np.ndarray]:
    """The 8 turns and flips of square cells: a cell's defect class does not change under any of them."""
    turns = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    return [np.ascontiguousarray(v) for t in turns for v in (t, t[:, :, ::-1])]


def probabilities(checkpoint: Path, images: np.ndarray, tta: bool) -> np.ndarray:
    model, meta = load_checkpoint(checkpoint)
    views = dihedral(images) if tta else [images]
    return np.mean([predict_proba(model, v, meta.normalization) for v in views], axis=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--models", type=int, default=2, help="ensemble members (different seed and policy)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="augmentation policy per model, in turn (edge_agent/augment.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "train_elpv.json")
    args = parser.parse_args()

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-elpv-") as tmp:
        data = Path(tmp) / "data"
        import_elpv(data, size=args.size, seed=args.seed, fractions=(67.5, 7.5, 25))
        test = open_dataset(data).load_split("test")
        runs, probs = [], {"single": [], "tta": []}
        for index in range(args.models):
            policies = args.policies.split(",")
            policy = policies[index % len(policies)]
            config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed + index,
                                 policy=policy, precision=args.precision)
            print(f"model {index + 1}/{args.models}: {args.arch} {args.size}px, policy {policy}, "
                  f"{'bf16' if uses_bf16(config) else 'fp32'}", flush=True)
            metrics = train_on_dataset(
                data, args.arch, Path(tmp) / f"model-{index}", config,
                on_epoch=lambda m: print(f"  epoch {m.epoch:>2}  loss {m.train_loss:.4f}  val_acc {m.val_acc:.3f}  "
                                         f"{m.seconds:.1f}s", flush=True))
            for key, tta in (("single", False), ("tta", True)):
                probs[key].append(probabilities(Path(tmp) / f"model-{index}" / "model.pt", test.images, tta))
            runs.append({"policy": policy, "seed": config.seed, "best_epoch": metrics["best_epoch"],
                         "val_accuracy": metrics["val_acc"], "test_accuracy": metrics["test_acc"],
                         "test_accuracy_tta": _accuracy(probs["tta"][-1], test.labels),
                         "seconds": metrics["seconds"], "seconds_per_epoch": metrics["seconds_per_epoch"],
                         "bf16": uses_bf16(config), "history": metrics["history"]})
        wall = time.monotonic() - started
    steps = {"one model": runs[0]["test_accuracy"], "one model + TTA": runs[0]["test_accuracy_tta"],
             f"ensemble of {args.models}": _accuracy(np.mean(probs["single"], axis=0), test.labels),
             f"ensemble of {args.models} + TTA": _accuracy(np.mean(probs["tta"], axis=0), test.labels)}
    result = {"benchmark": "train_elpv", "arch": args.arch, "image_size": args.size, "epochs": args.epochs,
              "split": "75/25 image-level (val 7.5 % carved from the training share)", "test_images": len(test),
              "test_accuracy": steps[f"ensemble of {args.models} + TTA"], "steps": steps, "models": runs,
              "wall_seconds": round(wall, 1), "budget_seconds": BUDGET_S, "within_budget": wall <= BUDGET_S,
              "anchors": ANCHORS, "machine": machine_info(),
              "command": "python bench/train_elpv.py " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print()
    for name, value in steps.items():
        print(f"  {name:<28} {value:.4f}")
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
