"""The model registry: model versions ("working sets") with artifacts, metrics, lineage and a stage.

A version ties together the dataset version it was trained on, its architecture and hyperparameters,
the version it was fine-tuned from, its metrics, and its artifacts (checkpoint, ONNX), each with a
sha256. One version per model family is the champion; a new candidate replaces it only through
:meth:`ModelRegistry.promote`, and the old champion is archived, never deleted. A version a rollout or an
operator rolled back is *rolled back* (who, when, why, which sites still serve it): if it was the champion, the
champion it replaced is champion again, so it is never the default rollout target nor a retrain's parent; it is
promoted or deployed again only with an override that gives a reason, recorded in its record.

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

Stage = Literal["candidate", "champion", "archived", "rolled_back"]
RECORD = "record.json"


class Artifact(BaseModel):
    file: str
    sha256: str
    bytes: int


class RolledBack(BaseModel):
    by: str
    at: float
    why: str
    still_serving: list[str] = Field(default_factory=list)  # sites whose rollback failed: they serve it still


class Override(BaseModel):
    by: str
    at: float
    reason: str
    action: str  # "deploy" or "promote"


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
    replaced: str | None = None  # the champion this version replaced when it was promoted
    rolled_back: RolledBack | None = None
    overrides: list[Override] = Field(default_factory=list)


class RegistryError(LookupError):
    pass


class ChampionChanged(RegistryError):
    """A promotion decided against a champion that another promoter has since replaced."""


class RolledBackVersion(RegistryError):
    """The version was rolled back: it goes out or becomes champion again only with an override's reason."""


class ContractChanged(RegistryError):
    """The candidate would change the fleet's serving contract (architecture, input size, classes)."""


def operator() -> str:
    """Who acts, for the records: the login user on this host (and the Prefect flow run, when in one)."""
    import getpass
    import socket

    who = f"{getpass.getuser()}@{socket.gethostname()}"
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            who += f" (flow run {flow_run.name})"
    except Exception:  # noqa: BLE001 - outside Prefect, or an older one: the user is enough
        pass
    return who


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
        if pointer.is_file() and record.stage != "rolled_back":
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
        """The family's champion: never a rolled-back version (a rollback cut short before the pointer moved
        reads as the champion that version replaced)."""
        pointer = self._champion_file(family)
        if pointer.is_file():
            return self._standing(self.get(pointer.read_text().strip()))
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

    def promote(self, version: str, expected: str | None | object = UNCHECKED, *,
                allow_contract_change: bool = False, override: str | None = None) -> ModelVersion:
        """Make ``version`` its family's champion.

        One atomic rename of the family's champion pointer is the promotion, done under the registry's
        lock (two flows promoting at once take turns); the records' stages are then brought in line. A
        crash at any point leaves the old champion or the new one, never none. ``expected`` makes it a
        compare-and-swap: the champion the candidate was gated against (None: there was none); if another
        promoter replaced it since, :class:`ChampionChanged` names the new one and nothing changes. With
        ``expected`` (every flow's promotion) the fleet's serving contract is checked too
        (:class:`ContractChanged` unless ``allow_contract_change``). A rolled-back version is refused
        (:class:`RolledBackVersion`) unless ``override`` gives the reason, which its record keeps.
        """
        record = self.get(version)
        with self._lock():
            current = self.champion(record.family)
            if expected is not UNCHECKED and (current.version if current else None) != expected:
                raise ChampionChanged(f"the champion changed since this candidate was gated (now "
                                      f"{current.version if current else None}, gated against {expected})")
            if expected is not UNCHECKED and current and current.version != version and not allow_contract_change:
                old, new = self.contract(current.version), self.contract(version)
                if old != new:
                    raise ContractChanged(f"{version} changes the fleet's serving contract {old} -> {new}; "
                                          "allow_contract_change to promote it")
            record = self._overridden(self.get(version), override, "promote")
            pointer = self._champion_file(record.family)
            write_bytes_atomic(pointer, (version + "\n").encode())
            if current and current.version != version:
                self._save(current.model_copy(update={"stage": "archived"}))
            promoted = record.model_copy(update={
                "stage": "champion", "replaced": current.version if current and current.version != version
                else record.replaced})
            self._save(promoted)
        return promoted

    def check_deployable(self, version: str, override: str | None = None, by: str | None = None) -> ModelVersion:
        """The record of ``version`` if it may go out: a rolled-back one only with ``override`` (its reason,
        recorded with who and when); :class:`RolledBackVersion` otherwise."""
        with self._lock():
            return self._overridden(self.get(version), override, "deploy", by)

    def _overridden(self, record: ModelVersion, override: str | None, action: str, by: str | None = None
                    ) -> ModelVersion:
        if record.stage != "rolled_back":
            return record
        back = record.rolled_back
        if not override or not override.strip():
            raise RolledBackVersion(
                f"{record.version} was rolled back by {back.by if back else '?'} ({back.why if back else '?'}); "
                f"to {action} it again give an override with a reason")
        record = record.model_copy(update={
            "stage": "candidate", "overrides": record.overrides + [Override(by=by or operator(), at=time.time(),
                                                                          reason=override.strip(), action=action)]})
        self._save(record)
        return record

    def mark_rolled_back(self, version: str, why: str, still_serving: list[str] | tuple = (),
                         by: str | None = None) -> ModelVersion | None:
        """Record that ``version`` was rolled back (by whom, when, why, which sites still serve it); if it was
        the champion, the newest champion it replaced that is not rolled back is champion again (none: the
        family has no champion). Returns the family's champion after it."""
        with self._lock():
            record = self.get(version)
            pointer = self._champion_file(record.family)
            was = pointer.read_text().strip() if pointer.is_file() else None
            self._save(record.model_copy(update={"stage": "rolled_back", "rolled_back": RolledBack(
                by=by or operator(), at=time.time(), why=why, still_serving=sorted(still_serving))}))
            if was == version:
                standing = self._standing(self.get(version))
                if standing is None:
                    pointer.unlink()
                else:
                    write_bytes_atomic(pointer, (standing.version + "\n").encode())
                    self._save(standing.model_copy(update={"stage": "champion"}))
            return self.champion(record.family)

    def _standing(self, record: ModelVersion) -> ModelVersion | None:
        """``record``, or when it was rolled back the newest champion it (transitively) replaced that was not."""
        seen = set()
        while record is not None and record.stage == "rolled_back" and record.version not in seen:
            seen.add(record.version)
            try:
                record = self.get(record.replaced) if record.replaced else None
            except RegistryError:
                record = None
        return record

    def default_parent(self, family: str) -> ModelVersion | None:
        """What a retrain fine-tunes from: the champion (never a rolled-back version)."""
        return self.champion(family)

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

