"""The cloud's side of the loop: registry, sample checks, retraining set, gate, deploy to a local site."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edge_agent.datasets import exam_share_of, open_dataset
from edge_agent.fileio import file_sha256
from edge_agent.layout import AgentPaths
from edge_agent.store import Store
from edge_agent.train import TrainConfig
from orchestrator.demo import ReferenceLabels
from orchestrator.deploy import deploy_model
from orchestrator.health import read_fleet_status
from orchestrator.inventory import load_inventory
from orchestrator.registry import ModelRegistry, RegistryError
from orchestrator.retrain import gate, retrain_from_samples, train_version
from orchestrator.samples import CLOUD_EXAM_SHARE, collect_samples

FAST = TrainConfig(epochs=1, batch_size=16, threads=1)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, elpv_small):
    registry = ModelRegistry(tmp_path_factory.mktemp("registry"))
    first = train_version(registry, "elpv", elpv_small / "generic", "tiny_cnn", FAST, note="pretrained")
    registry.promote(first.version)
    return registry


def _put_sample(store: Path, under: str, image: bytes, **sidecar) -> str:
    sha = hashlib.sha256(image).hexdigest()
    folder = store / "samples" / under
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{sha}.png").write_bytes(image)
    (folder / f"{sha}.json").write_text(json.dumps({"site": under, "time": 1.0, "reasons": ["uncertain"], **sidecar}))
    return sha


def _put_exams(store: Path, *sites: str) -> None:
    """Empty exam lists: the sites published theirs (the exam rule fails closed without one)."""
    (store / "exams").mkdir(parents=True, exist_ok=True)
    for site in sites:
        (store / "exams" / f"{site}.json").write_text(json.dumps({"site": site, "sha256": [], "phash": []}))


def test_registry_records_artifacts_lineage_and_stages(registry, elpv_small):
    champion = registry.champion("elpv")
    assert champion.stage == "champion" and champion.dataset_id == open_dataset(elpv_small / "generic").id
    assert set(champion.artifacts) == {"checkpoint", "onnx"} and champion.metrics["val_acc"] >= 0
    child = train_version(registry, "elpv", elpv_small / "sites/site-1", "tiny_cnn", FAST, parent=champion)
    assert [v.version for v in registry.lineage(child.version)] == [child.version, champion.version]
    assert child.stage == "candidate" and child.hyperparameters["epochs"] == 1
    registry.promote(child.version)
    assert registry.get(champion.version).stage == "archived" and registry.champion("elpv").version == child.version
    registry.promote(champion.version)  # back, for the other tests
    assert registry.get(child.version).stage == "archived"


def _checkpoint(tmp_path: Path, n: int) -> Path:
    path = tmp_path / f"model-{n}.pt"
    path.write_bytes(b"weights %d" % n)
    return path


@pytest.mark.parametrize("crash_at", ["pointer", "archive", "record"])
def test_a_crash_mid_promote_leaves_a_champion(tmp_path, monkeypatch, crash_at):
    """Promotion cut at each of its writes: the family has the old champion or the new one, never none,
    and exactly one version reads as champion."""
    import orchestrator.registry as registry_module

    registry = ModelRegistry(tmp_path / "registry")
    old, new = (registry.register("f", _checkpoint(tmp_path, n), arch="tiny_cnn", dataset_id=None,
                                  hyperparameters={}, metrics={}) for n in (1, 2))
    registry.promote(old.version)
    writes = []
    real_write = registry_module.write_bytes_atomic

    def crashing_write(path, data):
        writes.append(path)
        if len(writes) == {"pointer": 1, "archive": 2, "record": 3}[crash_at]:
            raise OSError("power cut")
        real_write(path, data)

    monkeypatch.setattr(registry_module, "write_bytes_atomic", crashing_write)
    with pytest.raises(OSError, match="power cut"):
        registry.promote(new.version)
    monkeypatch.undo()
    expected = old.version if crash_at == "pointer" else new.version
    assert registry.champion("f").version == expected
    assert [v.version for v in registry.versions("f") if v.stage == "champion"] == [expected]
    registry.promote(new.version)  # a retry completes it
    assert registry.get(old.version).stage == "archived" and registry.get(new.version).stage == "champion"


def test_concurrent_promotions_take_turns(tmp_path):
    """Two processes promoting different versions 30 times each: one champion at every step and at the end."""
    import subprocess
    import sys

    registry = ModelRegistry(tmp_path / "registry")
    versions = [registry.register("f", _checkpoint(tmp_path, n), arch="tiny_cnn", dataset_id=None,
                                  hyperparameters={}, metrics={}).version for n in (1, 2)]
    script = ("import sys; from orchestrator.registry import ModelRegistry\n"
              "r = ModelRegistry(sys.argv[1])\n"
              "for _ in range(30):\n"
              "    r.promote(sys.argv[2]); assert r.champion('f') is not None\n")
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(registry.root), v], cwd=root) for v in versions]
    assert [p.wait(60) for p in procs] == [0, 0]
    champions = [v.version for v in registry.versions("f") if v.stage == "champion"]
    assert len(champions) == 1 and champions[0] == registry.champion("f").version


def test_registry_refuses_a_corrupted_artifact(registry, tmp_path):
    version = registry.champion("elpv")
    path = registry.artifact(version.version, "onnx")
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-10])
        with pytest.raises(RegistryError, match="does not match its sha256"):
            registry.artifact(version.version, "onnx")
    finally:
        path.write_bytes(original)
    with pytest.raises(RegistryError, match="no model version"):
        registry.get("nope")


def test_samples_are_checked_before_use(tmp_path, elpv_small):
    store = tmp_path / "store"
    images = sorted((elpv_small / "sites/site-1").rglob("*.png"))
    good = _put_sample(store, "site-1", images[0].read_bytes())
    _put_sample(store, "site-1", images[1].read_bytes(), site="site-2")       # claims another site
    _put_sample(store, "site-1", b"\x89PNG\r\n\x1a\n truncated")            # not an image
    renamed = store / "samples/site-1" / ("0" * 64 + ".png")                   # bytes do not match the name
    renamed.write_bytes(images[2].read_bytes())
    (renamed.with_suffix(".json")).write_text(json.dumps({"site": "site-1", "time": 1, "reasons": []}))
    (store / "samples/site-1" / ("1" * 64 + ".png")).write_bytes(images[3].read_bytes())  # no sidecar yet: skipped
    _put_exams(store, "site-1")
    collection = collect_samples(Store(f"file://{store}"))
    assert [s.sha256 for s in collection.accepted] == [good]
    reasons = " | ".join(r["reason"] for r in collection.rejected)
    assert "names site 'site-2'" in reasons and "truncated" in reasons and "do not match" in reasons


def test_retrain_adds_labelled_samples_and_the_gate_decides(registry, tmp_path, elpv_small):
    store = tmp_path / "store"
    site = open_dataset(elpv_small / "sites/site-1")
    for record in site.files("test"):
        _put_sample(store, "site-1", (site.root / record["file"]).read_bytes())
    _put_sample(store, "site-1", (site.root / site.files("train")[0]["file"]).read_bytes(),
                operator_label="defective")
    unknown = min((elpv_small / "sites/site-2").rglob("*.png"))
    _put_sample(store, "site-2", unknown.read_bytes())  # nobody knows its label yet
    _put_exams(store, "site-1", "site-2")
    collection = collect_samples(Store(f"file://{store}"))
    assert ReferenceLabels([site])(collection.accepted[0]) is not None
    champion = registry.champion("elpv")
    candidate, summary = retrain_from_samples(registry, "elpv", elpv_small / "generic", collection,
                                              tmp_path / "retrain", FAST, labellers=[ReferenceLabels([site])])
    assert summary["samples_accepted"] == len(site.files("test")) + 2 and summary["samples_unlabelled"] == 1
    retrain_set, generic = open_dataset(tmp_path / "retrain"), open_dataset(elpv_small / "generic")
    pool = {r["sha256"] for r in generic.records}
    added = {split: [r["sha256"] for r in retrain_set.files(split) if r["sha256"] not in pool]
             for split in ("train", "gate")}
    assert len(added["train"]) + len(added["gate"]) == len(site.files("test")) + 1
    assert all(exam_share_of(sha, CLOUD_EXAM_SHARE) for sha in added["gate"])  # the exam grows, by content hash
    assert not any(exam_share_of(sha, CLOUD_EXAM_SHARE) for sha in added["train"])
    assert retrain_set.files("val") == generic.files("val")  # what chooses epochs is the pool's, unchanged
    assert {r["sha256"] for r in generic.files("gate")} <= {r["sha256"] for r in retrain_set.files("gate")}
    assert candidate.parent == champion.version
    decision = gate(registry, candidate, champion, tmp_path / "retrain")
    assert decision.promoted == (registry.champion("elpv").version == candidate.version)
    assert decision.n == len(retrain_set.load_split("gate")) and f"n = {decision.n}" in decision.reason
    assert decision.alpha == 0.1 and decision.p_value is not None  # the one paired gate's evidence
    assert 0 <= decision.candidate_test_acc <= 1 and 0 <= decision.champion_test_acc <= 1
    registry.promote(champion.version)


def _provisioned(root: Path) -> None:
    """What provisioning leaves that a deploy checks for: the agent's config."""
    AgentPaths(root).config_file.parent.mkdir(parents=True)
    AgentPaths(root).config_file.write_text("site: s1\n")


