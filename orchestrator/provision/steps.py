"""The provisioning steps for one site, in order: facts → folders → wheel → install → config → service →
restart → health.

Each step first looks at the host and acts only where it differs from what the inventory asks for, so
a second run over an unchanged fleet reports no change. In ``check`` mode every step only looks.

One module on purpose (about 450 lines): the steps are one ordered recipe sharing one host worker and one
report, and reading them in order is how an operator follows what provisioning did.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from edge_agent.config import dump_config
from edge_agent.layout import AgentPaths
from orchestrator.inventory import Inventory, Site
from orchestrator.known_hosts import known_host_lines, known_hosts_name
from orchestrator.progress import Progress
from orchestrator.provision.hostworker import part_name
from orchestrator.provision.remote import HostWorker, Remote, StepFailed
from orchestrator.provision.report import CHANGED, FAILED, OK, SKIPPED, HostResult, StepResult
from orchestrator.provision.service import (
    agent_unit,
    render_supervisor,
    render_unit,
    restart_marker,
    service_mode,
    supervisor_pidfile,
    supervisor_script,
)
from orchestrator.provision.wheel import Wheel
from orchestrator.provision.wheelhouse import (
    Lock,
    NoWheel,
    Platform,
    WheelFile,
    Wheelhouse,
    installed_size,
    site_requirements,
    wheelhouse_at,
)

log = logging.getLogger(__name__)
MIN_PYTHON = (3, 10)
REACH_TIMEOUT_S = 10.0  # the host asks its index once before anything ships; pip itself would retry for minutes


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} PiB"


_VERSION = re.compile(r"\d+\.\d+(\.\d+)?[A-Za-z0-9+.]{0,20}")
_TEXT = (lambda v: isinstance(v, str) and 0 < len(v) <= 4096, "text (at most 4096 characters)")
_COUNT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0")
# What each host fact must be before any step uses it (a garbage answer is named, never an int() traceback).
FACTS = {
    "os": _TEXT, "kernel": _TEXT, "arch": _TEXT, "python_path": _TEXT, "home": _TEXT, "root": _TEXT,
    "implementation": _TEXT, "libc": _TEXT,
    "python": (lambda v: isinstance(v, str) and bool(_VERSION.fullmatch(v)), "a Python version such as 3.11.7"),
    "libc_version": (lambda v: isinstance(v, str) and bool(re.fullmatch(r"\d+(\.\d+){1,3}", v)),
                     "a version such as 2.36"),
    "cores": (lambda v: v is None or (_COUNT[0](v) and v >= 1), "a whole number >= 1"),
    "memory_bytes": _COUNT, "disk_free_bytes": _COUNT, "uid": _COUNT,
    "time": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
             "a time in seconds"),
    "gpu": (lambda v: v is None or _TEXT[0](v), "a GPU name or null"),
    "systemd": (lambda v: isinstance(v, bool), "true or false"),
}


def checked_facts(facts: dict, site: str) -> dict:
    """``facts`` when every one is what the steps expect; else StepFailed naming the fact and the host."""
    for name, (valid, what) in FACTS.items():
        if name not in facts:
            raise StepFailed(f"host {site}: the fact {name!r} is missing from the host's answer")
        if not valid(facts[name]):
            shown = repr(facts[name])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise StepFailed(f"host {site}: the fact {name!r} is {shown}, not {what}")
    return facts


def shown_url(url: str) -> str:
    """``url`` with any password in it replaced by ``***`` (the URL is named in messages and logs)."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = f"{parts.username}:***@" if parts.username else "***@"
    return parts._replace(netloc=user + parts.netloc.rpartition("@")[2]).geturl()


