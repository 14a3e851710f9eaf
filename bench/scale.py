"""Benchmark: past one process and past ten hosts.

1. Training throughput of ``edgeloop train`` at 1 and 2 processes (DDP, gloo on the CPU; NCCL on a GPU when
   this machine has one, and it says so when it has none).
2. Random search against a grid of the same budget (the same trials, the same successive halving), several
   seeds: the best trial's val accuracy (what chose it) and test accuracy (what decided nothing).
3. Provisioning 100 real sshd hosts on loopback, fresh and re-run, with wall time and the cloud's CPU seconds
   per host; and reading the fleet's status: one listing of an sftp store against one read per site.

Reproduce: ``.venv/bin/python bench/scale.py`` (about 45 minutes on 2 cores; ``--only training|search|fleet``
runs one part). Writes ``bench/results/scale.json`` and ``bench/results/scale.md`` (the BENCHMARKS.md section).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_agent.datasets import import_elpv  # noqa: E402
from orchestrator.training import machine_info  # noqa: E402

RESULTS = REPO / "bench" / "results"


def dataset(work: Path, size: int) -> Path:
    """The ELPV generic pool at ``size`` px (the demo's cloud data)."""
    import_elpv(work / "elpv", size=size, sites=3)
    return work / "elpv" / "generic"


# 1. training throughput ------------------------------------------------------------------------------------

def training(data: Path, work: Path, epochs: int) -> dict:
    import torch

    rows = []
    for ranks in (1, 2):
        out = work / f"ddp-{ranks}"
        command = [sys.executable, "-m", "edgeloop", "train", "--data", str(data), "--arch", "resnet18",
                   "--out", str(out), "--epochs", str(epochs), "--batch-size", "64", "--nproc-per-node", str(ranks)]
        started = time.monotonic()
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        wall = time.monotonic() - started
        if run.returncode:  # e.g. two NCCL ranks on a machine with one GPU: record why, go on
            rows.append({"processes": ranks, "error": run.stderr.strip().splitlines()[-3:], "wall_s": round(wall, 1)})
            print(f"training, {ranks} process(es): failed: {rows[-1]['error']}", flush=True)
            continue
        metrics = json.loads((out / "metrics.json").read_text())
        images = metrics["train_images"] * metrics["epochs_run"]
        rows.append({"processes": ranks, "device": "cuda" if torch.cuda.is_available() else "cpu",
                     "images_per_s": round(images / metrics["seconds"], 1), "train_s": round(metrics["seconds"], 1),
                     "wall_s": round(wall, 1), "val_acc": round(metrics["val_acc"], 4),
                     "test_acc": round(metrics["test_acc"], 4), "train_images": metrics["train_images"]})
        print(f"training, {ranks} process(es): {rows[-1]['images_per_s']} images/s, {wall:.0f} s wall", flush=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"arch": "resnet18", "epochs": epochs, "global_batch": 64, "rows": rows,
            "gpu": gpu or "none: this machine has no GPU, so no GPU figure was taken"}


# 2. random search against a grid ---------------------------------------------------------------------------

def _run_rung_with(pool: ProcessPoolExecutor, data: Path, out: Path, seed: int):
    from orchestrator.tune import run_trial

    def run_rung(trials, rung, epochs):
        futures = [pool.submit(run_trial, data, t, rung, epochs, out, seed=seed, threads=1) for t in trials]
        return [f.result() for f in futures]

    return run_rung


def search(data: Path, work: Path, trials: int, seeds: int) -> dict:
    from edge_agent.datasets import open_dataset
    from orchestrator.tune import Halving, SearchSpace, grid_trials, random_trials, successive_halving

    space, halving = SearchSpace(), Halving(min_epochs=1, max_epochs=4, eta=2)
    size = open_dataset(data).image_size
    runs = []
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for seed in range(seeds):
            for strategy, drawn in (("random", random_trials(space, trials, size, seed)),
                                    ("grid", grid_trials(space, trials, size))):
                started = time.monotonic()
                run_rung = _run_rung_with(pool, data, work / f"{strategy}-{seed}", seed)
                found = successive_halving(drawn, halving, run_rung)
                best = found.best
                runs.append({"strategy": strategy, "seed": seed, "trials": len(drawn), "val_acc": best.val_acc,
                             "test_acc": best.test_acc, "params": best.trial.params,
                             "epochs_trained": sum(r.epochs for r in found.results),
                             "seconds": round(time.monotonic() - started, 1)})
                print(f"search {strategy} seed {seed}: val {best.val_acc:.3f} test {best.test_acc:.3f} "
                      f"{best.trial.params}", flush=True)
    summary = {}
    for strategy in ("random", "grid"):
        mine = [r for r in runs if r["strategy"] == strategy]
        summary[strategy] = {key: {"mean": round(statistics.mean(r[key] for r in mine), 4),
                                   "min": round(min(r[key] for r in mine), 4),
                                   "max": round(max(r[key] for r in mine), 4)}
                             for key in ("val_acc", "test_acc")}
    return {"trials": trials, "seeds": seeds, "halving": halving.model_dump(), "space": space.model_dump(),
            "runs": runs, "summary": summary}


# 3. a fleet of 100 hosts -----------------------------------------------------------------------------------

def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fleet(work: Path, hosts: int, concurrency: int) -> dict:
    from orchestrator.inventory import load_inventory
    from orchestrator.provision import build_wheel, provision
    from orchestrator.sshfleet import SshdFleet, fleet_inventory, stop_agents

    wheel = build_wheel()
    sshd = SshdFleet(work / "sshd", hosts).start()
    roots = work / "roots"
    try:
        inventory = load_inventory(fleet_inventory(sshd, work / "fleet.yaml", roots, concurrency=concurrency))
        scenarios = []
        try:
            for name in ("fresh hosts", "re-run (unchanged hosts)"):
                cpu = _cpu_seconds()
                report = provision(inventory, wheel=wheel)
                used = _cpu_seconds() - cpu
                failed = [h for h in report.hosts if h.failed]
                reasons = [f"{h.site} {st.step}: {st.message}" for h in failed for st in h.steps
                           if st.status == "failed"]
                scenarios.append({"name": name, "hosts": len(report.hosts), "failed": len(failed), "why": reasons,
                                  "wall_s": round(report.seconds, 1), "changed_steps": report.changed,
                                  "cloud_cpu_s_per_host": round(used / hosts, 3)})
                print(f"provision {name}: {report.seconds:.0f} s, {used / hosts:.3f} cloud CPU s/host, "
                      f"{len(failed)} failed", flush=True)
            status = status_polling(sshd, work, inventory.names())
            # Each agent starts a fine-tune when a new base lands: 100 of them on this machine's 2 cores would
            # measure its overload (a load average near 190), not the deploy. On a real fleet each site
            # fine-tunes on its own CPU; here the agents are stopped first and the deploy is files over SSH.
            stop_agents(roots)
            deploys = deploy_wave(inventory, work)
        finally:
            stop_agents(roots)
    finally:
        sshd.stop()
    return {"hosts": hosts, "concurrency": concurrency, "provisioning": scenarios, "status": status,
            "deploy": deploys}


def deploy_wave(inventory, work: Path) -> list[dict]:
    """A model to every site, 8 at once as the rollout flow deploys a wave; then again, unchanged."""
    from edge_agent.train import TrainConfig
    from orchestrator.deploy import deploy_model
    from orchestrator.training import train_on_dataset

    import_elpv(work / "tiny", size=32, sites=1, limit=200)
    train_on_dataset(work / "tiny" / "generic", "tiny_cnn", work / "model", TrainConfig(epochs=1, batch_size=16))
    rows = []
    for name in ("new version", "again (unchanged)"):
        cpu, started = _cpu_seconds(), time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda site: deploy_model(site, inventory, work / "model" / "model.pt", "v-bench"),
                                    inventory.sites))
        rows.append({"name": name, "sites": len(results), "wall_s": round(time.monotonic() - started, 1),
                     "by_status": {s: sum(r.status == s for r in results) for s in ("changed", "ok", "failed")},
                     "why": [f"{r.site}: {r.reason}" for r in results if r.status == "failed"],
                     "cloud_cpu_s_per_site": round((_cpu_seconds() - cpu) / len(results), 3)})
        print(f"deploy {name}: {rows[-1]['wall_s']} s, {rows[-1]['by_status']}", flush=True)
    return rows


