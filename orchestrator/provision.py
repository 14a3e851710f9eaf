"""Agentless provisioning of edge sites: idempotent steps, each reported per host as ok/changed/failed.

For each site (over SSH, or locally for the demo) the steps are::

    connect → facts → folders → wheel → install → config → service → restart → health

Each step first looks at the host and only acts when the host differs from what the inventory asks
for, so a second run on an unchanged fleet reports no change at all (Ansible's vocabulary: ``ok``
means "already right", ``changed`` means "made right", ``failed`` carries the reason). In ``check``
mode every step only looks and reports what it *would* change.

The work on the host is done by one small stdlib-only Python program (:data:`REMOTE`) run with the
site's base interpreter, one command per step, so a step is one SSH round trip and its decision (compare
hashes, create what is missing, write to a temporary name then rename) happens where the files are.
Nothing is left half-written: files and the venv are created under a temporary name and renamed.

Many hosts run at once (a thread per host, up to a limit); a host that is down, refuses the key, or
fails a step fails alone and the others finish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from edge_agent.config import dump_config
from edge_agent.fileio import file_sha256
from edge_agent.layout import AgentPaths
from orchestrator.inventory import Inventory, Site
from orchestrator.project import PROJECT_DIR

log = logging.getLogger(__name__)

STEPS = ("connect", "facts", "folders", "wheel", "install", "config", "service", "restart", "health")
OK, CHANGED, FAILED, SKIPPED = "ok", "changed", "failed", "skipped"

# What a person would type to do each step by hand on one host (for the benchmark's comparison).
MANUAL_COMMANDS = {
    "connect": 1,   # ssh user@host
    "facts": 6,     # uname -a; python3 --version; nproc; free -m; df -h; nvidia-smi
    "folders": 1,   # mkdir -p config models/... data/... runs outbox
    "wheel": 2,     # scp the wheel; sha256sum it
    "install": 4,   # python3 -m venv; echo base site-packages > x.pth; pip install; python -c 'import ...'
    "config": 2,    # scp agent.yaml; mv into place
    "service": 3,   # write the unit (or supervisor script); systemctl daemon-reload; systemctl enable
    "restart": 1,   # systemctl restart
    "health": 1,    # cat status.json (and look at the time)
}
MIN_PYTHON = (3, 10)


# ------------------------------------------------------------------------------------------- results


@dataclass
class StepResult:
    step: str
    status: str
    message: str = ""
    seconds: float = 0.0


@dataclass
class HostResult:
    site: str
    steps: list[StepResult] = field(default_factory=list)
    error_kind: str | None = None  # "connect" (retry may help), "hostkey" (never retried), "step"
    facts: dict = field(default_factory=dict)
    seconds: float = 0.0
    commands: int = 0  # SSH sessions/uploads this tool opened on the host
    requests: int = 0  # step requests answered by the remote worker (one line each way)

    @property
    def status(self) -> str:
        statuses = {s.status for s in self.steps}
        return FAILED if FAILED in statuses else CHANGED if CHANGED in statuses else OK

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    @property
    def changed(self) -> int:
        return sum(s.status == CHANGED for s in self.steps)

    @property
    def reason(self) -> str:
        """Why the host failed: the first failed step and its message."""
        for step in self.steps:
            if step.status == FAILED:
                return f"{step.step}: {step.message}"
        return ""

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.steps)

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status, "reason": self.reason}


@dataclass
class RunReport:
    hosts: list[HostResult]
    check: bool = False
    seconds: float = 0.0

    @property
    def failed(self) -> list[HostResult]:
        return [h for h in self.hosts if h.failed]

    @property
    def changed(self) -> int:
        """Total changed steps over all hosts (0 on a second run over an unchanged fleet)."""
        return sum(h.changed for h in self.hosts)

    def rows(self) -> list[dict]:
        """One row per host and step (the Prefect table artifact, the CLI's --json)."""
        return [{"site": h.site, "step": s.step, "status": s.status, "message": s.message,
                 "seconds": round(s.seconds, 2)} for h in self.hosts for s in h.steps]

    def recap(self) -> str:
        """An Ansible-style recap: one line per host, then the failures and why."""
        width = max([len(h.site) for h in self.hosts] + [4])
        mode = " (check mode: nothing was changed)" if self.check else ""
        lines = [f"PROVISION RECAP{mode}"]
        for h in self.hosts:
            lines.append(f"{h.site:<{width}}  {h.status:<7}  ok={h.count(OK)} changed={h.count(CHANGED)} "
                         f"failed={h.count(FAILED)} skipped={h.count(SKIPPED)}  {h.seconds:.1f}s")
        if self.failed:
            lines.append(f"{len(self.failed)} of {len(self.hosts)} host(s) failed:")
            lines += [f"  {h.site}: {h.reason}" for h in self.failed]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- the wheel


@dataclass(frozen=True)
class Wheel:
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name


PACKAGES = ("orchestrator", "edge_agent", "flows")
BUILD_FILES = ("pyproject.toml", "README.md", "LICENSE")


def _source_files(project: Path) -> list[Path]:
    files = [project / name for name in BUILD_FILES if (project / name).exists()]
    for package in PACKAGES:
        files += sorted(p for p in (project / package).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def build_wheel(project: Path = PROJECT_DIR, cache: Path | None = None) -> Wheel:
    """The project's wheel, built once per content of its sources (cached under ``cache``).

    The build runs on a copy of the sources in a temporary folder so that it neither writes ``build/``
    into the checkout nor picks up stale files from an old one; same sources, same cached file, same sha256.
    """
    cache = cache or Path(os.environ.get("EDGELOOP_CACHE", Path.home() / ".cache" / "edgeloop")) / "wheels"
    digest = hashlib.sha256()
    files = _source_files(project)
    for path in files:
        digest.update(str(path.relative_to(project)).encode() + b"\0" + path.read_bytes() + b"\0")
    folder = cache / digest.hexdigest()[:20]
    found = sorted(folder.glob("*.whl")) if folder.exists() else []
    if found:
        return Wheel(found[0], file_sha256(found[0]))
    with tempfile.TemporaryDirectory(prefix="edgeloop-wheel-") as tmp:
        src = Path(tmp) / "src"
        for path in files:
            target = src / path.relative_to(project)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        out = Path(tmp) / "out"
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                               "-w", str(out), str(src)], capture_output=True, text=True)
        wheels = sorted(out.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"building the wheel failed: {proc.stderr.strip()[-2000:]}")
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
        shutil.copy2(wheels[0], staging / wheels[0].name)
        try:
            staging.rename(folder)  # atomic: a concurrent build of the same content wins or loses whole
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return build_wheel(project, cache)


