"""Progress of long work (orchestrator.progress): a bar with time left on a terminal, today's lines elsewhere, and
inside a Prefect run one progress artifact kept up to date (read back from a real API, and seen in a real
browser while a pretrain runs)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from agent_helpers import one_site_inventory
from orchestrator import progress as progress_module
from test_serve import prefect_server  # noqa: F401 - a real server: the harness serves no UI
from orchestrator.progress import Progress

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


def _read_all(master: int, wait_s: float = 0.5) -> str:
    """What a pseudo-terminal's other end wrote (it hands the output over in pieces; EIO once it is closed)."""
    out = b""
    while select.select([master], [], [], wait_s)[0]:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return out.decode(errors="replace")


def _on_pty(argv: list[str], timeout: float = 180) -> tuple[int, str, str]:
    """Run ``argv`` with its stderr on a pseudo-terminal (so it is a TTY) and stdout on a pipe."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, cwd=REPO)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    stdout = proc.stdout.read().decode()
    return proc.wait(timeout=30), stdout, out.decode(errors="replace")


def test_on_a_terminal_the_cli_draws_a_bar_with_time_left(elpv_small, tmp_path):
    code, stdout, terminal = _on_pty([sys.executable, "-m", "edgeloop", "train", "--data", str(elpv_small / "generic"),
                                      "--arch", "tiny_cnn", "--epochs", "3", "--batch-size", "16", "--threads", "1",
                                      "--out", str(tmp_path / "model")])
    assert code == 0, terminal[-2000:]
    frames = [f for f in re.split(r"\r\x1b\[K", terminal) if f.strip()]
    bars = [f for f in frames if "training tiny_cnn" in f]
    assert any(re.search(r"\b1/3 epochs, .* left", f) for f in bars), bars  # mid-run: done/total, time left
    assert any(re.search(r"100% 3/3 epochs, .*took \d+:\d\d", f) for f in bars), bars
    assert terminal.rstrip().endswith(bars[-1].rstrip())  # the bar ends the output, on a line of its own
    # the epoch lines still go to stdout, above the bar (the trainers' progress reads them)
    assert "epoch   1/3" in stdout and "epoch   3/3" in stdout and "\r" not in stdout


def test_off_a_terminal_the_cli_prints_todays_lines_and_no_bar(elpv_small, tmp_path):
    done = subprocess.run([sys.executable, "-m", "edgeloop", "train", "--data", str(elpv_small / "generic"), "--arch",
                           "tiny_cnn", "--epochs", "2", "--batch-size", "16", "--threads", "1", "--out",
                           str(tmp_path / "model")], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "epoch   1/2" in done.stdout and "epoch   2/2" in done.stdout
    assert "\r" not in done.stderr + done.stdout and "left" not in done.stderr


def test_the_bar_counts_bytes_rate_and_time_left_on_a_terminal():
    master, slave = os.openpty()
    with os.fdopen(slave, "w", encoding="utf-8") as terminal:
        with Progress(4 << 20, "B", "shipping", stream=terminal) as bar:
            time.sleep(0.15)
            bar.advance(1 << 20, detail="1 of 4 wheels")
            assert re.search(r"1\.0 MiB/4\.0 MiB \(1 of 4 wheels\), [\d.]+ [KM]iB/s, \d+:\d\d left", bar.figures())
    text = _read_all(master)
    assert "shipping" in text and "█" in text and "100% 4.0 MiB/4.0 MiB" in text
    lines: list[str] = []
    with pytest.raises(RuntimeError):  # a failure: the figure stays where it stopped, with no bar off a TTY
        with Progress(10, "samples", "reading", log=lines.append, stream=open(os.devnull, "w")) as off:
            off.advance(3, note="3 read")
            raise RuntimeError("store gone")
    assert off.done == 3 and lines == ["3 read"] and not off.tty


# -- inside a Prefect run



def _run_artifacts(flow_run_id, kind: str = "progress") -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=[kind])))

    return asyncio.run(read())


@pytest.fixture
def counted_updates(monkeypatch) -> list[float]:
    """Every progress update sent to the API (still sent: this only counts them), published without throttle."""
    sent: list[float] = []
    real = progress_module.update_progress_artifact

    def counting(artifact_id, value, description):
        sent.append(value)
        real(artifact_id, value, description)

    monkeypatch.setattr(progress_module, "update_progress_artifact", counting)
    monkeypatch.setattr(progress_module, "PUBLISH_EVERY_S", 0.0)
    return sent


def test_a_pretrain_keeps_one_progress_artifact_up_to_date(prefect_harness, counted_updates, tmp_path, elpv_small):
    from flows.stages import PretrainSettings, pretrain

    state = pretrain(str(one_site_inventory(tmp_path, elpv_small)),
                     PretrainSettings(family="progress", arch="tiny_cnn", epochs=3, batch_size=16), return_state=True)
    assert state.is_completed(), state
    artifacts = _run_artifacts(state.state_details.flow_run_id)
    assert [a.key for a in artifacts] == ["training-progress"]  # one artifact, updated in place
    assert float(artifacts[0].data) == 100.0
    assert "training tiny_cnn" in artifacts[0].description and "3/3 epochs" in artifacts[0].description
    assert any(0 < value < 100 for value in counted_updates), counted_updates  # it moved during the run
    assert counted_updates == sorted(counted_updates) and counted_updates[-1] == 100.0


def test_the_artifact_is_throttled_to_once_a_second(prefect_harness, monkeypatch):
    """Ten thousand steps: the API hears at most one update a second and the end, once (not one per step)."""
    from prefect import flow

    sent: list[float] = []
    monkeypatch.setattr(progress_module, "update_progress_artifact", lambda _id, value, _text: sent.append(value))

    @flow
    def many_steps() -> float:
        began = time.monotonic()
        with Progress(10_000, "steps", "many steps") as bar:
            for _ in range(10_000):
                bar.advance()
        return time.monotonic() - began

    seconds = many_steps()
    assert 1 <= len(sent) <= 1 + seconds and sent[-1] == 100.0, (sent, seconds)


def test_collect_and_retrain_count_samples_read_and_epochs(prefect_harness, counted_updates, tmp_path, elpv_small):
    """A collect reads each new sample from the store: samples read of N, in the collect run's artifact; a retrain
    reads every sample again and fine-tunes the champion: both counted in its run."""
    from flows.stages import CollectSettings, PretrainSettings, RetrainSettings, collect, pretrain, retrain
    from test_cloud_loop import _put_exams, _put_sample

    inventory = one_site_inventory(tmp_path, elpv_small)
    assert pretrain(str(inventory), PretrainSettings(family="progress", arch="tiny_cnn", epochs=1, batch_size=16),
                    return_state=True).is_completed()  # the champion whose classes the collect labels in
    images = sorted((elpv_small / "sites" / "site-1").rglob("*.png"))[:5]
    for image in images:
        _put_sample(tmp_path / "store", "site-1", image.read_bytes())
    _put_exams(tmp_path / "store", "site-1")
    counted_updates.clear()
    state = collect(str(inventory), CollectSettings(family="progress"), return_state=True)
    [artifact] = _run_artifacts(state.state_details.flow_run_id)
    assert artifact.key == "collect-progress" and float(artifact.data) == 100.0
    assert "5/5 samples" in artifact.description, artifact.description
    assert any(0 < value < 100 for value in counted_updates), counted_updates

    # the retrain: its own read of every sample, and the champion's fine-tuning, epoch by epoch
    counted_updates.clear()
    state = retrain(str(inventory), RetrainSettings(family="progress", epochs=2, rollout=False), return_state=True)
    artifacts = {a.key: a for a in _run_artifacts(state.state_details.flow_run_id)}
    assert set(artifacts) == {"read-samples-progress", "training-progress"}, artifacts
    assert "fine-tuning the champion" in artifacts["training-progress"].description
    assert "2/2 epochs" in artifacts["training-progress"].description
    assert "5/5 samples" in artifacts["read-samples-progress"].description
    assert 50.0 in counted_updates  # after the first of two epochs


def _local_sites(tmp_path: Path, count: int) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    inventory = tmp_path / "fleet.yaml"
    sites = ", ".join(f'{{name: site-{i}, root: "{tmp_path / f"site-{i}"}"}}' for i in range(count))
    inventory.write_text(f"""
