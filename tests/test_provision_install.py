"""Bare hosts become sites: provisioning installs the agent's dependencies from a wheelhouse, offline.

Real OpenSSH servers on loopback ports whose sessions have no package index (``PIP_NO_INDEX=1``, empty
``PIP_INDEX_URL`` / ``PIP_FIND_LINKS``, no pip config); each site's ``python:`` is a bare interpreter (a
fresh venv with no packages, not even pip). One run provisions a healthy ``edge-serve`` host beside a
host whose disk is too small and one whose Python is too old: the two are refused at ``facts`` with the
reason, before anything is shipped, and the healthy one serves a deployed model without torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.imaging import encode_png
from orchestrator.deploy import deploy_model
from orchestrator.health import fleet_health, read_fleet_status
from orchestrator.inventory import load_inventory
from orchestrator.provision import CHANGED, FAILED, OK, SKIPPED, build_wheel, provision
from orchestrator.provision.wheelhouse import Platform, wheelhouse_at
from orchestrator.sshfleet import SshdFleet, fleet_inventory, stop_agents

pytestmark = pytest.mark.timeout(600)

# The hosts' sessions: pip told there is no index, and nowhere to find links.
NO_INDEX = {"PIP_NO_INDEX": "1", "PIP_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": "/dev/null"}
OLD_PYTHONS = ("python3.9", "python3.8", "python3.7", "python3.6")


def old_python() -> str | None:
    """A real interpreter older than the agent supports (3.6-3.9), from pyenv or PATH, that runs as is."""
    candidates = sorted(Path("~/.pyenv/versions").expanduser().glob("3.[6-9].*/bin/python3"), reverse=True)
    candidates += [Path(p) for p in map(shutil.which, OLD_PYTHONS) if p]
    for path in candidates:
        probe = subprocess.run([str(path), "-c", "import sys; print(sys.version_info < (3, 10))"],
                               capture_output=True, text=True, check=False)
        if probe.stdout.strip() == "True":
            return str(path)
    return None


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A fresh venv with nothing installed (``--without-pip``): the host's bare interpreter."""
    bare = tmp_path_factory.mktemp("bare") / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    assert not list((bare / "lib").glob("python3*/site-packages/*")), "the bare interpreter has packages"
    return str(bare / "bin" / "python")


@pytest.fixture(scope="module")
def offline_fleet(tmp_path_factory):
    fleet = SshdFleet(tmp_path_factory.mktemp("sshd-offline"), 3, env=NO_INDEX).start()
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A 40 MiB tmpfs for one site's root (root may mount); else a reserve larger than any disk."""
    mount = tmp_path_factory.mktemp("small-disk")
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)],
                                            capture_output=True, check=False).returncode == 0:
        try:
            yield {"root": mount / "site", "install": "{mode: wheelhouse, profile: edge-serve}"}
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False)
    else:
        yield {"root": mount / "site", "install": "{mode: wheelhouse, profile: edge-serve, disk_reserve_mb: 1e12}"}


@pytest.fixture(scope="module")
def served(offline_fleet, bare_python, small_disk, tmp_path_factory):
    """One provisioning run over the three hosts, and the healthy one's re-run."""
    work = tmp_path_factory.mktemp("install")
    roots = work / "roots"
    path = fleet_inventory(offline_fleet, work / "fleet.yaml", roots, python=bare_python,
                           install="{mode: wheelhouse, profile: edge-serve}")
    text = path.read_text().replace("cloud:\n", f"cloud:\n  wheelhouse: {work / 'wheelhouse'}\n")
    host1, host2 = offline_fleet.hosts[1].name, offline_fleet.hosts[2].name
    text = text.replace(f"root: {roots / host1}\n", f"root: {small_disk['root']}\n"
                                                    f"    install: {small_disk['install']}\n")
    old = old_python()
    if old:
        text = text.replace(f"root: {roots / host2}\n", f"root: {roots / host2}\n    python: {old}\n")
    path.write_text(text)
    inventory = load_inventory(path)
    wheel = build_wheel()
    try:
        first = provision(inventory, wheel=wheel)
        again = provision(inventory, wheel=wheel, limit=[offline_fleet.hosts[0].name])
        yield {"inventory": inventory, "roots": roots, "first": first, "again": again, "wheel": wheel,
               "work": work, "old_python": old, "small_disk": small_disk}
    finally:
        stop_agents(roots)


