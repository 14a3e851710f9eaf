"""The program provisioning runs on an edge host: stdlib only, no edgeloop installed.

One file on purpose (over 450 lines): it travels to the host as one source text (``python -c``), so it
cannot import a sibling module there.

The cloud sends this file's source to the site's base interpreter (``python -c SOURCE``) over one SSH
channel and then talks to it one JSON request per line (:func:`serve`). Each operation decides where
the files are (compare hashes, create what is missing, write under a temporary name then rename), so a
step costs one round trip and nothing is left half-written. Deploys and stops use the same worker.

Standard library only (the host has a bare Python before the first run), and it parses and answers
``facts`` on Python 3.6+, so a host too old for the agent is told so rather than failing with a syntax
error: hence ``typing.Optional``, ``universal_newlines``, no ``from __future__``. Tests call its ops directly.

Whether the agent must restart is kept on the host, not in the caller's memory: every operation that
changes what the agent runs (wheel, venv, config, service) first writes the restart marker, and only a
successful restart removes it, so a run cut off in between is finished by the next one.
"""
# ruff: noqa: UP006, UP021, UP035, UP045  (old-Python syntax on purpose, see above)

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from typing import IO, Dict, Iterable, List, Optional

Request = Dict  # one decoded request line: {"op": NAME, ...its fields}
Answer = Dict  # one answer line; an "error" field means the operation failed

# -- files


def sha256(path: str) -> Optional[str]:
    """Hex sha256 of a file, or None when it is not there."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return h.hexdigest()


def read(path: str) -> Optional[str]:
    """A text file's content, or None when it is not there."""
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def write_atomic(path: str, text: str, mode: Optional[int] = None) -> None:
    """Write under a temporary name created with its final mode (a secret is never readable by others,
    not even for a moment), fsync, then rename over ``path``."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)  # os.open's mode is masked by the umask; the wanted one is exact
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def mode_of(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return None


def existing_parent(path: str) -> str:
    """The nearest folder that exists (a root not created yet still has a disk to measure)."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def run(cmd: List[str]) -> str:
    """Run a command, return its output; a failure raises with the end of that output."""
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, cwd="/", check=False)  # not cwd: it would shadow the venv
    if proc.returncode != 0:
        raise RuntimeError("{} failed ({}): {}".format(" ".join(cmd[:4]), proc.returncode, proc.stdout[-1500:]))
    return proc.stdout


# -- facts


def _first_field(path: str, prefix: str) -> Optional[str]:
    """The value after ``prefix`` on the first line of ``path`` that starts with it."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
    except OSError:
        pass
    return None


def _gpu() -> Optional[str]:
    """The first GPU ``nvidia-smi -L`` lists, or None."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, universal_newlines=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _libc() -> List[str]:
    """["glibc", "2.36"] or ["musl", "1.2"]: which manylinux/musllinux wheels the host can use."""
    name, version = platform.libc_ver()
    if name == "glibc" and version:
        return [name, version]
    for folder in ("/lib", "/usr/lib"):
        try:
            if any(f.startswith("ld-musl-") for f in os.listdir(folder)):
                return ["musl", "1.2"]
        except OSError:
            pass
    return [name or "unknown", version or "0.0"]


def facts(req: Request) -> Answer:
    """What the steps need to know about the host: Python, resources, home, the resolved root, systemd."""
    mem = _first_field("/proc/meminfo", "MemTotal:")
    libc = _libc()
    os_name = _first_field("/etc/os-release", "PRETTY_NAME=")
    home = os.path.expanduser("~")
    root = req["root"].replace("~", home, 1) if req["root"].startswith("~/") else req["root"]
    return {"os": os_name.strip('"') if os_name else platform.platform(), "kernel": platform.release(),
            "arch": platform.machine(), "python": platform.python_version(), "python_path": sys.executable,
            "cores": os.cpu_count(), "memory_bytes": int(mem.split()[0]) * 1024 if mem else 0,
            "disk_free_bytes": shutil.disk_usage(existing_parent(root)).free, "gpu": _gpu(),
            "home": home, "root": root, "uid": os.getuid(), "time": time.time(),
            "implementation": {"cpython": "cp", "pypy": "pp"}.get(sys.implementation.name, sys.implementation.name),
            "libc": libc[0], "libc_version": libc[1],
            "systemd": os.path.isdir("/run/systemd/system") and bool(shutil.which("systemctl"))}


# -- the restart marker


