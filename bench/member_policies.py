"""Which augmentation policies make good ensemble members at the edge (what chose the default members).

On one seed of bench/loop.py's shifted fleet, one member per policy is fine-tuned from the pretrained
cloud base at each site, as the agent would (same epochs, learning rate, last epoch kept), and scored on
the site's val and gate splits together. The test split is not read: this chooses, so it must not judge.

    .venv/bin/python bench/member_policies.py     # ~3 min on 2 cores → bench/results/member_policies.json
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loop import Settings, make_fleet  # noqa: E402
from edge_agent.augment import POLICIES  # noqa: E402
from edge_agent.datasets import ArraySet  # noqa: E402
from edge_agent.models import load_checkpoint  # noqa: E402
from edge_agent.sitedata import load_site_splits  # noqa: E402
from edge_agent.train import TrainConfig, evaluate, train_model  # noqa: E402
from orchestrator.training import machine_info, train_on_dataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    settings, seed = Settings(), 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-policies-") as tmp:
        generic, sites = make_fleet(Path(tmp), seed, settings)
        base = Path(tmp) / "base"
        train_on_dataset(generic, "resnet18", base, TrainConfig(epochs=settings.pretrain_epochs, batch_size=64,
                                                                seed=seed))
        for site in sites:
            _, meta = load_checkpoint(base / "model.pt")
            splits = load_site_splits(site.paths, meta.class_names, settings.size)
            held = ArraySet(np.concatenate([splits["val"].images, splits["gate"].images]),
                            np.concatenate([splits["val"].labels, splits["gate"].labels]))
            for policy in POLICIES:
                model, meta = load_checkpoint(base / "model.pt")
                config = TrainConfig(epochs=settings.finetune_epochs, batch_size=32, lr=1e-3, weight_decay=1e-4,
                                     seed=seed, policy=policy, keep="last")
                train_model(model, splits["train"], splits["val"], config, meta.normalization)
                accuracy = evaluate(model, held, meta.normalization)[0]
                rows.append({"site": site.name, "role": site.role, "policy": policy, "val_gate_accuracy": accuracy,
                             "n": len(held)})
                print(f"{site.name} ({site.role}) {policy:<10} val+gate {accuracy:.3f} (n={len(held)})", flush=True)
    mean = {p: round(statistics.mean(r["val_gate_accuracy"] for r in rows if r["policy"] == p), 4) for p in POLICIES}
    result = {"benchmark": "member_policies", "seed": seed, "rows": rows, "mean_by_policy": mean,
              "machine": machine_info(), "command": "python bench/member_policies.py"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "member_policies.json").write_text(json.dumps(result, indent=1))
    print("mean over sites:", mean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