def test_deploy_to_a_local_site_is_verified_and_idempotent(registry, tmp_path):
    inventory_file = tmp_path / "inv.yaml"
    inventory_file.write_text(f"""
cloud: {{store_url: "file://{tmp_path}/store", registry: "{tmp_path}/registry"}}
defaults: {{connection: {{type: local}}}}
sites:
  - {{name: s1, root: "{tmp_path}/s1"}}
""")
    inventory = load_inventory(inventory_file)
    champion = registry.champion("elpv")
    checkpoint = registry.artifact(champion.version)
    never = deploy_model(inventory.site("s1"), inventory, checkpoint, champion.version)
    assert never.status == "failed" and never.reason.startswith("not provisioned: no agent config")
    assert not (tmp_path / "s1" / "models").exists()
    _provisioned(tmp_path / "s1")
    first = deploy_model(inventory.site("s1"), inventory, checkpoint, champion.version)
    assert first.status == "changed", first.reason
    target = AgentPaths(tmp_path / "s1").base_models / champion.version
    assert file_sha256(target / "model.pt") == (target / "model.pt.sha256").read_text().split()[0]
    assert not list(target.parent.glob(".*"))  # no staging leftovers
    assert deploy_model(inventory.site("s1"), inventory, checkpoint, champion.version).status == "ok"
    (target / "model.pt").write_bytes(b"damaged")  # a damaged copy is replaced, not trusted
    assert deploy_model(inventory.site("s1"), inventory, checkpoint, champion.version).status == "changed"
    assert file_sha256(target / "model.pt") == file_sha256(checkpoint)