def mark_restart(req: Request) -> None:
    """Record on the host that the agent must restart, before making the change that needs it.

    A connection that drops between the change and the restart leaves this marker, so the next run
    restarts the agent instead of finding everything "ok" and leaving the old code running.
    """
    if req.get("restart_marker"):
        write_atomic(req["restart_marker"], f"{time.time():f}\n")


def clear_restart(req: Request) -> None:
    """Called only once the restart has succeeded."""
    if req.get("restart_marker") and os.path.exists(req["restart_marker"]):
        os.unlink(req["restart_marker"])


def restart_pending(req: Request) -> Answer:
    return {"pending": os.path.exists(req["restart_marker"])}


# -- files the agent runs from


def folders(req: Request) -> Answer:
    missing = [f for f in req["folders"] if not os.path.isdir(f)]
    if not req["check"]:
        for f in missing:
            os.makedirs(f, exist_ok=True)
    return {"changed": missing}


def file_sha(req: Request) -> Answer:
    return {"sha256": sha256(req["path"])}


def commit(req: Request) -> Answer:
    """Move an uploaded file into place if it arrived whole; a corrupted one is removed, never used."""
    got = sha256(req["tmp"])
    if got != req["sha256"]:
        if os.path.exists(req["tmp"]):
            os.unlink(req["tmp"])
        return {"error": "upload corrupted: sha256 {}, expected {}".format(got, req["sha256"])}
    mark_restart(req)
    os.replace(req["tmp"], req["path"])
    if req.get("stamp"):  # the hash, checked once here, so a re-run need not read gigabytes again
        write_atomic(_stamp(req["path"]), req["sha256"])
    return {}


def _stamp(path: str) -> str:
    return os.path.join(os.path.dirname(path), ".{}.sha256".format(os.path.basename(path)))


def wheels_missing(req: Request) -> Answer:
    """Which of the wheels (name, sha256, size) the host lacks in ``folder``, and how many bytes of each
    a cut-off earlier upload already left (``partial``: the upload resumes there)."""
    missing, partial = [], {}
    for wheel in req["wheels"]:
        path = os.path.join(req["folder"], wheel["name"])
        try:
            whole = os.path.getsize(path) == wheel["size"] and read(_stamp(path)) == wheel["sha256"]
        except OSError:
            whole = False
        if not whole:
            missing.append(wheel["name"])
            try:
                partial[wheel["name"]] = os.path.getsize(os.path.join(req["folder"], part_name(wheel["sha256"])))
            except OSError:
                pass
    return {"missing": missing, "partial": partial}


def part_name(digest: str) -> str:
    return ".{}.part".format(digest)


def put_text(req: Request) -> Answer:
    """Make a text file hold ``content`` (with ``mode`` when given); ``changed`` says whether it had to."""
    mode = req.get("mode")
    if read(req["path"]) == req["content"]:
        if mode is None or mode_of(req["path"]) == mode:
            return {"changed": False}
        if not req["check"]:
            os.chmod(req["path"], mode)  # same content, too open (or too closed): fix the mode only
        return {"changed": True}
    if not req["check"]:
        mark_restart(req)
        write_atomic(req["path"], req["content"], mode)
    return {"changed": True}


# -- the venv


def _base_site_paths() -> str:
    """The base interpreter's site-packages, one per line: the venv reuses them (torch is not copied)."""
    paths = []  # type: List[str]
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in paths:
            paths.append(path)
    return "".join(p + "\n" for p in paths)


