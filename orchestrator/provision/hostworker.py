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

import errno
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Dict, Iterable, List, Optional, Tuple

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


def read_bounded(path: str, cap: int) -> Optional[str]:
    """A small text file the host's state lives in, or None when it is not there.

    Raises ValueError (saying why) for a symbolic link, anything but a regular file (a FIFO, a device
    such as /dev/zero) and a file over ``cap`` bytes, reading at most ``cap + 1`` bytes: a hostile
    record costs nothing to refuse and never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError("is a symbolic link") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("is not a regular file")
        data = f.read(cap + 1)
    if len(data) > cap:
        raise ValueError("is over {} bytes".format(cap))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None


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


def _memory_bytes() -> int:
    """MemTotal from /proc/meminfo in bytes; 0 when it is missing or unreadable (a container may hide it)."""
    mem = _first_field("/proc/meminfo", "MemTotal:")
    try:
        return int(mem.split()[0]) * 1024 if mem else 0
    except (ValueError, IndexError):
        return 0


def facts(req: Request) -> Answer:
    """What the steps need to know about the host: Python, resources, home, the resolved root, systemd."""
    libc = _libc()
    os_name = _first_field("/etc/os-release", "PRETTY_NAME=")
    home = os.path.expanduser("~")
    root = req["root"].replace("~", home, 1) if req["root"].startswith("~/") else req["root"]
    return {"os": os_name.strip('"') if os_name else platform.platform(), "kernel": platform.release(),
            "arch": platform.machine(), "python": platform.python_version(), "python_path": sys.executable,
            "cores": os.cpu_count(), "memory_bytes": _memory_bytes(),
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
        write_atomic(_stamp(req["path"]), _stamp_text(req["path"], req["sha256"]))
    return {}


# -- shipped wheels: stamped once checked, re-checked when the file changed, leftovers cleaned up

STALE_PART_S = 3600  # a partial upload of no wanted wheel, untouched this long, is no run's work in progress


def _stamp(path: str) -> str:
    return os.path.join(os.path.dirname(path), ".{}.sha256".format(os.path.basename(path)))


def _stamp_text(path: str, digest: str) -> str:
    """The checked hash with the file's identity (size, mtime, inode): a write to the file changes the
    identity, so the next run hashes it again instead of trusting the stamp."""
    st = os.stat(path)
    return "{} {} {} {}\n".format(digest, st.st_size, st.st_mtime_ns, st.st_ino)


def _regular_size(path: str) -> Optional[int]:
    """The size of ``path`` if it is a regular file (not a link, FIFO or device), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _remove(path: str, check: bool) -> None:
    if not check:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _wheel_state(path: str, wheel: Dict, check: bool) -> Optional[str]:
    """None when the host holds exactly this wheel; else why not ("" when it is simply not there).

    A stamp whose identity still matches the file is trusted; otherwise the bytes are hashed (once: a
    good file gets a fresh stamp). A file whose bytes do not match is removed with its stamp, so it is
    shipped again rather than failing every later install."""
    size = _regular_size(path)
    if size is None and not os.path.lexists(path):
        return ""
    stamp = _stamp(path)
    if size == wheel["size"]:
        try:
            if read_bounded(stamp, 4096) == _stamp_text(path, wheel["sha256"]):
                return None
        except (OSError, ValueError):
            pass  # an unreadable stamp proves nothing: hash the file
        if sha256(path) == wheel["sha256"]:
            if not check:
                write_atomic(stamp, _stamp_text(path, wheel["sha256"]))
            return None
        why = "its bytes do not match sha256 {}".format(wheel["sha256"][:12])
    elif size is None:
        why = "it is not a regular file"
    else:
        why = "it holds {} bytes, not {}".format(size, wheel["size"])
    if not check:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        _remove(path, check)
        _remove(stamp, check)
    return why


