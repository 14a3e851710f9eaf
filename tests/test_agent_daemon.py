"""The daemon as a real subprocess: starts, heartbeats, idles without a model, stops on SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from agent_helpers import REPO, AgentProcess, agent_env, wait_for, write_config


def test_daemon_idles_heartbeats_and_stops_on_sigterm(tmp_path):
    config = write_config(tmp_path / "agent", f"file://{tmp_path / 'store'}")
    agent = AgentProcess(config)
    try:
        first = wait_for(agent.status, 30, "first status.json", agent)
        assert first["site"] == "site-1" and first["pid"] == agent.proc.pid
        assert first["state"] == "no-model"
        later = wait_for(lambda: (s := agent.status()) and s["time"] > first["time"] + 0.4 and s, 10,
                         "a later heartbeat", agent)
        assert later["time"] > first["time"]
        for folder in ("data/inbox", "data/labelled", "models/base", "outbox", "runs"):
            assert (agent.root / folder).is_dir(), folder
        store_status = json.loads((tmp_path / "store" / "status" / "site-1.json").read_text())
        assert store_status["site"] == "site-1"
        started = time.monotonic()
        assert agent.terminate() == 0
        assert time.monotonic() - started < 5
        assert agent.status()["state"] == "stopped"
        assert not (agent.root / "agent.pid").exists()
    finally:
        agent.close()


def test_status_command_prints_state(tmp_path):
    config = write_config(tmp_path / "agent", f"file://{tmp_path / 'store'}")
    out = subprocess.run([sys.executable, "-m", "edge_agent", "status", "--config", str(config)], cwd=REPO,
                         env=agent_env(), capture_output=True, text=True, check=True)
    payload = json.loads(out.stdout)
    assert payload["state"]["pending_finetune"] is None


def test_bad_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "agent.yaml"
    bad.write_text("site: x\nroot: /tmp/x\nstore_url: file:///tmp/s\nnot_a_field: 1\n")
    out = subprocess.run([sys.executable, "-m", "edge_agent", "run", "--config", str(bad)], cwd=REPO,
                         env=agent_env(), capture_output=True, text=True)
    assert out.returncode != 0 and "not_a_field" in out.stderr


def test_labelled_images_wait_for_a_model_and_go_up_only_when_informative(tmp_path, elpv_small):
    """Item 9 of the learning issue: with no model serving, labelled images are counted (they trigger the
    fine-tune) but none is queued for upload; once an ensemble serves, each is judged like any sample: with
    no random share and thresholds nothing reaches, only the ones the model gets wrong go up."""
    from agent_helpers import copy_labelled, serving_site

    from edge_agent.config import load_config
    from edge_agent.daemon import Agent

    root = tmp_path / "agent"
    config_file = write_config(root, (tmp_path / "store").as_uri(),
                               thresholds={"uncertainty": 1.0, "disagreement": 1.0, "min_new_labelled": 1000})
    labelled = copy_labelled(elpv_small / "sites" / "site-1", root)
    agent = Agent(load_config(config_file), config_file)
    agent.scan_triggers()
    agent.judge_labelled()
    assert len(agent.state.labelled_seen) == labelled and agent.state.new_labelled == labelled
    assert len(agent.state.labelled_unjudged) == labelled and agent.outbox.items() == []

    serving_site(root, 32)
    agent.judge_labelled()
    queued = [item.read_sidecar() for item in agent.outbox.items()]
    assert agent.state.labelled_unjudged == [] and 0 < len(queued) < labelled
    assert all(s["reasons"] == ["operator_label", "mistaken"] and s["model_version"] == "v1"
               and max(s["probabilities"], key=s["probabilities"].get) != s["operator_label"] for s in queued)
    agent.scan_triggers()
    agent.judge_labelled()
    assert len(agent.outbox.items()) == len(queued)  # judged once, not again on the next tick