def steps_of(host) -> dict:
    return {s.step: s for s in host.steps}


def test_a_bare_edge_serve_host_is_provisioned_offline_from_the_wheelhouse(served):
    report = served["first"]
    host = report.hosts[0]
    steps = steps_of(host)
    assert not host.failed, report.recap()
    assert steps["wheel"].status == CHANGED and "shipped" in steps["wheel"].message
    assert steps["install"].status == CHANGED and "(wheelhouse)" in steps["install"].message
    assert steps["health"].status == OK
    assert host.shipped_bytes > 10 << 20  # onnxruntime, numpy, ... went up
    venv_site = next((served["roots"] / host.site / "venv" / "lib").glob("python3*/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in venv_site.glob("*.dist-info")}
    assert {"onnxruntime", "numpy", "pillow", "pydantic", "paramiko", "edgeloop"} <= installed
    assert not {"torch", "torchvision", "albumentations"} & installed
    # exactly the versions the cloud locked for this platform: nothing came from anywhere else
    lock = wheelhouse_at(served["inventory"].wheelhouse()).lock("edge-serve", Platform.from_facts(host.facts))
    versions = {p.name.removesuffix(".dist-info").split("-")[0].lower().replace("_", "-"):
                p.name.removesuffix(".dist-info").split("-")[1] for p in venv_site.glob("*.dist-info")}
    for wheel in lock.wheels:
        assert versions[wheel.project] == wheel.name.split("-")[1], wheel.name
    assert not (venv_site / "_edgeloop_base.pth").exists()


def test_the_re_run_ships_nothing_and_changes_nothing(served):
    again = served["again"].hosts[0]
    assert again.shipped_bytes == 0 and again.changed == 0, served["again"].recap()
    assert "0 B to ship" in steps_of(again)["facts"].message


def test_the_deployed_model_serves_an_inbox_image_without_torch(served, tmp_path):
    import torch

    from edge_agent.models import CheckpointMeta, ModelSpec, build_model, save_checkpoint

    inventory, host = served["inventory"], served["first"].hosts[0]
    site, root = inventory.site(host.site), served["roots"] / host.site
    spec = ModelSpec(arch="tiny_cnn", num_classes=2, image_size=site.learning.image_size)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "model.pt", build_model(spec, seed=0),
                                 CheckpointMeta(spec=spec, class_names=["functional", "defective"]))
    result = deploy_model(site, inventory, checkpoint, "v-serve")
    assert result.status == "changed", result.reason
    assert (root / "models" / "base" / "v-serve" / "ensemble.onnx").is_file()
    assert not (root / "models" / "base" / "v-serve" / "model.pt").exists()  # no torch there to read it
    image = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    (root / "data" / "inbox" / "cell-1.png").write_bytes(encode_png(image))

    results, deadline = root / "data" / "processed" / "results.jsonl", time.time() + 60
    while time.time() < deadline and not results.exists():
        time.sleep(0.5)
    assert results.exists(), (root / "agent.log").read_text()[-3000:]
    line = json.loads(results.read_text().splitlines()[0])
    assert line["file"] == "cell-1.png" and set(line["probabilities"]) == {"functional", "defective"}, line
    status_before = json.loads((root / "status.json").read_text())["time"]
    deadline = time.time() + 30
    while time.time() < deadline:  # a heartbeat after serving, with the sample selected and uploaded
        status = json.loads((root / "status.json").read_text())
        if status["time"] > status_before and status.get("uploaded_total"):
            break
        time.sleep(0.5)
    assert status["time"] > status_before, "no heartbeat after serving"
    # an untrained model is unsure of everything: the image is informative, selected and uploaded
    assert status["selected_total"] == 1 and status["uploaded_total"] == 1, status
    assert status["active_version"] == "base-v-serve"
    assert status["finetune"]["state"] == "off (profile edge-serve)"
    stored, refused = read_fleet_status(inventory.store(), [host.site])  # the heartbeat arrived in the store
    assert not refused, refused
    assert stored[host.site]["active_version"] == "base-v-serve" and stored[host.site]["time"] >= status_before
    row = fleet_health(inventory.store(), [host.site], stale_after_s=60)[0]  # what fleet-health shows
    assert row.verdict == "ok" and row.finetune == "fine-tune: off (profile edge-serve)"
    pid = status["pid"]
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" not in maps and "onnxruntime" in maps  # serving, and torch was never loaded


def test_too_little_disk_and_too_old_a_python_are_refused_before_anything_is_shipped(served):
    report = served["first"]
    by_site = {h.site: h for h in report.hosts}
    small = by_site["host1"]
    facts = steps_of(small)["facts"]
    assert small.failed and facts.status == FAILED, report.recap()
    assert "not enough disk" in facts.message and "need" in facts.message and "free" in facts.message
    assert all(s.status == SKIPPED for s in small.steps[2:])
    assert small.shipped_bytes == 0 and not (served["small_disk"]["root"] / "wheels").exists()
    print("refused:", facts.message)

    if served["old_python"] is None:  # CI's machines have one (pyenv): there the check must run
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "no Python 3.6-3.9 on this machine to stand for an unsupported host interpreter")
    old = by_site["host2"]
    facts = steps_of(old)["facts"]
    assert old.failed and facts.status == FAILED
    assert "too old" in facts.message and "need 3.10+" in facts.message, facts.message
    assert not (served["roots"] / "host2").exists()
    print("refused:", facts.message)
    assert [h.site for h in report.failed] == ["host1", "host2"]


