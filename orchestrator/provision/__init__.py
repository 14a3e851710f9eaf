"""Agentless provisioning of edge sites: idempotent steps, each reported per host as ok/changed/failed.

For each site (over SSH, or locally for the demo)::

    connect → facts → folders → wheel → install → config → service → restart → health

``facts`` also plans the install (install mode and profile per site): the wheels the host lacks and the
disk they need, refusing the host before anything is shipped.

=============  =====================================================================
``report``     the results: per host and step, ok / changed / failed / skipped
``wheel``      the project's wheel, built once per content of its sources
``wheelhouse`` the agent's dependencies resolved per host platform and profile (pip download), kept
               content-addressed, shipped to hosts that have no index
``hostworker`` the stdlib-only program that does the work on the host
``remote``     transports to a host (SSH, local) and the host worker client
``service``    systemd unit and supervisor script: templates, names, paths
``steps``      the steps for one site (:class:`SiteProvisioner`)
``driver``     the fleet: hosts at once, retries for unreachable hosts
=============  =====================================================================
"""

from orchestrator.provision.driver import DEFAULT_RETRY_DELAYS_S, provision, provision_host, provision_site
from orchestrator.provision.remote import HostWorker, StepFailed, open_remote
from orchestrator.provision.report import (
                                           CHANGED,
                                           FAILED,
                                           MANUAL_COMMANDS,
                                           OK,
                                           SKIPPED,
                                           STEPS,
                                           HostResult,
                                           RunReport,
                                           StepResult,
)
from orchestrator.provision.service import agent_unit, restart_marker, supervisor_pidfile, supervisor_script
from orchestrator.provision.wheel import Wheel, build_wheel

__all__ = ["CHANGED", "DEFAULT_RETRY_DELAYS_S", "FAILED", "MANUAL_COMMANDS", "OK", "SKIPPED", "STEPS", "HostResult",
           "HostWorker", "RunReport", "StepFailed", "StepResult", "Wheel", "agent_unit", "build_wheel", "open_remote",
           "provision", "provision_host", "provision_site", "restart_marker", "supervisor_pidfile",
           "supervisor_script"]
