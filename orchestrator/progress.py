"""Progress of long work, reported one way wherever it runs: the Prefect UI, a terminal, or the logs.

A :class:`Progress` counts ``done`` of ``total`` (epochs, trials, hosts, samples, bytes) and shows it where
someone is looking:

- inside a Prefect flow or task run, as one progress artifact of that run, updated in place (at most once per
  ``every_s`` seconds, and always at the end), so the UI shows how far a run is between "Running" and the end;
- on a terminal (stderr is a TTY), as a one-line bar with done/total, the rate and the time left, redrawn in
  place; lines logged meanwhile (an epoch's loss) scroll above it;
- elsewhere (a pipe, a log file, a test), as the lines logged today (the notes passed to :meth:`advance`).

Publishing never fails the work: an API that does not answer stops the artifact's updates, not the training.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger(__name__)

PUBLISH_EVERY_S = 1.0  # the artifact's updates, at most this often (the end always): the API is not flooded
DRAW_EVERY_S = 0.1  # the terminal bar's redraws, at most this often
BAR_WIDTH = 24
# One line on the terminal: the newest unfinished bar draws there (a wheelhouse resolved while hosts are being
# provisioned); when it ends, the one before it takes the line back.
_BARS: list[Progress] = []
_BARS_GUARD = threading.Lock()


def _run_context():
    """The Prefect task or flow run this code runs in, or None (a plain call, the CLI without a flow)."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:  # an edge host: no prefect, no artifacts
        return None
    return TaskRunContext.get() or FlowRunContext.get()