def test_deploy_and_stop_resolve_a_home_relative_root(registry, tmp_path, monkeypatch):
    """``root: ~/...`` means the login user's home on the host, for deploy and stop as for provisioning;
    ``service: auto`` stops what provisioning started (a supervised process where systemd is absent)."""
    from orchestrator.deploy import stop_agent

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    inventory_file = tmp_path / "inv.yaml"
    inventory_file.write_text(f"""
cloud: {{store_url: "file://{tmp_path}/store"}}
defaults: {{connection: {{type: local}}, agent: {{service: auto}}}}
sites: [{{name: s1, root: "~/edge/s1"}}]
""")
    inventory = load_inventory(inventory_file)
    champion = registry.champion("elpv")
    _provisioned(tmp_path / "home" / "edge" / "s1")
    result = deploy_model(inventory.site("s1"), inventory, registry.artifact(champion.version), champion.version)
    assert result.status == "changed", result.reason
    assert (tmp_path / "home" / "edge" / "s1" / "models" / "base" / champion.version / "model.pt").is_file()
    assert not (Path.cwd() / "~").exists()
    assert stop_agent(inventory.site("s1"), inventory) is False  # nothing was running; no error either


def test_fleet_status_reads_heartbeats_and_skips_missing_sites(tmp_path):
    (tmp_path / "status").mkdir()
    (tmp_path / "status" / "a.json").write_text(json.dumps({"site": "a", "time": 5}))
    (tmp_path / "status" / "b.json").write_text("{not json")
    status, unreadable = read_fleet_status(Store(f"file://{tmp_path}"), ["a", "b", "c"])
    assert status == {"a": {"site": "a", "time": 5}}
    assert list(unreadable) == ["b"] and unreadable["b"].startswith("unreadable heartbeat: status is not JSON")


