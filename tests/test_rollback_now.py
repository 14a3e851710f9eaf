"""Rollback acts on what serves now (issue 25, item 4): V1 -> V2 -> rollback V1 -> rollback V2 on a real agent
root, through the host worker. Rolling back V1 keeps V2's fine-tune serving (only the fence is added); rolling
back V2 then restores the newest ensemble built on neither, never the one built on the fenced V1."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
from agent_helpers import serving_site, write_config

from edge_agent.activation import Fenced, activate
from orchestrator.inventory import load_inventory
from orchestrator.provision import hostworker
from orchestrator.rollout import rollback_site

V1, V2 = "20261201T000000-aaaaaaa1", "20261202T000000-aaaaaaa2"


def _deploy(paths, version: str, finetune: str, bases: list[str]) -> None:
    """What a deploy of ``version`` and the site's fine-tune on it leave: the record of what served before,
    the base, ``base-<version>`` served as it came, then the fine-tune (its report names its bases) active."""
    done = hostworker.handle(json.dumps({"op": "deploy_record", "root": str(paths.root), "version": version}))
    assert done.get("changed") is True, done
    (paths.base_models / version).mkdir(parents=True)
    (paths.base_models / version / "model.pt").write_bytes(b"weights")
    for name, report in ((f"base-{version}", {"bases": [version]}), (finetune, {"bases": bases})):
        shutil.copytree(paths.ensembles / "v0", paths.ensembles / name)
        (paths.ensembles / name / "report.json").write_text(json.dumps(report))
        activate(paths, name, bases=report["bases"])


@pytest.fixture
def site(tmp_path):
    """One local site whose agent root served ``v0`` (built on an older base), then got V1 and V2."""
    inventory_file = tmp_path / "inv.yaml"
    inventory_file.write_text(f"""
cloud: {{store_url: "file://{tmp_path}/store", registry: "{tmp_path / 'registry'}"}}
defaults: {{connection: {{type: local}}, python: {sys.executable}}}
sites: [{{name: s1, root: "{tmp_path / 's1'}"}}]
""")
    paths = serving_site(tmp_path / "s1", 32)  # a real two-member ensemble, "v1": renamed v0 (not a version)
    os.rename(paths.ensembles / "v1", paths.ensembles / "v0")
    (paths.ensembles / "v0" / "report.json").write_text(json.dumps({"bases": ["20261101T000000-aaaaaaa0"]}))
    os.unlink(paths.active_link)
    activate(paths, "v0")
    shutil.copy(write_config(tmp_path / "s1", "file:///nowhere", site="s1"), paths.config_file)
    _deploy(paths, V1, "ft-on-v1", [V1])
    _deploy(paths, V2, "ft-on-v2", [V2])
    return load_inventory(inventory_file), paths


def _serving(paths) -> str:
    return os.path.basename(os.readlink(paths.active_link))


def test_v1_then_v2_then_rollback_v1_then_rollback_v2(site):
    inventory, paths = site
    assert _serving(paths) == "ft-on-v2"

    done = rollback_site(inventory, "s1", V1)  # what serves owes V1 nothing: it stays, V1 is fenced
    assert done == {"changed": ["fence", "base"], "version": V1, "serving": "ft-on-v2"}
    assert _serving(paths) == "ft-on-v2" and json.loads(paths.fence_file.read_text())["versions"] == [V1]
    assert not (paths.base_models / V1).exists() and (paths.base_models / V2).is_dir()
    with pytest.raises(Fenced):  # a fine-tune on V1 never activates again
        activate(paths, "ft-on-v1", bases=[V1])

    # V2's record says ft-on-v1 served before it: built on the fenced V1, so the newest ensemble built on
    # neither (what served before V1) is restored; a dry run says so and changes nothing
    assert rollback_site(inventory, "s1", V2, dry_run=True)["would_restore"] == "v0"
    assert _serving(paths) == "ft-on-v2"
    done = rollback_site(inventory, "s1", V2)
    assert done == {"changed": ["fence", "active", "base"], "version": V2, "serving": "v0"}
    assert _serving(paths) == "v0" and json.loads(paths.fence_file.read_text())["versions"] == [V1, V2]
    assert rollback_site(inventory, "s1", V2)["changed"] == [] and _serving(paths) == "v0"


def test_with_no_clean_ensemble_to_restore_the_rollback_refuses_and_changes_nothing(site):
    """Without V1's record nothing known to have served is free of V1 and V2: refused, naming why and what
    serves; never the ensemble built on the fenced V1, never nothing."""
    inventory, paths = site
    rollback_site(inventory, "s1", V1)
    (paths.deploy_records / f"{V1}.json").unlink()
    with pytest.raises(Exception, match=rf"cannot restore ft-on-v1: it was built on fenced {V1}.*nothing changed; "
                                        "serving ft-on-v2$"):
        rollback_site(inventory, "s1", V2)
    assert _serving(paths) == "ft-on-v2" and (paths.base_models / V2).is_dir()
    assert json.loads(paths.fence_file.read_text())["versions"] == [V1]


def test_a_serving_ensemble_built_on_both_is_replaced(site):
    """A fine-tune with members on V1 and V2 serves: rolling back V1 replaces it with what served before V1
    (candidates are only ensembles a deploy record saw serving: a kept challenger never served)."""
    inventory, paths = site
    shutil.copytree(paths.ensembles / "v0", paths.ensembles / "ft-on-both")
    (paths.ensembles / "ft-on-both" / "report.json").write_text(json.dumps({"bases": [V1, V2]}))
    activate(paths, "ft-on-both")
    done = rollback_site(inventory, "s1", V1)
    assert done["changed"] == ["fence", "active", "base"] and _serving(paths) == "v0"
