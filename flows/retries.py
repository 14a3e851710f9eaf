"""Which failures a task retries: typed transient errors only (a host or the store that did not answer this
time), never a bad input or a refused host key, and never by matching an error's text."""

from __future__ import annotations

from edge_agent.store import StoreError
from orchestrator.deploy import HostUnreachable
from orchestrator.ssh import ConnectError

TRANSIENT: tuple[type[BaseException], ...] = (ConnectError, HostUnreachable, StoreError, TimeoutError,
                                              ConnectionError)


def transient(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry when the task failed with one of :data:`TRANSIENT`."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except BaseException:  # noqa: BLE001 - anything else is not worth a retry
        return False
    return False
