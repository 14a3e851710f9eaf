"""Benchmark: the cloud's fleet-status poll of 100 sites on an S3 store against an sftp store, same run.

Both stores are real servers on loopback, each a process of its own: OpenSSH's sshd (sftp) and moto's S3
API server (``python -m orchestrator.s3local``, signatures checked). The 100 heartbeats are written as the
agents write them (``Store.put_verified``); then :class:`orchestrator.health.FleetStatus` polls: a first
read (one listing, all 100 fetched), a poll after 5 sites sent a new heartbeat (one listing, 5 fetched)
and a poll with nothing new (one listing). The stores' rounds alternate, so both see the same load; each
figure is the median of ``--rounds`` with its range.

Reproduce: ``.venv/bin/python bench/store_poll.py`` (about a minute). Writes
``bench/results/store_poll.json`` and ``bench/results/store_poll.md`` (the BENCHMARKS.md rows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_agent.store import Store  # noqa: E402
from orchestrator.health import FleetStatus  # noqa: E402
from orchestrator.sshfleet import SshdFleet  # noqa: E402
from orchestrator.training import machine_info  # noqa: E402

RESULTS = REPO / "bench" / "results"


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def figure(samples: list[float]) -> dict:
    return {"median_s": round(statistics.median(samples), 4), "min_s": round(min(samples), 4),
            "max_s": round(max(samples), 4), "n": len(samples)}


def heartbeat(site: str, n: int) -> bytes:
    return json.dumps({"site": site, "time": time.time(), "state": "idle", "n": n, "queues": {"outbox": 0}},
                      sort_keys=True).encode()


class Poller:
    """One store's figures, taken a round at a time so that the stores' rounds can alternate."""

    def __init__(self, store: Store, sites: list[str]):
        self.store, self.sites = store, sites
        self.first: list[float] = []
        self.changed: list[float] = []
        self.unchanged: list[float] = []
        self.fetched: set[int] = set()
        store.listing("status")  # connect once, outside the timings
        self.write_s = timed(lambda: [store.put_verified(f"status/{s}.json", heartbeat(s, 0)) for s in sites])

    def round(self, r: int) -> None:
        """A first read (every heartbeat), a poll after 5 sites sent a new one, a poll with nothing new."""
        reader = FleetStatus(self.store)
        self.first.append(timed(lambda: reader.read(self.sites)))
        assert reader.fetched == len(self.sites), reader.error
        for site in self.sites[:5]:
            self.store.put_verified(f"status/{site}.json", heartbeat(site, r))
        self.changed.append(timed(lambda: reader.read(self.sites)))
        self.fetched.add(reader.fetched)
        self.unchanged.append(timed(lambda: reader.read(self.sites)))
        assert reader.fetched == 0, reader.error

    def result(self) -> dict:
        return {"write_100_heartbeats_s": round(self.write_s, 3), "first_read": figure(self.first),
                "poll_5_changed": figure(self.changed), "poll_unchanged": figure(self.unchanged),
                "fetched_on_5_changed_poll": sorted(self.fetched)}


def sftp_store(work: Path) -> tuple[Store, SshdFleet]:
    fleet = SshdFleet(work / "sshd", 1).start()
    store = Store(f"sftp://127.0.0.1{work / 'sftp-store'}", {
        "port": str(fleet.hosts[0].port), "username": fleet.user, "key_filename": str(fleet.client_key),
        "known_hosts": str(fleet.known_hosts)})
    return store, fleet


def s3_store() -> tuple[Store, subprocess.Popen]:
    """moto's S3 server in its own process (as sshd is), its credentials in this process's environment."""
    server = subprocess.Popen([sys.executable, "-m", "orchestrator.s3local"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    ready = json.loads(server.stdout.readline())
    os.environ.update(ready["env"])
    return Store(ready["url"], ready["options"]), server


def markdown(result: dict) -> str:
    rows = []
    for name in ("s3", "sftp"):
        r = result["stores"][name]
        rows.append(f"| {name} | {r['first_read']['median_s']:.3f} ({r['first_read']['min_s']:.3f}–"
                    f"{r['first_read']['max_s']:.3f}) | {r['poll_5_changed']['median_s']:.3f} "
                    f"({r['poll_5_changed']['min_s']:.3f}–{r['poll_5_changed']['max_s']:.3f}) | "
                    f"{r['poll_unchanged']['median_s']:.3f} ({r['poll_unchanged']['min_s']:.3f}–"
                    f"{r['poll_unchanged']['max_s']:.3f}) | {r['write_100_heartbeats_s']:.2f} |")
    load = result["load_average"]
    return (f"Fleet status of {result['sites']} sites, one listing per poll, median (range) of "
            f"{result['rounds']} rounds; load average {load['before']:.1f} before, {load['after']:.1f} after:\n\n"
            "| store | first read (100 fetched) s | poll, 5 changed s | poll, none changed s | "
            "100 heartbeat writes s |\n|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sites = [f"site-{n:03d}" for n in range(args.sites)]
    result = {"benchmark": "store_poll", "machine": machine_info(), "time": time.time(), "sites": args.sites,
              "rounds": args.rounds, "load_average": {"before": os.getloadavg()[0]}, "stores": {},
              "command": "python bench/store_poll.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="edgeloop-store-poll-") as tmp:
        sftp, sshd = sftp_store(Path(tmp))
        s3, server = s3_store()
        try:
            pollers = {"sftp": Poller(sftp, sites), "s3": Poller(s3, sites)}
            for r in range(1, args.rounds + 1):  # alternate, so that both see the same load
                for poller in pollers.values():
                    poller.round(r)
            result["stores"] = {name: poller.result() for name, poller in pollers.items()}
        finally:
            sshd.stop()
            server.terminate()
            server.wait(10)
    result["load_average"]["after"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "store_poll.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.out / "store_poll.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