def _partial(folder: str, wheel: Dict, check: bool, healed: List[str]) -> int:
    """Bytes a cut-off upload of ``wheel`` left to resume from; a partial that cannot be the start of
    the wheel (larger than it, or not a regular file) is discarded."""
    part = os.path.join(folder, part_name(wheel["sha256"]))
    size = _regular_size(part)
    if size is not None and size <= wheel["size"]:
        return size
    if size is not None or os.path.lexists(part):
        what = "{} bytes, larger than the wheel ({})".format(size, wheel["size"]) if size is not None \
            else "not a regular file"
        healed.append("{} the partial upload of {} ({})".format("would discard" if check else "discarded",
                                                                   wheel["name"], what))
        if not check and os.path.isdir(part) and not os.path.islink(part):
            shutil.rmtree(part)
        _remove(part, check)
    return 0


def _stale_parts(folder: str, wanted: Iterable[str], check: bool) -> List[str]:
    """Discard partial uploads of wheels no longer wanted that nobody touched for :data:`STALE_PART_S`."""
    keep = set(wanted)
    gone = []  # type: List[str]
    try:
        names = os.listdir(folder)
    except OSError:
        return gone
    for name in sorted(names):
        path = os.path.join(folder, name)
        if not (name.startswith(".") and name.endswith(".part")) or name in keep:
            continue
        try:
            stale = time.time() - os.lstat(path).st_mtime > STALE_PART_S
        except OSError:
            continue
        if stale and _regular_size(path) is not None:
            _remove(path, check)
            gone.append("{} a stale partial upload {}".format("would discard" if check else "discarded", name))
    return gone


def wheels_missing(req: Request) -> Answer:
    """Which of the wheels (name, sha256, size) the host lacks in ``folder``, and how many bytes of each
    a cut-off earlier upload already left (``partial``: the upload resumes there). Leftovers that would
    fail every later run are healed here: a damaged wheel is removed (so it is shipped again), a partial
    larger than its wheel or long abandoned is discarded; ``healed`` says what was done."""
    folder, check = req["folder"], bool(req.get("check"))
    missing, partial, healed = [], {}, []  # type: List[str], Dict[str, int], List[str]
    installed = installed_wheels(req["venv"], req["layout"]) if req.get("venv") else {}
    for wheel in req["wheels"]:
        if installed.get(wheel["sha256"]) == wheel["name"]:
            continue  # in the venv the next install keeps: its file is not needed (and was removed)
        why = _wheel_state(os.path.join(folder, wheel["name"]), wheel, check)
        if why is None:
            continue
        if why:
            healed.append("{} {} ({})".format("would re-ship" if check else "re-ship", wheel["name"], why))
        missing.append(wheel["name"])
        size = _partial(folder, wheel, check, healed)
        if size:
            partial[wheel["name"]] = size
    healed += _stale_parts(folder, [part_name(w["sha256"]) for w in req["wheels"]], check)
    return {"missing": missing, "partial": partial, "healed": healed, "kept": bool(installed),
            "installed": sum(1 for w in req["wheels"] if installed.get(w["sha256"]) == w["name"])}


def wheels_verify(req: Request) -> Answer:
    """Hash every wheel in ``folder`` whatever its stamp says (after an install failed: a wheel damaged
    without its size or times changing), removing those whose bytes do not match; ``damaged`` names them."""
    damaged = []
    for wheel in req["wheels"]:
        path = os.path.join(req["folder"], wheel["name"])
        if _regular_size(path) is not None and sha256(path) != wheel["sha256"]:
            _remove(path, False)
            _remove(_stamp(path), False)
            damaged.append(wheel["name"])
    return {"damaged": damaged}


def part_name(digest: str) -> str:
    return ".{}.part".format(digest)


# -- what a verified install leaves behind: not the wheels (they go), the hashes of what it installed

MANIFEST = "edgeloop-wheels.json"  # in the venv: {"wheels": {sha256: file name}}


def installed_wheels(venv: str, layout: str) -> Dict[str, str]:
    """sha256 -> file name of the wheels a verified install put into ``venv``. Empty when the next install
    will not keep this venv (made for another mode or profile, or without its interpreter): then every
    wheel must be on the host again."""
    if read(os.path.join(venv, "edgeloop-layout")) != layout or not os.path.exists(os.path.join(venv, "bin", "python")):
        return {}
    try:
        data = json.loads(read_bounded(os.path.join(venv, MANIFEST), 1 << 20) or "{}")
    except (OSError, ValueError):
        return {}  # unreadable: vouches for nothing, the wheels are shipped again
    wheels = data.get("wheels") if isinstance(data, dict) else None
    if not isinstance(wheels, dict):
        return {}
    return {k: v for k, v in wheels.items() if isinstance(k, str) and isinstance(v, str)}


