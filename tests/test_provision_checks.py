"""What provisioning checks before it ships and what it leaves behind, against real sshd hosts on loopback.

- The facts step asks the site's ``index_url`` from the host before anything ships: a closed port, a 404,
  a name that does not resolve each refuse the host with one line naming the URL and the reason.
- A bare ``edge-serve`` host provisioned through the real CLI: the recap ends without a teardown traceback,
  the shipped wheels leave the host once the install is verified (their hashes stay in the venv, so a
  re-run ships 0 bytes), and the facts step's disk estimate is within 10 % of what the venv takes.
- A missing interpreter is named as such in the same run.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.fileio import file_sha256
from orchestrator.inventory import load_inventory
from orchestrator.provision import CHANGED, OK, SKIPPED, build_wheel, provision
from orchestrator.provision import hostworker
from orchestrator.provision.steps import shown_url
from orchestrator.provision.wheel import Wheel
from orchestrator.provision.wheelhouse import Platform, installed_size, wheelhouse_at
from orchestrator.sshfleet import SshdFleet, fleet_inventory, free_port, stop_agents

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
# The hosts' sessions: pip told there is no index (as in test_provision_install): only shipped wheels install.
NO_INDEX = {"PIP_NO_INDEX": "1", "PIP_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": "/dev/null"}


def steps_of(host) -> dict:
    return {s.step: s for s in host.steps}


def with_sites(path: Path, extra: dict[str, str]) -> Path:
    """Add lines under each named site's ``root:`` line of a :func:`fleet_inventory` file."""
    lines = path.read_text().splitlines(keepends=True)
    site = None
    out = []
    for line in lines:
        out.append(line)
        if line.startswith("  - name: "):
            site = line.split(": ", 1)[1].strip()
        elif line.startswith("    root: ") and site in extra:
            out.append(extra[site])
    path.write_text("".join(out))
    return path


# -- a tiny index on loopback


class Index(http.server.BaseHTTPRequestHandler):
    """Answers ``/simple/numpy/`` (what the facts step asks first) with a page; 404 for anything else.
    Records each request's path and Authorization header."""

    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.path.rstrip("/") != "/simple/numpy":
            self.send_error(404)
            return
        body = b'<a href="numpy-2.0.0-py3-none-any.whl">numpy-2.0.0-py3-none-any.whl</a>\n'
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def index_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_index_the_host_cannot_reach_is_refused_at_facts_naming_the_url(sshd_fleet, index_server, tmp_path):
    closed = free_port()  # nothing listens there
    roots = tmp_path / "roots"
    path = with_sites(fleet_inventory(sshd_fleet, tmp_path / "inv.yaml", roots), {
        "host0": f"    install: {{mode: index, index_url: 'http://127.0.0.1:{closed}/simple'}}\n",
        "host1": f"    install: {{mode: index, index_url: 'http://{index_server}/nothing-here/'}}\n",
        "host2": "    install: {mode: index, index_url: 'http://no-such-index.invalid/simple/'}\n"})
    Index.seen.clear()
    report = provision(load_inventory(path), wheel=build_wheel(), retry_delays_s=())
    reasons = {h.site: h.reason for h in report.hosts}
    assert reasons["host0"] == (f"facts: index_url http://127.0.0.1:{closed}/simple cannot be reached from the "
                                f"host: connection refused (asked http://127.0.0.1:{closed}/simple/numpy/); "
                                f"nothing was shipped"), reasons
    assert reasons["host1"].startswith(f"facts: index_url http://{index_server}/nothing-here/ cannot be reached "
                                       f"from the host: HTTP 404"), reasons
    assert "no-such-index.invalid" in reasons["host2"] and "does not resolve" in reasons["host2"], reasons
    for host in report.hosts:
        assert "\n" not in host.reason and host.shipped_bytes == 0
        assert all(s.status == SKIPPED for s in host.steps if s.step not in ("connect", "facts"))
    assert not roots.exists()  # not even a folder: refused before anything was written
    assert ("/nothing-here/numpy/", None) in Index.seen  # the host asked, as pip would, for a package's page
    print("refused:", *reasons.values(), sep="\n  ")