def _create_venv(venv: str, with_pip: bool) -> None:
    """A venv created under a temporary name and renamed into place: never half made."""
    tmp = f"{venv}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        run([sys.executable, "-m", "venv"] + ([] if with_pip else ["--without-pip"]) + [tmp])
        os.replace(tmp, venv)  # a venv without pip scripts holds no absolute path to itself
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _has_pip(python: str) -> bool:
    return subprocess.run([python, "-c", "import pip"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, check=False).returncode == 0


def _link_base_packages(vpy: str, req: Request, linked: bool) -> bool:
    """Point the venv at the base site-packages (a ``.pth`` file) or make sure it is not; True on a change."""
    site = run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    pth, text = os.path.join(site, "_edgeloop_base.pth"), _base_site_paths() if linked else None
    if read(pth) == text:
        return False
    if not req["check"]:
        mark_restart(req)
        if text is None:
            os.unlink(pth)
        else:
            write_atomic(pth, text)
    return True


def _pip(vpy: str, args: List[str], pip: Optional[str] = None) -> str:
    """The venv's pip (or pip run from its wheel, to bootstrap), blind to the host's pip configuration:
    what gets installed depends only on the arguments (no index, no find-links, no constraints from
    ``PIP_*`` variables or pip.conf)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    cmd = [vpy, os.path.join(pip, "pip")] if pip else [vpy, "-m", "pip"]
    proc = subprocess.run(cmd + args + ["-q", "--no-warn-script-location"], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, cwd="/",
                          env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError("pip {} failed ({}): {}".format(args[0], proc.returncode, proc.stdout[-1500:]))
    return proc.stdout


def _install_packages(vpy: str, req: Request) -> None:
    """The profile's packages, exactly as locked: from the shipped wheels only, or from the named index."""
    wheels = req.get("wheels_dir")
    requirements = os.path.join(req["venv"], "edgeloop-requirements.txt")
    write_atomic(requirements, req["requirements"])
    if req["mode"] == "wheelhouse":
        source = ["--no-index", "--find-links", wheels]
        if not _has_pip(vpy):
            _pip(vpy, ["install"] + source + ["pip"], pip=os.path.join(wheels, req["pip_wheel"]))
    else:
        source = ["--index-url", req["index_url"]]
        write_atomic(os.path.join(req["venv"], "edgeloop-constraints.txt"), req.get("constraints", ""))
        source += ["-c", os.path.join(req["venv"], "edgeloop-constraints.txt")]
    _pip(vpy, ["install"] + source + ["-r", requirements])


def _install_wheel(vpy: str, venv: str, marker: str, digest: str, req: Request) -> Optional[str]:
    """pip-install the project's wheel into the venv and check the agent imports from there; an error or None."""
    mark_restart(req)
    if req["mode"] != "system":
        _install_packages(vpy, req)
    _pip(vpy, ["install", "--no-deps", "--no-index", "--force-reinstall", req["wheel"]])
    where = run([vpy, "-c", "import edge_agent, edge_agent.config; print(edge_agent.__file__)"]).strip()
    if not os.path.realpath(where).startswith(os.path.realpath(venv)):
        return f"edge_agent imports from {where}, not from the venv {venv}"
    write_atomic(os.path.join(venv, "edgeloop-layout"), "{} {}\n".format(req["mode"], req.get("profile", "edge")))
    write_atomic(marker, digest)  # last: a cut-off install is done again next time
    return None


def install(req: Request) -> Answer:
    """The site's venv with the agent and what its profile needs, as the install mode says:

    ``system``: linked to the base interpreter's packages; ``wheelhouse``: its own packages from the
    shipped wheels (pip bootstrapped from its wheel, no index); ``index``: its own, from ``index_url``.
    """
    venv, check, mode = req["venv"], req["check"], req.get("mode", "system")
    vpy, marker = os.path.join(venv, "bin", "python"), os.path.join(venv, "edgeloop-wheel.sha256")
    digest = hashlib.sha256("\0".join([mode, req["sha256"], req.get("requirements", ""),
                                        req.get("index_url") or ""]).encode()).hexdigest()
    actions = []  # type: List[str]
    layout = "{} {}\n".format(mode, req.get("profile", "edge"))
    made_for = read(os.path.join(venv, "edgeloop-layout"))
    if os.path.exists(vpy) and made_for not in (None, layout):
        # another mode or profile: start afresh, so that what the old one needed (torch) does not stay behind
        if check:
            return {"changed": ["rebuild venv ({} -> {})".format(made_for.strip(), layout.strip())]}
        mark_restart(req)
        shutil.rmtree(venv)
        actions.append("remove the venv made for {}".format(made_for.strip()))
    if not os.path.exists(vpy):
        if check:
            return {"changed": ["create venv", "link base packages", "install wheel"] if mode == "system" else
                    ["create venv", "install packages ({})".format(mode), "install wheel"]}
        mark_restart(req)
        # system: pip comes with the linked base packages; index: ensurepip; wheelhouse: from its wheel
        _create_venv(venv, with_pip=mode == "index" or (mode == "system" and not _has_pip(sys.executable)))
        actions.append("create venv")
    if _link_base_packages(vpy, req, linked=mode == "system"):
        actions.append("link base packages" if mode == "system" else "unlink base packages")
    if read(marker) != digest:
        actions.append("install wheel" if mode == "system" else
                       "install {} packages ({})".format(req["requirements"].count("\n"), mode))
        error = None if check else _install_wheel(vpy, venv, marker, digest, req)
        if error:
            return {"error": error}
    return {"changed": actions}


# -- the agent's process (supervised, or a systemd unit)


def alive(pidfile: str, needle: str) -> Optional[int]:
    """The pid in ``pidfile`` if that process runs ``needle`` (a reused pid is not ours)."""
    try:
        pid = int(read(pidfile) or "")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except (ValueError, OSError):
        return None
    return pid if needle in cmdline else None


def process_state(req: Request) -> Answer:
    return {"pid": alive(req["pidfile"], req["script"]), "time": time.time()}


def process_stop(req: Request) -> Answer:
    """Stop the supervisor and the agent (its process group): TERM, then KILL after 15 s."""
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


def process_restart(req: Request) -> Answer:
    """Stop the running supervisor, start the script in its own session, then clear the restart marker."""
    pid = process_stop(req)["stopped"]
    started = time.time()
    proc = subprocess.Popen(["/bin/sh", req["script"]], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=req["cwd"], start_new_session=True, close_fds=True)
    write_atomic(req["pidfile"], f"{proc.pid}\n")
    clear_restart(req)
    return {"pid": proc.pid, "stopped": pid, "time": started}


def _systemctl_word(*args: str) -> str:
    """What ``systemctl`` prints for a query (is-active, is-enabled), whatever its exit status."""
    return subprocess.run(["systemctl"] + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          universal_newlines=True, check=False).stdout.strip()


def systemd(req: Request) -> Answer:
    """Reload, enable, restart or stop the unit as asked (in that order), then report its state."""
    unit, out = req["unit"], {}
    if req.get("reload"):
        run(["systemctl", "daemon-reload"])
    if req.get("enable"):
        run(["systemctl", "enable", "--quiet", unit])
    if req.get("restart"):
        out["time"] = time.time()
        run(["systemctl", "restart", unit])  # raises on failure: the marker stays for the next run
        clear_restart(req)
    if req.get("stop"):
        run(["systemctl", "stop", unit])
    out.update(active=_systemctl_word("is-active", unit) == "active",
               enabled=_systemctl_word("is-enabled", unit) == "enabled", now=time.time())
    return out


# -- health


def _status(path: str) -> object:
    """The agent's status file, parsed (None when missing or half written)."""
    try:
        return json.loads(read(path) or "null")
    except ValueError:
        return None


def _is_fresh(status: object, req: Request) -> bool:
    """This site's heartbeat, written at or after ``since``."""
    return isinstance(status, dict) and status.get("site") == req["site"] and \
        float(status.get("time", 0)) >= req["since"]


def health(req: Request) -> Answer:
    """Wait (up to ``timeout``; not at all in check mode) for a heartbeat newer than ``since``."""
    deadline = time.time() + req["timeout"]
    while True:
        status = _status(req["status_file"])
        if _is_fresh(status, req):
            return {"status": {k: status.get(k) for k in ("site", "time", "pid", "state", "version")},
                    "age": time.time() - float(status["time"])}
        if time.time() >= deadline or req["check"]:
            tail = "".join((read(f) or "")[-600:] for f in req["log_files"])
            return {"missing": True, "last": status, "log_tail": tail}
        time.sleep(0.2)


# -- deploy records and rollback (names as in edge_agent.layout.AgentPaths: this file cannot import it)


def _models(root: str, *parts: str) -> str:
    return os.path.join(os.path.expanduser(root), "models", *parts)


def _active(root: str) -> Optional[str]:
    link = _models(root, "active")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def _record(root: str, version: str) -> Optional[Dict]:
    text = read(_models(root, "deploys", version + ".json"))
    try:
        record = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) and "before_active" in record else None


