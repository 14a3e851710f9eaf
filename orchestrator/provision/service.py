"""How the agent runs on a host: a systemd unit (as root where systemd runs) or a supervisor script.

One definition of the names and paths (pid file, script, unit, restart marker) shared by provisioning,
deploys and stops, and the two templates they are rendered from. Every value from the inventory is
quoted for where it lands: POSIX shell quoting in the script, systemd's own quoting and ``%``
specifier escaping in the unit (the inventory already refuses control characters).
"""

from __future__ import annotations

import shlex


def supervisor_pidfile(root: str) -> str:
    return f"{root}/supervisor.pid"


def supervisor_script(root: str) -> str:
    return f"{root}/bin/edgeloop-agent-supervise"


def agent_unit(site_name: str) -> str:
    return f"edgeloop-agent-{site_name}.service"


def restart_marker(root: str) -> str:
    """Present while a change that needs an agent restart has been made but the restart has not."""
    return f"{root}/.restart-pending"


SUPERVISOR = """#!/bin/sh
# Managed by edgeloop provisioning (do not edit): runs the edge agent for site {site}
# and starts it again when it exits unexpectedly. Stop it with: kill -TERM -$(cat {pidfile})
echo $$ > {pidfile}.tmp && mv -f {pidfile}.tmp {pidfile}
child=
trap 'if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; wait "$child"; fi; exit 0' TERM INT HUP
while :; do
  {python} -m edge_agent run --config {config} >>{out} 2>&1 &
  child=$!
  wait "$child"
  code=$?
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) edgeloop supervisor: agent exited with $code; restarting in 5 s" >>{out}
  sleep 5
done
"""

UNIT = """# Managed by edgeloop provisioning (do not edit)
[Unit]
Description=edgeloop edge agent (site {site})
After=network-online.target
Wants=network-online.target

[Service]
ExecStart={python} -m edge_agent run --config {config}
WorkingDirectory={root}
Restart=always
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
"""


def systemd_word(value: str) -> str:
    """One argument of a systemd ``ExecStart=`` line: double-quoted, with ``\\``, ``"``, ``%`` and ``$`` escaped."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def systemd_value(value: str) -> str:
    """A plain systemd setting value (a path, a description): ``%`` specifiers escaped."""
    return value.replace("%", "%%")


def render_supervisor(site: str, python: str, config: str, out: str, pidfile: str) -> str:
    """The supervisor script, every path shell-quoted."""
    return SUPERVISOR.format(site=site, python=shlex.quote(python), config=shlex.quote(config),
                             out=shlex.quote(out), pidfile=shlex.quote(pidfile))


def render_unit(site: str, python: str, config: str, root: str) -> str:
    """The systemd unit, every value quoted the way systemd reads it."""
    return UNIT.format(site=systemd_value(site), python=systemd_word(python), config=systemd_word(config),
                       root=systemd_value(root))


def service_mode(wanted: str, facts: dict) -> str:
    """How the agent runs on a host: ``auto`` is systemd where systemd runs and the login user is root,
    else a supervised process (provisioning and stopping decide it the same way)."""
    if wanted != "auto":
        return wanted
    return "systemd" if facts["systemd"] and facts["uid"] == 0 else "process"
