"""The agent's dependencies for a host's platform, resolved once in the cloud and shipped as wheels.

``pip download --only-binary=:all:`` with the host's Python version, ABI and platform tags (from the facts
step) and the project's constraints gives the wheels a profile needs. They are kept content-addressed
(``blobs/<sha256>/<file name>``: pip's ``--find-links`` needs the file name) with one lock file per
(profile, platform, constraints), so a second host of the same kind costs no resolution, and a re-run
ships nothing the host already holds. The host installs with ``--no-index --find-links``: it needs no
index and no internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_agent.fileio import file_sha256, write_json_atomic
from orchestrator.progress import Progress
from orchestrator.project import PROJECT_DIR

# What each profile installs on top of the project's own wheel: the pyproject extra that lists it.
PROFILE_EXTRAS = {"edge": "edge", "edge-serve": "serve"}
# The host bootstraps pip into the site venv from this wheel, so it needs neither ensurepip nor an index.
BOOTSTRAP = ("pip",)


class NoWheel(Exception):
    """A needed package has no wheel for the host's platform (the message names both)."""


@dataclass(frozen=True)
class Platform:
    """What decides which wheels a host can install (read by the facts step)."""

    python: str  # "3.11"
    implementation: str  # "cp"
    arch: str  # "x86_64", "aarch64"
    libc: str  # "glibc", "musl"
    libc_version: str  # "2.36"

    @classmethod
    def from_facts(cls, facts: dict) -> Platform:
        return cls(".".join(facts["python"].split(".")[:2]), facts.get("implementation", "cp"), facts["arch"],
                   facts.get("libc") or "glibc", facts.get("libc_version") or "2.17")

    @property
    def abi(self) -> str:
        return f"{self.implementation}{self.python.replace('.', '')}"

    def tags(self) -> list[str]:
        """Platform tags the host accepts, newest first (pip does not widen ``manylinux_2_X`` by itself)."""
        major, minor = (int(p) for p in self.libc_version.split(".")[:2])
        if self.libc == "musl":
            return [f"musllinux_{major}_{m}_{self.arch}" for m in range(minor, -1, -1)] + [f"linux_{self.arch}"]
        tags = [f"manylinux_{major}_{m}_{self.arch}" for m in range(minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        tags += [f"{name}_{self.arch}" for m, name in legacy.items() if minor >= m]
        return tags + [f"linux_{self.arch}"]

    def describe(self) -> str:
        return f"cp{self.python} {self.libc} {self.libc_version} {self.arch}"


@dataclass(frozen=True)
class WheelFile:
    """One wheel of a lock: its file name, content hash, size, and the disk it takes installed."""

    name: str
    sha256: str
    size: int
    installed_size: int

    @property
    def project(self) -> str:
        return re.sub(r"[-_.]+", "-", self.name.split("-")[0]).lower()


@dataclass(frozen=True)
class Lock:
    """The wheels one profile needs on one platform (the project's own wheel aside)."""

    profile: str
    platform: Platform
    wheels: tuple[WheelFile, ...]

    @property
    def size(self) -> int:
        return sum(w.size for w in self.wheels)

    @property
    def installed_size(self) -> int:
        return sum(w.installed_size for w in self.wheels)

    def requirements(self) -> str:
        """``name==version`` per wheel: what the host installs, exactly, with ``--no-index``."""
        lines = []
        for wheel in self.wheels:
            if wheel.project in BOOTSTRAP:
                continue
            lines.append(f"{wheel.project}=={wheel.name.split('-')[1]}\n")
        return "".join(sorted(lines))


# What an installed file takes on disk, calibrated on a bare edge-serve venv (CPython 3.11, ext4, measured
# with du): files are whole 4 KiB blocks, every folder one block, and pip byte-compiles each .py into
# __pycache__ (34.9 MiB of .pyc for 26.2 MiB of .py: x1.33). The unpacked bytes alone (187 MiB) missed the
# venv's 235.1 MiB by a fifth; this estimate says 234.6 MiB (tests/test_provision_checks.py holds it to 10 %).
BLOCK = 4096
PYC_PER_PY = 1.33
SIZES = "blocks+pyc/1"  # the estimate's version in a lock file: a lock with another is re-measured


def _blocks(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def installed_size(wheel: Path) -> int:
    """Bytes of disk a wheel takes once ``pip install`` has unpacked and byte-compiled it."""
    total, folders = 0, set()
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            folders.update("/".join(parts[:k]) for k in range(1, len(parts)))
            total += _blocks(info.file_size)
            if info.filename.endswith(".py"):
                total += _blocks(int(info.file_size * PYC_PER_PY))
                folders.add("/".join(parts[:-1] + ["__pycache__"]))
    return total + len(folders) * BLOCK


# A store protocol's fsspec package, for a site whose profile does not bring it (edge-serve with s3://).
STORE_PACKAGES = {"s3": "s3fs"}


def site_requirements(profile: str, store_url: str = "") -> list[str]:
    """What a site installs: its profile, plus the package of its store's protocol when the profile lacks it."""
    out = project_requirements(profile)
    package = STORE_PACKAGES.get(store_url.split("://")[0]) if "://" in store_url else None
    if package and not any(re.match(rf"{package}\b", r) for r in out):
        out.append(package)
    return out


def project_requirements(profile: str, pyproject: Path = PROJECT_DIR / "pyproject.toml") -> list[str]:
    """The project's dependencies plus those of the profile's extra (read from ``pyproject.toml``)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the TOML reader pip itself carries
        from pip._vendor import tomli as tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    wanted, seen, out = [PROFILE_EXTRAS[profile]], set(), list(project.get("dependencies", []))
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in extras.get(extra, []):
            inner = re.fullmatch(rf"{project['name']}\[([\w,-]+)\]", requirement.replace(" ", ""))
            if inner:
                wanted += inner.group(1).split(",")
            else:
                out.append(requirement)
    return out


class Wheelhouse:
    """Wheels resolved per (profile, platform), kept content-addressed under ``root``.

    ``constraints`` pins what must be pinned (the project's constraints.txt). Where the wheels come from is
    the cloud's own pip configuration (PyPI, a mirror, a find-links folder, its cache).
    """

    def __init__(self, root: Path, constraints: Path | None = PROJECT_DIR / "constraints.txt"):
        self.root = Path(root)
        self.constraints = constraints if constraints and constraints.exists() else None
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def blob(self, wheel: WheelFile) -> Path:
        return self.root / "blobs" / wheel.sha256 / wheel.name

    def _key(self, profile: str, platform: Platform, requirements: list[str]) -> str:
        digest = hashlib.sha256(json.dumps([profile, asdict(platform), requirements,
                                            self.constraints.read_text() if self.constraints else ""]).encode())
        return digest.hexdigest()[:24]

    def lock(self, profile: str, platform: Platform, store_url: str = "") -> Lock:
        """The wheels a site of ``profile`` (storing to ``store_url``) needs on ``platform``: read from its lock
        file, else resolved now (once at a time)."""
        requirements = site_requirements(profile, store_url)
        key = self._key(profile, platform, requirements)
        with self._guard:
            guard = self._locks.setdefault(key, threading.Lock())
        with guard:  # hosts of one platform provisioned at once resolve it once
            path = self.root / "locks" / f"{profile}-{key}.json"
            try:
                data = json.loads(path.read_text())
                wheels = tuple(WheelFile(**w) for w in data["wheels"])
                if all(self.blob(w).is_file() for w in wheels):
                    if data.get("sizes") != SIZES:  # written by an older estimate: measure the blobs again
                        wheels = tuple(WheelFile(w.name, w.sha256, w.size, installed_size(self.blob(w)))
                                       for w in wheels)
                        self._write_lock(path, Lock(profile, platform, wheels))
                    return Lock(profile, platform, wheels)
            except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
                pass
            lock = self._resolve(profile, platform, requirements)
            self._write_lock(path, lock)
            return lock

    @staticmethod
    def _write_lock(path: Path, lock: Lock) -> None:
        write_json_atomic(path, {"profile": lock.profile, "platform": asdict(lock.platform), "sizes": SIZES,
                                 "wheels": [asdict(w) for w in lock.wheels]})

    def _resolve(self, profile: str, platform: Platform, requirements: list[str]) -> Lock:
        requirements = requirements + list(BOOTSTRAP)
        self.root.mkdir(parents=True, exist_ok=True)
        # steps: pip's download (one), then each wheel hashed and stored; the run's progress artifact shows them
        with tempfile.TemporaryDirectory(prefix=".download-", dir=self.root) as tmp, \
                Progress(1, "steps", f"wheelhouse {profile} {platform.describe()}", key="wheelhouse-progress") as bar:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                   "--only-binary=:all:", "--python-version", platform.python, "--implementation",
                   platform.implementation, "--abi", platform.abi, "--dest", tmp]
            cmd += [arg for tag in platform.tags() for arg in ("--platform", tag)]
            if self.constraints:
                cmd += ["-c", str(self.constraints)]
            proc = subprocess.run(cmd + requirements, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise _no_wheel(proc.stderr or proc.stdout, platform)
            wheels, files = [], sorted(Path(tmp).glob("*.whl"))
            bar.update(1, total=1 + len(files), detail=f"{len(files)} wheels downloaded")
            for file in files:
                wheel = WheelFile(file.name, file_sha256(file), file.stat().st_size, installed_size(file))
                target = self.blob(wheel)
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(file, target)  # same file system: atomic
                wheels.append(wheel)
                bar.advance()
        return Lock(profile, platform, tuple(wheels))


def _no_wheel(output: str, platform: Platform) -> NoWheel:
    """pip's failure as a reason a person can act on: which package, for which platform."""
    match = re.search(r"(?:satisfies the requirement|distribution found for) ([A-Za-z0-9_.\-\[\]]+)", output)
    if match:
        name = re.split(r"[\[<>=!~;]", match.group(1))[0]
        return NoWheel(f"no wheel of {name} for {platform.describe()} (resolved with pip download "
                       f"--only-binary=:all:); use 'install: {{mode: system}}' with a stack the host ships, or "
                       f"'mode: index' with an index that builds it")
    tail = " | ".join(output.strip().splitlines()[-3:])
    return NoWheel(f"resolving the wheels for {platform.describe()} failed: {tail}")



_houses: dict[Path, Wheelhouse] = {}
_houses_guard = threading.Lock()


def wheelhouse_at(root: Path) -> Wheelhouse:
    """One :class:`Wheelhouse` per folder in this process, so hosts provisioned at once share its locks."""
    with _houses_guard:
        return _houses.setdefault(Path(root), Wheelhouse(Path(root)))