def test_a_reachable_index_passes_and_its_password_is_never_shown(sshd_fleet, index_server, tmp_path):
    path = with_sites(fleet_inventory(sshd_fleet, tmp_path / "inv.yaml", tmp_path / "roots"), {
        "host0": f"    install: {{mode: index, index_url: 'http://edge:s3cret@{index_server}/simple/'}}\n"})
    Index.seen.clear()
    report = provision(load_inventory(path), wheel=build_wheel(), limit=["host0"], check=True, retry_delays_s=())
    facts = steps_of(report.hosts[0])["facts"]
    assert facts.status == OK, report.recap()
    assert Index.seen == [("/simple/numpy/", "Basic ZWRnZTpzM2NyZXQ=")]  # edge:s3cret, as pip would send it

    Index.seen.clear()  # the same index refusing: the message names the URL without the password
    path = with_sites(fleet_inventory(sshd_fleet, tmp_path / "inv2.yaml", tmp_path / "roots"), {
        "host0": f"    install: {{mode: index, index_url: 'http://edge:s3cret@{index_server}/private/'}}\n"})
    report = provision(load_inventory(path), wheel=build_wheel(), limit=["host0"], check=True, retry_delays_s=())
    reason = report.hosts[0].reason
    assert f"index_url http://edge:***@{index_server}/private/ cannot be reached" in reason, reason
    assert "s3cret" not in reason and "s3cret" not in report.recap()
    assert shown_url("https://u:p@example.org:8443/simple") == "https://u:***@example.org:8443/simple"


def test_reach_says_why_for_a_folder_and_a_stalled_server(tmp_path):
    """The host worker's op on its own: a ``file://`` index must be a folder; a server that accepts and never
    answers costs the timeout, not pip's minutes of retries."""
    assert hostworker.reach({"url": tmp_path.as_uri()}) == {"why": ""}
    assert hostworker.reach({"url": (tmp_path / "gone").as_uri()})["why"] == f"no folder {tmp_path / 'gone'} on the host"
    with socket.create_server(("127.0.0.1", 0)) as mute:  # listens, accepts (backlog), never answers
        start = time.monotonic()
        out = hostworker.reach({"url": f"http://127.0.0.1:{mute.getsockname()[1]}/simple/", "timeout": 1})
    assert out["why"] == "no answer within 1 s" and time.monotonic() - start < 5, out


# -- a bare serve-only host, through the CLI


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A fresh venv with nothing installed (``--without-pip``): the host's bare interpreter."""
    bare = tmp_path_factory.mktemp("bare") / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    return str(bare / "bin" / "python")


@pytest.fixture(scope="module")
def served(tmp_path_factory, bare_python) -> Iterator[dict]:
    """One ``edgeloop provision`` (a subprocess, as an operator runs it) over three offline hosts: host0 a
    bare edge-serve host from the user's wheelhouse, host1 an index nobody listens on, host2 no Python."""
    work = tmp_path_factory.mktemp("served")
    fleet = SshdFleet(work / "sshd", 3, env=NO_INDEX).start()
    roots = work / "roots"
    path = fleet_inventory(fleet, work / "inv.yaml", roots, python=bare_python,
                           install="{mode: wheelhouse, profile: edge-serve}")
    with_sites(path, {"host1": f"    install: {{mode: index, index_url: 'http://127.0.0.1:{free_port()}/'}}\n",
                      "host2": "    python: /nonexistent/python3\n"})
    try:
        done = subprocess.run([sys.executable, "-m", "edgeloop", "provision", "-i", str(path)],
                              capture_output=True, text=True, cwd=REPO, timeout=240)
        yield {"done": done, "roots": roots, "inventory": load_inventory(path), "fleet": fleet,
               "wheel": shipped_wheel(roots / "host0" / "venv")}
    finally:
        stop_agents(roots)
        fleet.stop()


def shipped_wheel(venv: Path) -> Wheel | None:
    """The project wheel the CLI run built and installed (found in the build cache by the hash the venv
    records): the sources may change under a long test session, the later runs must ship this one."""
    try:
        record = json.loads((venv / hostworker.MANIFEST).read_text())["wheels"]
    except (OSError, ValueError, KeyError):
        return None
    digest = next((sha for sha, name in record.items() if name.startswith("edgeloop-")), None)
    cache = Path(os.environ.get("EDGELOOP_CACHE", Path.home() / ".cache" / "edgeloop")) / "wheels"
    for path in cache.glob("*/edgeloop-*.whl"):
        if file_sha256(path) == digest:
            return Wheel(path, digest)
    return None


