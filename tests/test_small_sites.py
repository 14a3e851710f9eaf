"""Small sites never crash: with 5 or 10 labelled images (under 10 in the train split) no member is trained, the
status says why, and what serves keeps serving (the base as-is when nothing served); an empty split is handled
when one runs. A thin *gate* never blocks the learning (tests/test_shadow.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from agent_helpers import AgentProcess, deploy_base, wait_for, write_config

from edge_agent.activation import active_version
from edge_agent.config import load_config
from edge_agent.finetune import run_finetune
from edge_agent.layout import AgentPaths
from edge_agent.sitedata import MIN_TRAIN_IMAGES, SplitOf, labelled_files


def labelled_site(root: Path, pool: Path, count: int, tiny_base_model: Path) -> AgentPaths:
    """An agent root with the base deployed and the first ``count`` images of ``pool`` labelled."""
    paths = AgentPaths(root)
    paths.ensure()
    deploy_base(root, tiny_base_model, "v1")
    for file in sorted(pool.glob("*/*.png"))[:count]:
        (paths.labelled / file.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, paths.labelled / file.parent.name / file.name)
    return paths


@pytest.mark.parametrize("count", [5, 10])
def test_a_small_site_does_not_fine_tune_and_says_why(tmp_path, elpv_small, tiny_base_model, count):
    config_file = write_config(tmp_path / "agent", "file:///unused")
    config = load_config(config_file)
    paths = labelled_site(tmp_path / "agent", elpv_small / "sites" / "site-1", count, tiny_base_model)
    first = run_finetune(config, paths, "r1", "new base model v1", lambda: False)
    assert first["members"] == [] and "too few labelled images to fine-tune" in first["skipped"]
    assert f"train {first['counts']['train']}" in first["decision"] and sum(first["counts"].values()) == count
    assert first["counts"]["train"] < MIN_TRAIN_IMAGES
    assert first["activated"] and active_version(paths) == "base-v1"  # nothing served: the base as-is serves
    again = run_finetune(config, paths, "r2", "5 new labelled images", lambda: False)
    assert not again["activated"] and "what serves stays" in again["decision"] and active_version(paths) == "base-v1"


def test_the_daemon_status_says_why_a_small_site_does_not_fine_tune(tmp_path, elpv_small, tiny_base_model):
    config = write_config(tmp_path / "agent", f"file://{tmp_path / 'store'}")
    labelled_site(tmp_path / "agent", elpv_small / "sites" / "site-1", 10, tiny_base_model)
    agent = AgentProcess(config)
    try:
        status = wait_for(lambda: (s := agent.status()) and s.get("last_run") and s, 120, "a run", agent)
        assert "too few labelled images to fine-tune" in status["finetune_blocked"]
        assert status["last_run"]["skipped"] == status["finetune_blocked"] and status["finetune_failures"] == 0
        assert status["state"] == "serving" and status["active_version"] == "base-v1"
        assert agent.terminate() == 0
    finally:
        agent.close()


def test_a_fine_tune_with_empty_val_and_test_splits_completes(tmp_path, elpv_small, tiny_base_model):
    """Labelled images chosen so that val and test are empty: the fine-tune runs, reports no test figures."""
    config = load_config(write_config(tmp_path / "agent", "file:///unused"))  # min_gate_images 1
    pool = AgentPaths(tmp_path / "pool")
    pool.ensure()
    for file in sorted((elpv_small / "sites" / "site-1").glob("*/*.png")):
        (pool.labelled / file.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, pool.labelled / file.parent.name / file.name)
    split_of = SplitOf(pool)
    by_split = {s: [(c, f) for c, f in labelled_files(pool) if split_of(f) == s] for s in ("train", "gate")}
    chosen = by_split["train"][:MIN_TRAIN_IMAGES + 1] + by_split["gate"][:2]
    paths = labelled_site(tmp_path / "agent", tmp_path / "none", 0, tiny_base_model)
    for class_name, file in chosen:
        (paths.labelled / class_name).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, paths.labelled / class_name / file.name)
    report = run_finetune(config, paths, "r1", "test", lambda: False)
    assert report["counts"]["test"] == 0 and report["counts"]["gate"] >= 1
    assert report["counts"]["val"] == report["counts"]["train"]  # an empty val split borrows train
    assert len(report["members"]) == 3 and report["gain_over_base"]["test"] is None
    assert report["serving"] in ("base", "new") and active_version(paths) == report["serving_version"]
    json.dumps(report)  # the report is plain JSON
