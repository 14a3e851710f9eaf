"""Benchmark: provision 10 real sshd hosts serially and concurrently, then re-run on unchanged hosts; and
bare hosts per install profile (wheelhouse ``edge-serve`` and ``edge``) against the ``system`` baseline.

Reproduce: ``.venv/bin/python bench/provision.py`` (needs /usr/sbin/sshd; about 10 minutes on 2 cores:
the ``edge`` profile ships about 3 GB of wheels). Writes ``bench/results/provision.json`` (figures and
machine info) and ``bench/results/provision.md`` (the section for BENCHMARKS.md). Each scenario provisions
fresh agent roots, so the serial and the concurrent runs do the same work; "re-run" provisions the
concurrent run's hosts again, unchanged. ``--profiles-only`` runs the per-profile part alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.inventory import load_inventory  # noqa: E402
from orchestrator.provision import MANUAL_COMMANDS, STEPS, build_wheel, provision  # noqa: E402
from orchestrator.sshfleet import SshdFleet, fleet_inventory, stop_agents  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}


def scenario(name: str, inventory_path: Path, concurrency: int, wheel) -> dict:
    report = provision(load_inventory(inventory_path), concurrency=concurrency, wheel=wheel)
    if report.failed:
        raise SystemExit(f"{name}: hosts failed:\n{report.recap()}")
    per_host = sorted(h.seconds for h in report.hosts)
    print(f"{name:<28} {report.seconds:7.1f} s  changed steps {report.changed}")
    return {"name": name, "concurrency": concurrency, "hosts": len(report.hosts), "wall_s": round(report.seconds, 2),
            "host_median_s": round(per_host[len(per_host) // 2], 2), "host_max_s": round(per_host[-1], 2),
            "changed_steps": report.changed,
            "step_median_s": {s: round(sorted(st.seconds for h in report.hosts for st in h.steps
                                              if st.step == s)[len(report.hosts) // 2], 2) for s in STEPS},
            "remote_commands": sum(h.commands for h in report.hosts)}


# ------------------------------------------------------------------ bare hosts, per install profile

PROFILES = (("system", "{mode: system}"), ("edge-serve", "{mode: wheelhouse, profile: edge-serve}"),
            ("edge", "{mode: wheelhouse, profile: edge}"))


def du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> tuple[int, int, int]:
    """RSS of the agent ``pid``, of it and all its descendants, and of the largest process two or more levels
    below it (a member: agent → fine-tune → [forkserver →] member), bytes."""
    from orchestrator.sshfleet import _descendants

    children = set(_descendants(pid))
    grandchildren = {g for c in children for g in _descendants(c)}
    return rss(pid), rss(pid) + sum(map(rss, children)), max(map(rss, grandchildren), default=0)


def peak_rss(pid: int, until, timeout_s: float) -> tuple[int, int, int, float]:
    """Peak RSS (agent, agent + descendants, largest member) sampled every 0.2 s until ``until()`` or the
    timeout, and the seconds taken."""
    peaks, start = (0, 0, 0), time.monotonic()
    while time.monotonic() - start < timeout_s and not until():
        peaks = tuple(max(a, b) for a, b in zip(peaks, tree_rss(pid)))
        time.sleep(0.2)
    return (*peaks, time.monotonic() - start)


def status(root: Path) -> dict:
    return json.loads((root / "status.json").read_text())


def footprint(site, inventory, root: Path, data: Path, images: int, finetune: bool) -> dict:
    """The agent's RSS idle, while classifying ``images`` inbox images, and (edge) during a K=3 fine-tune."""
    import numpy as np
    import torch

    from edge_agent.imaging import encode_png
    from edge_agent.models import CheckpointMeta, ModelSpec, build_model, save_checkpoint
    from orchestrator.deploy import deploy_model

    time.sleep(5)
    pid = status(root)["pid"]
    idle = tree_rss(pid)[0]
    spec = ModelSpec(arch="resnet18", num_classes=2, image_size=site.learning.image_size)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(root.parent / f"{site.name}-base.pt", build_model(spec, seed=0),
                                 CheckpointMeta(spec=spec, class_names=["defective", "functional"]))
    if finetune:  # labelled site data first, so the new base starts a fine-tune at once
        for cls in ("defective", "functional"):
            (root / "data" / "labelled" / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted((data / cls).glob("*.png")):
                (root / "data" / "labelled" / cls / f.name).write_bytes(f.read_bytes())
    result = deploy_model(site, inventory, checkpoint, "v-bench")
    if result.status == "failed":
        raise SystemExit(f"deploy to {site.name} failed: {result.reason}")
    out = {"rss_idle_mb": round(idle / 2**20, 1)}
    if finetune:
        started = peak_rss(pid, lambda: status(root)["finetune"]["running"], 60)
        peak, tree, largest, seconds = peak_rss(pid, lambda: not status(root)["finetune"]["running"], 1800)
        out.update(rss_finetune_agent_mb=round(peak / 2**20, 1), rss_finetune_tree_mb=round(tree / 2**20, 1),
                   rss_member_mb=round(largest / 2**20, 1), finetune_s=round(seconds + started[-1], 1),
                   members_at_once=json.loads(max((root / "runs").glob("*/report.json"),
                                                  key=lambda p: p.stat().st_mtime).read_text()).get("members_at_once"))
    else:
        peak_rss(pid, lambda: status(root).get("active_version") == "base-v-bench", 60)
    rng = np.random.default_rng(0)
    for i in range(images):
        (root / "data" / "inbox" / f"load-{i:04d}.png").write_bytes(
            encode_png((rng.random((site.learning.image_size,) * 2) * 255).astype(np.uint8)))
    peak, _, _, seconds = peak_rss(pid, lambda: not any((root / "data" / "inbox").glob("*.png")), 600)
    out.update(rss_serving_mb=round(peak / 2**20, 1), serving_images=images,
               serving_images_per_s=round(images / max(seconds, 1e-3), 1))
    return out


def profile_scenarios(work: Path, fleet: SshdFleet, wheel, bare_python: str, data: Path, images: int,
                      profiles: list[str]) -> list[dict]:
    """Each profile on its own bare host: fresh provisioning (time, bytes shipped, venv disk), the re-run,
    then the agent's memory. ``system`` reuses this venv's packages (the hosts' base interpreter)."""
    rows = []
    work.mkdir(parents=True, exist_ok=True)
    try:
        for host, (name, install) in zip(fleet.hosts, [p for p in PROFILES if p[0] in profiles]):
            rows.append(one_profile(work, fleet, host, name, install, wheel, bare_python, data, images))
    finally:
        for name, _ in PROFILES:
            stop_agents(work / name)
    return rows


def one_profile(work: Path, fleet: SshdFleet, host, name: str, install: str, wheel, bare_python: str, data: Path,
                images: int) -> dict:
    """One profile on one bare host: provision, re-run, then the agent's memory (:func:`footprint`)."""
    python = sys.executable if name == "system" else bare_python
    path = fleet_inventory(fleet, work / f"{name}.yaml", work / name, python=python, install=install)
    path.write_text(path.read_text().replace("cloud:\n", f"cloud:\n  wheelhouse: {work / 'wheelhouse'}\n")
                    .replace("members: [{arch: resnet18, policy: flips}, {arch: resnet18, policy: contrast}]",
                             "members: [{arch: resnet18, policy: flips}, {arch: resnet18, policy: noise}, "
                             "{arch: resnet18, policy: none}]\n    finetune: {epochs: 1, batch_size: 32}"))
    inventory = load_inventory(path)
    start = time.monotonic()
    house = work / "wheelhouse"
    fresh = provision(inventory, wheel=wheel, limit=[host.name])
    if fresh.failed:
        raise SystemExit(f"{name}: {fresh.recap()}")
    rerun = provision(inventory, wheel=wheel, limit=[host.name])
    root = work / name / host.name
    row = {"profile": name, "install": install, "fresh_s": round(fresh.seconds, 1),
           "fresh_shipped_mb": round(fresh.hosts[0].shipped_bytes / 2**20, 1),
           "rerun_s": round(rerun.seconds, 2), "rerun_shipped_bytes": rerun.hosts[0].shipped_bytes,
           "rerun_changed_steps": rerun.changed, "venv_mb": round(du(root / "venv") / 2**20, 1),
           "wheelhouse_mb": round(du(house) / 2**20, 1) if house.exists() else 0,
           "step_s": {s.step: round(s.seconds, 1) for s in fresh.hosts[0].steps}}
    row.update(footprint(inventory.site(host.name), inventory, root, data, images, finetune=name != "edge-serve"))
    row["total_s"] = round(time.monotonic() - start, 1)
    print(json.dumps(row))
    return row


def markdown(result: dict) -> str:
    rows = "\n".join(f"| {s['name']} | {s['concurrency']} | {s['wall_s']:.1f} | {s['host_median_s']:.1f} | "
                     f"{s['changed_steps']} |" for s in result["scenarios"])
    m = result["machine"]
    manual = result["manual_commands"]
    return f"""## Provisioning a fleet over SSH

{result['hosts']} real OpenSSH servers (`sshd` on loopback ports, one host key each, key authentication only)
stand in for edge hosts; each is provisioned end to end: facts, folders, wheel upload (sha256-checked),
venv install reusing the base interpreter's torch, agent config, supervised service, start, heartbeat seen.
Machine: {m['platform']}, {m['cpu_count']} CPUs, Python {m['python']}.

| run | hosts at once | wall (s) | median per host (s) | changed steps |
|---|---:|---:|---:|---:|
{rows}

- Concurrency: {result['speedup']:.1f}x faster than one host at a time on this {m['cpu_count']}-core machine (the
  hosts share its CPUs; on a real fleet each host brings its own, so the gain grows with the limit).
- Idempotence: the re-run on unchanged hosts changed {result['scenarios'][2]['changed_steps']} steps and
  restarted no agent.
- By hand the same work is about {manual['per_host']} commands per host ({manual['fleet']} for the fleet,
  {', '.join(f'{k} {v}' for k, v in manual['per_step'].items())}); here it is one command:
  `edgeloop provision -i inventory.yaml`.

Reproduce: `.venv/bin/python bench/provision.py` (writes `bench/results/provision.json`).
""" + profiles_markdown(result)


def profiles_markdown(result: dict) -> str:
    rows = result.get("profiles") or []
    if not rows:
        return ""
    table = "\n".join(
        f"| {r['profile']} | {r['fresh_s']:.1f} | {r['step_s']['facts']:.1f} | {r['step_s']['wheel']:.1f} | "
        f"{r['step_s']['install']:.1f} | {r['fresh_shipped_mb']:.1f} | {r['rerun_s']:.2f} | "
        f"{r['rerun_shipped_bytes']} | {r['venv_mb']:.0f} |" for r in rows)
    memory = "\n".join(
        f"| {r['profile']} | {r['rss_idle_mb']:.0f} | {r['rss_serving_mb']:.0f} ({r['serving_images_per_s']:.0f} "
        f"img/s) | {r.get('rss_finetune_tree_mb', '-')} | {r.get('rss_member_mb', '-')} | "
        f"{r.get('members_at_once', '-')} |" for r in rows)
    return f"""
### Bare hosts by install profile

One sshd host per profile whose `python:` is a bare interpreter (a venv with no packages), except `system`,
the baseline that reuses this machine's full venv (torch & co.) as before; all in the same run. Wheelhouse
installs run with no index reachable from the host. Fresh = first provisioning of a host, with the
wheelhouse empty (facts = resolving the platform's wheels with `pip download` from this machine's mirror and
hashing them; wheel = shipping over SFTP; install = venv, pip bootstrap, `pip install --no-index`);
re-run = the same inventory again.

| profile | fresh (s) | facts (s) | wheel (s) | install (s) | shipped (MiB) | re-run (s) | re-run shipped (bytes) | venv (MiB) |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
{table}

The agent's memory (RSS): idle 5 s after start; peak while classifying {rows[0]['serving_images']} inbox
images (64 px); during a K = 3 fine-tune (resnet18, 64 px, 1 epoch, batch 32): peak of the agent with its
fine-tune and member processes, and peak of one member process.

| profile | idle (MiB) | serving (MiB) | fine-tune, all processes (MiB) | one member (MiB) | members at once |
|---|---:|---:|---:|---:|---:|
{memory}

Reproduce: `.venv/bin/python bench/provision.py` (`--profiles-only` for this part; writes
`bench/results/provision.json`).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--profiles", default="system,edge-serve,edge", help="install profiles to measure")
    parser.add_argument("--profiles-only", action="store_true", help="skip the 10-host fleet runs")
    parser.add_argument("--images", type=int, default=300, help="inbox images for the serving load")
    args = parser.parse_args(argv)
    wheel = build_wheel()
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as tmp:
        work = Path(tmp)
        fleet = SshdFleet(work / "sshd", args.hosts, env={"PIP_NO_INDEX": "1", "PIP_INDEX_URL": "",
                                                          "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": "/dev/null"})
        fleet.start()
        try:
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(work / "bare")], check=True)
            from edge_agent.datasets import import_elpv

            data = import_elpv(work / "elpv", size=64, sites=1, limit=240).children[-1].out
            profiles = profile_scenarios(work / "profiles", fleet, wheel, str(work / "bare" / "bin" / "python"),
                                         data, args.images, args.profiles.split(","))
            if args.profiles_only:
                return write({"benchmark": "provision", "machine": machine(), "time": time.time(),
                              "profiles": profiles, **previous(args.out)}, args.out)
            serial = fleet_inventory(fleet, work / "serial.yaml", work / "serial")
            parallel = fleet_inventory(fleet, work / "parallel.yaml", work / "parallel")
            scenarios = []
            try:
                scenarios.append(scenario("serial (fresh hosts)", serial, 1, wheel))
                stop_agents(work / "serial")
                scenarios.append(scenario("concurrent (fresh hosts)", parallel, args.hosts, wheel))
                scenarios.append(scenario("re-run (unchanged hosts)", parallel, args.hosts, wheel))
            finally:
                stop_agents(work / "serial")
                stop_agents(work / "parallel")
        finally:
            fleet.stop()
    per_host = sum(MANUAL_COMMANDS.values())
    result = {"benchmark": "provision", "hosts": args.hosts, "machine": machine(), "time": time.time(),
              "profiles": profiles,
              "wheel": {"name": wheel.name, "bytes": wheel.path.stat().st_size},
              "scenarios": scenarios, "speedup": round(scenarios[0]["wall_s"] / scenarios[1]["wall_s"], 2),
              "manual_commands": {"per_step": MANUAL_COMMANDS, "per_host": per_host,
                                  "fleet": per_host * args.hosts + 1, "edgeloop": 1}}
    return write(result, args.out)


def previous(out: Path) -> dict:
    """Figures of the last full run kept when only part is re-run."""
    try:
        old = json.loads((out / "provision.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: old[k] for k in ("hosts", "wheel", "scenarios", "speedup", "manual_commands") if k in old}


def write(result: dict, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / "provision.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result) if "scenarios" in result else profiles_markdown(result)
    (out / "provision.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
