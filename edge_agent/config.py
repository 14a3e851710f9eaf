"""The edge agent's configuration file (``<root>/config/agent.yaml``).

The cloud renders this file from the inventory (one per site) and the agent reads it at start.
It is the contract between ``orchestrator`` (which writes it) and ``edge_agent`` (which obeys it),
so it lives here, on the side that must stay importable without the cloud packages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_agent.gate import GateRule
from edge_agent.store import store_option_problems
from edge_agent.yamlfile import YamlFileError, read_yaml, validate


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a config must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")


class MemberConfig(Strict):
    """One ensemble member: which architecture it fine-tunes, at which input size, and which augmentation it
    sees. Members that differ in architecture or size err differently, which is what an ensemble needs."""

    arch: str = Field("resnet18", description="architecture (edge_agent.models.ARCHITECTURES); the newest "
                                              "base of that arch is fine-tuned, else the newest base")
    policy: str = Field("flips", description="augmentation policy (edge_agent.augment.POLICIES)")
    image_size: int | None = Field(None, ge=16, description="input size the member fine-tunes and runs at "
                                   "(the site's images resized to it; the ensemble resizes inside its graph); "
                                   "None: its base's size. It must give the same network as the base's size "
                                   "(resnet18 and the slim nets change their stem at 64 px)")


class FinetuneConfig(Strict):
    """Knobs of an edge fine-tune (the cloud picks them; the edge obeys)."""

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_balance: Literal["none", "weighted"] = Field("none", description="weighted: each class's loss "
                                                       "weighted by the inverse of its share (edge_agent.train)")
    ema_decay: float | None = Field(None, ge=0.5, lt=1, description="keep an exponential moving average of "
                                    "the weights and keep that (edge_agent.train); None: the raw weights")
    min_val_for_weights: int = Field(100, ge=0, description="val images needed to fit the ensemble's weights; "
                                     "below, equal weights (the standard error of a val accuracy on fewer "
                                     "images, 3-5 points, exceeds the 2-point margin a fitted weighting must "
                                     "win by: the choice would be luck)")
    time_budget_s: float | None = Field(None, gt=0)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="bf16 autocast in training; auto = "
                                                       "where the CPU has AMX or AVX512-BF16 (bench/finetune_speed.py)")
    keep: Literal["best", "last"] = Field("last", description="member weights kept: the last epoch, or the best "
                                          "on the site's val split (a few dozen images choose noise; bench/loop.py)")
    int8: bool = Field(True, description="try a static INT8 graph (calibrated on the site's train images)")
    member_memory_mb: int = Field(800, ge=32, description="peak memory of one member's training process; members "
                                  "train at once only as far as the host's available memory holds them "
                                  "(bench/provision.py measures it)")


class Thresholds(Strict):
    """When the agent acts, and how sure it must be."""

    min_new_labelled: int = Field(20, ge=1, description="new operator-labelled images that trigger a fine-tune")
    uncertainty: float = Field(0.5, ge=0, le=1, description="normalised entropy above which a sample is informative")
    disagreement: float = Field(0.2, ge=0, le=1, description="spread of member probabilities that flags a sample")
    min_gain: float = Field(0.0, ge=0, description="gate-split accuracy a model must add over the one serving")
    alpha: float = Field(0.1, gt=0, lt=1, description="significance of the gate's paired test: the highest share "
                                                      "of no-better models it may activate (edge_agent.gate)")
    min_gate_images: int = Field(1, ge=1, description="below this many gate images what serves stays (the exact "
                                                       "evidence); gate images accumulate as labelled data grows")
    int8_tolerance: float = Field(0.005, ge=0, description="INT8 serves when its gate accuracy is within this "
                                                           "of FP32's")

    def gate_rule(self) -> GateRule:
        return GateRule(alpha=self.alpha, min_gain=self.min_gain, min_gate_images=self.min_gate_images)


class HomeLabels(Strict):
    """Labels people gave in the cloud to this site's samples, coming home (:mod:`edge_agent.homelabels`)."""

    shares: dict[Literal["train", "val", "gate", "test"], float] = Field(
        default_factory=lambda: {"train": 0.55, "val": 0.15, "gate": 0.15, "test": 0.15},
        description="role of a label that comes home, chosen by its image's content hash (so it never moves): "
                    "train fits, val chooses, gate decides what serves, test reports; each label keeps the role "
                    "it was given when it came")
    poll_s: float = Field(30.0, gt=0, description="how often the store's labels/<site>.json is looked at")

    @model_validator(mode="after")
    def _shares_whole(self) -> "HomeLabels":
        if set(self.shares) != {"train", "val", "gate", "test"} or any(v < 0 for v in self.shares.values()) \
                or abs(sum(self.shares.values()) - 1) > 1e-6 or self.shares["train"] == 0:
            raise ValueError(f"shares: train, val, gate and test, each >= 0, train > 0, summing to 1 "
                             f"(got {dict(self.shares)})")
        return self


class UploadBudget(Strict):
    """What a site may send back per day, and how much it may hold while the cloud is away."""

    max_samples_per_day: int = Field(200, ge=0)
    max_bytes_per_day: int = Field(50_000_000, ge=0)
    random_share: float = Field(0.05, ge=0, le=1, description="share of ordinary samples sent so the cloud sees the normal case")
    outbox_max_bytes: int = Field(200_000_000, ge=0, description="disk cap of the outbox; least useful samples go first")
    retry_base_s: float = Field(1.0, gt=0, description="first wait after a failed upload; doubles per failure")
    retry_max_s: float = Field(60.0, gt=0, description="longest wait between upload attempts")
    http_share: float = Field(0.25, ge=0, le=1, description="share of the daily sample budget that images "
                                                            "POSTed to the HTTP endpoint may take")
    labelled_share: float = Field(0.5, ge=0, le=1, description="share of the daily sample budget that "
                                                               "informative operator-labelled images may take")


