"""What every stage flow's run says about itself in the Prefect UI: its name, its tags, how it ends, and the
training slot it holds.

- **Names** read like the run (``pretrain-slim_resnet-elpv-defects``), not Prefect's random pair of words:
  :func:`run_name` builds a ``flow_run_name`` callable from the run's own parameters.
- **Tags** say the stage and the family (``stage:pretrain``, ``family:elpv-defects``), so the run list filters
  by them whether the run came from a deployment, the CLI or the demo: :func:`tag_run`.
- **Expected errors** (a bad inventory, a missing dataset, an unreachable host, a refused version...) end the
  run Failed with one clear line, not two engine tracebacks: :func:`finish` returns a Failed state carrying the
  exception, so a caller (a test, a parent flow) still gets the exception raised by the flow call. A task that
  fails on one logs its failure line without the engine's traceback.
- **A kept champion** is not as green as a promotion: :func:`gate_state` is a Completed state whose message
  says which, and why.
- **Training slots**: pretrain, retrain and tune hold one slot of the Prefect global concurrency limit
  :data:`TRAINING_LIMIT` while they train (``edgeloop serve`` creates it, 1 slot unless told otherwise), so a
  run from the UI, the nightly retrain and a tune never train on the same cores at once. With no such limit
  (an ephemeral API, a test) Prefect logs a warning and the training goes on unlimited.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from prefect import get_run_logger
from prefect.states import Completed, Failed, State
from pydantic import BeforeValidator

from edge_agent.datasets import DatasetError
from edge_agent.store import StoreError
from orchestrator.deploy import HostUnreachable
from orchestrator.inventory import InventoryError
from orchestrator.lease import LeaseHeld
from orchestrator.registry import RegistryError
from orchestrator.ssh import SshError
from orchestrator.trainers import TrainersFailed
from orchestrator.tune import NoTrialFinished

TRAINING_LIMIT = "edgeloop-training"  # the global concurrency limit every training holds a slot of
TRAINING_LEASE_S = 300.0  # a crashed holder's slot comes back after this (a live one renews its lease)

# Problems an operator fixes (input, a host, the store), not bugs: one line in the run's state, no traceback.
EXPECTED: tuple[type[BaseException], ...] = (InventoryError, DatasetError, RegistryError, HostUnreachable, SshError,
                                             StoreError, LeaseHeld, TrainersFailed, NoTrialFinished,
                                             FileNotFoundError)


REPORTED = "_edgeloop_reported"  # set on an exception finish() has reported in one line


class _ReportedOnce(logging.Filter):
    """Drops Prefect's engine traceback for an error :func:`finish` already reported in one line: a deployment
    run's engine raises the failed state's exception again at its top level ("Engine execution exited with
    unexpected exception") and would log it with its traceback into the run's logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record.exc_info[1] if record.exc_info else None, REPORTED, False)


def _one_line_hook(previous):
    """The interpreter's last word on an uncaught exception: one line for a reported one (a deployment run's
    process ends on it: its run is already Failed with that line), the usual traceback for anything else."""
    def hook(kind, exc, tb):
        if getattr(exc, REPORTED, False):
            print(f"edgeloop: {one_line(exc)}", file=sys.stderr)
            return
        previous(kind, exc, tb)
    return hook


class _ExpectedWithoutTraceback(logging.Filter):
    """A task that fails on an expected error logs "Task run failed with exception: StoreError('...')": the line
    is kept, its engine traceback dropped (the flow then ends with the same error in one line, see
    :func:`finish`); any other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (StageFailed, *EXPECTED)):
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("prefect.flow_runs").addFilter(_ReportedOnce())
logging.getLogger("prefect.task_runs").addFilter(_ExpectedWithoutTraceback())
sys.excepthook = _one_line_hook(sys.excepthook)


class StageFailed(RuntimeError):
    """A stage that ran to its end with a result an operator must act on (e.g. hosts that failed to
    provision); ``summary`` is the result it would otherwise have returned."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary or {}


def one_line(exc: BaseException) -> str:
    """The error as one line: its type and the first line of its text (the type says which kind it is)."""
    text = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {text[:600]}"


def finish(body: Callable[..., Any], *args: Any, expected: tuple[type[BaseException], ...] = (), **kwargs: Any):
    """Run a flow's ``body``; an expected error (:data:`EXPECTED`, ``expected`` or :class:`StageFailed`) ends the
    run as a Failed state with one line, logged once as one line. Anything else raises as usual (a bug keeps its
    traceback). The state carries the exception: calling the flow raises it, as before."""
    try:
        return body(*args, **kwargs)
    except (StageFailed, *EXPECTED, *expected) as exc:
        line = one_line(exc)
        get_run_logger().error("%s", line)
        try:
            setattr(exc, REPORTED, True)
        except AttributeError:  # an exception type with __slots__: its traceback is shown, as before
            pass
        return Failed(message=line, data=exc)


def gate_state(decision: dict, stage: str) -> State:
    """A gated stage's end: Completed with a message that says promoted or kept, and why; the data is the
    decision, so the flow's callers get the dict as before."""
    reason = " ".join(str(decision.get("reason") or "").split())[:400]
    if decision.get("promoted"):
        message = f"{stage}: promoted {decision['candidate']} to champion: {reason}"
    else:
        message = (f"{stage}: kept champion {decision.get('champion') or '(none)'}; {decision.get('candidate')} "
                   f"not promoted: {reason}")
    return Completed(message=message, data=decision)


def _value(parameters: dict, name: str, field: str | None, default: Any) -> Any:
    """A run parameter (or one field of a settings parameter), whether given as a model, a dict (a deployment
    run's JSON) or not at all."""
    value = parameters.get(name)
    if field is None:
        return default if value in (None, "") else value
    value = value.get(field) if isinstance(value, dict) else getattr(value, field, None)
    return default if value in (None, "") else value


def run_name(stage: str, *parts: tuple) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``stage`` then each ``(parameter, field, default[, shown])`` read from the
    run's parameters (``shown`` turns the value into its word), joined by dashes:
    ``pretrain-slim_resnet-elpv-defects``. Empty words are left out."""
    def name() -> str:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        parameters = dict(context.parameters or {}) if context else {}
        words = []
        for parameter, field, default, *shown in parts:
            value = _value(parameters, parameter, field, default)
            words.append(str(shown[0](value) if shown else value))
        return "-".join([stage, *[w for w in words if w]])[:120]
    return name


def tag_run(stage: str, family: str | None = None, *more: str) -> None:
    """Add ``edgeloop``, ``stage:<stage>`` and ``family:<family>`` to the running flow run's tags (best effort: a
    run whose tags could not be written still runs)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    wanted = ["edgeloop", f"stage:{stage}", *([f"family:{family}"] if family else []), *more]
    tags = list(dict.fromkeys([*(context.flow_run.tags or []), *wanted]))
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(context.flow_run.id, tags=tags)
        context.flow_run.tags = tags
    except Exception as exc:  # noqa: BLE001 - a tag is a label, never a reason to fail a stage
        get_run_logger().debug("could not tag the run: %s", exc)