def _settle_wheels(venv: str, folder: str, wheels: List[Dict], check: bool) -> Tuple[int, int]:
    """After a verified install: record the installed wheels' hashes in the venv, then remove the shipped
    wheels (and their stamps) from ``folder``; (wheels removed, bytes freed). A re-run finds them in the
    record and ships nothing; partial uploads stay (:func:`_stale_parts` ages them out)."""
    if not wheels:  # no list to record: nothing may go (a re-run could not tell what was installed)
        return 0, 0
    manifest = os.path.join(venv, MANIFEST)
    text = json.dumps({"wheels": {w["sha256"]: w["name"] for w in wheels}}, sort_keys=True)
    if not check and read(manifest) != text:
        write_atomic(manifest, text)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return 0, 0
    count = freed = 0
    for name in names:
        path = os.path.join(folder, name)
        size = _regular_size(path)
        if not name.endswith(".whl") or name.startswith(".") or size is None:
            continue
        count, freed = count + 1, freed + size
        _remove(path, check)
        _remove(_stamp(path), check)
    return count, freed


# -- can the host reach its index (asked before anything ships)

REACH_READ_BYTES = 1 << 16


def _why_unreachable(reason: object, host: str, timeout: float) -> str:
    """What stopped a request, as one short phrase (pip says the same in a retry log without the URL)."""
    if isinstance(reason, socket.gaierror):
        return "the name {} does not resolve (DNS: {})".format(host, reason.strerror or reason)
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "no answer within {:.0f} s".format(timeout)
    if type(reason).__name__ in ("SSLError", "SSLCertVerificationError", "CertificateError"):
        return "TLS: {}".format(getattr(reason, "reason", None) or reason)
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[0].lower() + reason.strerror[1:]
    return str(reason) if isinstance(reason, str) else "{}: {}".format(type(reason).__name__, reason)