cloud: {{store_url: "{(tmp_path / 'store').as_uri()}"}}
defaults: {{connection: {{type: local}}, python: {sys.executable}}}
sites: [{sites}]
""")
    return inventory


def test_edgeloop_provision_on_a_terminal_counts_hosts_done(tmp_path):
    code, stdout, terminal = _on_pty([sys.executable, "-m", "edgeloop", "provision", "-i",
                                      str(_local_sites(tmp_path, 3)), "--check", "--concurrency", "1"])
    assert code == 0, stdout + terminal
    bars = [f for f in re.split(r"\r\x1b\[K", terminal) if f.startswith("provisioning")]
    assert any(re.search(r"\b[12]/3 hosts \(0 B shipped\), .* left", f) for f in bars), bars
    assert re.search(r"100% 3/3 hosts \(0 B shipped\), .*took", bars[-1]), bars
    assert "site-2" in stdout and "\r" not in stdout  # the table and recap as before, on stdout


def test_provisioning_counts_the_hosts_done(prefect_harness, tmp_path):
    """Three hosts (local, check mode: nothing changes): the run's artifact counts them done, of 3."""
    from flows.provision import provision_flow

    state = provision_flow(str(_local_sites(tmp_path, 3)), check=True, return_state=True)
    artifacts = {a.key: a for a in _run_artifacts(state.state_details.flow_run_id)}
    assert float(artifacts["provision-progress"].data) == 100.0
    assert "3/3 hosts" in artifacts["provision-progress"].description
    assert "shipped" in artifacts["provision-progress"].description