def disk_use(path: Path) -> int:
    """What ``du -s`` counts, in bytes: the blocks of every file and folder, each inode once."""
    seen, total = set(), 0
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files, "."]:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def test_the_cli_run_ends_without_a_teardown_traceback_and_names_each_failure(served):
    done = served["done"]
    assert done.returncode != 0 and "PROVISION RECAP" in done.stdout, done.stdout + done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    recap = done.stdout.split("PROVISION RECAP", 1)[1]
    assert "host0  changed" in recap and "failed=0" in recap.split("host0", 1)[1].splitlines()[0], done.stdout
    assert "host1: facts: index_url http://127.0.0.1:" in done.stdout and "connection refused" in done.stdout
    assert "host2: facts: python '/nonexistent/python3' not found on the host" in done.stdout, done.stdout
    assert "connection to the host lost" not in done.stdout


def test_the_shipped_wheels_leave_the_host_after_the_verified_install(served):
    root = served["roots"] / "host0"
    venv = root / "venv"
    assert not list((root / "wheels").glob("*.whl")) and not list((root / "wheels").glob(".*.sha256"))
    record = json.loads((venv / hostworker.MANIFEST).read_text())["wheels"]
    inventory = served["inventory"]
    lock = wheelhouse_at(inventory.wheelhouse()).lock("edge-serve", Platform.from_facts(
        hostworker.facts({"root": str(root)})))
    assert served["wheel"] is not None, record
    assert record == {w.sha256: w.name for w in (*lock.wheels, served["wheel"])}
    print(f"kept: site root {disk_use(root) / 2**20:.1f} MiB, venv {disk_use(venv) / 2**20:.1f} MiB, "
          f"wheels {disk_use(root / 'wheels') / 2**20:.2f} MiB")


def test_the_disk_estimate_is_within_ten_percent_of_the_installed_venv(served):
    root = served["roots"] / "host0"
    lock = wheelhouse_at(served["inventory"].wheelhouse()).lock("edge-serve", Platform.from_facts(
        hostworker.facts({"root": str(root)})))
    estimate = lock.installed_size + installed_size(served["wheel"].path)
    measured = disk_use(root / "venv")
    unpacked = sum(info.file_size for w in lock.wheels
                   for info in zipfile.ZipFile(wheelhouse_at(served["inventory"].wheelhouse()).blob(w)).infolist())
    print(f"estimate {estimate / 2**20:.1f} MiB, venv {measured / 2**20:.1f} MiB "
          f"({(estimate - measured) / measured:+.1%}); the unpacked bytes alone: {unpacked / 2**20:.1f} MiB")
    assert abs(estimate - measured) <= 0.10 * measured


