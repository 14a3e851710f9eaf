"""Hostile hosts against real sshd: an endless or trickling answer, garbage facts, a damaged wheel under an
intact stamp, leftover partial uploads, tampered deploy records. Each fails (or heals) its own host, in
bounded time, with a one-line reason, while the others finish."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.inventory import load_inventory
from orchestrator.provision import CHANGED, FAILED, build_wheel, provision
from orchestrator.provision import hostworker
from orchestrator.provision.hostworker import part_name
from orchestrator.provision.remote import MAX_ANSWER_BYTES, AnswerTooLong, HostWorker, StepFailed, open_remote, \
    read_line
from orchestrator.sshfleet import fleet_inventory, stop_agents

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel():
    return build_wheel()


def fake_python(folder: Path, name: str, body: str) -> Path:
    """An executable the inventory names as the site's Python: it ignores ``-c SOURCE`` and runs ``body``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f"{name}.py"
    script.write_text(body)
    wrapper = folder / name
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {script}\n")
    wrapper.chmod(0o755)
    return wrapper


def with_pythons(path: Path, pythons: dict[str, str | Path]) -> Path:
    """The inventory at ``path`` with a site-level ``python`` for each named site."""
    text = path.read_text()
    for site, python in pythons.items():
        text = text.replace(f"  - name: {site}\n", f"  - name: {site}\n    python: {python}\n")
    path.write_text(text)
    return path


def steps_of(host) -> dict:
    return {s.step: s for s in host.steps}


def running(needle: str) -> list[int]:
    """Pids of this machine's processes whose command line holds ``needle``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


# -- answers bounded in size and in time


ENDLESS = "import os\nblock = b'x' * 65536\nwhile True:\n    os.write(1, block)\n"
TRICKLE = "import os, time\nwhile True:\n    os.write(1, b'x')\n    time.sleep(0.2)\n"


def test_an_endless_and_a_trickling_answer_fail_their_hosts_alone_and_the_healthy_host_finishes(
        sshd_fleet, wheel, tmp_path):
    """host0's interpreter answers with an endless line, host1's with a byte every 0.2 s; host2 is healthy.
    The run ends with all three reports: host0 refused at the size cap, host1 at its step's deadline (the
    bytes keep coming, so no single read ever times out), host2 provisioned with its heartbeat."""
    fakes = tmp_path / "fakes"
    endless, trickle = fake_python(fakes, "endless", ENDLESS), fake_python(fakes, "trickle", TRICKLE)
    roots = tmp_path / "roots"
    path = fleet_inventory(sshd_fleet, tmp_path / "inv.yaml", roots)
    port1 = sshd_fleet.hosts[1].port
    path.write_text(path.read_text().replace(f"port: {port1}}}", f"port: {port1}, io_timeout_s: 4}}"))
    inventory = load_inventory(with_pythons(path, {"host0": endless, "host1": trickle}))

    started = time.monotonic()
    try:
        report = provision(inventory, wheel=wheel, retry_delays_s=())
    finally:
        stop_agents(roots)
    seconds = time.monotonic() - started

    hosts = {h.site: h for h in report.hosts}
    assert sorted(hosts) == ["host0", "host1", "host2"]
    flood = steps_of(hosts["host0"])["facts"]
    assert flood.status == FAILED and "without ending its answer line" in flood.message, flood.message
    assert flood.seconds < 30
    slow = steps_of(hosts["host1"])["facts"]
    assert slow.status == FAILED and "no answer from the host within 4 s" in slow.message, slow.message
    assert "bytes came without a line end" in slow.message and 3.5 < slow.seconds < 20
    assert not hosts["host2"].failed, report.recap()
    assert "heartbeat" in steps_of(hosts["host2"])["health"].message
    assert "host0: facts:" in report.recap() and "host1: facts:" in report.recap()
    assert seconds < 150
    deadline = time.monotonic() + 15  # the hosts' writers end with their sessions: nothing lingers
    while (running(str(fakes / "endless.py")) or running(str(fakes / "trickle.py"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(str(fakes / "endless.py")) and not running(str(fakes / "trickle.py"))


def test_a_local_worker_writing_100_mb_without_a_newline_is_refused_at_the_cap_quickly(tmp_path, wheel):
    flood = fake_python(tmp_path / "fakes", "flood",
                        "import os\nblock = b'y' * (1 << 20)\nfor _ in range(100):\n    os.write(1, block)\n")
    inventory_file = tmp_path / "inv.yaml"
    inventory_file.write_text(f"""