def reach(req: Request) -> Answer:
    """GET ``url`` from this host as pip would (proxies from the environment, credentials in the URL sent
    as basic auth), reading at most :data:`REACH_READ_BYTES` within about ``timeout`` seconds. ``why``: ""
    when it answered, else the reason (the name does not resolve, connection refused, HTTP 404 Not Found);
    a ``file://`` URL must name a folder on this host."""
    url, timeout = req["url"], float(req.get("timeout", 10))
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        path = urllib.request.url2pathname(parts.path)
        return {"why": "" if os.path.isdir(path) else "no folder {} on the host".format(path)}
    host = parts.hostname or ""
    netloc = host if ":" not in host else "[{}]".format(host)
    netloc += ":{}".format(parts.port) if parts.port else ""
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)),
                                     headers={"User-Agent": "edgeloop-provision", "Accept": "text/html"})
    if parts.username:
        import base64

        token = "{}:{}".format(urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        request.add_header("Authorization", "Basic " + base64.b64encode(token.encode()).decode())
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            got = 0
            while got < REACH_READ_BYTES and time.monotonic() < deadline:
                chunk = answer.read(8192)
                if not chunk:
                    break
                got += len(chunk)
            return {"why": "", "status": answer.status}
    except urllib.error.HTTPError as exc:
        return {"why": "HTTP {} {}".format(exc.code, exc.reason), "status": exc.code}
    except urllib.error.URLError as exc:
        return {"why": _why_unreachable(exc.reason, host, timeout)}
    except (OSError, ValueError) as exc:  # a timeout while reading, a reset, a malformed answer
        return {"why": _why_unreachable(exc, host, timeout)}
    except Exception as exc:  # noqa: BLE001 -- http.client's own errors (a server that speaks no HTTP)
        return {"why": "{}: {}".format(type(exc).__name__, exc)}


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


# Run by the venv's interpreter: every requirement installed, a pinned one at its version (argv[1]: the file).
VERIFY_SOURCE = """
import re
import sys
from importlib import metadata
bad = []
for line in open(sys.argv[1]):
    match = re.match(r"\\s*([A-Za-z0-9][A-Za-z0-9._-]*)\\s*(==\\s*([^\\s;]+))?", line)
    if not match:
        continue
    try:
        got = metadata.version(match.group(1))
    except metadata.PackageNotFoundError:
        bad.append(match.group(1) + " missing")
        continue
    if match.group(3) and got != match.group(3):
        bad.append("{} {} (wanted {})".format(match.group(1), got, match.group(3)))
print("; ".join(bad))
"""


def _verify_packages(vpy: str, req: Request) -> Optional[str]:
    """Why the venv does not hold what the requirements ask for (None: it does): checked before the
    shipped wheels are removed, so a wheel is never removed for an install that did not take."""
    if not req.get("requirements"):
        return None
    bad = run([vpy, "-c", VERIFY_SOURCE, os.path.join(req["venv"], "edgeloop-requirements.txt")]).strip()
    return "the install did not take: {}".format(bad[:500]) if bad else None


def _install_wheel(vpy: str, venv: str, marker: str, digest: str, req: Request) -> Optional[str]:
    """pip-install the project's wheel into the venv and check the agent imports from there and every
    requirement is installed as asked; an error or None. The project's wheel is not reinstalled when its
    file went after an earlier verified install that put this very wheel here (only the requirements
    changed)."""
    mark_restart(req)
    if req["mode"] != "system":
        _install_packages(vpy, req)
    layout = "{} {}\n".format(req["mode"], req.get("profile", "edge"))
    if os.path.exists(req["wheel"]) or installed_wheels(venv, layout).get(req["sha256"]) != \
            os.path.basename(req["wheel"]):
        _pip(vpy, ["install", "--no-deps", "--no-index", "--force-reinstall", req["wheel"]])
    where = run([vpy, "-c", "import edge_agent, edge_agent.config; print(edge_agent.__file__)"]).strip()
    if not os.path.realpath(where).startswith(os.path.realpath(venv)):
        return f"edge_agent imports from {where}, not from the venv {venv}"
    bad = _verify_packages(vpy, req)
    if bad:
        return bad
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
    removed = (0, 0)
    if read(marker) == digest or check:  # verified (now or by an earlier run): the shipped wheels may go
        removed = _settle_wheels(venv, os.path.dirname(req["wheel"]), req.get("wheels") or [], check)
    return {"changed": actions, "removed": removed[0], "removed_bytes": removed[1]}


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


MAX_RECORD_BYTES = 64 * 1024  # a deploy record or the fence: a few hundred bytes when the host wrote it
MAX_REPORT_BYTES = 32 << 20  # an ensemble's report.json (per-image gate predictions included)
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def valid_name(name: object) -> bool:
    """A version or ensemble name: one visible path component (no '/', not '.' or '..', not hidden)."""
    return isinstance(name, str) and 0 < len(name) <= 128 and not name.startswith(".") and set(name) <= NAME_CHARS


def _shown(value: object) -> str:
    """A value from a file on the host, short enough for a one-line message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _record(root: str, version: str) -> Tuple[Optional[Dict], Optional[str]]:
    """(record, None); (None, None) when there is no record; (None, why) when the record cannot be
    trusted: not a small regular file, not JSON, another version's, or naming something that is not an
    ensemble name as what served before (``../../evil``, an absolute path)."""
    try:
        text = read_bounded(_models(root, "deploys", version + ".json"), MAX_RECORD_BYTES)
        if text is None:
            return None, None
        record = json.loads(text)
    except json.JSONDecodeError:
        return None, "is not JSON"
    except ValueError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, "cannot be read ({})".format(exc.strerror or exc)
    if not isinstance(record, dict) or "before_active" not in record:
        return None, "has no 'before_active'"
    if record.get("version") != version:
        return None, "is the record of version {}".format(_shown(record.get("version")))
    before = record["before_active"]
    if before is not None and not valid_name(before):
        return None, "names {} as what served before, which is not an ensemble name".format(_shown(before))
    return record, None


def _fenced(root: str) -> List[str]:
    """The versions in ``models/fence.json``; ValueError (saying why) when it cannot be read: it is never
    rewritten from a failed read, which would lift every fence in it."""
    try:
        text = read_bounded(_models(root, "fence.json"), MAX_RECORD_BYTES)
        data = json.loads(text) if text is not None else {"versions": []}
    except json.JSONDecodeError:
        raise ValueError("models/fence.json is not JSON") from None
    except ValueError as exc:
        raise ValueError("models/fence.json {}".format(exc)) from None
    versions = data.get("versions") if isinstance(data, dict) else None
    if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
        raise ValueError("models/fence.json holds no list of versions")
    return versions


def _fence(root: str, version: str, add: bool) -> bool:
    """Add ``version`` to (or drop it from) ``models/fence.json``; True when that changed the file."""
    versions = _fenced(root)
    if (version in versions) == add:
        return False
    versions = versions + [version] if add else [v for v in versions if v != version]
    write_atomic(_models(root, "fence.json"), json.dumps({"versions": versions}))
    return True


def deploy_record(req: Request) -> Answer:
    """Before base ``version`` lands: note what serves now (what a rollback of it restores) and lift any old
    fence on it. A version already in place keeps its first record (a re-run deploys nothing); a record
    that cannot be trusted is written afresh."""
    root, version = req["root"], req["version"]
    if not valid_name(version):
        return {"error": "{} is not a version name".format(_shown(version))}
    record = _record(root, version)[0]
    if os.path.isdir(_models(root, "base", version)) and record is not None:
        return {"changed": False, "before_active": record["before_active"]}
    folder = _models(root, "deploys")
    os.makedirs(folder, exist_ok=True)
    before = _active(root)
    write_atomic(os.path.join(folder, version + ".json"),
                 json.dumps({"version": version, "before_active": before, "time": time.time()}))
    _fence(root, version, add=False)
    return {"changed": True, "before_active": before}


def _bases(root: str, name: str) -> Optional[List[str]]:
    """The base versions ensemble ``name`` was built on: ``base-<V>`` is V as-is, a fine-tune's
    ``report.json`` lists its bases; None when that cannot be read (its lineage is unknown)."""
    try:
        report = json.loads(read_bounded(_models(root, "ensembles", name, "report.json"), MAX_REPORT_BYTES) or "null")
    except (OSError, ValueError):
        report = None
    bases = report.get("bases") if isinstance(report, dict) else None
    known = [b for b in bases if isinstance(b, str)] if isinstance(bases, list) else None
    if name.startswith("base-"):
        return sorted(set((known or []) + [name[len("base-"):]]))
    return known


def _built_on(root: str, name: str, version: str) -> bool:
    """Whether ensemble ``name`` was built on base ``version`` (False when its lineage cannot be read)."""
    return version in (_bases(root, name) or [])


def _unsafe(root: str, version: str, before: Optional[str], serving: Optional[str]) -> Optional[str]:
    """Why restoring ``before`` (None: nothing) would not undo ``version`` safely; None when it would."""
    if before is None:
        if serving is None or _built_on(root, serving, version):
            return None
        return ("the deploy record says nothing served before {v}, but {s} serves and is not known to be built "
                "on {v}: the rollback would leave the site serving nothing (was the record edited?)"
                .format(v=version, s=serving))
    folder, ensembles = _models(root, "ensembles", before), _models(root, "ensembles")
    if os.path.islink(folder) or not os.path.isdir(folder):
        return "cannot restore {b}: models/ensembles/{b} is {w}".format(
            b=before, w="a symbolic link" if os.path.islink(folder) else "gone")
    if os.path.dirname(os.path.realpath(folder)) != os.path.realpath(ensembles):
        return "cannot restore {}: it is not under models/ensembles".format(before)
    if _regular_size(os.path.join(folder, "ensemble.onnx")) is None:
        return "cannot restore {b}: models/ensembles/{b}/ensemble.onnx is missing or not a regular file".format(
            b=before)
    if _built_on(root, before, version):
        return ("cannot restore {}: it was built on {}, the version being rolled back (was the record edited?)"
                .format(before, version))
    return None


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


def _choose(root: str, version: str, record: Dict, serving: Optional[str], off: List[str], check: List[str]
            ) -> Tuple[Optional[str], Optional[str]]:
    """``(ensemble to serve, None)`` or ``(None, why not)`` for the rollback of ``version``; ``off`` is it and
    every fenced version. What serves now stays when it is known to be built on none of ``off`` (rolling
    back V1 after V2 keeps V2's ensemble). Otherwise what served before ``version`` (its record, checked as
    :func:`_unsafe` says), unless that is built on a fenced version; then what served before each other
    deploy, newest record first: never an ensemble built on any of ``off``, never one that would not serve."""
    lineage = _bases(root, serving) if serving is not None else None
    if lineage is not None and not set(lineage) & set(off):
        return serving, None
    before = record["before_active"]
    why = _unsafe(root, version, before, serving)
    if why:
        return None, why
    if before is None or not set(_bases(root, before) or []) & set(off):
        why = None if before in (None, serving) else _check_ensemble(root, before, check)
        return (None, "cannot restore {}: {}".format(before, why)) if why else (before, None)
    for name in _served_before_others(root, version):
        if name != before and not set(_bases(root, name) or []) & set(off) \
                and _unsafe(root, version, name, serving) is None \
                and (name == serving or _check_ensemble(root, name, check) is None):
            return name, None
    return None, ("cannot restore {b}: it was built on fenced {f}, and no ensemble that served before another "
                  "deploy is free of {v} and every fenced version".format(
                      b=before, f=", ".join(sorted(set(_bases(root, before) or []) & set(off))), v=version))


def _served_before_others(root: str, version: str) -> List[str]:
    """What served before each deploy other than ``version``'s, by its trusted record, newest record first."""
    folder, found = _models(root, "deploys"), []
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for name in names[:1000]:  # a site keeps a record per version deployed: a few hundred at most
        other = name[:-len(".json")]
        if not name.endswith(".json") or other == version or not valid_name(other):
            continue
        record = _record(root, other)[0]
        if record is not None and record["before_active"] is not None:
            stamp = record.get("time")
            found.append((stamp if isinstance(stamp, (int, float)) and math.isfinite(stamp) else 0.0,
                          record["before_active"]))
    return [name for _, name in sorted(found, key=lambda item: item[0], reverse=True)]


def rollback(req: Request) -> Answer:
    """Undo the deploy of base ``version``: what serves now stays if it owes the version (and every fenced
    version) nothing; otherwise what served before it, or the newest ensemble that served before another
    deploy and is built on no fenced version (:func:`_choose`). Then the base is set aside.

    Refuses, before touching anything, when the site has no record of what served before the version, when
    the record cannot be trusted (not a small regular file, another version's, a name that is not an
    ensemble's), when what it names is not a regular ensemble under ``models/ensembles``, was itself built
    on the version, is gone or would not serve, or when it says nothing served before while something not
    built on the version serves now. Then, under the agent's activation lock, the version is
    fenced (a running fine-tune built on it will not activate) and ``models/active`` switched back; only
    then is the base set aside. A site that never got the version is not touched; a second run changes
    nothing. The answer says what serves now, even on a refusal.
    """
    root, version = os.path.expanduser(req["root"]), req["version"]
    serving = _active(root)

    def refuse(why: str) -> Answer:
        return {"error": "{}; nothing changed; serving {}".format(why, serving or "nothing")}

    if not valid_name(version):
        return refuse("{} is not a version name".format(_shown(version)))
    record, untrusted = _record(root, version)
    if untrusted:
        return refuse("refusing the rollback of {}: its deploy record models/deploys/{}.json {}".format(
            version, version, untrusted))
    present = os.path.isdir(_models(root, "base", version))
    if record is None and not present:
        return {"changed": [], "never_got": True, "serving": serving}
    if record is None:
        return refuse("no record of what served before {} (deployed before records were kept)".format(version))
    try:
        fenced = _fenced(root)
    except ValueError as exc:
        return refuse("cannot fence {}: {}".format(version, exc))
    if not present and version in fenced:  # rolled back before: what serves now is not this rollback's to change
        return {"changed": [], "version": version, "serving": serving}
    before, why = _choose(root, version, record, serving, [version] + [v for v in fenced if v != version],
                          req["check"])
    if why:
        return refuse(why)
    changed = []
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
       "install": install, "wheels_missing": wheels_missing, "wheels_verify": wheels_verify, "process_state": process_state,
       "process_restart": process_restart, "process_stop": process_stop, "restart_pending": restart_pending,
       "systemd": systemd, "health": health, "deploy_record": deploy_record, "rollback": rollback,
       "reach": reach}


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
