"""Pictures in the Prefect UI: learning curves, tuning trials and canary windows as PNG artifacts.

Prefect 3 has no image artifact that carries the image itself (``create_image_artifact`` only links to a URL,
which the browser must be able to reach: nothing here serves one). A markdown artifact whose image is a
``data:image/png;base64,...`` URI is stored in Prefect's database with the run and rendered by the UI as an
``<img>`` (checked in a real Chromium: tests/test_pictures.py). So every picture is a small PNG (800x400 at
dpi 100, a few tens of KB) embedded in a markdown artifact.

Drawing uses matplotlib's object API (:class:`~matplotlib.figure.Figure` with the Agg canvas), never pyplot:
no display, no global figure state shared between the threads Prefect runs tasks in.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

WIDTH_IN, HEIGHT_IN, DPI = 8.0, 4.0, 100  # 800x400 px
CHOSEN = "#d62728"  # the chosen epoch / the winning trial / "after"
BEFORE = "#7f7f7f"
OTHERS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]  # no red, no grey


def new_figure(ncols: int = 1, nrows: int = 1, title: str | None = None, height_in: float = HEIGHT_IN) -> tuple[
        Figure, list]:
    """An 8-inch-wide figure (800 px at dpi 100) with ``nrows x ncols`` axes (a flat list), in the one style
    every picture shares: grid, no top/right spines, small fonts, a bold title."""
    figure = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # Agg, whatever backend pyplot may have elsewhere
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=8)
    if title:
        figure.suptitle(title, fontsize=11, fontweight="bold")
    return figure, axes


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG at its own size and dpi."""
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def artifact_key(key: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from any text, e.g. a site name."""
    slug = re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")
    if not slug:
        raise ValueError(f"artifact key {key!r} has no letter or digit")
    return slug


def picture_markdown(png: bytes, alt: str) -> str:
    """Markdown that shows ``png`` as an image (a data URI: the UI needs no other server to show it)."""
    alt = re.sub(r"[\[\]\n]", " ", alt)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def publish_picture(key: str, figure: Figure, description: str) -> str | None:
    """Publish ``figure`` as a picture artifact of the current flow or task run; return the artifact's id.

    Outside a run there is nowhere to publish: nothing is written, None is returned. A picture is an aid, not
    the run's result: a failure to render or publish is logged and returns None, never fails the run.
    """
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return None
    try:
        from prefect.artifacts import create_markdown_artifact

        markdown = picture_markdown(png_bytes(figure), description)
        return str(create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description))
    except Exception as exc:  # noqa: BLE001 - a picture never fails the run that drew it
        log.warning("picture %s not published: %s: %s", key, type(exc).__name__, exc)
        return None


def drawn(what: str, build: Callable[[], Figure]) -> Figure | None:
    """``build()``, or None (logged) when drawing fails: a picture never fails the run that draws it."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - whatever broke the drawing, the run's own work stands
        log.warning("picture %s not drawn: %s: %s", what, type(exc).__name__, exc)
        return None


# --- learning curves ---------------------------------------------------------------------------------------

def _rows(history: Iterable[Any]) -> list[dict]:
    """History entries as dicts (EpochMetrics dataclasses, or the dicts metrics.json holds)."""
    return [asdict(m) if is_dataclass(m) else dict(m) for m in history]


def chosen_epoch(history: Sequence[Any], keep: str = "best") -> int | None:
    """The epoch a training kept, from its history, by :func:`edge_agent.train.train_model`'s rule: with
    ``keep="best"`` the first epoch of the highest val accuracy (train accuracy when there was no val split),
    else the last. For runs whose metrics.json is not at hand (a registered version keeps none)."""
    rows = _rows(history)
    if not rows:
        return None
    if keep != "best":
        return rows[-1]["epoch"]
    score = [r["train_acc"] if _nan(r["val_acc"]) else r["val_acc"] for r in rows]
    return rows[score.index(max(score))]["epoch"]


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def learning_curve_figure(history: Sequence[Any], best_epoch: int | None, title: str) -> Figure:
    """Loss (train, val) and accuracy (val, train) per epoch, side by side; the chosen epoch marked on both
    with a dashed line, and its val accuracy with a star and its value."""
    rows = _rows(history)
    if not rows:
        raise ValueError("no epochs in the history: nothing to draw")
    figure, (loss, acc) = new_figure(ncols=2, title=title)
    epochs = [r["epoch"] for r in rows]
    loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train loss", color="C0", gid="train_loss")
    acc.plot(epochs, [r["val_acc"] for r in rows], "o-", label="val accuracy", color="C1", gid="val_acc")
    if not all(_nan(r["val_loss"]) for r in rows):
        loss.plot(epochs, [r["val_loss"] for r in rows], "s--", label="val loss", color="C1", alpha=0.6,
                  gid="val_loss")
    acc.plot(epochs, [r["train_acc"] for r in rows], "s--", label="train accuracy", color="C0", alpha=0.6,
             gid="train_acc")
    if best_epoch is not None:
        for ax in (loss, acc):
            ax.axvline(best_epoch, color=CHOSEN, linestyle=":", linewidth=1.5, gid="chosen_epoch")
        chosen = next((r for r in rows if r["epoch"] == best_epoch), None)
        if chosen is not None and not _nan(chosen["val_acc"]):
            acc.plot([best_epoch], [chosen["val_acc"]], "*", color=CHOSEN, markersize=14, gid="chosen_val_acc",
                     label=f"chosen: epoch {best_epoch}, val acc {chosen['val_acc']:.3f}")
    loss.set(xlabel="epoch", ylabel="loss", title="loss")
    acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (loss, acc):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7, loc="best")
    return figure