class SiteProvisioner:
    """Runs the steps on one site, in order, stopping at the first failure.

    Holds what earlier steps learnt (facts, the resolved root, whether anything changed) because later
    steps depend on it: the service restarts only when the wheel, install, config or unit changed.
    """

    def __init__(self, site: Site, inventory: Inventory, remote: Remote, wheel: Wheel, check: bool,
                 result: HostResult):
        self.site, self.inventory, self.remote, self.wheel, self.check = site, inventory, remote, wheel, check
        self.result = result
        self.root = site.root
        self.paths = AgentPaths(Path(site.root))
        self.needs_restart = False
        self.worker = HostWorker(remote, site.python)
        self.restarted_at: float | None = None
        self.mode = "process"
        self.lock: Lock | None = None  # the dependency wheels (install mode wheelhouse), from the facts step
        self.missing: dict[str, int] = {}  # wheel name -> bytes already on the host (a cut-off upload)
        self.healed: list[str] = []  # leftovers the facts step found and cleared (a damaged wheel, a stale partial)

    # -- plumbing

    def call(self, op: str, timeout_s: float | None = None, **req) -> dict:
        """Run one :mod:`~orchestrator.provision.hostworker` operation on the host (starting the worker on first use)."""
        started = self.worker.started
        try:
            return self.worker.call(op, timeout_s, **req)
        finally:
            self.result.commands += int(self.worker.started and not started)
            self.result.requests += 1

    def would(self, text: str) -> str:
        return f"would {text}" if self.check else text

    @property
    def venv(self) -> str:
        return self.site.venv.replace("~", self.result.facts.get("home", "~"), 1) if self.site.venv else \
            f"{self.root}/venv"

    @property
    def pidfile(self) -> str:
        return supervisor_pidfile(self.root)

    @property
    def script(self) -> str:
        return supervisor_script(self.root)

    @property
    def out_file(self) -> str:
        """The agent's stdout/stderr (its own log goes to ``agent.log``; this catches what happens before)."""
        return f"{self.root}/agent.out"

    @property
    def unit(self) -> str:
        return agent_unit(self.site.name)

    @property
    def marker(self) -> str:
        return restart_marker(self.root)

    # -- steps: each returns (status, message)

    def facts(self) -> tuple[str, str]:
        facts = checked_facts(self.call("facts", root=self.site.root), self.site.name)
        self.result.facts = facts
        self.root = facts["root"]
        self.paths = AgentPaths(Path(self.root))
        version = tuple(int(p) for p in facts["python"].split(".")[:2])
        if version < MIN_PYTHON:
            raise StepFailed(f"python {facts['python']} at {facts['python_path']} is too old "
                             f"(need {'.'.join(map(str, MIN_PYTHON))}+)")
        mode = self.site.agent.service
        self.mode = service_mode(mode, facts)
        if mode == "systemd" and not facts["systemd"]:
            raise StepFailed("service: systemd was asked for but systemd does not run on this host")
        self._reach_index()
        plan = self._plan_install()
        gpu = facts["gpu"] or "no GPU"
        return OK, (f"{facts['os']} {facts['arch']} {facts['libc']} {facts['libc_version']}, python "
                    f"{facts['python']}, {facts['cores']} cores, {_size(facts['memory_bytes'])} RAM, "
                    f"{_size(facts['disk_free_bytes'])} free, {gpu}; {plan}")

    def _reach_index(self) -> None:
        """The host asks its ``index_url`` before anything ships (for the page pip asks first: the profile's
        first package); pip would find an unreachable index only at install time, after the wheel went up,
        as minutes of retries that never name the URL."""
        install = self.site.install
        if self.site.install_mode != "index" or not install.index_url:
            return
        url = install.index_url
        probe = url
        if not url.startswith("file:"):
            first = re.split(r"[\s\[<>=!~;]", site_requirements(install.profile, self.store_url)[0])[0]
            probe = f"{url.rstrip('/')}/{re.sub(r'[-_.]+', '-', first).lower()}/"
        out = self.call("reach", url=probe, timeout=REACH_TIMEOUT_S, timeout_s=REACH_TIMEOUT_S + 30)
        if out.get("why"):
            asked = f" (asked {shown_url(probe)})" if probe != url else ""
            raise StepFailed(f"index_url {shown_url(url)} cannot be reached from the host: {out['why']}{asked}; "
                             f"nothing was shipped")

    def _plan_install(self) -> str:
        """Facts before bytes: the wheels this host needs, and whether its disk holds them; refuses the host
        (with the package and platform, or need vs free) before anything is shipped."""
        install = self.site.install
        mode, facts = self.site.install_mode, self.result.facts
        if mode == "wheelhouse":
            try:
                self.lock = self.wheelhouse.lock(install.profile, Platform.from_facts(facts), self.store_url)
            except NoWheel as exc:
                raise StepFailed(str(exc)) from None
        wanted = self.wanted()
        # wheels a verified install recorded in the venv it keeps count as present: their files were removed
        out = self.call("wheels_missing", folder=f"{self.root}/wheels", wheels=self._wheel_list(wanted),
                        venv=self.venv, layout=f"{mode} {install.profile}\n", check=self.check,
                        timeout_s=600)  # may hash a changed wheel
        self.missing = {name: out["partial"].get(name, 0) for name in out["missing"]}
        self.healed = list(out.get("healed", []))
        ship = sum(w.size - self.missing[w.name] for w in wanted if w.name in self.missing)
        # the venv kept: only what is new goes in; made afresh: all of it (the wheels stay until it is verified)
        into = [w for w in wanted if w.name in self.missing] if out.get("kept") else wanted
        installed = sum(w.installed_size for w in into) if self.missing else 0
        need = ship + installed + (install.disk_reserve_mb << 20 if self.missing else 0)
        free = facts["disk_free_bytes"]
        if need > free:
            raise StepFailed(f"not enough disk at {self.root}: need {_size(need)} ({_size(ship)} to ship, "
                             f"{_size(installed)} installed, {install.disk_reserve_mb} MiB reserve), "
                             f"{_size(free)} free")
        return (f"install {mode}, profile {install.profile}: {len(wanted) - len(self.missing)}/{len(wanted)} "
                f"wheels installed or present, {_size(ship)} to ship, {_size(installed)} to install")

    @staticmethod
    def _wheel_list(wheels: list[WheelFile]) -> list[dict]:
        return [{"name": w.name, "sha256": w.sha256, "size": w.size} for w in wheels]

    def wanted(self) -> list[WheelFile]:
        """The wheels the host must hold: the project's, and with a wheelhouse its dependencies for the host."""
        ours = WheelFile(self.wheel.name, self.wheel.sha256, self.wheel.path.stat().st_size,
                         installed_size(self.wheel.path))
        return [*(self.lock.wheels if self.lock else ()), ours]

    def folders(self) -> tuple[str, str]:
        wanted = [str(f) for f in self.paths.folders()] + [f"{self.root}/bin", f"{self.root}/wheels"]
        missing = self.call("folders", folders=wanted, check=self.check)["changed"]
        if not missing:
            return OK, f"{len(wanted)} folders present"
        return CHANGED, self.would(f"create {len(missing)} folder(s) under {self.root}")

    def wheel_step(self) -> tuple[str, str]:
        """The wheels the host lacks (the facts step found which): each sha256-checked on the host before it
        counts; a cut-off upload resumes where it stopped."""
        wanted = self.wanted()
        todo = [w for w in wanted if w.name in self.missing]
        healed = f"; {'; '.join(self.healed)}" if self.healed else ""
        if not todo:
            status = CHANGED if self.healed and not self.check else OK  # a stale partial went
            return status, f"{len(wanted)} wheel(s) installed or present ({self.wheel.name}, sha256 " \
                f"{self.wheel.sha256[:12]})" + healed
        self.needs_restart = True
        resumed = sum(self.missing[w.name] for w in todo)
        size = sum(w.size for w in todo) - resumed
        what = f"{len(todo)} wheel(s), {_size(size)}"
        if self.check:
            return CHANGED, f"would ship {what}{healed}"
        # the bytes as they go: the host task's progress artifact (and a bar on a terminal)
        with Progress(size, "B", f"{self.site.name}: shipping {len(todo)} wheel(s)", key="upload-progress") as sent:
            for wheel in todo:
                self._ship(wheel, self.missing[wheel.name], sent.advance)
        self.result.shipped_bytes += size
        return CHANGED, f"shipped {what}" + (f" (resumed after {_size(resumed)} a cut-off upload left)"
                                             if resumed else "") + healed

    @property
    def store_url(self) -> str:
        return self.site.store_url or self.inventory.cloud.store_url

    @property
    def wheelhouse(self) -> Wheelhouse:
        return wheelhouse_at(self.inventory.wheelhouse())

    def _ship(self, wheel: WheelFile, offset: int = 0, on_bytes: Callable[[int], None] | None = None) -> None:
        """Upload one wheel (from ``offset``: the bytes a cut-off upload left) and commit it, sha256-checked on
        the host. A resumed upload whose result does not match is shipped again whole, once: the partial it
        resumed from was not the wheel's start (the host removed it)."""
        local = self.wheel.path if wheel.name == self.wheel.name else self.wheelhouse.blob(wheel)
        part = f"{self.root}/wheels/{part_name(wheel.sha256)}"
        self.remote.put(local, part, offset, on_bytes)
        self.result.commands += 1
        try:
            self.call("commit", tmp=part, path=f"{self.root}/wheels/{wheel.name}", sha256=wheel.sha256,
                      stamp=True, restart_marker=self.marker, timeout_s=600)
        except StepFailed as exc:
            if not offset or not str(exc).startswith("upload corrupted"):
                raise
            log.info("%s: %s after resuming at %d bytes; shipping it whole", self.site.name, exc, offset)
            self._ship(wheel, 0, on_bytes)
            self.result.shipped_bytes += wheel.size

    def install(self) -> tuple[str, str]:
        mode, install = self.site.install_mode, self.site.install
        extra: dict = {}
        if mode == "wheelhouse":
            extra = {"requirements": self.lock.requirements(), "wheels_dir": f"{self.root}/wheels",
                     "pip_wheel": next(w.name for w in self.lock.wheels if w.project == "pip")}
        elif mode == "index":
            constraints = self.wheelhouse.constraints
            requirements = site_requirements(install.profile, self.store_url)
            extra = {"requirements": "".join(f"{r}\n" for r in requirements),
                     "index_url": install.index_url, "constraints": constraints.read_text() if constraints else ""}
        # the wheels: recorded in the venv once the install is verified, then removed from the host
        request = dict(venv=self.venv, wheel=f"{self.root}/wheels/{self.wheel.name}", mode=mode,
                       profile=install.profile, sha256=self.wheel.sha256, check=self.check,
                       wheels=self._wheel_list(self.wanted()), restart_marker=self.marker, timeout_s=1800, **extra)
        try:
            out, reshipped = self.call("install", **request), ""
        except StepFailed as exc:
            reshipped = self._reship_damaged(exc)  # re-raises when no wheel was damaged
            out = self.call("install", **request)
        removed = (f"{'would remove' if self.check else 'removed'} {out['removed']} shipped wheel(s), "
                   f"{_size(out['removed_bytes'])}, after the verified install") if out.get("removed") else ""
        if not out["changed"]:
            if removed:  # a run cut off after its install, or a host provisioned before wheels were removed
                return CHANGED, f"{self.wheel.name} installed in {self.venv}; {removed}"
            return OK, f"{self.wheel.name} installed in {self.venv}"
        self.needs_restart = True
        return CHANGED, self.would(", ".join(out["changed"]) + f" ({self.venv})") + reshipped + \
            (f"; {removed}" if removed else "")

    def _reship_damaged(self, failure: StepFailed) -> str:
        """After a failed install: hash every shipped wheel whatever its stamp says (bytes damaged without
        the file's size or times changing), ship the damaged ones again and say so; re-raise the install's
        failure when none was damaged (the failure is not the wheels')."""
        if self.check:
            raise failure
        wanted = self.wanted()
        damaged = self.call("wheels_verify", folder=f"{self.root}/wheels", wheels=self._wheel_list(wanted),
                            timeout_s=600)["damaged"]
        if not damaged:
            raise failure
        for wheel in (w for w in wanted if w.name in damaged):
            self._ship(wheel)
            self.result.shipped_bytes += wheel.size
        return f"; re-shipped {len(damaged)} wheel(s) whose bytes on the host no longer matched ({', '.join(damaged)})"

    def config(self) -> tuple[str, str]:
        config = self.site.agent_config(self.inventory.cloud, root=self.root)
        changed = False
        if config.store_url.startswith("sftp://") and "known_hosts" not in config.store_options:
            changed = self._store_host_keys()
            config.store_options["known_hosts"] = self._store_known_hosts
        # 0600: store options may carry credentials from ${VAR}s; only the agent's user may read them.
        changed |= self.call("put_text", path=str(self.paths.config_file), content=dump_config(config),
                             check=self.check, mode=0o600, restart_marker=self.marker)["changed"]
        if not changed:
            return OK, f"{self.paths.config_file} up to date"
        self.needs_restart = True
        return CHANGED, self.would(f"write {self.paths.config_file}")

    @property
    def _store_known_hosts(self) -> str:
        return f"{self.paths.config_file.parent}/store_known_hosts"

    def _store_host_keys(self) -> bool:
        """Give the agent the store's host key from the inventory's known_hosts, so it verifies the store."""
        url = urlsplit(self.store_url)
        name = known_hosts_name(url.hostname or "", url.port or 22)
        lines = known_host_lines(self.inventory.known_hosts, name)
        if not lines:
            raise StepFailed(f"the store's host key ({name}) is not in {self.inventory.known_hosts}: add it "
                             f"(ssh-keyscan -p {url.port or 22} {url.hostname} >> FILE, then check the "
                             f"fingerprint) so the agents can verify the store")
        return self.call("put_text", path=self._store_known_hosts, content=lines, check=self.check, mode=0o644,
                         restart_marker=self.marker)["changed"]

    def service(self) -> tuple[str, str]:
        python, config = f"{self.venv}/bin/python", str(self.paths.config_file)
        if self.mode == "systemd":
            path = f"/etc/systemd/system/{self.unit}"
            text = render_unit(self.site.name, python, config, self.root)
        else:
            path = self.script
            text = render_supervisor(self.site.name, python, config, self.out_file, self.pidfile)
        changed = self.call("put_text", path=path, content=text, mode=0o755 if self.mode == "process" else 0o644,
                            check=self.check, restart_marker=self.marker)["changed"]
        if self.mode == "systemd" and not self.check:
            state = self.call("systemd", unit=self.unit, reload=changed, enable=True)
            changed = changed or not state["enabled"]
        if not changed:
            return OK, f"{self.mode}: {path} up to date"
        self.needs_restart = True
        return CHANGED, self.would(f"write {path} ({self.mode})")

    def restart(self) -> tuple[str, str]:
        if self.mode == "systemd":
            running = self.call("systemd", unit=self.unit)["active"]  # only asks: no reload/enable/restart
        else:
            running = bool(self.call("process_state", pidfile=self.pidfile, script=self.script)["pid"])
        # A change an earlier, cut-off run made but never restarted for is on the host as a marker.
        pending = self.call("restart_pending", restart_marker=self.marker)["pending"]
        if running and not (self.needs_restart or pending):
            return OK, "agent running, nothing changed"
        verb = "restart" if running else "start"
        if self.check:
            return CHANGED, f"would {verb} the agent"
        if self.mode == "systemd":  # reload first: the unit may have been written by a run cut off before it
            self.restarted_at = self.call("systemd", unit=self.unit, reload=True, restart=True,
                                          restart_marker=self.marker)["time"]
            return CHANGED, f"{verb}ed {self.unit}"
        out = self.call("process_restart", pidfile=self.pidfile, script=self.script, cwd=self.root,
                        restart_marker=self.marker)
        self.restarted_at = out["time"]
        return CHANGED, f"{verb}ed the supervised agent (pid {out['pid']})"

    def health(self) -> tuple[str, str]:
        interval = self.site.agent.heartbeat_interval_s
        if self.restarted_at is not None:
            since = self.restarted_at
        else:  # no restart: a heartbeat from the last few intervals will do (host clock, from the facts)
            since = self.result.facts["time"] - 3 * interval - 5
        timeout = self.site.agent.health_timeout_s
        out = self.call("health", status_file=str(self.paths.status_file),
                        log_files=[self.out_file, str(self.paths.log_file)],
                        site=self.site.name, since=since, timeout=timeout, check=self.check, timeout_s=timeout + 30)
        if "missing" in out:
            if self.check:
                return SKIPPED, "no fresh heartbeat now (check mode does not wait)"
            tail = out["log_tail"].strip().splitlines()[-3:]
            raise StepFailed(f"no heartbeat from the agent in {timeout:.0f} s at {self.paths.status_file}"
                             + (f"; agent log ends: {' | '.join(tail)}" if tail else ""))
        status = out["status"]
        return OK, f"heartbeat {out['age']:.1f} s old (agent pid {status.get('pid')})"

    def run(self, on_step: Callable[[str, str], None] | None = None) -> None:
        steps = {"facts": self.facts, "folders": self.folders, "wheel": self.wheel_step, "install": self.install,
                 "config": self.config, "service": self.service, "restart": self.restart, "health": self.health}
        failed = False
        for name, step in steps.items():
            if failed:
                self.result.steps.append(StepResult(name, SKIPPED, "an earlier step failed"))
                continue
            if on_step:
                on_step(self.site.name, name)
            start = time.monotonic()
            try:
                status, message = step()
            except StepFailed as exc:
                status, message = FAILED, str(exc)
            except Exception as exc:  # noqa: BLE001 -- a dropped connection mid-step, a timeout: this host only
                status, message = FAILED, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            failed = status == FAILED
            self.result.steps.append(StepResult(name, status, self.inventory.mask(message),
                                                time.monotonic() - start))
            log.debug("%s %s: %s %s", self.site.name, name, status, message)