def test_the_wheelhouse_resolution_reports_its_steps(prefect_harness, counted_updates, tmp_path):
    """pip's download, then each wheel hashed and stored: steps done of N in the resolving run's artifact."""
    from prefect import flow

    from orchestrator.provision.wheelhouse import Platform, Wheelhouse

    info = sys.version_info
    here = Platform(f"{info.major}.{info.minor}", "cp", os.uname().machine, "glibc", "2.17")

    @flow
    def resolve():
        return Wheelhouse(tmp_path / "wheelhouse")._resolve("edge-serve", here, [])  # pip alone: the bootstrap

    state = resolve(return_state=True)
    assert [w.project for w in state.result().wheels] == ["pip"]
    [artifact] = _run_artifacts(state.state_details.flow_run_id)
    assert artifact.key == "wheelhouse-progress" and float(artifact.data) == 100.0
    assert "2/2 steps (1 wheels downloaded)" in artifact.description, artifact.description
    assert 50.0 in counted_updates  # pip's download done, the wheel not yet stored


def test_tune_counts_trials_over_its_rungs(prefect_harness, counted_updates, tmp_path, elpv_small):
    """Two trials of one epoch (one rung): each counted as it ends."""
    from flows.tune import TuneSettings, tune
    from orchestrator.tune import Halving, SearchSpace
    from test_tune import _inventory as tune_inventory

    settings = TuneSettings(data=str(elpv_small / "generic"), family="tuned", trials=2, concurrency=2,
                            space=SearchSpace(arch=["tiny_cnn"], policy=["none"], image_size=[32]),
                            halving=Halving(min_epochs=1, max_epochs=1, eta=2))
    tune(str(tune_inventory(tmp_path)), settings)
    from agent_helpers import _latest_artifact

    artifact = _latest_artifact("tune-progress")
    assert float(artifact.data) == 100.0 and "2/2 trials (rung 1 of 1)" in artifact.description
    assert [round(v) for v in counted_updates if v < 100] == [50], counted_updates


def test_a_pretrain_on_the_trainers_counts_the_epochs_they_stream_back(prefect_harness, counted_updates, sshd_fleet,
                                                                      elpv_small, tmp_path):
    """One DDP job across two real sshd hosts: rank 0's epoch lines, read as they arrive, move the artifact."""
    from agent_helpers import free_port
    from flows.stages import PretrainSettings, pretrain
    from test_trainers import _inventory as trainers_inventory

    inventory = trainers_inventory(sshd_fleet, tmp_path, sshd_fleet.hosts[:2], free_port())
    state = pretrain(str(inventory), PretrainSettings(data=str(elpv_small / "generic"), family="ddp", arch="tiny_cnn",
                                                      epochs=3, batch_size=16), return_state=True)
    assert state.is_completed(), state
    artifacts = {a.key: a for a in _run_artifacts(state.state_details.flow_run_id)}
    progress = artifacts["training-progress"]
    assert float(progress.data) == 100.0 and "3/3 epochs" in progress.description
    assert "on host0, host1" in progress.description
    assert [round(v) for v in counted_updates if v < 100] == [33, 67], counted_updates  # epochs 1, 2 as they came


def test_epoch_lines_streamed_back_from_a_trainer_move_its_progress():
    """What a trainer's ``edgeloop train`` prints, as Fabric hands it over in pieces: each epoch line counts."""
    from orchestrator.trainers import EpochLines

    seen: list[tuple[int, int]] = []
    stream = EpochLines(lambda epoch, epochs, line: seen.append((epoch, epochs)))
    for piece in ["loading\nepoch   1/3  loss 0.7", "1  acc 0.5\nepoch   2/3  loss 0.6\n", "noise epoch 9/9\n",
                  "epoch   3/3  loss 0.5\nbest val_acc 0.75"]:
        stream.write(piece)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    broken = EpochLines(lambda *_: 1 / 0)  # a failing listener never stops the job's output being read
    assert broken.write("epoch 1/2 x\n") == len("epoch 1/2 x\n")


