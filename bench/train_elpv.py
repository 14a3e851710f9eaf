"""ResNet-18 on the ELPV binary task (defective if p >= 0.5), 75/25 image-level split as in Deitsch et al. 2019.

Prints and writes bench/results/train_elpv.json: accuracy, seconds per epoch, the settings and the machine.
The validation split that picks the best epoch is carved from the 75 % training share, so the test
quarter is never seen before the final evaluation.

    .venv/bin/python bench/train_elpv.py [--epochs 10] [--size 96] [--arch resnet18]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_agent.datasets import import_elpv
from edge_agent.train import TrainConfig
from orchestrator.training import machine_info, train_on_dataset

RESULTS = Path(__file__).resolve().parent / "results"
ANCHORS = {"Deitsch et al. 2019 CNN (published)": 0.8842, "Deitsch et al. 2019 SVM (published)": 0.8244,
           "SETUP-NOTES reference, ResNet-18 96 px, 10 epochs": 0.829}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "train_elpv.json")
    args = parser.parse_args()

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, policy="flips")
    with tempfile.TemporaryDirectory(prefix="bench-elpv-") as tmp:
        started = time.monotonic()
        import_elpv(Path(tmp) / "data", size=args.size, seed=args.seed, fractions=(67.5, 7.5, 25))
        import_seconds = time.monotonic() - started
        metrics = train_on_dataset(
            Path(tmp) / "data", args.arch, Path(tmp) / "model", config,
            on_epoch=lambda m: print(f"epoch {m.epoch:>2}  loss {m.train_loss:.4f}  val_acc {m.val_acc:.3f}  "
                                     f"{m.seconds:.1f}s", flush=True))
    result = {
        "benchmark": "train_elpv", "arch": args.arch, "image_size": args.size,
        "split": "75/25 image-level (val 7.5 % carved from the training share)",
        "test_accuracy": metrics["test_acc"], "val_accuracy": metrics["val_acc"], "best_epoch": metrics["best_epoch"],
        "seconds_per_epoch": metrics["seconds_per_epoch"], "train_seconds": metrics["seconds"],
        "import_seconds": import_seconds, "train_images": metrics["train_images"],
        "test_images": metrics["test_images"], "config": metrics["config"], "anchors": ANCHORS,
        "history": metrics["history"], "machine": machine_info(),
        "command": "python bench/train_elpv.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\n{args.arch} {args.size}px: test accuracy {metrics['test_acc']:.4f}, "
          f"{metrics['seconds_per_epoch']:.1f} s/epoch on {result['machine']['cpus']} cores")
    for name, value in ANCHORS.items():
        print(f"  {name}: {value:.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
