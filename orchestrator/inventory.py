"""Inventory files: which edge sites exist, how to reach them, and what each one learns.

One module on purpose (over 450 lines): it is the schema of one file, and its models validate each other
(defaults merged under sites, secrets masked in every error), so splitting it would split one document.

An inventory is one YAML file::

    cloud:    {store_url: ..., registry: ...}          # where samples/status go, where models live
    ssh:      {known_hosts: ..., concurrency: 8}       # how the cloud talks to its fleet
    defaults: {connection: {...}, root: ..., learning: {...}}   # merged under every site
    sites:
      - name: plant-a
        connection: {type: ssh, host: 10.0.0.11, user: edge, key_file: ~/.ssh/edge}
        labels: {region: north}

Every site is the ``defaults`` deep-merged with the site's own keys, then validated strictly (unknown
keys are errors, so a typo never silently falls back to a default). Values may be ``${VAR}`` or
``${VAR:-fallback}``: they are read from the environment, and because they may be secrets, their values
are masked (shown as ``${VAR}``) in everything this project prints about the inventory.

The learning settings reuse the agent's own pydantic classes (:mod:`edge_agent.config`), so what an
inventory accepts is exactly what an agent obeys; :meth:`Site.agent_config` renders the agent's config.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import shlex
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from edge_agent.config import (
    AgentConfig,
    FinetuneConfig,
    HomeLabels,
    MemberConfig,
    Retention,
    ServeConfig,
    Strict,
    Thresholds,
    UploadBudget,
)
from edge_agent.store import Store, store_option_problems
from edge_agent.yamlfile import YamlFileError, format_problem, line_of, read_yaml, suggest, validate
from orchestrator.registry import ModelRegistry


class InventoryError(ValueError):
    """An inventory that cannot be used; the message names file, line, site and field of each problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid inventory:\n  " + "\n  ".join(problems) if len(problems) > 1 else problems[0])


# ---------------------------------------------------------------------------------------------- models


class JumpHost(Strict):
    """A bastion the connection hops through (``ssh -J``); its host key is verified like any other."""

    host: str
    port: int = Field(22, ge=1, le=65535)
    user: str | None = None
    key_file: str | None = None
    use_agent: bool = False


class Connection(Strict):
    """How the cloud reaches a site: ``ssh`` (agentless, key or agent auth) or ``local`` (the demo)."""

    type: Literal["ssh", "local"] = "ssh"
    host: str | None = None
    port: int = Field(22, ge=1, le=65535)
    user: str | None = None
    key_file: str | None = Field(None, description="private key path; the key itself never goes in the inventory")
    use_agent: bool = Field(False, description="authenticate with keys held by ssh-agent ($SSH_AUTH_SOCK)")
    jump: JumpHost | None = None
    connect_timeout_s: float = Field(10.0, gt=0)
    io_timeout_s: float = Field(60.0, gt=0, description="deadline for any one read or write on the link: a "
                                                        "stalled host fails instead of hanging the run")

    @model_validator(mode="after")
    def _ssh_needs_host(self) -> "Connection":
        if self.type == "ssh" and not self.host:
            raise ValueError("an ssh connection needs 'host'")
        if self.type == "ssh" and not (self.key_file or self.use_agent):
            raise ValueError("an ssh connection needs 'key_file' or 'use_agent: true' (passwords are not supported)")
        return self

    def describe(self) -> str:
        if self.type == "local":
            return "local"
        text = f"ssh {self.user + '@' if self.user else ''}{self.host}:{self.port}"
        if self.jump:
            text += f" via {self.jump.user + '@' if self.jump.user else ''}{self.jump.host}:{self.jump.port}"
        return text


class Learning(Strict):
    """What a site learns and how (maps 1:1 onto :class:`edge_agent.config.AgentConfig` fields)."""

    image_size: int = Field(64, ge=16)
    members: list[MemberConfig] = Field(
        default_factory=lambda: [MemberConfig(policy=p) for p in ("flips", "contrast", "geometric")], min_length=1)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    upload: UploadBudget = Field(default_factory=UploadBudget)
    home_labels: HomeLabels = Field(default_factory=HomeLabels)


