"""The program provisioning runs on an edge host: stdlib only, Python 3.8+, no edgeloop installed.

The cloud sends this file's source to the site's base interpreter (``python -c SOURCE``) over one SSH
channel and then talks to it one JSON request per line (:func:`serve`). Each operation decides where
the files are (compare hashes, create what is missing, write under a temporary name then rename), so a
step costs one round trip and nothing is left half-written. Deploys and stops use the same worker.

It must not import anything outside the standard library: the host has only a bare Python before the
first run. Tests import it and call the operations directly.
"""

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
    """Write under a temporary name created with its final mode (a secret is never readable by others,
    not even for a moment), fsync, then rename over ``path``."""
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, ".%s.tmp-%d" % (os.path.basename(path), os.getpid()))
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


def mark_restart(req):
    """Record on the host that the agent must restart, before making the change that needs it.

    A connection that drops between the change and the restart leaves this marker, so the next run
    restarts the agent instead of finding everything "ok" and leaving the old code running.
    """
    if req.get("restart_marker"):
        write_atomic(req["restart_marker"], "%f\n" % time.time())


def clear_restart(req):
    if req.get("restart_marker") and os.path.exists(req["restart_marker"]):
        os.unlink(req["restart_marker"])


def restart_pending(req):
    return {"pending": os.path.exists(req["restart_marker"])}


def commit(req):
    got = sha256(req["tmp"])
    if got != req["sha256"]:
        if os.path.exists(req["tmp"]):
            os.unlink(req["tmp"])
        return {"error": "upload corrupted: sha256 %s, expected %s" % (got, req["sha256"])}
    mark_restart(req)
    os.replace(req["tmp"], req["path"])
    return {}


def mode_of(path):
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return None


def put_text(req):
    mode = req.get("mode")
    if read(req["path"]) == req["content"]:
        if mode is None or mode_of(req["path"]) == mode:
            return {"changed": False}
        if not req["check"]:
            os.chmod(req["path"], mode)  # same content, too open (or too closed): fix the mode only
        return {"changed": True}
    if not req["check"]:
        mark_restart(req)
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
        mark_restart(req)
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
            mark_restart(req)
            write_atomic(pth, pth_text)
    if read(marker) != req["sha256"]:
        actions.append("install wheel")
        if not check:
            mark_restart(req)
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
    clear_restart(req)
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
        clear_restart(req)
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
       "process_stop": process_stop, "restart_pending": restart_pending, "systemd": systemd, "health": health}


def handle(line):
    """Answer one request line; every error becomes an ``error`` field, never a dead worker."""
    try:
        req = json.loads(line)
        return OPS[req["op"]](req)
    except Exception as exc:
        return {"error": "%s: %s" % (type(exc).__name__, exc)}


def serve(stdin, stdout):
    """One request per line in, one JSON answer per line out: one SSH channel serves every step."""
    for line in stdin:
        stdout.write(json.dumps(handle(line)) + "\n")
        stdout.flush()


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
