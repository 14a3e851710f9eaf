"""The agent's HTTP endpoint under load: 200 concurrent clients posting real images while 1,000 idle
connections are held open, against the real server and a real fused ONNX ensemble in its own process.

Prints and writes bench/results/http_load.json: requests answered by status, connection errors, latency
percentiles, the server's peak RSS, and the longest gap of an inference loop that keeps classifying an
image every 0.5 s in the server process during the load (the agent's own work must go on).

With ``--batches``: throughput per image of the one-image POST against the Open Inference Protocol's batch
infer (``POST /v2/models/ensemble/infer``) with batches of 1, 8 and 32 real ELPV PNGs, as base64 in JSON and
as raw files in the binary tensor data extension, and 32 decoded images as a binary UINT8 tensor; a few
clients (as many as the server's workers) sending back to back. Writes bench/results/http_batches.json.

    .venv/bin/python bench/http_load.py            # 30 s of load
    .venv/bin/python bench/http_load.py --quick    # 8 s
    .venv/bin/python bench/http_load.py --batches  # 10 s per case (--quick: 3 s)
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

# The server process, as lean as the agent's serving side (no torch): the agent's real Server and
# EnsembleHandle over the ensemble the bench exported, and a loop standing in for the agent's inbox work.
SERVER = r"""
import json, os, signal, sys, threading, time
from pathlib import Path
import numpy as np
from edge_agent.activation import activate
from edge_agent.config import ServeConfig
from edge_agent.layout import AgentPaths
from edge_agent.server import Classifier, Server
from edge_agent.serving import EnsembleHandle, classify

paths = AgentPaths(Path(sys.argv[1]))
activate(paths, "v1")
handle = EnsembleHandle(paths.active_link, threads=1, image_size=64)
server = Server(ServeConfig(port=int(sys.argv[2])), Classifier(handle, 10_000_000), lambda: {"ok": True}).start()
gaps, fds, stop = [], [], threading.Event()
def inbox_loop():
    image, last = np.zeros((1, 64, 64), np.uint8), time.monotonic()
    while not stop.is_set():
        classify(handle.get(), image)
        now = time.monotonic(); gaps.append(now - last); last = now
        fds.append(len(os.listdir("/proc/self/fd")))  # the descriptors the server holds, sampled
        stop.wait(0.5)
threading.Thread(target=inbox_loop, daemon=True).start()
print("ready", flush=True)
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
server.stop()
print(json.dumps({"inbox_ticks": len(gaps), "inbox_max_gap_s": round(max(gaps[1:] or [0]), 3),
                  "server_max_open_fds": max(fds or [0]),
                  # VmHWM, not ru_maxrss: the latter keeps the peak of the parent that forked us
                  "server_peak_rss_mb": int(next(l for l in open("/proc/self/status")
                                                 if l.startswith("VmHWM")).split()[1]) / 1024}), flush=True)
"""


def export(root: Path) -> None:
    """An ensemble of three tiny CNNs at 64 px (the input size the demo's sites serve)."""
    sys.path.insert(0, str(REPO))
    from edge_agent.ensemble import export_ensemble
    from edge_agent.layout import AgentPaths
    from edge_agent.models import ModelSpec, Normalization, build_model

    paths = AgentPaths(root)
    paths.ensure()
    (paths.ensembles / "v1").mkdir(parents=True)
    spec = ModelSpec(arch="tiny_cnn", num_classes=2, image_size=64)
    export_ensemble([build_model(spec, seed=i) for i in range(3)], [Normalization()] * 3, [1 / 3] * 3,
                    paths.ensembles / "v1" / "ensemble.onnx", image_size=64, class_names=["functional", "defective"],
                    metadata={"version": "v1"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def images(n: int) -> list[bytes]:
    import elpv_dataset  # the package ships the real images

    files = sorted((Path(elpv_dataset.__file__).parent / "data" / "images").glob("*.png"))[:n]
    return [f.read_bytes() for f in files]


def client(port: int, bodies: list[bytes], until: float, out: list, index: int) -> None:
    i = index
    while time.monotonic() < until:
        body = bodies[i % len(bodies)]
        i += 1
        started = time.monotonic()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/classify", data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                answer.read()
                out.append((answer.status, time.monotonic() - started))
        except urllib.error.HTTPError as error:
            out.append((error.code, time.monotonic() - started))
            if error.code == 503:
                time.sleep(0.05)  # the endpoint said busy; a polite client backs off a little
        except OSError as exc:
            reason = getattr(exc, "reason", exc)
            out.append((f"{type(exc).__name__}: {type(reason).__name__}", time.monotonic() - started))


INFER = "/v2/models/ensemble/infer"


def machine() -> dict:
    """What the figures were measured on, and how busy it was (the load average at the end)."""
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": model,
            "python": platform.python_version(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def batch_requests(files: list[bytes], n: int) -> dict[str, tuple[str, bytes, dict]]:
    """The request bodies of each case for a batch of ``n`` images: (path, body, headers)."""
    chosen = [files[i % len(files)] for i in range(n)]
    as_json = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [n],
                                      "data": [base64.b64encode(f).decode() for f in chosen]}]}).encode()
    raw = b"".join(struct.pack("<I", len(f)) + f for f in chosen)
    head = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [n],
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    cases = {f"v2 BYTES base64 JSON, batch {n}": (INFER, as_json, {"Content-Type": "application/json"}),
             f"v2 BYTES binary, batch {n}": (INFER, head + raw, {"Inference-Header-Content-Length": str(len(head))})}
    if n == 32:
        from edge_agent.imaging import decode_image

        pixels = b"".join(decode_image(f, 64).tobytes() for f in chosen)
        head = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [n, 64, 64],
                                       "parameters": {"binary_data_size": len(pixels)}}]}).encode()
        cases[f"v2 UINT8 tensor binary (decoded 64 px), batch {n}"] = (
            INFER, head + pixels, {"Inference-Header-Content-Length": str(len(head))})
    return cases