# ------------------------------------------------------------------------------ what runs on the host

# Run as: <site python> -c REMOTE, then JSON requests on stdin. Stdlib only, Python >= 3.8.
REMOTE = r'''
import hashlib, json, os, platform, shutil, signal, subprocess, sys, sysconfig, time

def sha256(path):
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for b in iter(lambda: f.read(1 << 20), b""):
                h.update(b)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return h.hexdigest()

def read(path):
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None

def write_atomic(path, text, mode=None):
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, ".%s.tmp-%d" % (os.path.basename(path), os.getpid()))
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

def existing_parent(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path

def facts(req):
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    os_name = platform.platform()
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL,
                                 universal_newlines=True, timeout=10).stdout.strip()
            gpu = out.splitlines()[0] if out else None
        except Exception:
            gpu = None
    home = os.path.expanduser("~")
    root = req["root"].replace("~", home, 1) if req["root"].startswith("~/") else req["root"]
    return {"os": os_name, "kernel": platform.release(), "arch": platform.machine(),
            "python": platform.python_version(), "python_path": sys.executable, "cores": os.cpu_count(),
            "memory_bytes": mem, "disk_free_bytes": shutil.disk_usage(existing_parent(root)).free, "gpu": gpu,
            "home": home, "root": root, "uid": os.getuid(), "time": time.time(),
            "systemd": os.path.isdir("/run/systemd/system") and bool(shutil.which("systemctl"))}

def folders(req):
    missing = [f for f in req["folders"] if not os.path.isdir(f)]
    if not req["check"]:
        for f in missing:
            os.makedirs(f, exist_ok=True)
    return {"changed": missing}

def file_sha(req):
    return {"sha256": sha256(req["path"])}

def commit(req):
    got = sha256(req["tmp"])
    if got != req["sha256"]:
        if os.path.exists(req["tmp"]):
            os.unlink(req["tmp"])
        return {"error": "upload corrupted: sha256 %s, expected %s" % (got, req["sha256"])}
    os.replace(req["tmp"], req["path"])
    return {}

def put_text(req):
    if read(req["path"]) == req["content"]:
        return {"changed": False}
    if not req["check"]:
        write_atomic(req["path"], req["content"], req.get("mode"))
    return {"changed": True}

def run(cmd):
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, cwd="/")  # not the caller's cwd: it would shadow the venv
    if proc.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(cmd[:4]), proc.returncode, proc.stdout[-1500:]))
    return proc.stdout

def install(req):
    venv, check = req["venv"], req["check"]
    vpy = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, "edgeloop-wheel.sha256")
    base = []
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths()[key]
        if p not in base:
            base.append(p)
    pth_text = "".join(p + "\n" for p in base)
    actions = []
    if not os.path.exists(vpy):
        actions.append("create venv")
        if check:
            return {"changed": actions + ["link base packages", "install wheel"]}
        has_pip = subprocess.run([sys.executable, "-c", "import pip"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
        tmp = "%s.tmp-%d" % (venv, os.getpid())
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            run([sys.executable, "-m", "venv"] + (["--without-pip"] if has_pip else []) + [tmp])
            os.replace(tmp, venv)  # a venv without pip scripts holds no absolute path to itself
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    site = run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    pth = os.path.join(site, "_edgeloop_base.pth")
    if read(pth) != pth_text:
        actions.append("link base packages")
        if not check:
            write_atomic(pth, pth_text)
    if read(marker) != req["sha256"]:
        actions.append("install wheel")
        if not check:
            run([vpy, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", "-q",
                 "--disable-pip-version-check", "--no-warn-script-location", req["wheel"]])
            where = run([vpy, "-c", "import edge_agent, edge_agent.config; print(edge_agent.__file__)"]).strip()
            if not os.path.realpath(where).startswith(os.path.realpath(venv)):
                return {"error": "edge_agent imports from %s, not from the venv %s" % (where, venv)}
            write_atomic(marker, req["sha256"])
    return {"changed": actions}

def alive(pidfile, needle):
    try:
        pid = int(read(pidfile) or "")
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except (ValueError, OSError):
        return None
    return pid if needle in cmdline else None

def process_state(req):
    return {"pid": alive(req["pidfile"], req["script"]), "time": time.time()}

def process_stop(req):
    pid = alive(req["pidfile"], req["script"])
    if pid:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.time() + 15
        while time.time() < deadline and alive(req["pidfile"], req["script"]):
            time.sleep(0.1)
        if alive(req["pidfile"], req["script"]):
            os.killpg(pid, signal.SIGKILL)
    return {"stopped": pid}

def process_restart(req):
    pid = process_stop(req)["stopped"]
    started = time.time()
    devnull = open(os.devnull, "r+")
    proc = subprocess.Popen(["/bin/sh", req["script"]], stdin=devnull, stdout=devnull, stderr=devnull,
                            cwd=req["cwd"], start_new_session=True, close_fds=True)
    write_atomic(req["pidfile"], "%d\n" % proc.pid)
    return {"pid": proc.pid, "stopped": pid, "time": started}

def systemd(req):
    unit, out = req["unit"], {}
    if req.get("reload"):
        run(["systemctl", "daemon-reload"])
    if req.get("enable"):
        run(["systemctl", "enable", "--quiet", unit])
    if req.get("restart"):
        out["time"] = time.time()
        run(["systemctl", "restart", unit])
    if req.get("stop"):
        run(["systemctl", "stop", unit])
    state = subprocess.run(["systemctl", "is-active", unit], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           universal_newlines=True)
    enabled = subprocess.run(["systemctl", "is-enabled", unit], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             universal_newlines=True)
    out.update(active=state.stdout.strip() == "active", enabled=enabled.stdout.strip() == "enabled",
               now=time.time())
    return out

def health(req):
    deadline = time.time() + req["timeout"]
    last = None
    while True:
        try:
            status = json.loads(read(req["status_file"]) or "null")
        except ValueError:
            status = None
        if isinstance(status, dict) and status.get("site") == req["site"] and \
                float(status.get("time", 0)) >= req["since"]:
            return {"status": {k: status.get(k) for k in ("site", "time", "pid", "state", "version")},
                    "age": time.time() - float(status["time"])}
        last = status
        if time.time() >= deadline or req["check"]:
            tail = "".join((read(f) or "")[-600:] for f in req["log_files"])
            return {"missing": True, "last": last, "log_tail": tail}
        time.sleep(0.2)

OPS = {"facts": facts, "folders": folders, "file_sha": file_sha, "commit": commit, "put_text": put_text,
       "install": install, "process_state": process_state, "process_restart": process_restart,
       "process_stop": process_stop,
       "systemd": systemd, "health": health}
# One request per line on stdin, one JSON answer per line on stdout: one SSH channel serves every step.
for line in sys.stdin:
    try:
        req = json.loads(line)
        out = OPS[req["op"]](req)
    except Exception as exc:
        out = {"error": "%s: %s" % (type(exc).__name__, exc)}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
'''