def _fence(root: str, version: str, add: bool) -> bool:
    """Add ``version`` to (or drop it from) ``models/fence.json``; True when that changed the file."""
    path = _models(root, "fence.json")
    try:
        versions = list(json.loads(read(path) or "{}").get("versions", []))
    except (ValueError, AttributeError):
        versions = []
    if (version in versions) == add:
        return False
    versions = versions + [version] if add else [v for v in versions if v != version]
    write_atomic(path, json.dumps({"versions": versions}))
    return True


def deploy_record(req: Request) -> Answer:
    """Before base ``version`` lands: note what serves now (what a rollback of it restores) and lift any old
    fence on it. A version already in place keeps its first record (a re-run deploys nothing)."""
    root, version = req["root"], req["version"]
    if os.path.isdir(_models(root, "base", version)) and _record(root, version) is not None:
        return {"changed": False, "before_active": _record(root, version)["before_active"]}
    folder = _models(root, "deploys")
    os.makedirs(folder, exist_ok=True)
    before = _active(root)
    write_atomic(os.path.join(folder, version + ".json"),
                 json.dumps({"version": version, "before_active": before, "time": time.time()}))
    _fence(root, version, add=False)
    return {"changed": True, "before_active": before}


def _set_aside(root: str, version: str) -> bool:
    base = _models(root, "base", version)
    if not os.path.isdir(base):
        return False
    os.rename(base, _models(root, "base", ".rolled-back-{}-{}".format(version, int(time.time()))))
    return True