def test_a_re_run_ships_nothing_and_a_lost_record_ships_again(served):
    """The record of installed wheels stands in for the wheels: a re-run ships 0 bytes and changes nothing;
    a venv whose record is gone gets its wheels shipped again (and removed again after the install)."""
    inventory, root, wheel = served["inventory"], served["roots"] / "host0", served["wheel"]
    again = provision(inventory, wheel=wheel, limit=["host0"], retry_delays_s=())
    host = again.hosts[0]
    assert host.shipped_bytes == 0 and again.changed == 0, again.recap()
    assert "0 B to ship" in steps_of(host)["facts"].message and "installed or present" in steps_of(host)["facts"].message

    (root / "venv" / hostworker.MANIFEST).unlink()
    (root / "venv" / "edgeloop-wheel.sha256").unlink()  # the install must run again: from shipped wheels
    lost = provision(inventory, wheel=wheel, limit=["host0"], retry_delays_s=())
    host = lost.hosts[0]
    steps = steps_of(host)
    assert not lost.failed, lost.recap()
    assert steps["wheel"].status == CHANGED and host.shipped_bytes > 10 << 20, steps["wheel"].message
    assert "removed" in steps["install"].message and "after the verified install" in steps["install"].message
    assert not list((root / "wheels").glob("*.whl")) and (root / "venv" / hostworker.MANIFEST).is_file()

    # a host provisioned before wheels left: its wheels (stamped) there, no record; the next run records and
    # removes them, ships nothing and does not restart the agent
    record = json.loads((root / "venv" / hostworker.MANIFEST).read_text())["wheels"]
    house = wheelhouse_at(inventory.wheelhouse())
    for digest, name in record.items():
        source = wheel.path if name == wheel.name else house.blob(next(
            w for w in house.lock("edge-serve", Platform.from_facts(host.facts)).wheels if w.sha256 == digest))
        shutil.copy(source, root / "wheels" / name)
        (root / "wheels" / f".{name}.sha256").write_text(hostworker._stamp_text(str(root / "wheels" / name), digest))
    (root / "venv" / hostworker.MANIFEST).unlink()
    old = provision(inventory, wheel=wheel, limit=["host0"], retry_delays_s=())
    steps = steps_of(old.hosts[0])
    assert old.hosts[0].shipped_bytes == 0 and steps["restart"].status == OK, old.recap()
    assert steps["install"].status == CHANGED and f"removed {len(record)} shipped wheel(s)" in steps["install"].message
    assert not list((root / "wheels").glob("*.whl")) and json.loads(
        (root / "venv" / hostworker.MANIFEST).read_text())["wheels"] == record


def test_the_install_check_names_a_requirement_the_venv_does_not_hold(served, tmp_path):
    """The check before the wheels go: a requirement the venv does not hold at its version fails the install."""
    venv = served["roots"] / "host0" / "venv"
    requirements = (venv / "edgeloop-requirements.txt").read_text()
    numpy = next(line for line in requirements.splitlines() if line.startswith("numpy=="))
    fake = tmp_path / "venv"
    fake.mkdir()
    (fake / "edgeloop-requirements.txt").write_text(requirements.replace(numpy, "numpy==0.0.1") + "not-installed==1\n")
    why = hostworker._verify_packages(str(venv / "bin" / "python"), {"venv": str(fake), "requirements": "x"})
    assert why == (f"the install did not take: numpy {numpy.split('==')[1]} (wanted 0.0.1); not-installed missing")
    (fake / "edgeloop-requirements.txt").write_text(requirements)
    assert hostworker._verify_packages(str(venv / "bin" / "python"), {"venv": str(fake), "requirements": "x"}) is None


def test_a_record_vouches_only_for_the_venv_the_next_install_keeps(tmp_path):
    """Made for another mode or profile, the venv is rebuilt: its record counts for nothing and every wheel
    must be shipped again; an unreadable record vouches for nothing either."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / "edgeloop-layout").write_text("wheelhouse edge-serve\n")
    (venv / hostworker.MANIFEST).write_text(json.dumps({"wheels": {"a" * 64: "a-1-py3-none-any.whl"}}))
    assert hostworker.installed_wheels(str(venv), "wheelhouse edge-serve\n") == {"a" * 64: "a-1-py3-none-any.whl"}
    assert hostworker.installed_wheels(str(venv), "wheelhouse edge\n") == {}
    assert hostworker.installed_wheels(str(venv), "index edge-serve\n") == {}
    (venv / hostworker.MANIFEST).write_text("{not json")
    assert hostworker.installed_wheels(str(venv), "wheelhouse edge-serve\n") == {}
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    out = hostworker.wheels_missing({"folder": str(wheels), "venv": str(venv), "layout": "wheelhouse edge\n",
                                     "wheels": [{"name": "a-1-py3-none-any.whl", "sha256": "a" * 64, "size": 3}]})
    assert out["missing"] == ["a-1-py3-none-any.whl"] and not out["kept"]


def test_the_estimate_counts_blocks_folders_and_byte_code(tmp_path):
    """One 10-byte module in a folder: two 4 KiB blocks (the file, its .pyc) and two folders (its own and
    __pycache__), not 10 bytes."""
    wheel = tmp_path / "tiny-1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tiny/__init__.py", "x = 1\n" + "#" * 3)
    assert installed_size(wheel) == 4 * 4096