# ----------------------------------------------------------------------------- transports to the host


class WorkerGone(Exception):
    """The remote worker ended (host went down, connection cut, interpreter missing)."""

    def __init__(self, message: str, exit_status: int | None = None):
        super().__init__(message)
        self.exit_status = exit_status


class Remote(Protocol):
    """What the steps need from a host: a long-lived worker to send requests to, and file upload."""

    def start(self, command: str) -> None: ...

    def request(self, line: str, timeout: float) -> str: ...

    def put(self, local: Path, remote: str) -> None: ...

    def close(self) -> None: ...


class SshRemote:
    """A host reached through an open Fabric connection (host key already verified).

    The worker runs on one SSH channel for the whole visit: a step costs one line each way instead of
    a new session (a new session costs OpenSSH a fork and setup, about 0.3 s on a small machine).
    """

    def __init__(self, fab):
        self.fab = fab
        self.channel = None

    def start(self, command: str) -> None:
        self.channel = self.fab.client.get_transport().open_session()
        self.channel.exec_command(command)
        self._in = self.channel.makefile_stdin("wb")
        self._out = self.channel.makefile("rb")

    def request(self, line: str, timeout: float) -> str:
        try:
            self.channel.settimeout(timeout)
            self._in.write(line.encode() + b"\n")
            self._in.flush()
            answer = self._out.readline()
        except OSError as exc:  # socket.timeout included
            raise WorkerGone(f"no answer from the host: {exc or type(exc).__name__}") from None
        if not answer:
            status = self.channel.recv_exit_status() if self.channel.exit_status_ready() else None
            err = self.channel.recv_stderr(4000).decode(errors="replace").strip() if self.channel.recv_stderr_ready() \
                else ""
            raise WorkerGone(f"connection to the host lost{': ' + err if err else ''}", status)
        return answer.decode()

    def put(self, local: Path, remote: str) -> None:
        self.fab.sftp().put(str(local), remote)

    def close(self) -> None:
        self.fab.close()


