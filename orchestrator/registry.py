"""The model registry: model versions ("working sets") with artifacts, metrics, lineage and a stage.

A version ties together the dataset version it was trained on, its architecture and hyperparameters,
the version it was fine-tuned from, its metrics, and its artifacts (checkpoint, ONNX), each with a
sha256. One version per model family is the champion; a new candidate replaces it only through
:meth:`ModelRegistry.promote`, and the old champion is archived, never deleted.

On disk: ``<root>/<version>/record.json`` beside the artifacts; ``<root>/.champion-<family>`` names the
champion (replaced atomically: the promotion's one commit point). Versions sort by creation time.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

from pydantic import BaseModel, Field

from edge_agent.fileio import file_sha256, write_bytes_atomic
from edge_agent.ids import new_id

Stage = Literal["candidate", "champion", "archived"]
RECORD = "record.json"


class Artifact(BaseModel):
    file: str
    sha256: str
    bytes: int


class ModelVersion(BaseModel):
    version: str
    family: str = Field(description="what is being improved over time, e.g. 'elpv-resnet18'")
    arch: str
    dataset_id: str | None
    hyperparameters: dict = Field(default_factory=dict)
    parent: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    stage: Stage = "candidate"
    artifacts: dict[str, Artifact] = Field(default_factory=dict)
    created: float = Field(default_factory=time.time)
    note: str = ""


class RegistryError(LookupError):
    pass


class ChampionChanged(RegistryError):
    """A promotion decided against a champion that another promoter has since replaced."""


UNCHECKED = object()  # promote() without a compare-and-swap (the demo's own first champion, an operator)


class ModelRegistry:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.skipped: dict[str, str] = {}  # folders the last listing found not to be versions, with why

    def register(self, family: str, checkpoint: str | Path, *, arch: str, dataset_id: str | None,
                 hyperparameters: dict, metrics: dict[str, float], parent: str | None = None,
                 extra_artifacts: dict[str, str | Path] | None = None, note: str = "") -> ModelVersion:
        """Copy the artifacts in and record a new candidate; written atomically (staged, then renamed)."""
        digest = file_sha256(checkpoint)
        version = new_id(digest)
        staged = self.root / f".{version}.tmp"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        artifacts = {}
        for name, source in {"checkpoint": checkpoint, **(extra_artifacts or {})}.items():
            target = staged / Path(source).name
            shutil.copyfile(source, target)
            artifacts[name] = Artifact(file=target.name, sha256=file_sha256(target), bytes=target.stat().st_size)
        record = ModelVersion(version=version, family=family, arch=arch, dataset_id=dataset_id,
                              hyperparameters=hyperparameters, parent=parent, metrics=metrics,
                              artifacts=artifacts, note=note)
        (staged / RECORD).write_text(record.model_dump_json(indent=1))
        os.replace(staged, self.root / version)
        return record

    def get(self, version: str) -> ModelVersion:
        """One version's record; its stage as the champion pointer says (a promotion cut short before the
        records were updated still reads right)."""
        path = self.root / version / RECORD
        if not path.is_file():
            raise RegistryError(f"no model version {version!r} in {self.root}")
        record = ModelVersion.model_validate_json(path.read_text())
        pointer = self.root / f".champion-{record.family}"
        if pointer.is_file():
            champion = pointer.read_text().strip() == version
            if champion or record.stage == "champion":
                record = record.model_copy(update={"stage": "champion" if champion else "archived"})
        return record

    def versions(self, family: str | None = None) -> Iterator[ModelVersion]:
        """Every version (of ``family``), oldest first. A folder that is not a version (no readable record:
        a stray copy, a half-deleted version) is skipped and named in :attr:`skipped` with why."""
        self.skipped = {}
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and not folder.name.startswith("."):
                try:
                    record = self.get(folder.name)
                except (RegistryError, ValueError, OSError) as exc:
                    self.skipped[folder.name] = str(exc).splitlines()[0]
                    continue
                if family is None or record.family == family:
                    yield record

    def artifact(self, version: str, name: str = "checkpoint") -> Path:
        """Path of an artifact, after checking its sha256 (a corrupt registry must not deploy)."""
        record = self.get(version)
        if name not in record.artifacts:
            raise RegistryError(f"model version {version} has no {name!r} artifact")
        artifact = record.artifacts[name]
        path = self.root / version / artifact.file
        if not path.is_file() or file_sha256(path) != artifact.sha256:
            raise RegistryError(f"artifact {path} is missing or does not match its sha256")
        return path

    def champion(self, family: str) -> ModelVersion | None:
        pointer = self._champion_file(family)
        if pointer.is_file():
            return self.get(pointer.read_text().strip())
        # a registry written before the champion pointer existed: the record's stage says it
        return next((v for v in self.versions(family) if v.stage == "champion"), None)

    def champion_classes(self, family: str) -> list[str]:
        """The class names the family's champion predicts (from its checkpoint); RegistryError without one."""
        champion = self.champion(family)
        if champion is None:
            raise RegistryError(f"no champion of family {family!r} in {self.root}: run pretrain first")
        return self.contract(champion.version)["classes"]

    def contract(self, version: str) -> dict:
        """What a fleet that fine-tunes from ``version`` depends on: architecture, input size, class names
        (read from the checkpoint itself, which is what the sites load)."""
        meta = self._meta(version)
        return {"arch": meta["spec"]["arch"], "image_size": meta["spec"]["image_size"],
                "classes": list(meta["class_names"])}

    def _meta(self, version: str) -> dict:
        import torch

        return torch.load(self.artifact(version), map_location="cpu", weights_only=True)["meta"]

    def promote(self, version: str, expected: str | None | object = UNCHECKED) -> ModelVersion:
        """Make ``version`` its family's champion.

        One atomic rename of the family's champion pointer is the promotion, done under the registry's
        lock (two flows promoting at once take turns); the records' stages are then brought in line. A
        crash at any point leaves the old champion or the new one, never none. ``expected`` makes it a
        compare-and-swap: the champion the candidate was gated against (None: there was none); if another
        promoter replaced it since, :class:`ChampionChanged` names the new one and nothing changes.
        """
        record = self.get(version)
        with self._lock():
            current = self.champion(record.family)
            if expected is not UNCHECKED and (current.version if current else None) != expected:
                raise ChampionChanged(f"the champion changed since this candidate was gated (now "
                                      f"{current.version if current else None}, gated against {expected})")
            pointer = self._champion_file(record.family)
            write_bytes_atomic(pointer, (version + "\n").encode())
            if current and current.version != version:
                self._save(current.model_copy(update={"stage": "archived"}))
            promoted = record.model_copy(update={"stage": "champion"})
            self._save(promoted)
        return promoted

    def _champion_file(self, family: str) -> Path:
        if not family or "/" in family or family.startswith("."):
            raise RegistryError(f"bad model family name {family!r}")
        return self.root / f".champion-{family}"

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def lineage(self, version: str) -> list[ModelVersion]:
        """This version and its ancestors, newest first: which data and which parent made it."""
        chain, seen = [], set()
        current: str | None = version
        while current and current not in seen:
            seen.add(current)
            record = self.get(current)
            chain.append(record)
            current = record.parent
        return chain

    def _save(self, record: ModelVersion) -> None:
        write_bytes_atomic(self.root / record.version / RECORD, record.model_dump_json(indent=1).encode())


def table(records: list[ModelVersion]) -> list[dict]:
    """Rows for a Prefect table artifact or a terminal listing."""
    return [{"version": r.version, "family": r.family, "stage": r.stage, "arch": r.arch,
             "dataset": r.dataset_id, "parent": r.parent or "", **{k: round(v, 4) for k, v in r.metrics.items()}}
            for r in records]