def test_a_platform_without_a_wheel_is_refused_naming_the_package(tmp_path):
    """32-bit ARM boards get no manylinux wheels of the agent's compiled dependencies: the resolution
    names the package and the platform (the facts step refuses the host with that message)."""
    from orchestrator.provision.wheelhouse import NoWheel, project_requirements

    house = wheelhouse_at(tmp_path / "wheelhouse")
    with pytest.raises(NoWheel) as refused:
        house.lock("edge-serve", Platform("3.11", "cp", "armv7l", "glibc", "2.31"))
    message = str(refused.value)
    assert "for cp3.11 glibc 2.31 armv7l" in message, message
    named = message.split("no wheel of ")[1].split()[0]
    assert named in {r.split(">")[0].split("=")[0] for r in project_requirements("edge-serve")}, message


def test_a_cut_off_wheel_upload_resumes_where_it_stopped(offline_fleet, bare_python, tmp_path):
    """The host goes down part way through the wheels; the next run ships only the rest (the partial file's
    bytes are kept and the whole is sha256-checked on the host before it counts)."""
    import contextlib
    import threading

    host = offline_fleet.hosts[0]
    roots = tmp_path / "roots"
    path = fleet_inventory(offline_fleet, tmp_path / "inv.yaml", roots, python=bare_python,
                           install="{mode: wheelhouse, profile: edge-serve}")
    path.write_text(path.read_text().replace("cloud:\n", f"cloud:\n  wheelhouse: {tmp_path / 'wheelhouse'}\n"))
    inventory, wheel = load_inventory(path), build_wheel()
    wheels = roots / host.name / "wheels"
    stop = threading.Event()

    def cut_when_a_part_is_big() -> None:
        """Kill the host while a wheel has more than 4 MiB up and at least as much still to go (on a loaded
        machine a smaller wheel can finish between the look and the kill)."""
        while not stop.is_set():
            for part in wheels.glob(".*.part"):
                whole = list((tmp_path / "wheelhouse" / "blobs" / part.name[1:-len(".part")]).glob("*.whl"))
                with contextlib.suppress(OSError):
                    if whole and 4 << 20 < part.stat().st_size < whole[0].stat().st_size - (4 << 20):
                        host.kill()
                        return
            time.sleep(0.01)

    cutter = threading.Thread(target=cut_when_a_part_is_big, daemon=True)
    cutter.start()
    try:
        cut = provision(inventory, wheel=wheel, limit=[host.name], retry_delays_s=())
    finally:
        stop.set()
        cutter.join()
        host.start()
    try:
        assert steps_of(cut.hosts[0])["wheel"].status == FAILED, cut.recap()
        partial = sum(p.stat().st_size for p in wheels.glob(".*.part"))
        assert partial > 4 << 20
        lock = wheelhouse_at(inventory.wheelhouse()).lock("edge-serve", Platform.from_facts(cut.hosts[0].facts))
        done = sum(w.size for w in lock.wheels if (wheels / w.name).exists())

        again = provision(inventory, wheel=wheel, limit=[host.name])
        assert not again.failed, again.recap()
        message = steps_of(again.hosts[0])["wheel"].message
        assert "resumed after" in message, message
        assert again.hosts[0].shipped_bytes == lock.size - done - partial + wheel.path.stat().st_size
        assert not list(wheels.glob(".*.part"))
    finally:
        stop_agents(roots)