class AgentSettings(Strict):
    """How the agent process runs on the site."""

    serve: ServeConfig = Field(default_factory=ServeConfig)
    poll_interval_s: float = Field(2.0, gt=0)
    heartbeat_interval_s: float = Field(10.0, gt=0)
    workers: int | None = Field(None, ge=1)
    service: Literal["auto", "systemd", "process"] = Field(
        "auto", description="systemd unit where systemd runs, else a supervised background process")
    health_timeout_s: float = Field(60.0, gt=0, description="how long to wait for the first heartbeat")
    retention: Retention = Field(default_factory=Retention)


class Install(Strict):
    """How the agent's dependencies reach the site (see README, "Install modes")."""

    mode: Literal["wheelhouse", "index", "system"] | None = Field(
        None, description="wheelhouse: wheels resolved by the cloud for the host's platform and shipped over SSH "
                          "(no index needed on the host); index: the host installs from 'index_url'; system: "
                          "reuse the base interpreter's packages (a stack the host ships). Default: wheelhouse "
                          "over SSH, system for local sites")
    profile: Literal["edge", "edge-serve"] = Field(
        "edge", description="edge: fine-tune and serve (torch & co.); edge-serve: serve, select and upload only")
    index_url: str | None = Field(None, description="the index or proxy the host installs from (mode: index)")
    disk_reserve_mb: int = Field(200, ge=0, description="free disk to leave on the host after the install")

    @field_validator("index_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(https?|file)://\S+$", value):
            raise ValueError(f"not an index URL (http://, https:// or file://): {value!r}")
        return value

    @model_validator(mode="after")
    def _index_needs_url(self) -> "Install":
        if self.mode == "index" and not self.index_url:
            raise ValueError("mode 'index' needs 'index_url' (the index or proxy the host can reach)")
        if self.index_url and self.mode != "index":
            raise ValueError(f"'index_url' is only used with mode 'index' (mode is {self.mode or 'the default'})")
        return self


