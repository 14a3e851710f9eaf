"""The host worker run locally, without SSH: its operations called directly, and the program itself
driven over its line protocol as a subprocess (the way provisioning runs it on a host)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.provision import hostworker
from orchestrator.provision.remote import HOSTWORKER_SOURCE


def call(op: str, **req) -> dict:
    return hostworker.handle(json.dumps({"op": op, **req}))


def test_put_text_writes_once_and_marks_a_pending_restart(tmp_path):
    target, marker = tmp_path / "agent.yaml", tmp_path / ".restart-pending"
    assert call("put_text", path=str(target), content="a: 1\n", check=True, restart_marker=str(marker)) == \
        {"changed": True}
    assert not target.exists() and not marker.exists()  # check mode only looks
    assert call("put_text", path=str(target), content="a: 1\n", check=False, restart_marker=str(marker)) == \
        {"changed": True}
    assert target.read_text() == "a: 1\n" and marker.is_file()
    assert call("restart_pending", restart_marker=str(marker)) == {"pending": True}
    marker.unlink()
    assert call("put_text", path=str(target), content="a: 1\n", check=False, restart_marker=str(marker)) == \
        {"changed": False}
    assert not marker.exists()  # nothing changed, nothing to restart for
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_put_text_creates_secret_files_owner_only_and_tightens_an_open_one(tmp_path):
    target = tmp_path / "agent.yaml"
    assert call("put_text", path=str(target), content="password: x\n", check=False, mode=0o600) == {"changed": True}
    assert target.stat().st_mode & 0o777 == 0o600
    target.chmod(0o644)  # written by an older version, world-readable
    assert call("put_text", path=str(target), content="password: x\n", check=False, mode=0o600) == {"changed": True}
    assert target.stat().st_mode & 0o777 == 0o600
    assert call("put_text", path=str(target), content="password: x\n", check=False, mode=0o600) == {"changed": False}


def test_commit_refuses_a_corrupted_upload_and_marks_a_restart_only_for_a_whole_one(tmp_path):
    staged, final, marker = tmp_path / ".w.tmp", tmp_path / "w.whl", tmp_path / ".restart-pending"
    staged.write_bytes(b"truncated")
    out = call("commit", tmp=str(staged), path=str(final), sha256="0" * 64, restart_marker=str(marker))
    assert "upload corrupted" in out["error"]
    assert not staged.exists() and not final.exists() and not marker.exists()
    staged.write_bytes(b"whole")
    digest = hostworker.sha256(str(staged))
    assert call("commit", tmp=str(staged), path=str(final), sha256=digest, restart_marker=str(marker)) == {}
    assert final.read_bytes() == b"whole" and marker.is_file()  # a new wheel in place: the agent must restart


def test_folders_and_facts(tmp_path):
    wanted = [str(tmp_path / "root" / "a"), str(tmp_path / "root" / "b")]
    assert call("folders", folders=wanted, check=True)["changed"] == wanted and not (tmp_path / "root").exists()
    assert call("folders", folders=wanted, check=False)["changed"] == wanted
    assert call("folders", folders=wanted, check=False)["changed"] == []
    facts = call("facts", root=str(tmp_path / "not-yet" / "root"))
    assert facts["python"] == ".".join(map(str, sys.version_info[:3])) and facts["cores"] >= 1
    assert facts["disk_free_bytes"] > 0 and facts["root"].endswith("not-yet/root")


def test_bad_requests_answer_an_error_and_the_worker_goes_on():
    assert "JSONDecodeError" in hostworker.handle("{not json")["error"]
    assert "KeyError" in call("no_such_op")["error"]
    assert "KeyError" in call("put_text")["error"]  # missing fields


def test_process_restart_runs_the_script_clears_the_marker_and_stop_ends_it(tmp_path):
    script, pidfile, marker = tmp_path / "supervise", tmp_path / "supervisor.pid", tmp_path / ".restart-pending"
    script.write_text("#!/bin/sh\nwhile :; do sleep 0.2; done\n")
    marker.write_text("pending\n")
    req = {"pidfile": str(pidfile), "script": str(script)}
    assert call("process_state", **req)["pid"] is None
    started = call("process_restart", cwd=str(tmp_path), restart_marker=str(marker), **req)
    try:
        assert started["pid"] > 0 and not marker.exists()
        deadline = time.time() + 5
        while call("process_state", **req)["pid"] != started["pid"] and time.time() < deadline:
            time.sleep(0.05)
        assert call("process_state", **req)["pid"] == started["pid"]
    finally:
        stopped = call("process_stop", **req)
    assert stopped["stopped"] == started["pid"]
    assert call("process_state", **req)["pid"] is None


def test_the_program_sent_to_hosts_speaks_one_json_line_per_request(tmp_path):
    """Exactly what a host runs: ``python -c SOURCE``, requests on stdin, answers on stdout."""
    proc = subprocess.Popen([sys.executable, "-c", HOSTWORKER_SOURCE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    try:
        answers = []
        for request in ({"op": "file_sha", "path": str(tmp_path / "missing")},
                        {"op": "put_text", "path": str(tmp_path / "x"), "content": "x", "check": False},
                        {"op": "bogus"}):
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            answers.append(json.loads(proc.stdout.readline()))
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    assert answers[0] == {"sha256": None} and answers[1] == {"changed": True} and "error" in answers[2]
    assert (tmp_path / "x").read_text() == "x"


def test_the_host_worker_needs_nothing_but_the_standard_library():
    imported = {line.split()[1].split(".")[0] for line in Path(hostworker.__file__).read_text().splitlines()
                if line.startswith(("import ", "from "))}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)



def test_the_host_worker_parses_on_an_old_python_so_it_can_say_the_python_is_too_old():
    ast.parse(HOSTWORKER_SOURCE, feature_version=(3, 6))  # no walrus, no positional-only, no match


def test_install_in_check_mode_on_a_fresh_host_says_what_it_would_do_and_does_nothing(tmp_path):
    venv, marker = tmp_path / "venv", tmp_path / ".restart-pending"
    out = call("install", venv=str(venv), wheel=str(tmp_path / "w.whl"), sha256="0" * 64, check=True,
               restart_marker=str(marker))
    assert out == {"changed": ["create venv", "link base packages", "install wheel"]}
    assert not venv.exists() and not marker.exists()


def test_health_finds_a_fresh_heartbeat_and_reports_a_stale_one_with_the_log_tail(tmp_path):
    status, log = tmp_path / "status.json", tmp_path / "agent.log"
    log.write_text("starting\nboom: no model\n")
    req = {"status_file": str(status), "log_files": [str(log)], "site": "a", "timeout": 0.3, "check": False}
    status.write_text(json.dumps({"site": "a", "time": 100.0, "pid": 7}))
    stale = call("health", since=200.0, **req)
    assert stale["missing"] and stale["last"]["time"] == 100.0 and "boom: no model" in stale["log_tail"]
    status.write_text(json.dumps({"site": "a", "time": time.time(), "pid": 7, "state": "serving"}))
    fresh = call("health", since=200.0, **req)
    assert fresh["status"]["pid"] == 7 and fresh["status"]["state"] == "serving" and fresh["age"] < 5
    assert call("health", since=time.time() + 60, **{**req, "timeout": 60, "check": True})["missing"]  # no wait


@pytest.fixture
def systemctl(tmp_path, monkeypatch):
    """A stand-in ``systemctl`` first on PATH: it logs its arguments; ``restart`` fails while ``fail`` exists."""
    folder, log, fail = tmp_path / "fakebin", tmp_path / "systemctl.log", tmp_path / "fail"
    folder.mkdir()
    script = folder / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\ncase "$1" in\n'
                      f'  is-active) echo active ;;\n  is-enabled) echo enabled ;;\n'
                      f'  restart) test ! -e "{fail}" ;;\nesac\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return {"log": log, "fail": fail}


def test_systemd_restart_reloads_first_and_clears_the_marker_only_when_it_succeeds(tmp_path, systemctl):
    marker = tmp_path / ".restart-pending"
    marker.write_text("pending\n")
    req = {"unit": "edgeloop-agent-a.service", "reload": True, "restart": True, "restart_marker": str(marker)}
    systemctl["fail"].write_text("")
    assert "restart edgeloop-agent-a.service failed" in call("systemd", **req)["error"]
    assert marker.exists()  # the next run restarts again
    systemctl["fail"].unlink()
    out = call("systemd", **req)
    assert out["active"] and out["enabled"] and not marker.exists()
    assert systemctl["log"].read_text().splitlines()[-4:] == [
        "daemon-reload", "restart edgeloop-agent-a.service", "is-active edgeloop-agent-a.service",
        "is-enabled edgeloop-agent-a.service"]
