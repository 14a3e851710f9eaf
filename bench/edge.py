"""Edge benchmark on the ELPV site sets: parallel vs sequential member fine-tuning, member and ensemble
accuracy, and inference speed of torch eager, onnxruntime FP32 and INT8, fused ensemble vs K sessions.

    .venv/bin/python bench/edge.py            # full run (ResNet-18 members at 64 px; ~10 min on 2 cores)
    .venv/bin/python bench/edge.py --quick    # tiny_cnn at 32 px on a few hundred images (~2 min)

Writes bench/results/edge.json (numbers + machine) and bench/results/edge.md (the BENCHMARKS.md section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.config import AgentConfig, FinetuneConfig, MemberConfig, ServeConfig  # noqa: E402
from edge_agent.layout import AgentPaths  # noqa: E402

RESULTS = REPO / "bench" / "results"
POLICIES = ("flips", "contrast", "geometric")


def machine() -> dict:
    import onnxruntime
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def prepare(work: Path, size: int, limit: int | None, arch: str, base_epochs: int) -> tuple[Path, Path]:
    """ELPV split into a generic pool and two site sets; a base model pretrained on the generic pool."""
    from edge_agent.datasets import import_elpv
    from edge_agent.train import TrainConfig
    from orchestrator.training import train_on_dataset

    data = work / "elpv"
    import_elpv(data, size=size, sites=2, limit=limit)
    train_on_dataset(data / "generic", arch, work / "base", TrainConfig(epochs=base_epochs, batch_size=32))
    return data, work / "base" / "model.pt"


def site_root(work: Path, name: str, data: Path, base: Path, arch: str, size: int, epochs: int) -> AgentConfig:
    import hashlib

    root = work / name
    paths = AgentPaths(root)
    paths.ensure()
    version = paths.base_models / "v1"
    version.mkdir(parents=True)
    shutil.copy(base, version / "model.pt")
    (version / "model.pt.sha256").write_text(hashlib.sha256(base.read_bytes()).hexdigest())
    shutil.copytree(data / "sites" / "site-1", paths.labelled, dirs_exist_ok=True)
    return AgentConfig(site="site-1", root=root, store_url=f"file://{work / 'store'}", image_size=size,
                       members=[MemberConfig(arch=arch, policy=p) for p in POLICIES],
                       finetune=FinetuneConfig(epochs=epochs, batch_size=32, lr=1e-3), serve=ServeConfig(port=0))


def import_seconds() -> float:
    """Wall time a fresh worker spends importing torch + torchvision + albumentations (paid per process)."""
    import subprocess

    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import edge_agent.train, edge_agent.models"], cwd=REPO, check=True)
    return round(time.perf_counter() - start, 2)


def timed_finetune(config: AgentConfig, parallel: bool) -> dict:
    from edge_agent.finetune import run_finetune

    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    before_self = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    report = run_finetune(config, AgentPaths(config.root), "bench-" + ("parallel" if parallel else "sequential"),
                          "benchmark", lambda: False, parallel=parallel)
    wall = time.perf_counter() - start
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    after_self = resource.getrusage(resource.RUSAGE_SELF)
    cpu = sum(getattr(after_children, f) - getattr(before_children, f) + getattr(after_self, f) - getattr(before_self, f)
              for f in ("ru_utime", "ru_stime"))
    cores = os.cpu_count() or 1
    return {"mode": "parallel" if parallel else "sequential", "wall_s": round(wall, 2),
            "train_wall_s": report["train_seconds"], "cpu_s": round(cpu, 2),
            "cpu_utilisation": round(cpu / (wall * cores), 3), "threads_per_member": report["members"][0]["threads"],
            "member_train_s": [m["seconds"] for m in report["members"]],
            "members": [{k: m[k] for k in ("index", "arch", "policy", "test_accuracy", "val_accuracy", "seconds")}
                        for m in report["members"]],
            "ensemble_test_accuracy": report["candidates"]["new"]["test"]["accuracy"],
            "ensemble_val_accuracy": report["ensemble"]["val"]["accuracy"],
            "base_as_is_test_accuracy": report["candidates"]["base"]["test"]["accuracy"],
            "serving": report["serving"], "precision": (report["precision"] or {}).get("serving"),
            "weights": report["ensemble"]["weights"], "test_n": report["candidates"]["new"]["test"]["n"],
            "run_dir": str(Path(config.root) / "runs" / report["run_id"]), "version": report["version"]}


def latency(fn, images: np.ndarray, batch: int, seconds: float) -> dict:
    """Median batch latency and throughput over repeated calls on real images."""
    if len(images) < batch:  # a small test split: repeat it to fill a batch
        images = np.resize(images, (batch, *images.shape[1:]))
    batches = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)]
    fn(batches[0])  # warm-up
    times, n, deadline = [], 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        x = batches[n % len(batches)]
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
        n += 1
    median = statistics.median(times)
    return {"batch": batch, "latency_ms": round(median * 1000, 3), "images_per_s": round(batch / median, 1),
            "calls": len(times)}


def inference_bench(run: dict, config: AgentConfig, data: Path, seconds: float) -> dict:
    import torch

    from edge_agent.datasets import open_dataset
    from edge_agent.ensemble import accuracy, export_ensemble
    from edge_agent.export import Classifier, export_onnx, quantize_int8
    from edge_agent.models import load_checkpoint
    from edge_agent.onnx_model import OnnxClassifier

    site = open_dataset(data / "sites" / "site-1")
    test, calib = site.load_split("test", config.image_size), site.load_split("train", config.image_size)
    run_dir, cores = Path(run["run_dir"]), os.cpu_count() or 1
    torch.set_num_threads(cores)
    out = Path(run_dir) / "bench"
    model, meta = load_checkpoint(run_dir / "member-0.pt")
    eager = Classifier(model, meta.normalization).eval()
    fp32 = export_onnx(eager, out / "member0.onnx", image_size=config.image_size, class_names=meta.class_names)
    int8 = quantize_int8(fp32, out / "member0.int8.onnx", calib.images[:128])

    @torch.no_grad()
    def run_eager(x):
        return eager(torch.from_numpy(x[:, None].astype(np.float32))).numpy()

    sessions = {"onnx_fp32": OnnxClassifier(fp32, cores), "onnx_int8": OnnxClassifier(int8, cores)}
    engines = {"torch_eager": run_eager, **{k: s.predict for k, s in sessions.items()}}
    single = {}
    for name, fn in engines.items():
        single[name] = {"accuracy": accuracy(fn(test.images), test.labels),
                        "speed": [latency(fn, test.images, b, seconds) for b in (1, 32)]}
    single["onnx_fp32"]["bytes"], single["onnx_int8"]["bytes"] = fp32.stat().st_size, int8.stat().st_size

    loaded = [load_checkpoint(run_dir / f"member-{k}.pt") for k in range(len(config.members))]
    weights = np.array(run["weights"])
    # the run's fused FP32 graph, exported again: the agent publishes it only when it beats the base as-is
    fused = OnnxClassifier(export_ensemble([m for m, _ in loaded], [mm.normalization for _, mm in loaded], weights,
                                           out / "fused.onnx", image_size=config.image_size,
                                           class_names=loaded[0][1].class_names, metadata={}), cores)
    members = [OnnxClassifier(export_onnx(Classifier(m, mm.normalization), out / f"member{k}.onnx",
                                          image_size=config.image_size, class_names=mm.class_names), cores)
               for k, (m, mm) in enumerate(loaded)]

    def separate(x):
        return np.einsum("knc,k->nc", np.stack([s.predict(x) for s in members]), weights)

    ensemble = {"fused_graph": {"accuracy": accuracy(fused.predict(test.images), test.labels),
                                "speed": [latency(fused.predict, test.images, b, seconds) for b in (1, 32)]},
                "k_sessions": {"accuracy": accuracy(separate(test.images), test.labels),
                               "speed": [latency(separate, test.images, b, seconds) for b in (1, 32)]}}
    return {"single_member": single, "ensemble": ensemble, "test_n": int(len(test)), "threads": cores}


def markdown(result: dict) -> str:
    p, s = result["finetune"]["parallel"], result["finetune"]["sequential"]
    m = result["machine"]
    lines = [
        "## Edge agent: parallel fine-tuning, ensemble, inference",
        "",
        f"Reproduce: `{result['command']}` ({result['settings']['arch']} members at "
        f"{result['settings']['image_size']} px, {result['settings']['epochs']} epoch(s), ELPV site-1: "
        f"{result['settings']['counts']}). Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}.",
        "",
        "| K=3 members | wall s | of which training s | CPU s | CPU use (of all cores) | threads/member |",
        "|---|---|---|---|---|---|",
    ]
    for run in (p, s):
        lines.append(f"| {run['mode']} | {run['wall_s']} | {run['train_wall_s']} | {run['cpu_s']} | "
                     f"{run['cpu_utilisation']:.0%} | {run['threads_per_member']} |")
    lines += ["", f"Each worker process first spends about {result['worker_import_s']} s importing torch, torchvision "
              "and albumentations (measured alone); \"of which training\" includes that start-up, the members' own "
              f"training loops took {p['member_train_s']} s (parallel) and {s['member_train_s']} s (sequential)."]
    lines += ["", f"Test accuracy on the site's test split (n={p['test_n']}), parallel run:", "",
              "| model | policy | test accuracy |", "|---|---|---|"]
    for member in p["members"]:
        lines.append(f"| member {member['index']} ({member['arch']}) | {member['policy']} | {member['test_accuracy']:.3f} |")
    lines.append(f"| ensemble (weights {', '.join(f'{w:.2f}' for w in p['weights'])}) | soft vote | "
                 f"{p['ensemble_test_accuracy']:.3f} |")
    inf = result["inference"]
    lines += ["", f"Inference, one member, {inf['threads']} threads (n={inf['test_n']} test images):", "",
              "| engine | accuracy | batch 1 ms | batch 1 img/s | batch 32 ms | batch 32 img/s |", "|---|---|---|---|---|---|"]
    for name, row in list(inf["single_member"].items()) + [(f"ensemble: {k}", v) for k, v in inf["ensemble"].items()]:
        b1, b32 = row["speed"]
        lines.append(f"| {name} | {row['accuracy']:.3f} | {b1['latency_ms']} | {b1['images_per_s']} | "
                     f"{b32['latency_ms']} | {b32['images_per_s']} |")
    lines += ["", "CPU use = (user+sys CPU of the bench process and its workers) / (wall × cores). "
              "Small test splits: one image is several points of accuracy.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny_cnn at 32 px on a few hundred images")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)
    settings = ({"arch": "tiny_cnn", "image_size": 32, "limit": 400, "epochs": 2, "base_epochs": 3, "seconds": 1.0}
                if args.quick else
                {"arch": "resnet18", "image_size": 64, "limit": None, "epochs": 5, "base_epochs": 8, "seconds": 3.0})
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeloop-bench-"))
    started = time.time()
    data, base = prepare(work, settings["image_size"], settings["limit"], settings["arch"], settings["base_epochs"])
    runs = {}
    for parallel in (True, False):
        config = site_root(work, "parallel" if parallel else "sequential", data, base, settings["arch"],
                           settings["image_size"], settings["epochs"])
        runs["parallel" if parallel else "sequential"] = timed_finetune(config, parallel)
        print(json.dumps({k: v for k, v in runs[list(runs)[-1]].items() if k != "members"}), flush=True)
    parallel_config = site_root(work, "scratch", data, base, settings["arch"], settings["image_size"], settings["epochs"])
    parallel_config.root = work / "parallel"
    from edge_agent.datasets import open_dataset

    settings["counts"] = {s: sum(c.values()) for s, c in open_dataset(data / "sites" / "site-1").counts().items()}
    result = {"command": "python bench/edge.py" + (" --quick" if args.quick else ""), "settings": settings,
              "machine": machine(), "finetune": runs, "worker_import_s": import_seconds(),
              "inference": inference_bench(runs["parallel"], parallel_config, data, settings["seconds"]),
              "seconds": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "edge.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "edge.md").write_text(markdown(result))
    print(markdown(result))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