class LocalRemote:
    """This machine (``connection: local``): the same worker, run as a local process."""

    def start(self, command: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a fresh login would have it
        self.proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=Path.home(), env=env)

    def request(self, line: str, timeout: float) -> str:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        except OSError:
            answer = ""
        if not answer:
            status = self.proc.wait(timeout=5)
            raise WorkerGone(f"worker exited: {self.proc.stderr.read().strip()[-500:]}", status)
        return answer

    def put(self, local: Path, remote: str) -> None:
        shutil.copyfile(local, remote)

    def close(self) -> None:
        if getattr(self, "proc", None) and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


def supervisor_pidfile(root: str) -> str:
    return f"{root}/supervisor.pid"


def supervisor_script(root: str) -> str:
    return f"{root}/bin/edgeloop-agent-supervise"


def agent_unit(site_name: str) -> str:
    return f"edgeloop-agent-{site_name}.service"


class HostWorker:
    """The :data:`REMOTE` worker on one host: one JSON request and one JSON answer per line.

    Started on first use with the site's base Python, so provisioning, deploys and stops all speak
    the same small protocol over one channel.
    """

    def __init__(self, remote: Remote, python: str):
        self.remote, self.python, self.started = remote, python, False

    def call(self, op: str, timeout_s: float = 120, **req) -> dict:
        if not self.started:
            self.remote.start(f"{shlex.quote(self.python)} -c {shlex.quote(REMOTE)}")
            self.started = True
        try:
            out = json.loads(self.remote.request(json.dumps({"op": op, **req}), timeout=timeout_s))
        except WorkerGone as exc:
            if exc.exit_status == 127:
                raise StepFailed(f"python {self.python!r} not found on the host "
                                 f"(set 'python' in the inventory)") from None
            raise StepFailed(str(exc)) from None
        if "error" in out:
            raise StepFailed(out["error"])
        return out