def status_polling(sshd, work: Path, sites: list[str]) -> dict:
    """Read 100 heartbeats from an sftp store: one listing (edgeloop) against one read per site (before)."""
    from edge_agent.store import Store
    from orchestrator.health import MAX_HEARTBEAT_BYTES, FleetStatus

    folder = work / "sftp-store" / "status"
    folder.mkdir(parents=True)
    for n, site in enumerate(sites):
        (folder / f"{site}.json").write_text(json.dumps({"site": site, "time": time.time(), "n": n}))
    host = sshd.hosts[0]
    store = Store(f"sftp://127.0.0.1{folder.parent}", {"port": str(host.port), "username": sshd.user,
                                                      "key_filename": str(sshd.client_key),
                                                      "known_hosts": str(sshd.known_hosts)})
    reader = FleetStatus(store)

    def timed(read) -> float:
        started = time.monotonic()
        read()
        return round(time.monotonic() - started, 3)

    store.listing("status")  # connect once, outside the timings
    per_site = timed(lambda: [store.read(f"status/{s}.json", MAX_HEARTBEAT_BYTES) for s in sites])
    first = timed(lambda: reader.read(sites))
    for site in sites[:5]:  # five sites send a new heartbeat
        (folder / f"{site}.json").write_text(json.dumps({"site": site, "time": time.time()}))
    steady = timed(lambda: reader.read(sites))
    return {"sites": len(sites), "per_site_reads_s": per_site, "listing_first_read_s": first,
            "listing_poll_5_changed_s": steady, "fetched_on_poll": reader.fetched}


# report ----------------------------------------------------------------------------------------------------

def _spread(figure: dict) -> str:
    return f"{figure['mean']:.3f} ({figure['min']:.3f}–{figure['max']:.3f})"


