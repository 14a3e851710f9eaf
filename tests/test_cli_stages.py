"""``edgeloop pretrain`` and ``edgeloop deploy`` on real files: a tiny_cnn pretrained on real ELPV images through
the pretrain flow into a real registry, then deployed to a local site root (sha256-checked, idempotent), and
each refusal one clear line with nothing changed."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest

from edge_agent.fileio import file_sha256
from edge_agent.layout import AgentPaths
from edgeloop.cli import main
from orchestrator.registry import ModelRegistry

pytestmark = pytest.mark.timeout(600)
FAST = ["--arch", "tiny_cnn", "--epochs", "1", "--batch-size", "16"]


def _run(*argv: str) -> tuple[int, str, str]:
    """One in-process command (the Prefect harness is shared): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, elpv_small) -> Path:
    """An inventory with a registry, the ELPV pool as its generic dataset, a provisioned site and a bare one."""
    home = tmp_path_factory.mktemp("cli-stages")
    inventory = home / "fleet.yaml"
    inventory.write_text(f"""
cloud: {{store_url: "{(home / 'store').as_uri()}", registry: "{home / 'registry'}",
        datasets: {{generic: "{elpv_small / 'generic'}"}}}}
defaults: {{connection: {{type: local}}}}
sites:
  - {{name: s1, root: "{home / 's1'}"}}
  - {{name: bare, root: "{home / 'bare'}"}}
""")
    config = AgentPaths(home / "s1").config_file  # what provisioning leaves, and what a deploy checks for
    config.parent.mkdir(parents=True)
    config.write_text("site: s1\n")
    return inventory


@pytest.fixture(scope="module")
def pretrained(prefect_harness, fleet) -> tuple[int, str, str]:
    """`edgeloop pretrain` once, on the inventory's generic pool (no --data)."""
    return _run("pretrain", "-i", str(fleet), *FAST, "--seed", "3")


def test_pretrain_registers_gates_and_promotes_in_one_line(pretrained, fleet):
    code, out, err = pretrained
    assert code == 0, err[-2000:]
    registry = ModelRegistry(fleet.parent / "registry")
    (version,) = [v.version for v in registry.versions("elpv-defects")]
    line = out.strip().splitlines()[-1]
    assert line.startswith(f"pretrain {version}: promoted to champion (gate acc "), out
    assert "vs no champion); " in line
    assert registry.champion("elpv-defects").version == version
    record = registry.get(version)
    assert record.arch == "tiny_cnn" and record.hyperparameters["epochs"] == 1 and record.hyperparameters["seed"] == 3


def test_pretrain_refuses_bad_input_before_running(prefect_harness, fleet, tmp_path):
    versions = lambda: sorted(p.name for p in (fleet.parent / "registry").iterdir())  # noqa: E731
    before = versions()
    for argv, says in [(["--epochs", "0"], "epochs: Input should be greater than or equal to 1"),
                       (["--arch", "vgg99"], "arch: Input should be 'resnet18'"),
                       (["--data", str(tmp_path / "nowhere")], "not a dataset version")]:
        code, out, err = _run("pretrain", "-i", str(fleet), *FAST, *argv)
        assert code == 2 and out == "", (argv, out, err)
        assert len(err.strip().splitlines()) == 1 and says in err, (argv, err)
    code, _, err = _run("pretrain", "-i", str(tmp_path / "missing.yaml"), *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "missing.yaml" in err
    assert versions() == before


def test_a_failed_pretrain_run_exits_non_zero_and_promotes_nothing(pretrained, fleet, elpv_small, tmp_path):
    """A dataset whose images were damaged after import: the run fails, the champion stays."""
    registry = ModelRegistry(fleet.parent / "registry")
    champion = registry.champion("elpv-defects").version
    data = tmp_path / "damaged"
    shutil.copytree(elpv_small / "generic", data)
    for image in data.rglob("*.png"):
        image.write_bytes(b"not a png")
    code, out, err = _run("pretrain", "-i", str(fleet), *FAST, "--data", str(data))
    assert code == 1, (out, err[-2000:])
    assert out.strip().splitlines()[-1].startswith("pretrain failed (Failed): "), out
    assert registry.champion("elpv-defects").version == champion


def test_deploy_one_version_to_one_site_verified_and_idempotent(pretrained, fleet):
    registry = ModelRegistry(fleet.parent / "registry")
    version = registry.champion("elpv-defects").version
    code, out, err = _run("deploy", "--site", "s1", "--version", version, "-i", str(fleet))
    assert code == 0, err
    assert out.startswith(f"s1  changed  {version} deployed (sha256 verified on the host)"), out
    target = AgentPaths(fleet.parent / "s1").base_models / version
    assert file_sha256(target / "model.pt") == file_sha256(registry.artifact(version))
    assert (target / "model.pt.sha256").read_text().split()[0] == file_sha256(target / "model.pt")
    code, out, _ = _run("deploy", "--site", "s1", "--version", version, "-i", str(fleet))
    assert code == 0 and out.startswith(f"s1  ok       {version} already in place"), out
    (target / "model.pt").write_bytes(b"damaged")  # a damaged copy on the site is replaced, not trusted
    code, out, _ = _run("deploy", "--site", "s1", "--version", version, "-i", str(fleet))
    assert code == 0 and out.startswith("s1  changed"), out
    assert file_sha256(target / "model.pt") == file_sha256(registry.artifact(version))


def test_deploy_refusals_and_failures_are_one_clear_line(pretrained, fleet):
    registry = ModelRegistry(fleet.parent / "registry")
    version = registry.champion("elpv-defects").version
    deploy = ("deploy", "-i", str(fleet))
    code, out, err = _run(*deploy, "--site", "nowhere", "--version", version)
    assert code == 2 and out == "" and "no site named 'nowhere' (sites: s1, bare)" in err, err
    code, out, err = _run(*deploy, "--site", "s1", "--version", "v-none")
    assert code == 2 and out == "" and "no model version 'v-none'" in err, err
    for text in (out, err):
        assert len(text.strip().splitlines()) <= 1
    # a site that was never provisioned: the deploy fails on the host, names why, and leaves nothing there
    code, out, err = _run(*deploy, "--site", "bare", "--version", version)
    assert code == 1 and out.startswith("bare  failed   not provisioned: no agent config"), (out, err)
    assert len(out.strip().splitlines()) == 1 and not (fleet.parent / "bare" / "models").exists()
    # a corrupt registry never ships: the artifact no longer matches its recorded sha256
    artifact = registry.artifact(version)
    good = artifact.read_bytes()
    artifact.write_bytes(good[:-10])
    try:
        code, out, err = _run(*deploy, "--site", "s1", "--version", version)
        assert code == 2 and out == "" and "does not match its sha256" in err, err
    finally:
        artifact.write_bytes(good)
    # a rolled-back version goes out again only with a reason, which its record keeps
    registry.mark_rolled_back(version, "canary failed", by="test")
    code, out, err = _run(*deploy, "--site", "s1", "--version", version)
    assert code == 2 and out == "" and "was rolled back by test (canary failed)" in err, err
    code, out, err = _run(*deploy, "--site", "s1", "--version", version, "--override", "fixed the site's camera")
    assert code == 0 and out.startswith("s1  ok"), (out, err)
    assert registry.get(version).overrides[-1].reason == "fixed the site's camera"