# ------------------------------------------------------------------------------------------- the steps


class StepFailed(Exception):
    """A step could not do its job; the message says why (and is printed, masked)."""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} PiB"


SUPERVISOR = """#!/bin/sh
# Managed by edgeloop provisioning (do not edit): runs the edge agent for site {site}
# and starts it again when it exits unexpectedly. Stop it with: kill -TERM -$(cat {pidfile})
echo $$ > {pidfile}.tmp && mv -f {pidfile}.tmp {pidfile}
child=
trap 'if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; wait "$child"; fi; exit 0' TERM INT HUP
while :; do
  {python} -m edge_agent run --config {config} >>{out} 2>&1 &
  child=$!
  wait "$child"
  code=$?
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) edgeloop supervisor: agent exited with $code; restarting in 5 s" >>{out}
  sleep 5
done
"""

UNIT = """# Managed by edgeloop provisioning (do not edit)
[Unit]
Description=edgeloop edge agent (site {site})
After=network-online.target
Wants=network-online.target

[Service]
ExecStart={python} -m edge_agent run --config {config}
WorkingDirectory={root}
Restart=always
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
"""


class SiteProvisioner:
    """Runs the steps on one site, in order, stopping at the first failure.

    Holds what earlier steps learnt (facts, the resolved root, whether anything changed) because later
    steps depend on it: the service restarts only when the wheel, install, config or unit changed.
    """

    def __init__(self, site: Site, inventory: Inventory, remote: Remote, wheel: Wheel, check: bool,
                 result: HostResult):
        self.site, self.inventory, self.remote, self.wheel, self.check = site, inventory, remote, wheel, check
        self.result = result
        self.root = site.root
        self.paths = AgentPaths(Path(site.root))
        self.needs_restart = False
        self.worker = HostWorker(remote, site.python)
        self.restarted_at: float | None = None
        self.mode = "process"

    # -- plumbing

    def call(self, op: str, timeout_s: float = 120, **req) -> dict:
        """Run one :data:`REMOTE` operation on the host (starting the worker on first use)."""
        started = self.worker.started
        try:
            return self.worker.call(op, timeout_s, **req)
        finally:
            self.result.commands += int(self.worker.started and not started)
            self.result.requests += 1

    def would(self, text: str) -> str:
        return f"would {text}" if self.check else text

    @property
    def venv(self) -> str:
        return self.site.venv.replace("~", self.result.facts.get("home", "~"), 1) if self.site.venv else \
            f"{self.root}/venv"

    @property
    def pidfile(self) -> str:
        return supervisor_pidfile(self.root)

    @property
    def script(self) -> str:
        return supervisor_script(self.root)

    @property
    def out_file(self) -> str:
        """The agent's stdout/stderr (its own log goes to ``agent.log``; this catches what happens before)."""
        return f"{self.root}/agent.out"

    @property
    def unit(self) -> str:
        return agent_unit(self.site.name)

    # -- steps: each returns (status, message)

    def facts(self) -> tuple[str, str]:
        facts = self.call("facts", root=self.site.root)
        self.result.facts = facts
        self.root = facts["root"]
        self.paths = AgentPaths(Path(self.root))
        version = tuple(int(p) for p in facts["python"].split(".")[:2])
        if version < MIN_PYTHON:
            raise StepFailed(f"python {facts['python']} at {facts['python_path']} is too old "
                             f"(need {'.'.join(map(str, MIN_PYTHON))}+)")
        mode = self.site.agent.service
        self.mode = "systemd" if mode == "systemd" or (mode == "auto" and facts["systemd"] and facts["uid"] == 0) \
            else "process"
        if mode == "systemd" and not facts["systemd"]:
            raise StepFailed("service: systemd was asked for but systemd does not run on this host")
        gpu = facts["gpu"] or "no GPU"
        return OK, (f"{facts['os']} {facts['arch']}, python {facts['python']}, {facts['cores']} cores, "
                    f"{_size(facts['memory_bytes'])} RAM, {_size(facts['disk_free_bytes'])} free, {gpu}")

    def folders(self) -> tuple[str, str]:
        wanted = [str(f) for f in self.paths.folders()] + [f"{self.root}/bin", f"{self.root}/wheels"]
        missing = self.call("folders", folders=wanted, check=self.check)["changed"]
        if not missing:
            return OK, f"{len(wanted)} folders present"
        return CHANGED, self.would(f"create {len(missing)} folder(s) under {self.root}")

    def wheel_step(self) -> tuple[str, str]:
        target = f"{self.root}/wheels/{self.wheel.name}"
        if self.call("file_sha", path=target)["sha256"] == self.wheel.sha256:
            return OK, f"{self.wheel.name} present (sha256 {self.wheel.sha256[:12]})"
        self.needs_restart = True
        if self.check:
            return CHANGED, f"would upload {self.wheel.name}"
        tmp = f"{self.root}/wheels/.{self.wheel.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.remote.put(self.wheel.path, tmp)
        self.result.commands += 1
        self.call("commit", tmp=tmp, path=target, sha256=self.wheel.sha256)
        return CHANGED, f"uploaded {self.wheel.name} ({_size(self.wheel.path.stat().st_size)})"

    def install(self) -> tuple[str, str]:
        out = self.call("install", venv=self.venv, wheel=f"{self.root}/wheels/{self.wheel.name}",
                        sha256=self.wheel.sha256, check=self.check, timeout_s=600)
        if not out["changed"]:
            return OK, f"{self.wheel.name} installed in {self.venv}"
        self.needs_restart = True
        return CHANGED, self.would(", ".join(out["changed"]) + f" ({self.venv})")

    def config(self) -> tuple[str, str]:
        text = dump_config(self.site.agent_config(self.inventory.cloud, root=self.root))
        changed = self.call("put_text", path=str(self.paths.config_file), content=text, check=self.check)["changed"]
        if not changed:
            return OK, f"{self.paths.config_file} up to date"
        self.needs_restart = True
        return CHANGED, self.would(f"write {self.paths.config_file}")

    def service(self) -> tuple[str, str]:
        python = shlex.quote(f"{self.venv}/bin/python")
        config = shlex.quote(str(self.paths.config_file))
        if self.mode == "systemd":
            path = f"/etc/systemd/system/{self.unit}"
            text = UNIT.format(site=self.site.name, python=python, config=config, root=self.root)
        else:
            path = self.script
            text = SUPERVISOR.format(site=self.site.name, python=python, config=config,
                                     out=shlex.quote(self.out_file), pidfile=shlex.quote(self.pidfile))
        changed = self.call("put_text", path=path, content=text, mode=0o755 if self.mode == "process" else 0o644,
                            check=self.check)["changed"]
        if self.mode == "systemd" and not self.check:
            state = self.call("systemd", unit=self.unit, reload=changed, enable=True)
            changed = changed or not state["enabled"]
        if not changed:
            return OK, f"{self.mode}: {path} up to date"
        self.needs_restart = True
        return CHANGED, self.would(f"write {path} ({self.mode})")

    def restart(self) -> tuple[str, str]:
        if self.mode == "systemd":
            running = self.call("systemd", unit=self.unit)["active"]  # only asks: no reload/enable/restart
        else:
            running = bool(self.call("process_state", pidfile=self.pidfile, script=self.script)["pid"])
        if running and not self.needs_restart:
            return OK, "agent running, nothing changed"
        verb = "restart" if running else "start"
        if self.check:
            return CHANGED, f"would {verb} the agent"
        if self.mode == "systemd":
            self.restarted_at = self.call("systemd", unit=self.unit, restart=True)["time"]
            return CHANGED, f"{verb}ed {self.unit}"
        out = self.call("process_restart", pidfile=self.pidfile, script=self.script, cwd=self.root)
        self.restarted_at = out["time"]
        return CHANGED, f"{verb}ed the supervised agent (pid {out['pid']})"

    def health(self) -> tuple[str, str]:
        interval = self.site.agent.heartbeat_interval_s
        if self.restarted_at is not None:
            since = self.restarted_at
        else:  # no restart: a heartbeat from the last few intervals will do (host clock, from the facts)
            since = self.result.facts["time"] - 3 * interval - 5
        timeout = self.site.agent.health_timeout_s
        out = self.call("health", status_file=str(self.paths.status_file),
                        log_files=[self.out_file, str(self.paths.log_file)],
                        site=self.site.name, since=since, timeout=timeout, check=self.check, timeout_s=timeout + 30)
        if "missing" in out:
            if self.check:
                return SKIPPED, "no fresh heartbeat now (check mode does not wait)"
            tail = out["log_tail"].strip().splitlines()[-3:]
            raise StepFailed(f"no heartbeat from the agent in {timeout:.0f} s at {self.paths.status_file}"
                             + (f"; agent log ends: {' | '.join(tail)}" if tail else ""))
        status = out["status"]
        return OK, f"heartbeat {out['age']:.1f} s old (agent pid {status.get('pid')})"

    def run(self, on_step: Callable[[str, str], None] | None = None) -> None:
        steps = {"facts": self.facts, "folders": self.folders, "wheel": self.wheel_step, "install": self.install,
                 "config": self.config, "service": self.service, "restart": self.restart, "health": self.health}
        failed = False
        for name, step in steps.items():
            if failed:
                self.result.steps.append(StepResult(name, SKIPPED, "an earlier step failed"))
                continue
            if on_step:
                on_step(self.site.name, name)
            start = time.monotonic()
            try:
                status, message = step()
            except StepFailed as exc:
                status, message = FAILED, str(exc)
            except Exception as exc:  # a dropped connection mid-step, a timeout: this host only
                status, message = FAILED, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            failed = status == FAILED
            self.result.steps.append(StepResult(name, status, self.inventory.mask(message),
                                                time.monotonic() - start))
            log.debug("%s %s: %s %s", self.site.name, name, status, message)