class Site(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    connection: Connection
    root: str = Field(description="agent root on the site: absolute, or ~/... (the login user's home)")
    python: str = Field("python3", description="base interpreter the site venv is made from (its packages are "
                                               "reused only with install mode 'system')")
    venv: str | None = Field(None, description="the agent's venv; default <root>/venv")
    install: Install = Field(default_factory=Install)
    labels: dict[str, str] = Field(default_factory=dict)
    store_url: str | None = Field(None, description="overrides cloud.store_url for this site")
    learning: Learning = Field(default_factory=Learning)
    agent: AgentSettings = Field(default_factory=AgentSettings)

    @field_validator("root")
    @classmethod
    def _root_is_absolute(cls, value: str) -> str:
        if not (value.startswith("/") or value.startswith("~/")):
            raise ValueError(f"must be absolute or start with ~/ (got {value!r})")
        return value.rstrip("/") or "/"

    @property
    def install_mode(self) -> str:
        return self.install.mode or ("system" if self.connection.type == "local" else "wheelhouse")

    def agent_config(self, cloud: "Cloud", root: str | None = None) -> AgentConfig:
        """The agent config this site runs with (``root``: the resolved root when it starts with ~/)."""
        return AgentConfig(
            site=self.name, root=Path(root or self.root), store_url=self.store_url or cloud.store_url,
            store_options=cloud.store_options, image_size=self.learning.image_size,
            members=self.learning.members, finetune=self.learning.finetune, thresholds=self.learning.thresholds,
            upload=self.learning.upload, home_labels=self.learning.home_labels, serve=self.agent.serve, poll_interval_s=self.agent.poll_interval_s,
            heartbeat_interval_s=self.agent.heartbeat_interval_s, workers=self.agent.workers,
            retention=self.agent.retention, profile=self.install.profile)


class Trainer(Strict):
    """A cloud host that pretrains: one node of a torch.distributed job, started over SSH."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    connection: Connection
    python: str = Field("python3", description="an interpreter with edgeloop[cloud] installed")
    workdir: str = Field(description="where runs are written on the host; the dataset path must be readable there")
    nproc_per_node: int = Field(1, ge=1, description="ranks on this host (its GPUs, or a few CPU processes)")

    @field_validator("connection")
    @classmethod
    def _ssh(cls, value: Connection) -> Connection:
        if value.type != "ssh" or not value.host:
            raise ValueError("a trainer is reached over SSH: give connection.host (and user, key_file)")
        return value


class Cloud(Strict):
    store_url: str = Field(description="fsspec URL agents push samples and status to")
    store_options: dict[str, str] = Field(default_factory=dict)
    registry: str | None = Field(None, description="where model versions live (a path or fsspec URL)")
    wheelhouse: str | None = Field(None, description="where the wheels resolved for the sites' platforms are kept "
                                   "(content-addressed); default: beside a local registry, else ~/.cache/edgeloop")
    stale_after_s: float = Field(300, gt=0, description="a site whose last heartbeat is older is stale "
                                 "(fleet-health fails)")
    retrain_schedule: str | None = Field(None, description="cron for the retrain deployment (collect, then "
                                         "retrain), e.g. '0 3 * * *'; none: started by hand")
    trainers: list[Trainer] = Field(default_factory=list, description="hosts the pretrain flow trains on together "
                                    "(DDP over SSH); none: it trains in the flow's own process")
    rendezvous_port: int = Field(29400, ge=1, le=65535, description="port on the first trainer where the "
                                 "trainers meet")
    datasets: dict[str, str] = Field(default_factory=dict, description="named dataset versions (paths relative "
                                     "to the inventory file); pretrain and retrain use `generic` unless told")

    @model_validator(mode="after")
    def _store_options_fit(self) -> "Cloud":
        if problems := store_option_problems(self.store_url, self.store_options):
            raise ValueError("; ".join(problems))
        return self

    @field_validator("retrain_schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and len(value.split()) not in (5, 6):
            raise ValueError(f"not a cron expression (5 fields, e.g. '0 3 * * *'): {value!r}")
        return value


class CanaryThresholds(Strict):
    """How a site's live window on the new version is judged against its window before the deploy
    (:mod:`orchestrator.canary`): tests at a stated error rate, traffic sized for the effect to catch."""

    alpha: float = Field(0.05, gt=0, lt=1, description="the share of canaries of a version no worse than the "
                         "one before that the live tests may fail (split over the tests); also the alpha of the "
                         "gate-evidence row (the site's own alpha is never used)")
    power: float = Field(0.8, ge=0.5, lt=1, description="the chance of catching the effect below")
    rate_ratio: float = Field(2.0, gt=1, description="the effect to catch: a class's prediction rate (e.g. the "
                              "defect rate) or the failure rate that halves or doubles")
    min_change_points: float = Field(5.0, ge=0, le=100, description="the smallest change of a rate worth "
                                     "catching, in percentage points (a rate near 0 has no halving to see)")
    min_predictions: int = Field(0, ge=0, description="predictions the new model must serve before it is judged, "
                                 "beyond what the power needs")
    latency_p95_growth_pct: float = Field(50.0, ge=0, description="guard: largest growth of p95 inference "
                                          "latency, in %")
    confidence_drop_points: float = Field(15.0, ge=0, le=100, description="guard: largest drop of mean "
                                          "confidence, in percentage points")
    disagreement_rise_points: float = Field(15.0, ge=0, le=100, description="guard: largest rise of mean member "
                                            "disagreement, in percentage points")


class RolloutSettings(Strict):
    """How a new version goes out: canary sites first, then the rest in waves, every site judged."""

    canary: list[str] | float = Field(0.1, description="canary sites by name, or the fraction of the fleet "
                                      "(at least one site) taken in inventory order")
    soak_s: float = Field(60.0, ge=0, description="how long a canary must keep serving the new model, healthy, "
                          "before the rest of the fleet gets it")
    timeout_s: float = Field(1800.0, gt=0, description="how long to wait for a canary's verdict")
    fresh_within_s: float | None = Field(None, gt=0, description="a canary whose last heartbeat is older than "
                                         "this, by the store's clock, fails (default: three of its heartbeat "
                                         "intervals plus 10 s)")

    waves: list[float] = Field(default_factory=lambda: [1.0], description="after the canaries, the share of "
                               "the rest deployed by the end of each wave (cumulative, rising to 1.0), each "
                               "wave judged like the canaries")
    require: Literal["improve", "no_regression"] = Field("no_regression", description="improve: the version goes "
                                                         "on only if its gate evidence improved at least one "
                                                         "canary; no_regression: unless it regressed one")
    thresholds: CanaryThresholds = Field(default_factory=CanaryThresholds)
    inconclusive: Literal["halt", "extend", "proceed"] = Field("extend", description="a canary whose soak ended "
                                                               "without the traffic its tests need: halt (roll "
                                                               "back now), extend (soak on until timeout_s, then "
                                                               "halt) or proceed (go on; the verdict stays "
                                                               "inconclusive)")
    max_predictions_per_s: float = Field(50.0, gt=0, description="the most inputs a site can serve per second: "
                                         "a window claiming more since the deploy is unreadable")
    restart_grace_s: float | None = Field(None, gt=0, description="a canary whose agent stopped is restarting "
                                          "for this long (default: its freshness limit) before it fails")
    rollback_retries: int = Field(3, ge=0, description="retries of a site's rollback that failed, with back-off")
    rollback_retry_s: float = Field(2.0, ge=0, description="first back-off between rollback retries (doubles)")
    lease_s: float = Field(300.0, gt=0, description="the fleet's rollout lease expires this long after its "
                                                    "holder last renewed it (a crashed holder blocks no longer)")

    @field_validator("waves")
    @classmethod
    def _waves(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < w <= 1 for w in value) or value != sorted(value) or value[-1] != 1.0:
            raise ValueError(f"waves must be rising shares in (0, 1] ending at 1.0 (got {value})")
        return value

    def fresh_limit(self, heartbeat_interval_s: float) -> float:
        return self.fresh_within_s or 3 * heartbeat_interval_s + 10.0

    @field_validator("canary")
    @classmethod
    def _fraction(cls, value: list[str] | float) -> list[str] | float:
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError(f"a canary fraction must be in (0, 1] (got {value})")
        return value


class SshSettings(Strict):
    known_hosts: str = Field("~/.ssh/known_hosts", description="relative paths are relative to the inventory file")
    concurrency: int = Field(8, ge=1, description="hosts provisioned at once")


class Inventory(BaseModel):
    """A loaded, validated inventory; ``secrets`` holds the env values to keep out of printed output."""

    path: Path
    cloud: Cloud
    ssh: SshSettings
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    sites: list[Site]
    secrets: dict[str, str] = Field(default_factory=dict, repr=False, description="env var name -> value")

    def dataset(self, name: str = "generic") -> str:
        """The path of the dataset version ``cloud.datasets`` names ``name`` (a clear error when none)."""
        if name not in self.cloud.datasets:
            raise InventoryError([f"{self.path}: cloud.datasets has no {name!r} dataset; name one there "
                                  f"(e.g. `datasets: {{{name}: data/{name}}}`) or give the flow a dataset"])
        path = Path(os.path.expanduser(self.cloud.datasets[name]))
        return str(path if path.is_absolute() else (self.path.parent / path).resolve())

    @property
    def known_hosts(self) -> Path:
        path = Path(os.path.expanduser(self.ssh.known_hosts))
        return path if path.is_absolute() else (self.path.parent / path)

    def store(self) -> Store:
        """The store as the cloud reads it: the agents' URL and options; an sftp store's host key is
        checked against the inventory's known_hosts unless the store options name another file."""
        return Store(self.cloud.store_url, {"known_hosts": str(self.known_hosts), **self.cloud.store_options}
                     if self.cloud.store_url.startswith("sftp://") else self.cloud.store_options)

    def wheelhouse(self) -> Path:
        """The folder of resolved wheels: ``cloud.wheelhouse``, else ``wheelhouse/`` beside a local registry."""
        if self.cloud.wheelhouse:
            path = Path(os.path.expanduser(self.cloud.wheelhouse))
            return path if path.is_absolute() else self.path.parent / path
        registry = self.cloud.registry or ""
        if registry and "://" not in registry or registry.startswith("file://"):
            path = Path(os.path.expanduser(registry.removeprefix("file://")))
            return (path if path.is_absolute() else self.path.parent / path).parent / "wheelhouse"
        return Path(os.environ.get("EDGELOOP_CACHE", Path.home() / ".cache" / "edgeloop")) / "wheelhouse"

    def registry(self) -> ModelRegistry:
        """The cloud's model registry; a clear error when the inventory names none."""
        if not self.cloud.registry:
            raise InventoryError([f"{self.path}: cloud.registry is not set; the cloud's stages need a registry"])
        return ModelRegistry(self.cloud.registry)

    def site(self, name: str) -> Site:
        for site in self.sites:
            if site.name == name:
                return site
        raise InventoryError([f"{self.path}: no site named {name!r} (sites: {', '.join(self.names())})"])

    def names(self) -> list[str]:
        return [site.name for site in self.sites]

    def select(self, limit: list[str] | None) -> list[Site]:
        """The sites named in ``limit`` (all when empty); an unknown name is an error, not a no-op."""
        if not limit:
            return list(self.sites)
        unknown = [name for name in limit if name not in self.names()]
        if unknown:
            raise InventoryError([f"{self.path}: --limit names unknown site(s) {', '.join(unknown)} "
                                  f"(sites: {', '.join(self.names())})"])
        return [site for site in self.sites if site.name in limit]

    def mask(self, text: str) -> str:
        """``text`` with every value that came from an environment variable shown as ``${VAR}``."""
        return mask(text, self.secrets)


TOP_LEVEL = {"cloud": Cloud, "ssh": SshSettings, "rollout": RolloutSettings, "defaults": None, "sites": None}


# ------------------------------------------------------------------------------------ env variables

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _written_forms(value: str) -> set[str]:
    """The ways a value shows up in output: as is, JSON-escaped, repr-escaped, shell-quoted."""
    return {value, json.dumps(value)[1:-1], repr(value)[1:-1], shlex.quote(value)} - {""}


def mask(text: str, secrets: dict[str, str]) -> str:
    """``text`` with every secret value, in any of its escaped forms, shown as ``${VAR}``."""
    forms = [(form, name) for name, value in secrets.items() if value for form in _written_forms(value)]
    for form, name in sorted(forms, key=lambda pair: -len(pair[0])):
        text = re.sub(rf"(?<![\w]){re.escape(form)}(?![\w])", "${" + name + "}", text)
    return text


CONTROL = re.compile(r"[\x00-\x1f\x7f]")
KEY_MATERIAL = re.compile(r"-----BEGIN|PRIVATE KEY|^(ssh-(rsa|ed25519)|ecdsa-sha2-\S+) AAAA", re.MULTILINE)


def _refuse_unsafe_values(value: Any, path: tuple, found: list[tuple[tuple, str]]) -> Any:
    """Replace values that must never reach a script, a unit or a log; ``found`` says where and why.

    Control characters (a newline in ``root`` would add a line to the supervisor script) and key
    material pasted where a path belongs. The value itself is never repeated in the message.
    """
    if isinstance(value, dict):
        return {k: _refuse_unsafe_values(v, (*path, k), found) for k, v in value.items()}
    if isinstance(value, list):
        return [_refuse_unsafe_values(v, (*path, i), found) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    if KEY_MATERIAL.search(value):
        found.append((path, "looks like key material, not a path: give the path of the key file "
                            "(the key itself never goes in the inventory)"))
        return "<refused>"
    if CONTROL.search(value):
        found.append((path, "contains a control character (newline, tab, ...); not allowed in inventory values"))
        return "<refused>"
    return value


def _expand(value: Any, path: tuple, env: typing.Mapping[str, str], secrets: dict[str, str],
            missing: list[tuple[tuple, str]]) -> Any:
    """Substitute ``${VAR}`` / ``${VAR:-default}`` in every string; ``$$`` is a literal ``$``."""
    if isinstance(value, dict):
        return {k: _expand(v, (*path, k), env, secrets, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*path, i), env, secrets, missing) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            secrets[name] = env[name]
            return env[name]
        if default is not None:
            return default
        missing.append((path, name))
        return ""

    return _VAR.sub(one, value)


# ---------------------------------------------------------------------------------------- loading


def _deep_merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def load_inventory(path: str | Path, env: typing.Mapping[str, str] | None = None) -> Inventory:
    """Read, expand and validate an inventory; raises :class:`InventoryError` listing every problem."""
    path = Path(path)
    env = os.environ if env is None else env
    try:
        raw, lines = read_yaml(path)
    except YamlFileError as exc:
        raise InventoryError([p.replace(": no such file", ": no such inventory file") for p in exc.problems]) from None
    if not isinstance(raw, dict):
        raise InventoryError([f"{path}: expected a mapping with 'cloud', 'sites' (and optionally 'ssh', 'defaults')"])

    problems: list[str] = []
    secrets: dict[str, str] = {}
    missing: list[tuple[tuple, str]] = []
    raw = _expand(raw, (), env, secrets, missing)
    for loc, name in missing:
        site_where = _where(raw, loc)
        problems.append(format_problem(path, line_of(lines, loc), site_where[0], site_where[1],
                                f"environment variable ${{{name}}} is not set (and has no :-default)"))
    unsafe: list[tuple[tuple, str]] = []
    raw = _refuse_unsafe_values(raw, (), unsafe)
    for loc, why in unsafe:
        site_where = _where(raw, loc)
        problems.append(format_problem(path, line_of(lines, loc), site_where[0], site_where[1], why))

    for key in raw:
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(str(key), list(TOP_LEVEL), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(TOP_LEVEL)})"
            problems.append(format_problem(path, line_of(lines, (key,)), "top level", (key,), "unknown key" + hint))

    cloud = validate(Cloud, raw.get("cloud"), path, lines, ("cloud",), "cloud", problems)
    ssh = validate(SshSettings, raw.get("ssh") or {}, path, lines, ("ssh",), "ssh", problems)
    rollout = validate(RolloutSettings, raw.get("rollout") or {}, path, lines, ("rollout",), "rollout", problems)
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append(format_problem(path, line_of(lines, ("defaults",)), "defaults", (), "must be a mapping"))
        defaults = {}
    for key in defaults:
        if key == "name" or key not in Site.model_fields:
            problems.append(format_problem(path, line_of(lines, ("defaults", key)), "defaults", (key,),
                                    "unknown key" + suggest(Site, (key,))))

    sites_raw = raw.get("sites")
    sites: list[Site] = []
    if not isinstance(sites_raw, list) or not sites_raw:
        problems.append(format_problem(path, line_of(lines, ("sites",)), "top level", ("sites",),
                                "must be a non-empty list of sites (each with a 'name')"))
        sites_raw = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(sites_raw):
        if not isinstance(entry, dict):
            problems.append(format_problem(path, line_of(lines, ("sites", i)), f"site #{i + 1}", (), "must be a mapping"))
            continue
        name = entry.get("name")
        if not isinstance(name, (str, type(None))):  # a list or mapping: the Site model names the field
            name = None
        where = f"site {name!r}" if name else f"site #{i + 1}"
        if name in seen:
            problems.append(format_problem(path, line_of(lines, ("sites", i, "name")), where, ("name",),
                                    f"duplicate site name (first used by site #{seen[name] + 1})"))
        elif name:
            seen[name] = i
        merged = _deep_merge({k: v for k, v in defaults.items() if k in Site.model_fields}, entry)
        site = validate(Site, merged, path, lines, ("sites", i), where, problems, fallback=("defaults",))
        if site is not None:
            sites.append(site)

    unknown = [n for n in (rollout.canary if rollout and isinstance(rollout.canary, list) else []) if n not in seen]
    if unknown:
        problems.append(format_problem(path, line_of(lines, ("rollout", "canary")), "rollout", ("canary",),
                                       f"names unknown site(s) {', '.join(map(str, unknown))}"))
    for site in sites if rollout else []:  # a soak within the freshness limit lets a dead canary pass it
        limit = rollout.fresh_limit(site.agent.heartbeat_interval_s)
        if rollout.soak_s <= limit:
            problems.append(format_problem(path, line_of(lines, ("rollout", "soak_s")), "rollout", ("soak_s",),
                                           f"soak_s {rollout.soak_s:g} must be over site {site.name!r}'s freshness "
                                           f"limit {limit:g} s (rollout.fresh_within_s, or 3 heartbeat intervals "
                                           "+ 10 s): a canary that stopped heartbeating could pass its soak"))
            break
    if problems:
        raise InventoryError([mask(p, secrets) for p in problems])
    return Inventory(path=path, cloud=cloud, ssh=ssh, rollout=rollout, sites=sites, secrets=secrets)


def _where(raw: dict, loc: tuple) -> tuple[str, tuple]:
    """('site 'x'', field loc) for a path in the raw document."""
    if len(loc) >= 2 and loc[0] == "sites" and isinstance(loc[1], int):
        try:
            name = raw["sites"][loc[1]].get("name")
        except (KeyError, IndexError, AttributeError, TypeError):
            name = None
        name = name if isinstance(name, str) else None
        return (f"site {name!r}" if name else f"site #{loc[1] + 1}"), loc[2:]
    return (str(loc[0]) if loc else "top level"), loc[1:]