cloud: {{store_url: "file://{tmp_path}/store"}}
defaults: {{connection: {{type: local}}, python: {flood}}}
sites: [{{name: s1, root: "{tmp_path / 's1'}"}}]
""")
    started = time.monotonic()
    report = provision(load_inventory(inventory_file), wheel=wheel, check=True, retry_delays_s=())
    assert time.monotonic() - started < 15
    assert "without ending its answer line" in report.hosts[0].reason, report.recap()


def test_a_line_is_read_in_time_linear_in_its_length_and_capped():
    """A 3.9 MiB answer in 1 KiB pieces reads in well under a second (each byte scanned once); the cap and
    the whole-line deadline hold however the bytes arrive."""
    line = b'{"pad": "' + b"z" * (MAX_ANSWER_BYTES - 200_000) + b'"}\n'
    pieces = iter([line[i:i + 1024] for i in range(0, len(line), 1024)])
    buffer = bytearray()
    started = time.monotonic()
    assert read_line(lambda _: next(pieces), buffer, timeout=30) == line
    assert time.monotonic() - started < 2 and not buffer
    with pytest.raises(AnswerTooLong):
        read_line(lambda _: b"x" * 65536, bytearray(), timeout=30)

    def slow(_seconds: float) -> bytes:
        time.sleep(0.05)
        return b"x"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        read_line(slow, bytearray(), timeout=0.5)
    assert time.monotonic() - started < 2


# -- garbage facts and interpreters that are not one


def garbage_worker(**override) -> str:
    """A worker that answers ``facts`` with the real facts of this machine, some of them replaced."""
    real = hostworker.facts({"root": "/tmp"})
    return (f"import json, sys\nfacts = {json.dumps({**real, **override})!r}\n"
            "for line in sys.stdin:\n    sys.stdout.write(facts + '\\n')\n    sys.stdout.flush()\n")


def test_garbage_facts_and_broken_interpreters_are_named_with_the_host(sshd_fleet, wheel, tmp_path):
    fakes = tmp_path / "fakes"
    path = fleet_inventory(sshd_fleet, tmp_path / "inv.yaml", tmp_path / "roots")
    with_pythons(path, {"host0": fake_python(fakes, "version", garbage_worker(python="three.eleven")),
                        "host1": fake_python(fakes, "memory", garbage_worker(memory_bytes="lots")),
                        "host2": fake_python(fakes, "chatter", "import sys\nsys.stdin.readline()\n"
                                                          "print('hello from a login banner')\n")})
    report = provision(load_inventory(path), wheel=wheel, check=True, retry_delays_s=())
    reasons = {h.site: h.reason for h in report.hosts}
    assert reasons["host0"] == ("facts: host host0: the fact 'python' is 'three.eleven', not a Python version "
                                "such as 3.11.7"), reasons
    assert reasons["host1"] == "facts: host host1: the fact 'memory_bytes' is 'lots', not a whole number >= 0"
    assert "not the worker's JSON: 'hello from a login banner'" in reasons["host2"], reasons
    assert not any("invalid literal" in r or "Traceback" in r for r in reasons.values())

    not_executable = fakes / "plain-file"
    not_executable.write_text("not a program\n")
    path = fleet_inventory(sshd_fleet, tmp_path / "inv2.yaml", tmp_path / "roots")
    with_pythons(path, {"host0": "/bin/false", "host1": "/nonexistent/python3", "host2": not_executable})
    report = provision(load_inventory(path), wheel=wheel, check=True, retry_delays_s=())
    reasons = {h.site: h.reason for h in report.hosts}
    assert reasons["host0"] == "facts: python '/bin/false' exited with status 1 before answering", reasons
    assert reasons["host1"].startswith("facts: python '/nonexistent/python3' not found on the host"), reasons
    assert f"python '{not_executable}' cannot be run on the host" in reasons["host2"], reasons
    assert not any("connection to the host lost" in r for r in reasons.values())


def test_the_cli_recap_ends_without_a_teardown_traceback(sshd_fleet, tmp_path):
    """A successful run (check mode) and a failed one through the CLI: stderr holds no paramiko
    "Exception ignored" traceback from connections closed late."""
    path = fleet_inventory(sshd_fleet, tmp_path / "inv.yaml", tmp_path / "roots")
    with_pythons(path, {"host2": fake_python(tmp_path / "fakes", "endless", ENDLESS)})
    done = subprocess.run([sys.executable, "-m", "edgeloop", "provision", "-i", str(path), "--check"],
                          capture_output=True, text=True, cwd=REPO, timeout=240)
    assert "PROVISION RECAP" in done.stdout and "host2: facts:" in done.stdout, done.stdout + done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr


# -- leftovers provisioning heals by itself


def test_a_damaged_wheel_under_an_intact_stamp_is_reshipped_and_oversized_or_stale_partials_discarded(
        sshd_fleet, wheel, tmp_path):
    roots = tmp_path / "roots"
    inventory = load_inventory(fleet_inventory(sshd_fleet, tmp_path / "inv.yaml", roots))
    wheels = roots / "host0" / "wheels"
    shipped = wheels / wheel.name
    stamp = wheels / f".{wheel.name}.sha256"

    def run(check: bool = False):
        report = provision(inventory, wheel=wheel, limit=["host0"], check=check, retry_delays_s=())
        assert not report.failed, report.recap()
        return report.hosts[0]

    def cut_before_install() -> None:
        """The host as a run cut off between shipping and installing leaves it (a verified install removes the
        wheels): the wheel and its stamp there, the venv's install marker and record of installed wheels gone."""
        shutil.copy(wheel.path, shipped)
        stamp.write_text(hostworker._stamp_text(str(shipped), wheel.sha256))
        for name in ("edgeloop-wheel.sha256", hostworker.MANIFEST):
            (roots / "host0" / "venv" / name).unlink(missing_ok=True)

    def damage() -> None:
        data = bytearray(shipped.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 256] = bytes(b ^ 0xFF for b in data[middle:middle + 256])
        with open(shipped, "r+b") as f:  # in place: same inode, same size
            f.write(data)

    try:
        run()
        cut_before_install()

        damage()  # 1. the file's times changed: the stamp no longer vouches for it, its bytes are hashed
        host = run()
        assert "re-ship" in steps_of(host)["wheel"].message and "bytes do not match" in \
            steps_of(host)["wheel"].message, steps_of(host)["wheel"].message
        assert "removed 1 shipped wheel(s)" in steps_of(host)["install"].message and not shipped.exists()

        cut_before_install()
        before = shipped.stat()  # 2. damaged with its size, times and inode as they were: the stamp matches
        stamp_text = stamp.read_text()
        damage()
        os.utime(shipped, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert stamp.read_text() == stamp_text and hostworker.sha256(str(shipped)) != wheel.sha256
        host = run()
        install = steps_of(host)["install"]
        assert install.status == CHANGED and "re-shipped 1 wheel(s)" in install.message, install.message
        assert "removed 1 shipped wheel(s)" in install.message and not shipped.exists()

        # 3. a partial upload larger than the wheel, and an abandoned partial of a wheel nobody wants
        cut_before_install()
        shipped.unlink()
        stamp.unlink()
        oversized = wheels / part_name(wheel.sha256)
        oversized.write_bytes(os.urandom(shipped_size := wheel.path.stat().st_size + 4096))
        stale, fresh = wheels / part_name("d" * 64), wheels / part_name("e" * 64)
        stale.write_bytes(b"old")
        fresh.write_bytes(b"in flight")
        os.utime(stale, (time.time() - 7200, time.time() - 7200))
        looked = run(check=True)
        assert "would discard the partial upload" in steps_of(looked)["wheel"].message
        assert oversized.stat().st_size == shipped_size and stale.exists()  # check mode touches nothing
        host = run()
        message = steps_of(host)["wheel"].message
        assert "discarded the partial upload" in message and "larger than the wheel" in message, message
        assert "discarded a stale partial upload" in message and "resumed" not in message, message
        assert "removed 1 shipped wheel(s)" in steps_of(host)["install"].message and not shipped.exists()
        assert not oversized.exists() and not stale.exists() and fresh.exists()
        assert host.shipped_bytes == wheel.path.stat().st_size
    finally:
        stop_agents(roots)


# -- tampered deploy records


VERSION = "20261122T000000-abcdef12"


@pytest.fixture
def rollback_site_env(sshd_fleet, tmp_path):
    """host1's root as a deploy leaves it: v1 served, base VERSION arrived (its record says v1 served
    before), and the fine-tune on VERSION ("on-new") serves now. Returns (inventory, paths, rollback)."""
    from agent_helpers import serving_site, write_config

    from edge_agent.activation import activate
    from orchestrator.rollout import rollback_site

    roots = tmp_path / "roots"
    inventory = load_inventory(fleet_inventory(sshd_fleet, tmp_path / "inv.yaml", roots))
    paths = serving_site(roots / "host1", 32)
    shutil.copy(write_config(roots / "host1", "file:///nowhere", site="host1"), paths.config_file)
    site = inventory.site("host1")
    remote = open_remote(site, inventory, False)
    try:
        HostWorker(remote, site.python).call("deploy_record", root=str(paths.root), version=VERSION)
    finally:
        remote.close()
    (paths.base_models / VERSION).mkdir(parents=True)
    (paths.base_models / VERSION / "model.pt").write_bytes(b"weights")
    shutil.copytree(paths.ensembles / "v1", paths.ensembles / "on-new")
    (paths.ensembles / "on-new" / "report.json").write_text(json.dumps({"bases": [VERSION]}))
    activate(paths, "on-new")
    return inventory, paths, lambda **kw: rollback_site(inventory, "host1", VERSION, **kw)


def test_a_tampered_deploy_record_is_refused_naming_what_serves_and_changes_nothing(rollback_site_env, tmp_path):
    inventory, paths, rollback = rollback_site_env
    record = paths.deploy_records / f"{VERSION}.json"
    genuine = record.read_text()
    assert json.loads(genuine)["before_active"] == "v1"
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(paths.ensembles / "v1" / "ensemble.onnx", evil / "ensemble.onnx")
    (paths.ensembles / "linked").symlink_to(evil)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def tamper(before=None, text: str | None = None, link: Path | None = None) -> None:
        record.unlink()
        if link is not None:
            record.symlink_to(link)
        else:
            record.write_text(text if text is not None else json.dumps(
                {"version": VERSION, "before_active": before, "time": 1.0}))

    cases = [
        (lambda: tamper("../../../../evil"), "names '../../../../evil' as what served before, which is not an "
                                             "ensemble name"),
        (lambda: tamper(str(evil)), f"names '{evil}' as what served before"),
        (lambda: tamper(link=Path("/dev/zero")), "is a symbolic link"),
        (lambda: (record.unlink(), os.mkfifo(record)), "is not a regular file"),
        (lambda: tamper(text=" " * (1 << 20)), "is over 65536 bytes"),
        (lambda: tamper(text="{not json"), "is not JSON"),
        (lambda: tamper(text=json.dumps({"version": "other", "before_active": "v1"})),
         "is the record of version 'other'"),
        (lambda: tamper("v0"), "cannot restore v0: models/ensembles/v0 is gone"),
        (lambda: tamper("linked"), "cannot restore linked: models/ensembles/linked is a symbolic link"),
        (lambda: tamper("on-new"), f"cannot restore on-new: it was built on {VERSION}, the version being rolled "
                                   "back"),
    ]
    for make, expected in cases:
        make()
        started = time.monotonic()
        with pytest.raises(StepFailed) as refused:
            rollback()
        assert time.monotonic() - started < 10
        message = str(refused.value)
        assert expected in message and message.endswith("nothing changed; serving on-new"), (expected, message)
        assert os.readlink(paths.active_link) == "ensembles/on-new"
        assert (paths.base_models / VERSION).is_dir() and not paths.fence_file.exists()

    # nothing served before, says the record, while v1 (not built on the version) serves: not undone to nothing
    os.unlink(paths.active_link)
    os.symlink("ensembles/v1", paths.active_link)
    tamper(None)
    with pytest.raises(StepFailed, match=r"would leave the site serving nothing .* nothing changed; serving v1$"):
        rollback()
    assert os.readlink(paths.active_link) == "ensembles/v1"

    # the CLI exits non-zero and names what serves
    tamper("../../../../evil")
    done = subprocess.run([sys.executable, "-m", "edgeloop", "rollback", "-i", str(inventory.path), "--version",
                           VERSION, "--limit", "host1", "--verify-timeout-s", "0"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "host1: failed (" in done.stdout and "nothing changed; serving v1)" in done.stdout, done.stdout


def test_a_genuine_record_still_rolls_back_and_a_first_deploy_may_roll_back_to_nothing(rollback_site_env):
    inventory, paths, rollback = rollback_site_env
    record = paths.deploy_records / f"{VERSION}.json"
    genuine = record.read_text()
    record.write_text(json.dumps({**json.loads(genuine), "before_active": None}))
    assert rollback(dry_run=True)["would_restore"] is None  # on-new was built on the version: nothing it is
    record.write_text(genuine)
    done = rollback()
    assert done["changed"] == ["fence", "active", "base"] and done["serving"] == "v1"
    assert os.readlink(paths.active_link) == "ensembles/v1"
    assert rollback()["changed"] == []


def test_the_host_worker_refuses_version_names_that_are_paths(tmp_path):
    for bad in ("../../x", "/abs", ".hidden", "", "a/b", "x" * 200):
        assert "not a version name" in hostworker.handle(json.dumps(
            {"op": "deploy_record", "root": str(tmp_path), "version": bad}))["error"]
        assert "not a version name" in hostworker.handle(json.dumps(
            {"op": "rollback", "root": str(tmp_path), "version": bad, "check": []}))["error"]
    assert not (tmp_path / "models").exists() and not (tmp_path.parent / "x.json").exists()


def test_the_agent_reads_deploy_records_bounded(tmp_path):
    """The agent's retention reads the deploy records too: a record linked to /dev/zero, a FIFO or an oversized
    one is skipped at once, and a good record still keeps what it names."""
    import json
    import os
    import time

    from edge_agent.daemon import MAX_DEPLOY_RECORD_BYTES, restorable_ensembles
    from edge_agent.layout import AgentPaths

    paths = AgentPaths(tmp_path / "agent")
    paths.ensure()
    paths.deploy_records.mkdir(parents=True, exist_ok=True)
    for version in ("good", "zero", "fifo", "big"):
        (paths.base_models / version).mkdir(parents=True)
    (paths.deploy_records / "good.json").write_text(json.dumps({"before_active": "ens-1"}))
    (paths.deploy_records / "zero.json").symlink_to("/dev/zero")
    os.mkfifo(paths.deploy_records / "fifo.json")
    (paths.deploy_records / "big.json").write_text(json.dumps({"before_active": "x" * MAX_DEPLOY_RECORD_BYTES}))
    started = time.monotonic()
    assert restorable_ensembles(paths) == {"ens-1"}
    assert time.monotonic() - started < 2
