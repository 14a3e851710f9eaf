"""Does a short self-supervised pretext help the ELPV base? (issue 20: tried when the recipe leaves a gap)

SimCLR-style: two augmented views of each training cell (crop, turns and flips, exposure, blur), a
projection head on the slim ResNet's pooled features, the NT-Xent loss over the batch; no labels are used.
Then the supervised recipe (bench/train_elpv.py's RECIPE, 128 px) fine-tunes from those weights and, with the
same seed, from scratch. Judged on the validation share only, like every other recipe step; the pretext sees
the training share's pixels and nothing else. Same split as bench/train_elpv.py.

    .venv/bin/python bench/elpv_ssl.py --pretext-epochs 20        # about 10 minutes on 2 cores

Writes bench/results/elpv_ssl.json.
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

from edge_agent.datasets import import_elpv, open_dataset  # noqa: E402
from orchestrator.training import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def views(size: int, seed: int):
    import albumentations as A

    compose = A.Compose([A.RandomResizedCrop((size, size), scale=(0.5, 1.0), ratio=(0.9, 1.1)),
                         A.HorizontalFlip(), A.VerticalFlip(), A.RandomRotate90(),
                         A.RandomBrightnessContrast(0.3, 0.3, p=0.8), A.GaussianBlur(blur_limit=(3, 5), p=0.3)],
                        seed=seed)
    return lambda image: compose(image=image)["image"]


def nt_xent(z1, z2, temperature: float):
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    n = len(z1)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(similarity, targets)


def pretext(model, images: np.ndarray, normalization, epochs: int, size: int, seed: int, batch: int = 128,
            lr: float = 2e-3, temperature: float = 0.2) -> list[float]:
    """Train ``model``'s features in place on the pretext; returns the loss per epoch."""
    import torch
    from torch import nn

    from edge_agent.train import to_tensor

    torch.manual_seed(seed)
    width = model.head[-1].in_features
    projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, 64))
    encoder = nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net = nn.Sequential(encoder, projector).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(images) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    augment, rng, losses = views(size, seed), np.random.default_rng(seed), []
    for epoch in range(epochs):
        order, total = rng.permutation(len(images)), 0.0
        for i in range(0, len(order) - batch + 1, batch):
            chunk = images[order[i:i + batch]]
            pair = [to_tensor(np.stack([augment(im) for im in chunk]), normalization) for _ in range(2)]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                z1, z2 = net(pair[0]), net(pair[1])
            loss = nt_xent(z1.float(), z2.float(), temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(chunk)
        losses.append(total / len(order))
        print(f"  pretext epoch {epoch + 1:>2}  loss {losses[-1]:.4f}", flush=True)
    model.to(memory_format=torch.contiguous_format)
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretext-epochs", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=30, help="supervised epochs (the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default every core)")
    parser.add_argument("--out", type=Path, default=RESULTS / "elpv_ssl.json")
    args = parser.parse_args()

    from edge_agent.models import ModelSpec, build_model
    from bench.elpv_recipe import recipe_config
    from bench.train_elpv import RECIPE
    from edge_agent.train import normalization_of, train_model

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-ssl-") as tmp:
        import_elpv(Path(tmp) / "data", size=args.size, seed=args.seed, fractions=(67.5, 7.5, 25))
        dataset = open_dataset(Path(tmp) / "data")
        train, val = dataset.load_split("train"), dataset.load_split("val")
    normalization = normalization_of(train)
    spec = ModelSpec(arch="slim_resnet", num_classes=2, image_size=args.size)
    config = recipe_config({**RECIPE, "epochs": args.epochs}, seed=args.seed, threads=args.threads)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = {}
    for name in ("scratch", "self-supervised pretext, then the recipe"):
        model = build_model(spec, seed=args.seed)
        step_started = time.monotonic()
        losses = pretext(model, train.images, normalization, args.pretext_epochs, args.size, args.seed) \
            if name != "scratch" else []
        result = train_model(model, train, val, config, normalization,
                             on_epoch=lambda m: print(f"  epoch {m.epoch:>2}  val {m.val_acc:.3f}", flush=True))
        rows[name] = {"val_accuracy": result.best_val_acc, "best_epoch": result.best_epoch,
                      "val_curve": [round(m.val_acc, 4) for m in result.history], "pretext_losses": losses,
                      "seconds": round(time.monotonic() - step_started, 1)}
        print(f"{name}: val {result.best_val_acc:.4f} (epoch {result.best_epoch}), "
              f"{rows[name]['seconds'] / 60:.1f} min", flush=True)
    out = {"benchmark": "elpv_ssl", "judged_on": "validation share only", "image_size": args.size,
           "pretext_epochs": args.pretext_epochs, "supervised_epochs": args.epochs, "rows": rows,
           "wall_seconds": round(time.monotonic() - started, 1), "machine": machine_info(),
           "command": "python bench/elpv_ssl.py " + " ".join(sys.argv[1:])}
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