def _check_ensemble(root: str, name: str, check: List[str]) -> Optional[str]:
    """Why ensemble ``name`` would not serve (None: it would), by the agent's own ``check-ensemble``."""
    if not os.path.isfile(_models(root, "ensembles", name, "ensemble.onnx")):
        return "ensemble {} is gone (models/ensembles/{}/ensemble.onnx missing)".format(name, name)
    argv = list(check)
    if not os.path.exists(argv[0]):
        argv[0] = sys.executable  # no venv (a local demo site): the base interpreter has the agent
    done = subprocess.run(argv + [name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=300)
    return None if done.returncode == 0 else (done.stderr.strip()[-500:] or "exit status %d" % done.returncode)


def rollback(req: Request) -> Answer:
    """Undo the deploy of base ``version``: serve exactly what served before it, then set the base aside.

    Refuses, before touching anything, when the site has no record of what served before the version, or
    when that ensemble is gone or would not serve. Then, under the agent's activation lock, the version is
    fenced (a running fine-tune built on it will not activate) and ``models/active`` switched back; only
    then is the base set aside. A site that never got the version is not touched; a second run changes
    nothing. The answer says what serves now, even on a refusal.
    """
    root, version = os.path.expanduser(req["root"]), req["version"]
    serving = _active(root)
    record = _record(root, version)
    present = os.path.isdir(_models(root, "base", version))
    if record is None and not present:
        return {"changed": [], "never_got": True, "serving": serving}
    if record is None:
        return {"error": "no record of what served before {} (deployed before records were kept); nothing "
                         "changed; serving {}".format(version, serving)}
    before = record["before_active"]
    changed = []
    if before != serving and before is not None:
        why = _check_ensemble(root, before, req["check"])
        if why:
            return {"error": "cannot restore {}: {}; nothing changed; serving {}".format(before, why, serving)}
    if req.get("dry_run"):
        return {"changed": [], "would_restore": before, "serving": serving}
    import fcntl

    os.makedirs(_models(root), exist_ok=True)
    with open(_models(root, ".activation.lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _fence(root, version, add=True):
            changed.append("fence")
        if _active(root) != before:
            link, temp = _models(root, "active"), _models(root, ".active-rollback")
            if os.path.lexists(temp):
                os.unlink(temp)
            if before is None:
                os.unlink(link)  # nothing served before the version: nothing serves again
            else:
                os.symlink(os.path.join("ensembles", before), temp)
                os.replace(temp, link)
            changed.append("active")
    if _set_aside(root, version):
        changed.append("base")
    return {"changed": changed, "version": version, "serving": _active(root)}


# -- the protocol

OPS = {"facts": facts, "folders": folders, "file_sha": file_sha, "commit": commit, "put_text": put_text,
       "install": install, "wheels_missing": wheels_missing, "process_state": process_state,
       "process_restart": process_restart, "process_stop": process_stop, "restart_pending": restart_pending,
       "systemd": systemd, "health": health, "deploy_record": deploy_record, "rollback": rollback}


def handle(line: str) -> Answer:
    """Answer one request line; every error becomes an ``error`` field, never a dead worker."""
    try:
        req = json.loads(line)
        return OPS[req["op"]](req)
    except Exception as exc:  # noqa: BLE001 -- any failure is this request's answer, the worker goes on
        return {"error": f"{type(exc).__name__}: {exc}"}


def serve(stdin: Iterable[str], stdout: IO[str]) -> None:
    """One request per line in, one JSON answer per line out: one SSH channel serves every step."""
    for line in stdin:
        stdout.write(json.dumps(handle(line)) + "\n")
        stdout.flush()


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