# -- seen in a real browser, mid-run

PRETRAIN_FOREVER = """
import sys
from flows.stages import PretrainSettings, pretrain
pretrain(sys.argv[1], PretrainSettings(family="progress", arch="tiny_cnn", epochs=400, batch_size=16))
"""


def _training_progress(server: str):
    """The newest ``training-progress`` artifact on ``server`` (None before the training began)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["training-progress"])),
                sort=ArtifactSort.CREATED_DESC, limit=1)
        return found[0] if found else None

    return asyncio.run(read())


def test_a_pretrain_shows_its_progress_mid_run_in_the_ui(prefect_server, tmp_path, elpv_small):  # noqa: F811
    """A pretrain of 400 short epochs in a process of its own, reporting to a real server: once its artifact is
    between 1 and 99 %, the artifact's page is screenshot in a real Chromium (test-artifacts/pretrain-progress.png);
    the run is then stopped."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from agent_helpers import screenshot_prefect_page, wait_for

    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    run = subprocess.Popen([sys.executable, "-c", PRETRAIN_FOREVER, str(one_site_inventory(tmp_path, elpv_small))], cwd=REPO,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            def mid_run():
                assert run.poll() is None, run.stdout.read().decode()[-2000:]
                found = _training_progress(prefect_server)
                return found if found and 1 <= float(found.data) <= 99 else None

            artifact = wait_for(mid_run, timeout=90, what="a training-progress artifact between 1 and 99 %",
                                interval=0.5)
            page = screenshot_prefect_page(f"/artifacts/artifact/{artifact.id}", "pretrain-progress.png",
                                           ["training tiny_cnn", "epochs"])
            later = _training_progress(prefect_server)
        assert run.poll() is None, run.stdout.read().decode()[-2000:]  # still training when it was seen
        assert "training tiny_cnn" in page and re.search(r"\d+/400 epochs, .* left", page), page[-1500:]
        assert re.search(r"Progress: ([1-9]|[1-9]\d)%", page), page[-1500:]  # the UI's own reading of it
        assert float(later.data) < 100 and later.id == artifact.id  # one artifact, updated in place
    finally:
        run.kill()
        run.wait(30)


def test_nested_bars_share_the_terminal_line_the_newest_drawing():
    """A wheelhouse resolved while hosts are provisioned: the inner bar draws, then the outer takes the line back."""
    master, slave = os.openpty()
    with os.fdopen(slave, "w", encoding="utf-8") as terminal:
        with Progress(2, "hosts", "provisioning", stream=terminal) as hosts:
            with Progress(3, "steps", "wheelhouse", stream=terminal) as steps:
                hosts.advance(note=None)  # covered: not drawn while the wheelhouse's bar is on the line
                steps.advance(note=None)
            time.sleep(progress_module.DRAW_EVERY_S)
            hosts.advance()
    frames = [f for f in re.split(r"\r\x1b\[K", _read_all(master)) if f.strip()]
    names = [f.split()[0] for f in frames]
    assert names[:3] == ["provisioning", "wheelhouse", "wheelhouse"] and set(names[3:]) == {"provisioning"}, frames
    assert re.search(r"100% 3/3 steps.*\n$", frames[2]) and re.search(r"100% 2/2 hosts.*\n$", frames[-1]), frames


def test_a_provisioned_host_counts_the_bytes_it_ships(prefect_harness, tmp_path):
    """A host that lacks the project's wheel: its provision task's upload artifact counts the bytes as they go."""
    from flows.provision import provision_flow
    from orchestrator.sshfleet import stop_agents

    try:
        state = provision_flow(str(_local_sites(tmp_path / "roots", 1)), return_state=True)
    finally:
        stop_agents(tmp_path / "roots")
    artifacts = {a.key: a for a in _run_artifacts(state.state_details.flow_run_id)}
    upload = artifacts["upload-progress"]
    assert float(upload.data) == 100.0 and "site-0: shipping 1 wheel(s)" in upload.description
    size = re.search(r"([\d.]+ [KM]iB)/\1", upload.description)
    assert size, upload.description  # all of the wheel's bytes, counted
    assert re.search(r"1/1 hosts \([\d.]+ [KM]iB shipped\)", artifacts["provision-progress"].description)