def test_upgrading_edgeloop_ships_only_its_own_wheel(served, tmp_path):
    """A new edgeloop (same dependencies) on a provisioned site: one wheel goes up, the agent restarts on it."""
    from orchestrator.project import PROJECT_DIR
    from orchestrator.provision.wheel import BUILD_FILES, PACKAGES

    source = tmp_path / "src"
    source.mkdir()
    for name in (*BUILD_FILES, *PACKAGES):
        if (PROJECT_DIR / name).is_dir():
            shutil.copytree(PROJECT_DIR / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (PROJECT_DIR / name).exists():
            shutil.copy2(PROJECT_DIR / name, source / name)
    (source / "edge_agent" / "_upgrade_probe.py").write_text("UPGRADED = True\n")
    new = build_wheel(source, cache=tmp_path / "wheels")
    assert new.sha256 != served["wheel"].sha256
    host = served["first"].hosts[0].site
    report = provision(served["inventory"], wheel=new, limit=[host])
    steps = steps_of(report.hosts[0])
    assert not report.failed, report.recap()
    assert steps["wheel"].message.startswith("shipped 1 wheel(s)"), steps["wheel"].message
    assert report.hosts[0].shipped_bytes == new.path.stat().st_size
    assert steps["restart"].status == CHANGED and steps["health"].status == OK
    venv_site = next((served["roots"] / host / "venv" / "lib").glob("python3*/site-packages"))
    assert (venv_site / "edge_agent" / "_upgrade_probe.py").is_file()


def test_the_edge_profile_resolves_for_the_host_and_check_says_what_would_ship(offline_fleet, bare_python,
                                                                               tmp_path):
    """The full profile (torch & co., about 3 GB of wheels here) on a bare host: resolved for its platform
    with the project's pins, and ``--check`` says how many wheels and bytes would go; nothing is written.
    (Shipping and installing it end to end is measured by bench/provision.py: minutes, not a CI test.)"""
    host = offline_fleet.hosts[0]
    path = fleet_inventory(offline_fleet, tmp_path / "inv.yaml", tmp_path / "roots", python=bare_python,
                           install="{mode: wheelhouse, profile: edge}")
    inventory = load_inventory(path)  # the user's wheelhouse (~/.cache/edgeloop): 3 GB resolved once, kept
    report = provision(inventory, wheel=build_wheel(), limit=[host.name], check=True)
    assert not report.failed, report.recap()
    steps = steps_of(report.hosts[0])
    lock = wheelhouse_at(inventory.wheelhouse()).lock("edge", Platform.from_facts(report.hosts[0].facts))
    versions = {w.project: w.name.split("-")[1] for w in lock.wheels}
    assert versions["torch"] == "2.14.1" and versions["torchvision"] == "0.29.1"  # constraints.txt
    assert {"onnxruntime", "albumentations", "numpy", "pip"} <= set(versions)
    assert steps["wheel"].status == CHANGED
    assert steps["wheel"].message.startswith(f"would ship {len(lock.wheels) + 1} wheel(s), "), steps["wheel"].message
    assert lock.size > 1 << 30 and "GiB to ship" in steps["facts"].message
    assert not (tmp_path / "roots").exists()
    # the serve profile's wheels are the same files: a site moving up from edge-serve ships only the rest
    serve = wheelhouse_at(inventory.wheelhouse()).lock("edge-serve", Platform.from_facts(report.hosts[0].facts))
    assert {w.sha256 for w in serve.wheels} <= {w.sha256 for w in lock.wheels}


def test_index_mode_installs_from_the_named_index_and_a_mode_change_rebuilds_the_venv(served, tmp_path):
    """The site switches from the wheelhouse to ``mode: index`` (a PEP 503 index on this disk, made of the
    same wheels): its venv is made afresh for the new mode and filled from that index by the host's pip."""
    inventory, host = served["inventory"], served["first"].hosts[0]
    lock = wheelhouse_at(inventory.wheelhouse()).lock("edge-serve", Platform.from_facts(host.facts))
    simple = tmp_path / "simple"
    for wheel in lock.wheels:
        page = simple / wheel.project / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        blob = wheelhouse_at(inventory.wheelhouse()).blob(wheel)
        with page.open("a") as out:
            out.write(f'<a href="{blob.as_uri()}#sha256={wheel.sha256}">{wheel.name}</a>\n')
    path = tmp_path / "index.yaml"
    root = served["roots"] / host.site
    path.write_text(inventory.path.read_text().replace(
        f"root: {root}\n", f"root: {root}\n    install: {{mode: index, index_url: '{simple.as_uri()}'}}\n"))
    switched = load_inventory(path)
    report = provision(switched, wheel=served["wheel"], limit=[host.site])
    steps = steps_of(report.hosts[0])
    assert not report.failed, report.recap()
    assert "remove the venv made for wheelhouse edge-serve" in steps["install"].message, steps["install"].message
    assert "(index)" in steps["install"].message
    assert report.hosts[0].shipped_bytes <= served["wheel"].path.stat().st_size  # no dependency wheels go up
    assert steps["health"].status == OK
    assert (root / "venv" / "edgeloop-layout").read_text() == "index edge-serve\n"
    venv_site = next((root / "venv" / "lib").glob("python3*/site-packages"))
    assert (venv_site / "onnxruntime").is_dir() and not (venv_site / "torch").exists()
    again = provision(switched, wheel=served["wheel"], limit=[host.site])
    assert again.changed == 0, again.recap()


def test_a_site_installs_its_profile_plus_its_store_protocol():
    """edge-serve carries no s3fs; a site that uploads to s3:// gets it (edge has it already)."""
    from orchestrator.provision.wheelhouse import site_requirements

    serve = site_requirements("edge-serve", "file:///srv/store")
    assert "onnxruntime" in serve and not {"torch", "torchvision", "albumentations", "scipy", "s3fs"} & set(serve)
    assert site_requirements("edge-serve", "s3://bucket/store") == [*serve, "s3fs"]
    assert site_requirements("edge", "s3://bucket/store").count("s3fs") == 1
