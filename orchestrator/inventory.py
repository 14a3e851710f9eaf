"""Inventory files: which edge sites exist, how to reach them, and what each one learns.

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
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from edge_agent.config import (AgentConfig, FinetuneConfig, MemberConfig, ServeConfig, Strict, Thresholds,
                               UploadBudget)


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


class AgentSettings(Strict):
    """How the agent process runs on the site."""

    serve: ServeConfig = Field(default_factory=ServeConfig)
    poll_interval_s: float = Field(2.0, gt=0)
    heartbeat_interval_s: float = Field(10.0, gt=0)
    workers: int | None = Field(None, ge=1)
    service: Literal["auto", "systemd", "process"] = Field(
        "auto", description="systemd unit where systemd runs, else a supervised background process")
    health_timeout_s: float = Field(60.0, gt=0, description="how long to wait for the first heartbeat")


class Site(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    connection: Connection
    root: str = Field(description="agent root on the site: absolute, or ~/... (the login user's home)")
    python: str = Field("python3", description="base interpreter; its packages (torch...) are reused by the venv")
    venv: str | None = Field(None, description="the agent's venv; default <root>/venv")
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

    def agent_config(self, cloud: "Cloud", root: str | None = None) -> AgentConfig:
        """The agent config this site runs with (``root``: the resolved root when it starts with ~/)."""
        return AgentConfig(
            site=self.name, root=Path(root or self.root), store_url=self.store_url or cloud.store_url,
            store_options=cloud.store_options, image_size=self.learning.image_size,
            members=self.learning.members, finetune=self.learning.finetune, thresholds=self.learning.thresholds,
            upload=self.learning.upload, serve=self.agent.serve, poll_interval_s=self.agent.poll_interval_s,
            heartbeat_interval_s=self.agent.heartbeat_interval_s, workers=self.agent.workers)


class Cloud(Strict):
    store_url: str = Field(description="fsspec URL agents push samples and status to")
    store_options: dict[str, str] = Field(default_factory=dict)
    registry: str | None = Field(None, description="where model versions live (a path or fsspec URL)")


class SshSettings(Strict):
    known_hosts: str = Field("~/.ssh/known_hosts", description="relative paths are relative to the inventory file")
    concurrency: int = Field(8, ge=1, description="hosts provisioned at once")


class Inventory(BaseModel):
    """A loaded, validated inventory; ``secrets`` holds the env values to keep out of printed output."""

    path: Path
    cloud: Cloud
    ssh: SshSettings
    sites: list[Site]
    secrets: dict[str, str] = Field(default_factory=dict, repr=False, description="env var name -> value")

    @property
    def known_hosts(self) -> Path:
        path = Path(os.path.expanduser(self.ssh.known_hosts))
        return path if path.is_absolute() else (self.path.parent / path)

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


TOP_LEVEL = {"cloud": Cloud, "ssh": SshSettings, "defaults": None, "sites": None}


# ------------------------------------------------------------------------------------ env variables

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def mask(text: str, secrets: dict[str, str]) -> str:
    for name, value in sorted(secrets.items(), key=lambda kv: -len(kv[1])):
        if value:
            text = re.sub(rf"(?<![\w]){re.escape(value)}(?![\w])", "${" + name + "}", text)
    return text


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


# ----------------------------------------------------------------------------------- line numbers


def _line_map(text: str) -> dict[tuple, int]:
    """Map every key/item path in a YAML document to its 1-based line (for error messages)."""
    lines: dict[tuple, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, child in node.value:
                walk(child, (*path, key.value))
                lines[(*path, key.value)] = key.start_mark.line + 1  # the key's line, not its value's
        elif isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                walk(child, (*path, i))

    if root is not None:
        walk(root, ())
    return lines


def _line_of(lines: dict[tuple, int], *candidates: tuple) -> int | None:
    """The line of the longest existing prefix of the first candidate path that has one."""
    for path in candidates:
        for end in range(len(path), 0, -1):
            if path[:end] in lines:
                return lines[path[:end]]
    return None


# ------------------------------------------------------------------------------------ suggestions


def _model_at(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` (to suggest a near-miss key)."""
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        if info is None:
            return model if part == loc[-1] else None
        model = _unwrap_model(info.annotation)
    return model


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _suggest(model: type[BaseModel] | None, loc: tuple) -> str:
    holder = _model_at(model, loc)
    if holder is None or not loc:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(holder.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(holder.model_fields)})"


# ---------------------------------------------------------------------------------------- loading


