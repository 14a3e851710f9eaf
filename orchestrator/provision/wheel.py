"""The project's wheel, the one artifact provisioning ships to every host."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edge_agent.fileio import file_sha256
from orchestrator.project import PROJECT_DIR


@dataclass(frozen=True)
class Wheel:
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name


PACKAGES = ("edgeloop", "orchestrator", "edge_agent", "flows")
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
                               "-w", str(out), str(src)], capture_output=True, text=True, check=False)
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
