"""Pictures in the Prefect UI (orchestrator.pictures): the learning curve of a real training carries its curves
and the epoch it kept; tuning and canary pictures draw what they were given; inside a flow a picture is a
markdown artifact holding a decodable 800x400 PNG, outside one nothing is written; and a real Chromium on a
real Prefect server's UI renders a pretrain run's learning curve as an image
(test-artifacts/pretrain-learning-curve.png)."""

from __future__ import annotations

import base64
import io
import re
import time

import pytest
from matplotlib.colors import to_hex

from agent_helpers import _latest_artifact, one_site_inventory
from test_run_graphs import on_server  # noqa: F401 - this process's flows report to a real server
from test_serve import prefect_server  # noqa: F401 - a real server: the harness serves no UI

from orchestrator.pictures import (
    CHOSEN,
    EpochLog,
    canary_figure,
    chosen_epoch,
    learning_curve_figure,
    png_bytes,
    publish_learning_curve,
    publish_picture,
    tune_figure,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def trained(elpv_small, tmp_path_factory) -> tuple[dict, EpochLog]:
    """A real 3-epoch tiny_cnn training: its metrics.json as written, and the history its on_epoch saw."""
    from edge_agent.train import TrainConfig
    from orchestrator.training import train_on_dataset

    seen = EpochLog()
    metrics = train_on_dataset(elpv_small / "generic", "tiny_cnn", tmp_path_factory.mktemp("curve"),
                               TrainConfig(epochs=3, batch_size=16, threads=1), on_epoch=seen)
    return metrics, seen


def _line(figure, gid: str):
    lines = [line for ax in figure.axes for line in ax.get_lines() if line.get_gid() == gid]
    assert lines, f"no line {gid!r} in the figure"
    return lines


def _png(markdown: str) -> bytes:
    found = re.search(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert found, markdown[:200]
    return base64.b64decode(found.group(1), validate=True)


def _size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image.load()  # a truncated or corrupt PNG fails here
        return image.size


def test_the_learning_curve_of_a_real_training_has_its_curves_and_the_kept_epoch(trained):
    metrics, seen = trained
    history, best = metrics["history"], metrics["best_epoch"]
    assert len(history) == 3
    # the history an on_epoch callback saw names the same kept epoch as the training itself
    assert seen.metrics() == {"history": history, "best_epoch": best}
    figure = learning_curve_figure(history, best, "pretrain tiny_cnn")
    (train_loss,), (val_acc,) = _line(figure, "train_loss"), _line(figure, "val_acc")
    assert list(train_loss.get_xdata()) == [1, 2, 3]
    assert list(train_loss.get_ydata()) == [h["train_loss"] for h in history]
    assert list(val_acc.get_ydata()) == [h["val_acc"] for h in history]
    marks = _line(figure, "chosen_epoch")
    assert len(marks) == 2 and all(list(m.get_xdata()) == [best, best] for m in marks)  # on both panels
    (star,) = _line(figure, "chosen_val_acc")
    assert list(star.get_xdata()) == [best] and list(star.get_ydata()) == [metrics["val_acc"]]
    assert to_hex(star.get_color()) == CHOSEN
    assert f"epoch {best}" in star.get_label()
    assert _size(png_bytes(figure)) == (800, 400)


def test_the_kept_epoch_follows_the_training_rule():
    rows = [{"epoch": e, "train_loss": 1.0, "train_acc": t, "val_loss": 1.0, "val_acc": v, "seconds": 1, "lr": 1e-3}
            for e, t, v in [(1, 0.5, 0.6), (2, 0.6, 0.8), (3, 0.7, 0.8), (4, 0.9, 0.7)]]
    assert chosen_epoch(rows) == 2  # the first of the best val accuracy
    assert chosen_epoch(rows, keep="last") == 4
    no_val = [{**r, "val_acc": float("nan")} for r in rows]
    assert chosen_epoch(no_val) == 4  # no val split: train accuracy decides
    assert chosen_epoch([]) is None
    with pytest.raises(ValueError, match="no epochs"):
        learning_curve_figure([], None, "empty")


def test_the_tune_picture_draws_each_trial_across_the_rungs_and_the_winner_red():
    from orchestrator.tune import Trial, TrialResult

    trials = [Trial(n, {"lr": 1e-3}) for n in range(3)]
    results = [TrialResult(trials[0], 0, 1, 0.6, 0.5, 1.0, "a"), TrialResult(trials[1], 0, 1, 0.7, 0.6, 1.0, "b"),
               TrialResult(trials[2], 0, 1, float("nan"), float("nan"), 0.0, "", "killed: out of memory"),
               TrialResult(trials[1], 1, 2, 0.8, 0.7, 2.0, "c")]
    figure = tune_figure(results, results[3], "search")
    (winner,) = _line(figure, "trial-1")
    assert list(winner.get_xdata()) == [1, 2] and list(winner.get_ydata()) == [0.7, 0.8]
    assert to_hex(winner.get_color()) == CHOSEN and "best" in winner.get_label()
    (loser,) = _line(figure, "trial-0")
    assert to_hex(loser.get_color()) != CHOSEN
    (failed,) = _line(figure, "trial-2-failed")
    assert list(failed.get_ydata()) == [0]


def test_the_canary_picture_shows_rates_with_counts_and_latency_before_and_after():
    before = {"predictions": 40, "class_counts": {"defective": 4, "functional": 36},
              "class_rates": {"defective": 0.1, "functional": 0.9}, "latency_p50_ms": 4.0, "latency_p95_ms": 6.0}
    after = {"predictions": 50, "class_counts": {"defective": 50, "functional": 0},
             "class_rates": {"defective": 1.0, "functional": 0.0}, "latency_p50_ms": 5.0, "latency_p95_ms": 9.5}
    figure = canary_figure([("site-a", before, after), ("site-b", None, None)], "rollout")
    rates, latency, empty, _ = figure.axes

    def bars(ax, gid):
        return [p.get_height() for p in ax.patches if p.get_gid() == gid], [t.get_text() for t in ax.texts]

    heights, _ = bars(rates, "rates-before")
    assert heights == [0.1, 0.9]  # classes in order: defective, functional
    heights, labels = bars(rates, "rates-after")
    assert heights == [1.0, 0.0] and ["4", "36", "50", "0"] == labels  # the counts behind the rates
    assert "before (n=40)" in [t.get_text() for t in rates.get_legend().get_texts()]
    heights, labels = bars(latency, "latency-after")
    assert heights == [5.0, 9.5] and "9.5" in labels
    assert "no predictions" in " ".join(t.get_text() for t in empty.texts)  # a site without windows says so


def test_a_picture_is_published_in_a_flow_and_nothing_outside_one(prefect_harness, trained):
    from prefect import flow, task

    metrics, _ = trained
    figure = learning_curve_figure(metrics["history"], metrics["best_epoch"], "outside")
    assert publish_picture("outside-any-run", figure, "never published") is None
    with pytest.raises(IndexError):
        _latest_artifact("outside-any-run")

    @task
    def in_a_task() -> str | None:
        return publish_learning_curve("Picture_Test curve", metrics, "in a task")  # the key is made a valid one

    @flow(name="pictures-test")
    def publishing() -> tuple:
        broken = publish_learning_curve("picture-broken", {"history": [{"epoch": 1}], "best_epoch": 1}, "broken")
        return in_a_task(), broken

    published, broken = publishing()
    assert broken is None  # a history that cannot be drawn is logged, and the run goes on
    artifact = _latest_artifact("picture-test-curve")
    assert str(artifact.id) == published and artifact.type == "markdown"
    assert "dotted line marks the epoch kept" in artifact.description
    png = _png(artifact.data)
    assert _size(png) == (800, 400) and 5_000 < len(png) < 150_000  # small: it lives in Prefect's database
    with pytest.raises(IndexError):
        _latest_artifact("picture-broken")


def test_the_ui_renders_a_pretrain_runs_learning_curve_as_an_image(on_server, tmp_path, elpv_small):  # noqa: F811
    from selenium.webdriver.common.by import By

    from flows.stages import PretrainSettings, pretrain
    from test_labelling import ARTIFACTS, _browser

    inventory = one_site_inventory(tmp_path, elpv_small)
    state = pretrain(str(inventory), PretrainSettings(family="pictures", arch="tiny_cnn", epochs=3, batch_size=16),
                     return_state=True)
    assert state.is_completed(), state
    artifact = _latest_artifact("pretrain-learning-curve")
    assert artifact.flow_run_id == state.state_details.flow_run_id  # this run's picture, not another's
    assert _size(_png(artifact.data)) == (800, 400)

    ui = on_server.removesuffix("/api")
    browser = _browser()
    try:
        browser.set_window_size(1400, 900)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for version, shot in (("", "pretrain-learning-curve.png"), ("/v2", "pretrain-learning-curve-ui-v2.png")):
            browser.get(f"{ui}{version}/artifacts/artifact/{artifact.id}")  # the UI, and the one it offers next
            deadline = time.monotonic() + 90
            while True:  # a single-page app: wait for the markdown to render its image
                widths = [browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
                          for img in browser.find_elements(By.CSS_SELECTOR, "img[src^='data:image/png;base64,']")]
                if any(widths):
                    break
                assert time.monotonic() < deadline, browser.find_element(By.TAG_NAME, "body").text[-2000:]
                time.sleep(1)
            assert max(widths) == 800  # the PNG itself, decoded by the browser (the sanitizer kept the data URI)
            assert "pretrain-learning-curve" in browser.find_element(By.TAG_NAME, "body").text
            time.sleep(1)
            browser.save_screenshot(str(ARTIFACTS / shot))
    finally:
        browser.quit()

    from flows.stages import RetrainSettings, retrain

    state = retrain(str(inventory), RetrainSettings(family="pictures", epochs=2, rollout=False), return_state=True)
    assert state.is_completed(), state
    curve = _latest_artifact("retrain-learning-curve")
    assert curve.flow_run_id == state.state_details.flow_run_id and _size(_png(curve.data)) == (800, 400)
    assert "retrain " in curve.description and "epoch kept" in curve.description


def _served(model: str, defective: int, total: int = 20) -> dict:
    """A heartbeat whose window is the agent's own (:class:`LiveWindow` fed real predictions)."""
    import numpy as np

    from edge_agent.serving import Prediction
    from edge_agent.window import LiveWindow

    window = LiveWindow()
    for i in range(total):
        p = np.array([0.1, 0.9]) if i < defective else np.array([0.8, 0.2])
        window.record(Prediction("defective" if i < defective else "functional", {}, p, np.stack([p, p]), model), 2.0)
    return {"site": "site-a", "time": time.time(), "active_version": model, "window": window.summary()}


def test_a_rollout_stage_publishes_its_canary_windows_and_a_broken_baseline_fails_nothing(prefect_harness, tmp_path):
    import json

    from prefect import flow

    from edge_agent.store import Store
    from orchestrator.health import FleetStatus
    from orchestrator.pictures import publish_canaries
    from orchestrator.rollout import Watch

    (tmp_path / "status").mkdir()
    (tmp_path / "status" / "site-a.json").write_text(json.dumps(_served("e2", 20)))  # after: all defective
    reader = FleetStatus(Store(tmp_path.as_uri()))
    watch = Watch("site-a", time.time() - 5, before=_served("e1", 6))

    @flow(name="pictures-canary")
    def publishing(watches: list, stage: str) -> None:
        publish_canaries(stage, watches, reader, "v2")

    publishing([watch], "canary")
    artifact = _latest_artifact("rollout-canary-windows")
    assert _size(_png(artifact.data)) == (800, 400) and "rollout of v2, canary" in artifact.description
    broken = Watch("site-a", time.time(), before={"active_version": "e1", "window": "not a window"})
    state = publishing([broken], "wave-1", return_state=True)  # logged, not raised: the verdict is what matters
    assert state.is_completed()
    try:  # other tests in this process may have published under the key: none of them is this run's
        newest = _latest_artifact("rollout-wave-1-windows").flow_run_id
    except IndexError:
        newest = None
    assert newest != state.state_details.flow_run_id


def test_a_tune_run_publishes_its_trials_and_the_winners_learning_curve(prefect_harness, elpv_small, tmp_path):
    from test_tune import _inventory, _settings

    from flows.tune import tune

    settings = _settings(elpv_small / "generic").model_copy(update={"trials": 2})
    result = tune(str(_inventory(tmp_path)), settings)
    trials = _latest_artifact("tune-trials-picture")
    assert _size(_png(trials.data)) == (800, 400)
    assert f"winner (trial {result['best_trial']['trial']})" in trials.description
    curve = _latest_artifact("tune-learning-curve")
    assert curve.flow_run_id == trials.flow_run_id and _size(_png(curve.data)) == (800, 400)
    assert f"{result['best_trial']['epochs']} epochs" in curve.description