def artifact_key(text: str) -> str:
    """A Prefect artifact key from free text (keys take lowercase letters, digits and dashes only)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "progress"


def clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    seconds = int(max(0, round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def size_text(n: float) -> str:
    """Bytes for people: ``12.3 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """``done`` of ``total`` ``unit`` of one piece of work called ``description``; thread-safe.

    ``log`` writes a note as a line (default: the run's logger in a run, else this module's); ``stream`` is
    where the bar goes when it is a terminal (default: stderr); ``key`` names the artifact (default: from the
    description). Use as a context manager: leaving it ends the bar and publishes the last figure (100 % when
    the block ended normally, where it stopped when it raised).
    """

    def __init__(self, total: float, unit: str = "", description: str = "", *, key: str | None = None,
                 log: Callable[[str], None] | None = None, stream: TextIO | None = None,
                 every_s: float | None = None, done: float = 0):
        self.total, self.done, self.unit, self.description = max(float(total), 0.0), float(done), unit, description
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = PUBLISH_EVERY_S if every_s is None else every_s
        self.started, self._start_done = time.monotonic(), self.done
        self._lock = threading.Lock()
        self._drawn_at = 0.0
        self._bar_shown = self.closed = False
        self.finished_at: float | None = None  # when done reached total: the rate and time taken stop there
        self.detail = ""
        self._context = contextvars.copy_context()  # the run (and API) this began in, for updates from any thread
        self._artifact = self._create_artifact(key or artifact_key(f"{description}-progress")) \
            if _run_context() is not None else None
        self._published_at, self._sent = time.monotonic(), (self.percent, self._description())
        self._log = log or _default_logger()
        if self.tty:
            with _BARS_GUARD:
                _BARS.append(self)
        self._draw(force=True)

    # -- what callers use

    def advance(self, n: float = 1, note: str | None = None, detail: str | None = None) -> None:
        """``n`` more done; ``note`` (e.g. an epoch's loss) is logged as a line; ``detail`` is shown after the
        figures from now on (e.g. the bytes shipped so far)."""
        self.update(self.done + n, note, detail=detail)

    def update(self, done: float, note: str | None = None, total: float | None = None,
               detail: str | None = None) -> None:
        """Set how much is done (and the total, when it became known only now)."""
        with self._lock:
            if detail is not None:
                self.detail = detail
            if total is not None:
                self.total = max(float(total), 0.0)
            self.done = min(float(done), self.total) if self.total else float(done)
            if self.total and self.done >= self.total and self.finished_at is None:
                self.finished_at = time.monotonic()
            if note:
                self._note(note)
            self._draw(force=bool(note))
            self._publish(force=self.total > 0 and self.done >= self.total)

    def count(self, done: float, total: float) -> None:
        """``done`` of ``total``: a callback for code that reports both (``on_read(done, total)``)."""
        self.update(done, total=total)

    def close(self, completed: bool = True, why: str = "") -> None:
        """The end: the last figure published, the bar finished with a newline. ``completed`` counts it all
        done (a training that stopped early is done); else the figure is where it stopped, with ``why``."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if completed:
                self.done = max(self.done, self.total)
            self.finished_at = self.finished_at or time.monotonic()
            self._draw(force=True, final=True)
            self._publish(force=True, why=why)
        with _BARS_GUARD:
            mine = self in _BARS
            if mine:
                _BARS.remove(self)
            below = _BARS[-1] if mine and _BARS else None
        if below is not None:  # the bar this one covered takes the line back
            with below._lock:
                below._draw(force=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.close(completed=exc is None, why=f"{kind.__name__}: {exc}" if kind else "")

    # -- figures

    @property
    def percent(self) -> float:
        if self.total <= 0:  # nothing to do (done), or the total is not known yet
            return 100.0 if self.closed else 0.0
        return max(0.0, min(100.0, 100.0 * self.done / self.total))

    def rate(self) -> float | None:
        """Units per second since the start (None before anything was done)."""
        elapsed, done = (self.finished_at or time.monotonic()) - self.started, self.done - self._start_done
        return done / elapsed if done > 0 and elapsed > 0 else None

    def left_s(self) -> float | None:
        rate = self.rate()
        return (self.total - self.done) / rate if rate else None

    def _amount(self, n: float) -> str:
        return size_text(n) if self.unit == "B" else f"{n:g}"

    def figures(self) -> str:
        """``3/10 epochs, 0.52 epochs/s, 0:13 left``: what the bar and the artifact's description say."""
        unit = "" if self.unit == "B" else f" {self.unit}" if self.unit else ""
        text = f"{self._amount(self.done)}/{self._amount(self.total)}{unit}"
        text += f" ({self.detail})" if self.detail else ""
        rate, left = self.rate(), self.left_s()
        if rate is not None:
            each = self.unit or "it"
            per = f"{size_text(rate)}/s" if self.unit == "B" else f"{rate:.0f} {each}/s" if rate >= 100 else \
                f"{rate:.3g} {each}/s" if rate >= 0.1 else f"{1 / rate:.3g} s/{each}"
            text += f", {per}"
        if self.finished_at is not None:
            return text + f", took {clock(self.finished_at - self.started)}"
        return text + (f", {clock(left)} left" if left is not None else ", time left unknown")

    # -- the terminal

    def _draw(self, force: bool = False, final: bool = False) -> None:
        if not self.tty or (_BARS and _BARS[-1] is not self and not final):
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < DRAW_EVERY_S:
            return
        self._drawn_at = now
        try:
            self.stream.write("\r\x1b[K" + self._line() + ("\n" if final else ""))
            self.stream.flush()
            self._bar_shown = not final
        except (OSError, ValueError):  # the terminal went away: the work goes on
            self.tty = False

    def _line(self) -> str:
        """``description ████░░░░  33% 1/3 epochs, 0.5 epochs/s, 0:04 left``, within the terminal's width (a
        wrapped line would not redraw in place): the bar narrows first, the figures are kept."""
        utf = (getattr(self.stream, "encoding", "") or "").lower().startswith("utf")
        full, empty = ("█", "░") if utf else ("#", "-")
        figures = f"{self.percent:3.0f}% {self.figures()}"
        room = self._columns() - 1 - len(self.description) - len(figures) - 2
        width = max(0, min(BAR_WIDTH, room))
        filled = round(width * self.percent / 100)
        bar = f" {full * filled}{empty * (width - filled)} " if width >= 5 else " "
        return (self.description + bar + figures)[:self._columns() - 1]

    def _columns(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        return columns or shutil.get_terminal_size((100, 20)).columns

    def _note(self, note: str) -> None:
        """A line above the bar (on a terminal) or in the logs as today."""
        if self.tty and self._bar_shown:
            try:
                self.stream.write("\r\x1b[K")  # the log line takes the bar's place; the bar is drawn below it
                self.stream.flush()
            except (OSError, ValueError):
                self.tty = False
        try:
            self._log(note)
        except Exception:  # noqa: BLE001 - a logger that fails must not stop the work
            log.debug("progress note not logged: %s", note)

    # -- the Prefect UI

    def _create_artifact(self, key: str):
        try:
            from prefect.artifacts import create_progress_artifact

            return create_progress_artifact(self.percent, key=key, description=self._description())
        except Exception as exc:  # noqa: BLE001 - no API: the work goes on without its artifact
            log.debug("no progress artifact for %s: %s", self.description, exc)
            return None

    def _description(self, why: str = "") -> str:
        state = f" (stopped: {why})" if why else ""
        return f"**{self.description}**: {self.percent:.0f} %, {self.figures()}{state}"

    def _publish(self, force: bool = False, why: str = "") -> None:
        if self._artifact is None:
            return
        now = time.monotonic()
        if not force and now - self._published_at < self.every_s:
            return
        figure = (self.percent, self._description(why))
        if figure == self._sent:  # nothing new to say (the end, already published when the total was reached)
            return
        self._published_at, self._sent = now, figure
        try:  # in the context the work began in: the same API from a worker thread too
            self._context.copy().run(update_progress_artifact, self._artifact, *figure)
        except Exception as exc:  # noqa: BLE001 - the API went away: stop updating, keep working
            log.warning("progress artifact of %s no longer updated: %s", self.description, exc)
            self._artifact = None

    @property
    def artifact_id(self):
        """The progress artifact's id (None outside a run, or when the API refused it)."""
        return self._artifact


def update_progress_artifact(artifact_id, progress: float, description: str) -> None:
    """One update of a progress artifact (a module function: tests count the updates through it)."""
    from prefect.artifacts import update_progress_artifact as update

    update(artifact_id, progress, description=description)


def _default_logger() -> Callable[[str], None]:
    if _run_context() is not None:
        from prefect import get_run_logger

        return get_run_logger().info
    return log.info


def epoch_line(metrics, epochs: int) -> str:
    """Today's per-epoch log line: ``epoch 3/30: loss 0.4120, val_acc 0.861 (27.1 s)``."""
    return (f"epoch {metrics.epoch}/{epochs}: loss {metrics.train_loss:.4f}, val_acc {metrics.val_acc:.3f} "
            f"({metrics.seconds:.1f} s)")


def training_progress(epochs: int, description: str, log: Callable[[str], None] | None = None,
                      key: str = "training-progress") -> tuple[Progress, Callable]:
    """A training's progress and the ``on_epoch`` callback that moves it (and logs the epoch's line)."""
    progress = Progress(epochs, "epochs", description, key=key, log=log)

    def on_epoch(metrics) -> None:
        progress.update(metrics.epoch, epoch_line(metrics, epochs))

    return progress, on_epoch