@contextmanager
def training_slot(what: str) -> Iterator[None]:
    """Hold one slot of :data:`TRAINING_LIMIT` while training; logs how long the run waited for it."""
    from prefect.concurrency.sync import concurrency

    started = time.monotonic()
    with concurrency(TRAINING_LIMIT, occupy=1, lease_duration=TRAINING_LEASE_S):
        waited = time.monotonic() - started
        if waited >= 1.0:
            get_run_logger().info("%s: waited %.0f s for a training slot (%s: another training held it)", what,
                                  waited, TRAINING_LIMIT)
        yield


def ensure_training_limit(slots: int) -> str:
    """Create (or resize) :data:`TRAINING_LIMIT` on the configured Prefect API with ``slots`` slots; ``0``
    removes it (trainings then run unlimited). Returns what was done, in words."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            current = client.read_global_concurrency_limit_by_name(TRAINING_LIMIT)
        except ObjectNotFound:
            current = None
        if slots <= 0:
            if current is not None:
                client.delete_global_concurrency_limit_by_name(TRAINING_LIMIT)
            return f"{TRAINING_LIMIT}: no limit (trainings may run at once)"
        if current is None:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=TRAINING_LIMIT, limit=slots))
        elif current.limit != slots or not current.active:
            client.update_global_concurrency_limit(TRAINING_LIMIT,
                                                   GlobalConcurrencyLimitUpdate(limit=slots, active=True))
        return f"{TRAINING_LIMIT}: {slots} training(s) at once"


def _empty_for_none(value: Any) -> Any:
    return "" if value is None else value


# A text field whose empty value means "resolved from the inventory when the run starts" (the description says
# which key). Not ``str | None``: Prefect's form shows that as a str/None type toggle reading 'Property is type
# "None"'. None is still taken (read as empty) from callers written for the old type.
FromInventory = Annotated[str, BeforeValidator(_empty_for_none)]


def _list_for_none(value: Any) -> Any:
    return [] if value is None else value


# A list whose empty value means "all of them" (e.g. every site); ``list | None`` would be a type toggle too.
Names = Annotated[list[str], BeforeValidator(_list_for_none)]