def markdown(result: dict) -> str:
    m = result["machine"]
    out = [f"## Past one process, past ten hosts\n\nMachine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}.\n"]
    if "training" in result:
        t = result["training"]
        rows = "\n".join(f"| {r['processes']} | failed: {' '.join(r['error'])[-160:]} | | | {r['wall_s']} | |" if "error" in r
                         else f"| {r['processes']} | {r['device']} | {r['images_per_s']} | {r['train_s']} | {r['wall_s']} | "
                              f"{r['test_acc']:.3f} |" for r in t["rows"])
        out.append(f"""### Training throughput, 1 and 2 processes (DDP)

ResNet-18 on the ELPV generic pool ({next((r['train_images'] for r in t['rows'] if 'train_images' in r), '?')} training images), {t['epochs']} epochs, global
batch {t['global_batch']}; 2 processes split each batch and average gradients with gloo. GPU: {t['gpu']}.

| processes | device | images/s | training (s) | wall incl. launch (s) | test acc |
|---:|---|---:|---:|---:|---:|
{rows}

Reproduce: `.venv/bin/python bench/scale.py --only training`
""")
    if "search" in result:
        budgets = sorted(result["search"].values(), key=lambda b: b["trials"])
        rows = "\n".join(f"| {b['trials']} | {name} | {_spread(v['val_acc'])} | {_spread(v['test_acc'])} |"
                         for b in budgets for name, v in b["summary"].items())
        first = budgets[0]
        out.append(f"""### Random search against a grid of the same budget

The same successive halving for both (rungs of {first['halving']['min_epochs']} to {first['halving']['max_epochs']}
epochs, eta {first['halving']['eta']}), {first['seeds']} seeds (the seed draws the random trials and seeds every
training). Val chose the best trial; test decided nothing. Mean (min–max) over seeds:

| trials | strategy | best trial's val acc | its test acc |
|---:|---|---:|---:|
{rows}

Reproduce: `.venv/bin/python bench/scale.py --only search --trials {' '.join(str(b['trials']) for b in budgets)}`
""")
    if "fleet" in result:
        f = result["fleet"]
        rows = "\n".join(f"| {p['name']} | {p['hosts']} | {p['failed']} | {p['wall_s']} | {p['changed_steps']} | "
                         f"{p['cloud_cpu_s_per_host']} |" for p in f["provisioning"])
        deploy = "".join(f"\n- {d['name']}: {d['wall_s']} s for {d['sites']} sites ({d['by_status']}), "
                         f"{d['cloud_cpu_s_per_site']} cloud CPU s per site" for d in f.get("deploy", []))
        why = "".join(f"\n- {p['name']}: {reason}" for p in f["provisioning"] for reason in p.get("why", []))
        st = f["status"]
        out.append(f"""### A fleet of {f['hosts']} hosts

{f['hosts']} real OpenSSH servers on loopback ports, {f['concurrency']} provisioned at once (`ssh.concurrency`);
every host gets the full provisioning (wheel, venv, config, supervised agent, heartbeat seen). Cloud CPU is
this process's own user + system time (the sshd servers and the agents are other processes).

| run | hosts | failed | wall (s) | changed steps | cloud CPU s/host |
|---|---:|---:|---:|---:|---:|
{rows}
{why}

Status of {st['sites']} sites from an sftp store: one read per site (before) {st['per_site_reads_s']} s; one
listing plus a batched read of all {st['sites']} heartbeats {st['listing_first_read_s']} s; a poll when 5 sites
sent a new heartbeat {st['listing_poll_5_changed_s']} s ({st['fetched_on_poll']} files fetched).

A model deployed to every site, 8 at once (as the rollout flow deploys a wave; sha256-checked upload; the
agents stopped first, so that 100 fine-tunes of the new base on these 2 cores do not measure their overload):
{deploy}

Reproduce: `.venv/bin/python bench/scale.py --only fleet`
""")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["training", "search", "fleet"], action="append")
    parser.add_argument("--size", type=int, default=64, help="image size of the ELPV pool")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs for the throughput runs")
    parser.add_argument("--trials", type=int, nargs="+", default=[8, 16], help="search budgets, in trials")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    parts = args.only or ["training", "search", "fleet"]
    previous = RESULTS / "scale.json"
    result = json.loads(previous.read_text()) if args.only and previous.is_file() else {}
    if "trials" in result.get("search", {}):  # written when the script took one budget
        result["search"] = {str(result["search"]["trials"]): result["search"]}
    result.update({"benchmark": "scale", "machine": machine_info(), "time": time.time(),
                   "command": "python bench/scale.py " + " ".join(argv if argv is not None else sys.argv[1:])})
    with tempfile.TemporaryDirectory(prefix="edgeloop-scale-") as tmp:
        work = Path(tmp)
        data = dataset(work, args.size) if {"training", "search"} & set(parts) else None
        if "training" in parts:
            result["training"] = training(data, work, args.epochs)
        if "search" in parts:
            for trials in args.trials:
                result.setdefault("search", {})[str(trials)] = search(data, work, trials, args.seeds)
        if "fleet" in parts:
            result["fleet"] = fleet(work, args.hosts, args.concurrency)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.out / "scale.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