def test_models_cli_lists_versions_and_lineage(registry, capsys):
    from edgeloop.cli import main

    champion = registry.champion("elpv")
    assert main(["models", "list", "--registry", str(registry.root)]) == 0
    listing = capsys.readouterr().out
    assert champion.version in listing and "champion" in listing
    assert main(["models", "lineage", champion.version, "--registry", str(registry.root)]) == 0
    assert champion.version in capsys.readouterr().out
    assert main(["models", "show", "missing", "--registry", str(registry.root)]) == 2
    assert "no model version 'missing'" in capsys.readouterr().err
    missing = registry.root.parent / "no-such-registry"
    assert main(["models", "list", "--registry", str(missing)]) == 2 and not missing.exists()
    assert "no registry at" in capsys.readouterr().err


def test_models_show_into_a_pipe_that_closes_early_is_no_traceback(registry):
    """``edgeloop models show V | head``: the reader is gone before edgeloop writes; edgeloop exits quietly."""
    import subprocess
    import sys

    version = registry.champion("elpv").version
    shell = (f"{sys.executable} -m edgeloop models show {version} --registry {registry.root} | true;"
             " echo ${PIPESTATUS[0]}")
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "0" and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_fleet_status_lists_once_and_fetches_only_what_changed(tmp_path):
    from orchestrator.health import FleetStatus

    status = tmp_path / "status"
    status.mkdir()
    sites = [f"site-{n:03d}" for n in range(100)]
    for n, site in enumerate(sites):
        (status / f"{site}.json").write_text(json.dumps({"site": site, "time": n}))
    reader = FleetStatus(Store(f"file://{tmp_path}"))
    assert len(reader.read(sites)) == 100 and reader.fetched == 100
    assert reader.read(sites)[sites[7]] == {"site": sites[7], "time": 7} and reader.fetched == 0
    for site in sites[:3]:
        (status / f"{site}.json").write_text(json.dumps({"site": site, "time": 1000}))
    seen = reader.read(sites)
    assert reader.fetched == 3 and seen[sites[0]]["time"] == 1000 and seen[sites[99]]["time"] == 99
    (status / f"{sites[5]}.json").unlink()
    assert sites[5] not in reader.read(sites)  # a heartbeat that is gone is not served from memory

    from agent_helpers import free_port

    reader.store = Store(f"sftp://127.0.0.1:{free_port()}/store", {"timeout": "3"})  # the link is cut
    after = reader.read(sites)  # the heartbeats read before are kept (they age into stale), and it says why
    assert len(after) == 99 and reader.fetched == 0 and reader.error
