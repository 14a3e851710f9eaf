"""The agent's per-tick CPU with 0, 800 and 4,000 samples queued in its outbox (issue 18, item 9).

The cloud away or the day's upload budget spent is when the outbox grows, and the agent must not spend a
growing share of a small edge CPU on its own queue. Each measurement is a real :class:`edge_agent.daemon.Agent`
serving a real ensemble, its outbox filled with real PNG samples, the budget spent (so nothing leaves);
the CPU time of ``tick()`` is averaged over many ticks, with a heartbeat on every tick (the worst case).
The same measurement runs, in the same invocation, on the code this work started from (the baseline).

    .venv/bin/python bench/agent_tick.py                       # this tree and the baseline commit
    .venv/bin/python bench/agent_tick.py --baseline-rev NONE   # this tree only

Writes bench/results/agent_tick.json and bench/results/agent_tick.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
QUEUED = (0, 800, 4000)
BASELINE_REV = "3e352df"  # the branch's start: the outbox listed and stat-ed on every tick


def measure(queued: list[int], ticks: int) -> dict[int, float]:
    """CPU milliseconds per tick at each outbox size (run inside the tree under test)."""
    import numpy as np
    import yaml
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    from agent_helpers import serving_site

    from edge_agent.config import AgentConfig
    from edge_agent.daemon import Agent

    out = {}
    for n in queued:
        with tempfile.TemporaryDirectory(prefix="agent-tick-") as tmp:
            root = Path(tmp) / "site"
            serving_site(root, 32)
            raw = {"site": "bench", "root": str(root), "store_url": (Path(tmp) / "store").as_uri(), "image_size": 32,
                   "upload": {"max_samples_per_day": 0}, "serve": {"port": 0}, "poll_interval_s": 2.0,
                   "heartbeat_interval_s": 0.001}
            config_file = Path(tmp) / "site.yaml"
            config_file.write_text(yaml.safe_dump(raw))
            agent = Agent(AgentConfig.model_validate(raw), config_file)
            rng = np.random.default_rng(0)
            for i in range(n):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(buffer, "PNG")
                agent.outbox.put(buffer.getvalue(), {"site": "bench", "time": float(i), "reasons": ["uncertain"]},
                                 float(rng.random()))
            agent = Agent(AgentConfig.model_validate(raw), config_file)  # a fresh start: it finds the outbox on disk
            for _ in range(3):
                agent.tick()
            start = time.process_time()
            for _ in range(ticks):
                agent.tick()
            out[n] = round((time.process_time() - start) / ticks * 1000, 2)
    return out


def run_tree(src: Path, ticks: int) -> dict[str, float]:
    code = (f"import json, sys; sys.path.insert(0, {str(src)!r}); sys.path.insert(0, {str(REPO / 'bench')!r});"
            f"import agent_tick; print(json.dumps(agent_tick.measure({list(QUEUED)!r}, {ticks})))")
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticks", type=int, default=40)
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision to compare with, or NONE")
    args = parser.parse_args()
    trees = {"this tree": REPO}
    with tempfile.TemporaryDirectory(prefix="agent-tick-baseline-") as tmp:
        if args.baseline_rev != "NONE":
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline_rev], capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            trees[f"baseline {args.baseline_rev}"] = Path(tmp)
        figures = {name: run_tree(src, args.ticks) for name, src in trees.items()}
    load = os.getloadavg()[0]
    result = {"machine": {"platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "load_1min_at_end": round(load, 2)},
              "ticks": args.ticks, "queued": list(QUEUED), "cpu_ms_per_tick": figures}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "agent_tick.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = "\n".join(f"| {name} | " + " | ".join(f"{ms[str(n)] if str(n) in ms else ms[n]:.2f}" for n in QUEUED) + " |"
                     for name, ms in figures.items())
    table = (f"| code | {' | '.join(f'{n:,} queued' for n in QUEUED)} |\n|---|" + "---:|" * len(QUEUED) + f"\n{rows}\n")
    (RESULTS / "agent_tick.md").write_text(
        f"CPU ms per agent tick (mean of {args.ticks}, a heartbeat on every tick), {os.cpu_count()} cores, "
        f"load {load:.1f} at the end:\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