def hammer(port: int, path: str, body: bytes, headers: dict, until: float, out: list) -> None:
    """Send one request after another until ``until``: (status, seconds) each."""
    while time.monotonic() < until:
        started = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            connection.request("POST", path, body, headers)
            answer = connection.getresponse()
            answer.read()
            out.append((answer.status, time.monotonic() - started))
        except OSError as exc:
            out.append((type(exc).__name__, time.monotonic() - started))
        finally:
            connection.close()


def measure(port: int, path: str, body: bytes, headers: dict, images: int, clients: int, seconds: float) -> dict:
    results: list = []
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=hammer, args=(port, path, body, headers, until, results))
               for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    ok = sorted(t for status, t in results if status == 200)
    served = len(ok) * images
    return {"batch": images, "requests_ok": len(ok), "requests_other": len(results) - len(ok),
            "body_bytes": len(body), "images_per_s": round(served / elapsed, 1),
            "ms_per_image": round(elapsed * 1000 / served, 2) if served else None,
            "request_p50_ms": round(ok[len(ok) // 2] * 1000, 1) if ok else None}


def batches(args: argparse.Namespace) -> int:
    """Throughput per image: the one-image POST against v2 batches of 1, 8 and 32 (see the module doc)."""
    sys.path.insert(0, str(REPO))
    seconds, clients = (3.0 if args.quick else 10.0), args.batch_clients
    files, port = images(64), free_port()
    cases = {"POST /classify (one image)": ("/classify", files[0], {}, 1)}
    for n in (1, 8, 32):
        cases.update({name: (*request, n) for name, request in batch_requests(files, n).items()})
    out: dict[str, dict] = {}
    with serving(port) as proc:
        for name, (path, body, headers, n) in cases.items():
            measure(port, path, body, headers, n, clients, min(1.0, seconds))  # warm-up
            out[name] = measure(port, path, body, headers, n, clients, seconds)
            print(f"{name:55s} {out[name]['images_per_s']:8.1f} images/s  {out[name]['ms_per_image']} ms/image",
                  flush=True)
        proc.terminate()
        server_stats = json.loads(proc.stdout.read().strip().splitlines()[-1])
    base = out["POST /classify (one image)"]["images_per_s"]
    for result in out.values():
        result["vs_one_image_post"] = round(result["images_per_s"] / base, 2) if base else None
    result = {"benchmark": "http_batches",
              "command": "python bench/http_load.py --batches" + (" --quick" if args.quick else ""),
              "seconds_per_case": seconds, "clients": clients, "server_workers": 4,
              "images": "real ELPV PNGs (300x300 grey, about 26 kB each), decoded and resized to 64 px by the server",
              "model": "fused ensemble of 3 tiny_cnn members, 64 px, onnxruntime 1 thread a session",
              "cases": out, "inbox_max_gap_s": server_stats["inbox_max_gap_s"],
              "server_peak_rss_mb": server_stats["server_peak_rss_mb"], "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "http_batches.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


class serving:
    """The server process (``SERVER``) over a freshly exported ensemble, for the time of a ``with``."""

    def __init__(self, port: int):
        self.port = port

    def __enter__(self) -> subprocess.Popen:
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-http-")
        export(Path(self.tmp.name))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, self.tmp.name, str(self.port)],
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout.readline().strip() == "ready"
        return self.proc

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.tmp.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--batches", action="store_true", help="throughput per image: one-image POST vs v2 batches")
    parser.add_argument("--batch-clients", type=int, default=4, help="clients in --batches (the server's workers)")
    args = parser.parse_args()
    if args.batches:
        return batches(args)
    seconds = 8.0 if args.quick else 30.0
    port = free_port()
    with serving(port) as proc:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.idle)]
        bodies, results = images(64), []
        until = time.monotonic() + seconds
        threads = [threading.Thread(target=client, args=(port, bodies, until, results, i)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        probe_started = time.monotonic()
        probe = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/classify", data=bodies[0],
                                                              method="POST"), timeout=30).status
        probe_s = time.monotonic() - probe_started
        idle_closed = 0
        for sock in idle:  # how many of the idle connections the server has closed (evicted, timed out)
            sock.setblocking(False)
            try:
                idle_closed += sock.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                idle_closed += 1
            sock.close()
        proc.terminate()
        server_stats = json.loads(proc.stdout.read().strip().splitlines()[-1])
    latencies = sorted(t for status, t in results if status == 200)
    by_status: dict[str, int] = {}
    for status, _ in results:
        by_status[str(status)] = by_status.get(str(status), 0) + 1

    def pct(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1) if latencies else None

    result = {
        "benchmark": "http_load", "command": "python bench/http_load.py" + (" --quick" if args.quick else ""),
        "seconds": seconds, "clients": args.clients, "idle_connections": args.idle,
        "model": "fused ensemble of 3 tiny_cnn members, 64 px, onnxruntime 1 thread",
        "answers_by_status": by_status, "served_per_s": round(by_status.get("200", 0) / seconds, 1),
        "latency_ms_200": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                           "mean": round(statistics.mean(latencies) * 1000, 1) if latencies else None},
        "after_load_probe": {"status": probe, "seconds": round(probe_s, 3)},
        "idle_closed_by_server": idle_closed,
        **server_stats,
        "machine": machine(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "http_load.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
