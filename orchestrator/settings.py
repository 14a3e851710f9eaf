"""The cloud's settings in one place; every field can be set as ``EDGELOOP_<NAME>`` in the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.project import PROJECT_DIR


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGELOOP_", extra="ignore")

    home: Path = Field(PROJECT_DIR / ".demo", description="the demo's working folder: data, registry, store, sites")
    inventory: Path = Field(PROJECT_DIR / "inventory" / "local.yaml", description="the fleet to run on")
    family: str = Field("elpv-defects", description="registry name of the model being improved")
    pretrain_arch: str = "resnet18"
    pretrain_epochs: int = Field(8, ge=1)
    retrain_epochs: int = Field(3, ge=1)
    seed: int = 0
    site_timeout_s: float = Field(900, gt=0, description="how long the cloud waits for an edge before going on")
