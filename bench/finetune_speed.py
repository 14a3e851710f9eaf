"""What the worker start-up and bf16 change in an edge fine-tune (issue 9, item 6): wall time and accuracy.

One site (bench/edge.py's ELPV site-1 set, 64 px, a ResNet-18 base pretrained on the generic pool), K = 3
ResNet-18 members in parallel through the agent's own fine-tune, three ways on the same data and seeds:
workers spawned fresh in fp32 (before), from the preloaded forkserver in fp32, and from it in bf16.

    .venv/bin/python bench/finetune_speed.py     # ~6 min on 2 cores → bench/results/finetune_speed.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.edge import machine, prepare, site_root, timed_finetune  # noqa: E402
from edge_agent import members  # noqa: E402
from edge_agent.train import bf16_native  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"spawn, fp32 (before)": ("spawn", "fp32"), "forkserver, fp32": ("forkserver", "fp32"),
            "forkserver, bf16": ("forkserver", "bf16")}


def main() -> int:
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-ftspeed-") as tmp:
        work = Path(tmp)
        data, base = prepare(work, 64, None, "resnet18", 8)
        for index, (name, (start, precision)) in enumerate(VARIANTS.items()):
            members.START_METHOD = start
            config = site_root(work, f"v{index}", data, base, "resnet18", 64, 5)
            config.finetune.precision = precision
            run = timed_finetune(config, parallel=True)
            rows[name] = {k: run[k] for k in ("wall_s", "train_wall_s", "cpu_s", "cpu_utilisation",
                                              "member_train_s", "ensemble_test_accuracy", "test_n")}
            rows[name]["member_test_accuracy"] = [m["test_accuracy"] for m in run["members"]]
            print(f"{name:<22} wall {run['wall_s']:6.1f} s  members {run['train_wall_s']:6.1f} s  "
                  f"ensemble test {run['ensemble_test_accuracy']:.3f}", flush=True)
    result = {"benchmark": "finetune_speed", "bf16_native": bf16_native(), "variants": rows, "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": "python bench/finetune_speed.py"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "finetune_speed.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