def _deep_merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def _format(file: Path, line: int | None, where: str, loc: tuple, msg: str) -> str:
    field = ".".join(str(p) for p in loc)
    place = f"{file}:{line}" if line else f"{file}"
    return f"{place}: {where}{': field ' + repr(field) if field else ''}: {msg}"


def load_inventory(path: str | Path, env: typing.Mapping[str, str] | None = None) -> Inventory:
    """Read, expand and validate an inventory; raises :class:`InventoryError` listing every problem."""
    path = Path(path)
    env = os.environ if env is None else env
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InventoryError([f"{path}: no such inventory file"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else f"{path}"
        raise InventoryError([f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    lines = _line_map(text)
    if not isinstance(raw, dict):
        raise InventoryError([f"{path}: expected a mapping with 'cloud', 'sites' (and optionally 'ssh', 'defaults')"])

    problems: list[str] = []
    secrets: dict[str, str] = {}
    missing: list[tuple[tuple, str]] = []
    raw = _expand(raw, (), env, secrets, missing)
    for loc, name in missing:
        site_where = _where(raw, loc)
        problems.append(_format(path, _line_of(lines, loc), site_where[0], site_where[1],
                                f"environment variable ${{{name}}} is not set (and has no :-default)"))

    for key in raw:
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(str(key), list(TOP_LEVEL), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(TOP_LEVEL)})"
            problems.append(_format(path, _line_of(lines, (key,)), "top level", (key,), "unknown key" + hint))

    cloud = _validate(Cloud, raw.get("cloud"), path, lines, ("cloud",), "cloud", problems)
    ssh = _validate(SshSettings, raw.get("ssh") or {}, path, lines, ("ssh",), "ssh", problems)
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append(_format(path, _line_of(lines, ("defaults",)), "defaults", (), "must be a mapping"))
        defaults = {}
    for key in defaults:
        if key == "name" or key not in Site.model_fields:
            problems.append(_format(path, _line_of(lines, ("defaults", key)), "defaults", (key,),
                                    "unknown key" + _suggest(Site, (key,))))

    sites_raw = raw.get("sites")
    sites: list[Site] = []
    if not isinstance(sites_raw, list) or not sites_raw:
        problems.append(_format(path, _line_of(lines, ("sites",)), "top level", ("sites",),
                                "must be a non-empty list of sites (each with a 'name')"))
        sites_raw = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(sites_raw):
        if not isinstance(entry, dict):
            problems.append(_format(path, _line_of(lines, ("sites", i)), f"site #{i + 1}", (), "must be a mapping"))
            continue
        name = entry.get("name")
        where = f"site {name!r}" if name else f"site #{i + 1}"
        if name in seen:
            problems.append(_format(path, _line_of(lines, ("sites", i, "name")), where, ("name",),
                                    f"duplicate site name (first used by site #{seen[name] + 1})"))
        elif name:
            seen[name] = i
        merged = _deep_merge({k: v for k, v in defaults.items() if k in Site.model_fields}, entry)
        site = _validate(Site, merged, path, lines, ("sites", i), where, problems, fallback=("defaults",))
        if site is not None:
            sites.append(site)

    if problems:
        raise InventoryError([mask(p, secrets) for p in problems])
    return Inventory(path=path, cloud=cloud, ssh=ssh, sites=sites, secrets=secrets)


def _where(raw: dict, loc: tuple) -> tuple[str, tuple]:
    """('site 'x'', field loc) for a path in the raw document."""
    if len(loc) >= 2 and loc[0] == "sites" and isinstance(loc[1], int):
        try:
            name = raw["sites"][loc[1]].get("name")
        except (KeyError, IndexError, AttributeError, TypeError):
            name = None
        return (f"site {name!r}" if name else f"site #{loc[1] + 1}"), loc[2:]
    return (str(loc[0]) if loc else "top level"), loc[1:]


def _validate(model: type[BaseModel], data: Any, file: Path, lines: dict[tuple, int], prefix: tuple, where: str,
              problems: list[str], fallback: tuple | None = None) -> Any:
    if data is None:
        problems.append(_format(file, _line_of(lines, prefix), where, (), "missing section"))
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field" + _suggest(model, loc)
            elif err["type"] == "missing":
                msg = "required field is missing"
            elif "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f" (got {err['input']!r})"
            candidates = [(*prefix, *loc)] + ([(*fallback, *loc)] if fallback and loc else [])
            exact = [c for c in candidates if c in lines]
            line = lines[exact[0]] if exact else _line_of(lines, candidates[0])
            problems.append(_format(file, line, where, loc, msg))
        return None
