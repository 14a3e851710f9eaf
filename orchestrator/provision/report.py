"""What a provisioning run reports: per host and step, ok / changed / failed / skipped (Ansible's words).

``ok`` means "already right", ``changed`` "made right", ``failed`` carries the reason; a step after a
failed one is ``skipped``. The same records feed the CLI's recap, ``--json`` and the flow's table artifact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

STEPS = ("connect", "facts", "folders", "wheel", "install", "config", "service", "restart", "health")
OK, CHANGED, FAILED, SKIPPED = "ok", "changed", "failed", "skipped"


def shown(status: str, check: bool) -> str:
    """A status as a person reads it: in check mode nothing changed, so ``changed`` is ``would change``."""
    return "would change" if check and status == CHANGED else status

# What a person would type to do each step by hand on one host (for the benchmark's comparison).
MANUAL_COMMANDS = {
    "connect": 1,   # ssh user@host
    "facts": 6,     # uname -a; python3 --version; nproc; free -m; df -h; nvidia-smi
    "folders": 1,   # mkdir -p config models/... data/... runs outbox
    "wheel": 2,     # scp the wheel; sha256sum it
    "install": 4,   # python3 -m venv; echo base site-packages > x.pth; pip install; python -c 'import ...'
    "config": 2,    # scp agent.yaml; mv into place
    "service": 3,   # write the unit (or supervisor script); systemctl daemon-reload; systemctl enable
    "restart": 1,   # systemctl restart
    "health": 1,    # cat status.json (and look at the time)
}


# ------------------------------------------------------------------------------------------- results


@dataclass
class StepResult:
    step: str
    status: str
    message: str = ""
    seconds: float = 0.0


@dataclass
class HostResult:
    site: str
    steps: list[StepResult] = field(default_factory=list)
    error_kind: str | None = None  # "connect" (retry may help), "hostkey" (never retried), "step"
    facts: dict = field(default_factory=dict)
    seconds: float = 0.0
    commands: int = 0  # SSH sessions/uploads this tool opened on the host
    requests: int = 0  # step requests answered by the remote worker (one line each way)
    shipped_bytes: int = 0  # wheels uploaded to the host (or that would be, in check mode)
    attempts: int = 1  # tries: an unreachable host is tried again (see the driver's retry delays)

    @property
    def status(self) -> str:
        statuses = {s.status for s in self.steps}
        return FAILED if FAILED in statuses else CHANGED if CHANGED in statuses else OK

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    @property
    def changed(self) -> int:
        return sum(s.status == CHANGED for s in self.steps)

    @property
    def reason(self) -> str:
        """Why the host failed: the first failed step and its message."""
        for step in self.steps:
            if step.status == FAILED:
                return f"{step.step}: {step.message}"
        return ""

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.steps)

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status, "reason": self.reason}


@dataclass
class RunReport:
    hosts: list[HostResult]
    check: bool = False
    seconds: float = 0.0

    @property
    def failed(self) -> list[HostResult]:
        return [h for h in self.hosts if h.failed]

    @property
    def changed(self) -> int:
        """Total changed steps over all hosts (0 on a second run over an unchanged fleet)."""
        return sum(h.changed for h in self.hosts)

    def rows(self) -> list[dict]:
        """One row per host and step (the Prefect table artifact, the CLI's --json)."""
        return [{"site": h.site, "step": s.step, "status": shown(s.status, self.check), "message": s.message,
                 "seconds": round(s.seconds, 2)} for h in self.hosts for s in h.steps]

    def recap(self) -> str:
        """An Ansible-style recap: one line per host, then the failures and why."""
        width = max([len(h.site) for h in self.hosts] + [4])
        mode = " (check mode: nothing was changed)" if self.check else ""
        lines = [f"PROVISION RECAP{mode}"]
        changed = "would_change" if self.check else "changed"
        for h in self.hosts:
            shipped = f"  shipped {h.shipped_bytes / 2**20:.1f} MiB" if h.shipped_bytes else ""
            lines.append(f"{h.site:<{width}}  {shown(h.status, self.check):<7}  ok={h.count(OK)} "
                         f"{changed}={h.count(CHANGED)} failed={h.count(FAILED)} skipped={h.count(SKIPPED)}  "
                         f"{h.seconds:.1f}s{shipped}")
        if self.failed:
            lines.append(f"{len(self.failed)} of {len(self.hosts)} host(s) failed:")
            lines += [f"  {h.site}: {h.reason}" for h in self.failed]
        return "\n".join(lines)