class Retention(Strict):
    """How much history the agent keeps on its small disk; the oldest goes first, what serves never goes."""

    keep_runs: int = Field(5, ge=1, description="fine-tune run folders (member checkpoints, reports)")
    keep_ensembles: int = Field(3, ge=1, description="published ensembles, besides the active one")
    keep_base_models: int = Field(2, ge=1, description="deployed base models (the newest)")
    keep_processed: int = Field(2000, ge=0, description="classified images kept in data/processed/")
    keep_quarantined: int = Field(500, ge=0, description="quarantined files kept (with their reasons)")
    results_max_bytes: int = Field(20_000_000, ge=1, description="results.jsonl is rotated past this size")
    log_max_bytes: int = Field(10_000_000, ge=1, description="agent.log is rotated past this size (2 kept)")
    interval_s: float = Field(60.0, gt=0, description="how often the limits are enforced")
    min_free_bytes: int = Field(50_000_000, ge=0, description="below this much free disk the agent reports "
                                "'disk full' and holds an owed fine-tune, retried with back-off once space returns")


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class ServeConfig(Strict):
    """The local HTTP endpoint (``edge_agent.server``). Every resource a client can hold is bounded here."""

    host: str = Field("127.0.0.1", description="address to bind; anything but loopback requires `token`")
    port: int = Field(8765, ge=0, le=65535, description="0 disables the HTTP endpoint")
    max_image_bytes: int = Field(10_000_000, ge=1, description="largest image file accepted, by the HTTP "
                                                               "endpoint (413) and the inbox")
    max_image_pixels: int = Field(25_000_000, ge=1, description="largest canvas (width x height, read from the "
                                                                "header before decoding) the HTTP endpoint "
                                                                "decodes; each of `workers` may hold ~4 bytes "
                                                                "a pixel while decoding")
    token: str | None = Field(None, description="bearer token every request must carry; required on any "
                                                "non-loopback bind (give it as ${VAR} in the inventory)")
    workers: int = Field(4, ge=1, le=64, description="requests handled at once")
    max_queued: int = Field(32, ge=1, description="requests waiting for a worker; beyond, 503 at once")
    max_connections: int = Field(256, ge=1, description="connections waiting to send a request; beyond, "
                                                        "the one idle longest is dropped")
    header_timeout_s: float = Field(5.0, gt=0, description="a connection that sends no request in this "
                                                           "time is closed")
    request_timeout_s: float = Field(15.0, gt=0, description="deadline for any one read or write of a request")
    max_batch: int = Field(32, ge=1, le=1024, description="images in one Open Inference Protocol request "
                                                          "(POST /v2/models/ensemble/infer); beyond, 413")
    max_batch_bytes: int = Field(8_000_000, ge=1, description="largest body of such a batch request (413 before "
                                 "a byte is read); each image in it is held to max_image_bytes and "
                                 "max_image_pixels too. A worker holds about 10 times this while parsing JSON")

    @model_validator(mode="after")
    def _token_off_loopback(self) -> "ServeConfig":
        if self.port and self.host not in LOOPBACK_HOSTS and not self.host.startswith("127.") and not self.token:
            raise ValueError(f"serving on {self.host} (not loopback) needs a bearer token: set serve.token "
                             f"(e.g. token: ${{EDGE_HTTP_TOKEN}} in the inventory), or bind 127.0.0.1")
        return self


class AgentConfig(Strict):
    site: str
    root: Path
    store_url: str = Field(description="fsspec URL the agent pushes samples and status to (file://, sftp://, s3://)")
    store_options: dict[str, str] = Field(default_factory=dict, description="fsspec storage options (no secrets: use env); "
                                             "s3://: endpoint_url, region, profile, timeout")
    image_size: int = Field(64, ge=16)
    # The policies that fine-tune best at the edge (bench/member_policies.py: contrast, geometric and strong
    # cost 4-5 points on the sites' val and gate splits after a short fine-tune; these did not).
    members: list[MemberConfig] = Field(default_factory=lambda: [MemberConfig(policy=p) for p in ("flips", "noise", "none")])
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    upload: UploadBudget = Field(default_factory=UploadBudget)
    home_labels: HomeLabels = Field(default_factory=HomeLabels)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    retention: Retention = Field(default_factory=Retention)
    poll_interval_s: float = Field(2.0, gt=0)
    heartbeat_interval_s: float = Field(10.0, gt=0)
    workers: int | None = Field(None, ge=1, description="cores to use; default all")
    profile: Literal["edge", "edge-serve"] = Field(
        "edge", description="what is installed: edge fine-tunes and serves; edge-serve serves the deployed model "
                            "as it comes (no torch), selects and uploads")

    @model_validator(mode="after")
    def _store_options_fit(self) -> "AgentConfig":
        if problems := store_option_problems(self.store_url, self.store_options):
            raise ValueError("; ".join(problems))
        return self


class ConfigError(ValueError):
    """A config file that cannot be used, with the file and field named."""


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate an agent config; errors name the file, line and field (as the inventory's do)."""
    path = Path(path)
    try:
        raw, lines = read_yaml(path)
    except YamlFileError as exc:
        raise ConfigError("; ".join(p.replace(": no such file", ": no such config file") for p in exc.problems)) \
            from None
    problems: list[str] = []
    config = validate(AgentConfig, raw or {}, path, lines, (), "agent config", problems)
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def dump_config(config: AgentConfig) -> str:
    """The YAML text of a config, stable so that an unchanged config renders byte-identical."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=True)