def publish_learning_curve(key: str, metrics: Mapping[str, Any], title: str) -> str | None:
    """The learning-curve picture of one training from its metrics (``history`` and ``best_epoch``, as
    :func:`orchestrator.training.train_on_dataset` writes them). A training without history publishes nothing."""
    history = metrics.get("history") or []
    if not history:
        return None
    best = metrics.get("best_epoch")
    figure = drawn(key, lambda: learning_curve_figure(history, best, title))
    if figure is None:
        return None
    return publish_picture(key, figure, f"{title}: train loss and val accuracy per epoch; the dotted line marks "
                                        f"the epoch kept (epoch {best})")


class EpochLog:
    """An ``on_epoch`` callback that also keeps every epoch, for the picture of a training whose metrics.json
    is gone by the time the flow has the registered version (training in a temporary folder)."""

    def __init__(self, then=None):
        self.history: list[Any] = []
        self.then = then

    def __call__(self, metrics: Any) -> None:
        self.history.append(metrics)
        if self.then is not None:
            self.then(metrics)

    def metrics(self, keep: str = "best") -> dict:
        return {"history": _rows(self.history), "best_epoch": chosen_epoch(self.history, keep)}


# --- tuning -------------------------------------------------------------------------------------------------

def tune_figure(results: Sequence[Any], best: Any | None, title: str) -> Figure:
    """Val accuracy of every trial at every rung it reached (x: the rung's epochs), one line per trial; the
    winner red and thick, failed trials as grey crosses at zero."""
    figure, (ax,) = new_figure(title=title)
    by_trial: dict[int, list] = {}
    for r in results:
        by_trial.setdefault(r.trial.number, []).append(r)
    failed_label = "failed"
    for index, (number, runs) in enumerate(sorted(by_trial.items())):
        runs = sorted(runs, key=lambda r: r.rung)
        done = [r for r in runs if not r.error and not _nan(r.val_acc)]
        winner = best is not None and number == best.trial.number
        if done:
            ax.plot([r.epochs for r in done], [r.val_acc for r in done], "o-", gid=f"trial-{number}",
                    color=CHOSEN if winner else OTHERS[index % len(OTHERS)], linewidth=2.5 if winner else 1, alpha=1 if winner else 0.7,
                    label=f"trial {number}" + (" (best)" if winner else ""), zorder=3 if winner else 2)
        failed = [r for r in runs if r.error or _nan(r.val_acc)]
        if failed:
            ax.plot([r.epochs for r in failed], [0] * len(failed), "x", color=BEFORE, gid=f"trial-{number}-failed",
                    label=failed_label)
            failed_label = "_nolegend_"  # one legend entry for every failure
    ax.set(xlabel="epochs (rung)", ylabel="val accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(by_trial) <= 16:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return figure


# --- canary windows -----------------------------------------------------------------------------------------

def _counts(window: Mapping[str, Any]) -> dict[str, int]:
    from orchestrator.canary import class_counts

    return class_counts(window)


def canary_figure(sites: Sequence[tuple[str, Mapping | None, Mapping | None]], title: str) -> Figure:
    """Per site (a row): the class rates before and after the deploy as paired bars with their counts, and the
    p50/p95 latency before and after. A side with no window is drawn empty and says so."""
    shown = list(sites)[:6]
    figure, axes = new_figure(ncols=2, nrows=max(1, len(shown)), title=title,
                              height_in=max(HEIGHT_IN, 2.2 * len(shown) + 0.6))
    for row, (site, before, after) in enumerate(shown):
        _class_bars(axes[2 * row], site, before, after)
        _latency_bars(axes[2 * row + 1], site, before, after)
    return figure


def _class_bars(ax, site: str, before: Mapping | None, after: Mapping | None) -> None:
    classes = sorted({*((before or {}).get("class_rates") or {}), *((after or {}).get("class_rates") or {})})
    width = 0.38
    for offset, (label, window, color) in enumerate((("before", before, BEFORE), ("after", after, CHOSEN))):
        if not window or not window.get("predictions"):
            continue
        rates, counts = window.get("class_rates") or {}, _counts(window)
        xs = [i + (offset - 0.5) * width for i in range(len(classes))]
        bars = ax.bar(xs, [rates.get(c, 0.0) for c in classes], width, color=color, gid=f"rates-{label}",
                      label=f"{label} (n={window['predictions']})")
        ax.bar_label(bars, labels=[str(counts.get(c, 0)) for c in classes], fontsize=7)
    ax.set_xticks(range(len(classes)), classes, fontsize=8)
    ax.set(xlim=(-0.6, max(len(classes), 1) - 0.4), ylim=(0, 1.15), ylabel="rate",
           title=f"{site}: predicted classes (bar labels: counts)")
    ax.title.set_fontsize(9)
    missing = [label for label, window in (("before", before), ("after", after))
               if not window or not window.get("predictions")]
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    if missing:
        ax.text(0.62, 0.97, "no predictions " + (" or ".join(missing) if len(missing) < 2 else "in either window")
                + (" the deploy" if len(missing) < 2 else ""), ha="center", va="top", transform=ax.transAxes,
                fontsize=8, color="black", gid="missing", bbox={"facecolor": "white", "edgecolor": BEFORE})
        if ax.get_legend() is not None:
            ax.get_legend().set_loc("upper left")


def _latency_bars(ax, site: str, before: Mapping | None, after: Mapping | None) -> None:
    names = ["latency_p50_ms", "latency_p95_ms"]
    width = 0.38
    for offset, (label, window, color) in enumerate((("before", before, BEFORE), ("after", after, CHOSEN))):
        if not window:
            continue
        values = [window.get(n) for n in names]
        xs = [i + (offset - 0.5) * width for i in range(len(names))]
        bars = ax.bar(xs, [v or 0.0 for v in values], width, color=color, label=label, gid=f"latency-{label}")
        ax.bar_label(bars, labels=["-" if v is None else f"{v:.1f}" for v in values], fontsize=7)
    ax.set_xticks(range(len(names)), ["p50", "p95"], fontsize=8)
    ax.set(xlim=(-0.6, len(names) - 0.4), ylabel="ms", title=f"{site}: latency")
    ax.margins(y=0.15)
    ax.title.set_fontsize(9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def publish_tune(results: Sequence[Any], best: Any, trials: int) -> None:
    """The search's pictures: every trial across the rungs (``tune-trials-picture``) and the winner's own
    learning curve (``tune-learning-curve``, from the metrics.json beside its checkpoint, while it is there)."""
    title = f"random search: {trials} trials, successive halving"
    if figure := drawn("tune-trials-picture", lambda: tune_figure(results, best, title)):
        publish_picture("tune-trials-picture", figure, f"{title}: val accuracy of each trial at each rung; the "
                                                       f"winner (trial {best.trial.number}) in red")
    metrics = Path(best.checkpoint).parent / "metrics.json" if best.checkpoint else None
    if metrics is not None and metrics.is_file():
        publish_learning_curve("tune-learning-curve", json.loads(metrics.read_text()),
                               f"tune winner: trial {best.trial.number}, rung {best.rung} ({best.epochs} epochs)")


def publish_canaries(stage: str, watches: Sequence[Any], reader: Any, version: str) -> None:
    """One picture of a rollout stage's watched sites (``rollout-<stage>-windows``): the window of what served
    before the deploy (the canary's baseline) against the live window of the latest heartbeats ``reader``
    (a :class:`orchestrator.health.FleetStatus`) reads. Like every picture, it never fails the rollout."""
    from orchestrator.canary import live_window
    from orchestrator.rollout import _baseline  # the baseline the canary analysis itself compares with

    if not watches:
        return

    def build() -> Figure:
        now = reader.read([w.site for w in watches])
        sites = [(w.site, _baseline(w), live_window(now.get(w.site))) for w in watches]
        return canary_figure(sites, f"rollout of {version}: {stage}, before and after the deploy")

    if (figure := drawn(f"rollout-{stage}-windows", build)) is None:
        return
    publish_picture(f"rollout-{stage}-windows", figure,
                    f"rollout of {version}, {stage}: per site, predicted-class rates (bar labels: counts) and "
                    "latency in the window before the deploy and the live window after")
