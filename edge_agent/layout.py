"""Where things live under an edge agent's root.

One object names every folder so that the agent, the cloud's provisioning and the tests agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AgentPaths:
    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "config" / "agent.yaml"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def base_models(self) -> Path:
        """Base models deployed by the cloud: ``base/<version>/model.pt`` (+ ``model.sha256``)."""
        return self.models / "base"

    @property
    def ensembles(self) -> Path:
        """Fine-tuned ensembles: ``ensembles/<version>/ensemble.onnx`` + ``report.json``."""
        return self.models / "ensembles"

    @property
    def active_link(self) -> Path:
        """Symlink to the serving ensemble; replaced atomically (rename) on activation."""
        return self.models / "active"

    @property
    def deploy_records(self) -> Path:
        """``deploys/<version>.json``: what served before each deploy (the cloud writes it; a rollback reads it)."""
        return self.models / "deploys"

    @property
    def fence_file(self) -> Path:
        """``fence.json``: base versions rolled back; a fine-tune built on one never activates."""
        return self.models / "fence.json"

    @property
    def activation_lock(self) -> Path:
        """Held while the fence is checked and ``active`` switched (fine-tune) or fenced and switched (rollback)."""
        return self.models / ".activation.lock"

    @property
    def labelled(self) -> Path:
        """Operator-labelled site data, ImageFolder style: ``labelled/<class>/<file>``."""
        return self.root / "data" / "labelled"

    @property
    def inbox(self) -> Path:
        """Images to classify; results go to ``results.jsonl`` beside the processed images."""
        return self.root / "data" / "inbox"

    @property
    def processed(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def quarantine(self) -> Path:
        return self.root / "data" / "quarantine"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def status_file(self) -> Path:
        """The local heartbeat/status JSON, rewritten atomically every heartbeat interval."""
        return self.root / "status.json"

    @property
    def state_file(self) -> Path:
        """What the daemon must remember across restarts (counters, last run)."""
        return self.root / "state.json"

    @property
    def pid_file(self) -> Path:
        return self.root / "agent.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "agent.log"

    def folders(self) -> list[Path]:
        return [self.config_file.parent, self.base_models, self.ensembles, self.labelled, self.inbox,
                self.processed, self.quarantine, self.runs, self.outbox]

    def ensure(self) -> None:
        for folder in self.folders():
            folder.mkdir(parents=True, exist_ok=True)