# --------------------------------------------------------------------------------------- the runner


def open_remote(site: Site, inventory: Inventory, accept_new_host_keys: bool) -> Remote:
    if site.connection.type == "local":
        return LocalRemote()
    from orchestrator.ssh import connect  # fabric is a cloud-side dependency, imported when needed

    return SshRemote(connect(site.connection, inventory.known_hosts, accept_new_host_keys))


def provision_site(site: Site, inventory: Inventory, wheel: Wheel, check: bool = False,
                   accept_new_host_keys: bool = False, on_step: Callable[[str, str], None] | None = None) -> HostResult:
    """Provision one site; never raises for a host problem, the result says what failed and why."""
    from orchestrator.ssh import ConnectError, HostKeyRefused

    result = HostResult(site.name)
    start = time.monotonic()
    try:
        if on_step:
            on_step(site.name, "connect")
        t0 = time.monotonic()
        try:
            remote = open_remote(site, inventory, accept_new_host_keys)
        except HostKeyRefused as exc:
            result.error_kind = "hostkey"
            result.steps.append(StepResult("connect", FAILED, inventory.mask(str(exc)), time.monotonic() - t0))
            return result
        except ConnectError as exc:
            result.error_kind = "connect"
            result.steps.append(StepResult("connect", FAILED, inventory.mask(str(exc)), time.monotonic() - t0))
            return result
        result.steps.append(StepResult("connect", OK, inventory.mask(site.connection.describe()),
                                       time.monotonic() - t0))
        try:
            SiteProvisioner(site, inventory, remote, wheel, check, result).run(on_step)
        finally:
            remote.close()
        if result.failed:
            result.error_kind = "step"
        return result
    finally:
        result.seconds = time.monotonic() - start
        for name in STEPS:
            if name not in {s.step for s in result.steps}:
                result.steps.append(StepResult(name, SKIPPED, "an earlier step failed"))


def provision(inventory: Inventory, limit: list[str] | None = None, check: bool = False,
              accept_new_host_keys: bool = False, concurrency: int | None = None, wheel: Wheel | None = None,
              on_step: Callable[[str, str], None] | None = None) -> RunReport:
    """Provision the selected sites, ``concurrency`` at once (default: the inventory's ``ssh.concurrency``)."""
    sites = inventory.select(limit)
    wheel = wheel or build_wheel()
    workers = max(1, min(concurrency or inventory.ssh.concurrency, len(sites)))
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="provision") as pool:
        futures = [pool.submit(provision_site, site, inventory, wheel, check, accept_new_host_keys, on_step)
                   for site in sites]
        hosts = [f.result() for f in futures]
    return RunReport(hosts, check=check, seconds=time.monotonic() - start)

