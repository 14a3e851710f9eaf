"""Inventory files: the shipped examples load, and bad inventories fail naming file, line, site and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import AgentConfig, dump_config, load_config
from edgeloop.cli import main as cli_main
from edgeloop.commands.inventory import site_table
from orchestrator.inventory import InventoryError, load_inventory

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
cloud:
  store_url: file:///srv/store
ssh:
  known_hosts: known_hosts
defaults:
  connection: {type: ssh, user: edge, key_file: ~/.ssh/id_ed25519}
  root: /opt/edgeloop
  learning:
    thresholds: {uncertainty: 0.6}
sites:
  - name: alpha
    connection: {host: 10.0.0.1}
  - name: beta
    connection: {host: "${BETA_HOST}", port: 2222}
    learning:
      members: [{arch: resnet18, policy: flips}]
      thresholds: {min_new_labelled: 5}
"""


def write(tmp_path: Path, text: str, name: str = "inv.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(path: Path, env: dict | None = None) -> str:
    with pytest.raises(InventoryError) as info:
        load_inventory(path, env or {"BETA_HOST": "10.0.0.2"})
    return str(info.value)


def test_shipped_local_inventory_has_three_local_sites():
    inv = load_inventory(REPO / "inventory" / "local.yaml", env={})
    assert inv.names() == ["site-a", "site-b", "site-c"]
    assert {s.connection.type for s in inv.sites} == {"local"}
    assert [len(s.learning.members) for s in inv.sites] == [3, 3, 2]
    assert len({s.root for s in inv.sites}) == 3 and len({s.agent.serve.port for s in inv.sites}) == 3


def test_shipped_lab_inventory_has_ten_ssh_sites():
    inv = load_inventory(REPO / "inventory" / "lab.yaml", env={"EDGE_HTTP_TOKEN": "s3cret-token"})
    assert len(inv.sites) == 10
    assert all(s.agent.serve.token == "s3cret-token" for s in inv.sites)
    assert "s3cret-token" not in inv.mask(str(inv.site("plant-a-01").agent_config(inv.cloud).model_dump()))
    with pytest.raises(InventoryError, match="EDGE_HTTP_TOKEN"):
        load_inventory(REPO / "inventory" / "lab.yaml", env={})
    assert {s.connection.type for s in inv.sites} == {"ssh"}
    assert all(s.connection.key_file for s in inv.sites)
    jumped = [s.name for s in inv.sites if s.connection.jump]
    assert jumped == [f"plant-b-0{i}" for i in range(1, 6)]
    arm = inv.site("plant-a-05")
    assert (arm.connection.user, arm.agent.workers, arm.install.profile) == ("pi", 2, "edge-serve")
    assert arm.agent_config(inv.cloud).profile == "edge-serve"
    assert {s.install_mode for s in inv.sites} == {"wheelhouse", "index"}
    assert inv.site("plant-b-05").install.index_url.startswith("http://")
    assert inv.site("plant-b-05").connection.port == 2222
    assert inv.site("plant-b-05").learning.upload.max_samples_per_day == 100
    assert inv.known_hosts == Path.home() / ".ssh" / "edgeloop_known_hosts"


def test_install_modes_and_profiles_are_validated_with_the_site_and_field(tmp_path):
    inv = load_inventory(write(tmp_path, GOOD.replace("  root: /opt/edgeloop\n", "  root: /opt/edgeloop\n"
                                                      "  install: {profile: edge-serve}\n")),
                         env={"BETA_HOST": "10.0.0.2"})
    assert [(s.install_mode, s.install.profile) for s in inv.sites] == [("wheelhouse", "edge-serve")] * 2
    assert inv.wheelhouse().name == "wheelhouse"  # no registry: the user's cache
    for install, expected in (("{mode: index}", "mode 'index' needs 'index_url'"),
                              ("{index_url: 'http://proxy/simple'}", "only used with mode 'index'"),
                              ("{mode: index, index_url: 'proxy:3141'}", "not an index URL"),
                              ("{profile: edge-lite}", "'edge' or 'edge-serve'"),
                              ("{mode: pip}", "'wheelhouse', 'index' or 'system'")):
        path = write(tmp_path, GOOD.replace("    connection: {host: 10.0.0.1}\n",
                                            f"    connection: {{host: 10.0.0.1}}\n    install: {install}\n"))
        text = problems_of(path)
        assert "site 'alpha'" in text and "install" in text and expected in text, text
    local = load_inventory(write(tmp_path, "cloud: {store_url: 'file:///s', registry: /srv/reg/models}\n"
                                           "sites: [{name: a, root: /x, connection: {type: local}}]\n"), env={})
    assert local.sites[0].install_mode == "system" and local.wheelhouse() == Path("/srv/reg/wheelhouse")


def test_defaults_merge_under_sites_and_render_the_agent_config(tmp_path):
    inv = load_inventory(write(tmp_path, GOOD), env={"BETA_HOST": "10.0.0.2"})
    alpha, beta = inv.sites
    assert alpha.learning.thresholds.uncertainty == beta.learning.thresholds.uncertainty == 0.6
    assert beta.learning.thresholds.min_new_labelled == 5 and alpha.learning.thresholds.min_new_labelled == 20
    assert (beta.connection.host, beta.connection.port, beta.connection.user) == ("10.0.0.2", 2222, "edge")
    assert inv.known_hosts == tmp_path / "known_hosts"  # relative to the inventory file
    config = beta.agent_config(inv.cloud)
    assert isinstance(config, AgentConfig)
    assert (config.site, str(config.root), config.store_url) == ("beta", "/opt/edgeloop", "file:///srv/store")
    assert [m.policy for m in config.members] == ["flips"]
    rendered = tmp_path / "agent.yaml"
    rendered.write_text(dump_config(config))
    assert load_config(rendered) == config  # what provisioning writes, the agent reads back identically


def test_typo_in_a_site_field_names_file_line_site_and_field(tmp_path):
    path = write(tmp_path, GOOD.replace("thresholds: {min_new_labelled: 5}", "thresholds: {min_new_labeled: 5}"))
    message = problems_of(path)
    assert f"{path}:17:" in message
    assert "site 'beta'" in message
    assert "'learning.thresholds.min_new_labeled'" in message
    assert "did you mean 'min_new_labelled'?" in message


def test_typo_in_defaults_points_at_the_defaults_line(tmp_path):
    message = problems_of(write(tmp_path, GOOD.replace("thresholds: {uncertainty: 0.6}",
                                                       "thresholds: {uncertanty: 0.6}")))
    assert "inv.yaml:9:" in message and "'learning.thresholds.uncertanty'" in message
    assert "did you mean 'uncertainty'?" in message


def test_bad_values_and_missing_fields_are_each_reported(tmp_path):
    text = GOOD.replace("port: 2222", "port: 99999").replace("  - name: alpha\n    connection: {host: 10.0.0.1}\n",
                                                             "  - name: alpha\n    connection: {port: 22}\n")
    message = problems_of(write(tmp_path, text))
    assert "site 'beta': field 'connection.port'" in message and "99999" in message
    assert "site 'alpha': field 'connection'" in message and "needs 'host'" in message


def test_duplicate_names_unknown_top_level_key_and_bad_yaml(tmp_path):
    message = problems_of(write(tmp_path, GOOD.replace("name: beta", "name: alpha").replace("ssh:", "shh:")))
    assert "duplicate site name" in message and "did you mean 'ssh'?" in message
    message = problems_of(write(tmp_path, "cloud: {store_url: x\nsites: []\n"))
    assert "inv.yaml:2" in message and "not valid YAML" in message


def test_env_values_are_substituted_masked_and_missing_ones_named(tmp_path):
    path = write(tmp_path, GOOD)
    inv = load_inventory(path, env={"BETA_HOST": "secret-host.internal"})
    table = site_table(inv)
    assert "secret-host.internal" not in table and "${BETA_HOST}" in table and "10.0.0.1" in table
    with pytest.raises(InventoryError) as info:
        load_inventory(path, env={})
    assert "site 'beta': field 'connection.host'" in str(info.value) and "${BETA_HOST}" in str(info.value)


def test_limit_selects_sites_and_rejects_unknown_names(tmp_path):
    inv = load_inventory(write(tmp_path, GOOD), env={"BETA_HOST": "h"})
    assert [s.name for s in inv.select(["beta"])] == ["beta"]
    assert len(inv.select(None)) == 2
    with pytest.raises(InventoryError, match="unknown site.*gamma"):
        inv.select(["gamma"])


def test_cli_inventory_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BETA_HOST", "hidden.example")
    assert cli_main(["inventory", "check", str(write(tmp_path, GOOD))]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "ssh edge@${BETA_HOST}:2222" in out and "hidden.example" not in out
    assert "2 site(s) OK" in out
    bad = write(tmp_path, GOOD.replace("key_file:", "keyfile:"), "bad.yaml")
    assert cli_main(["inventory", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:6" in err and "'connection.keyfile'" in err and "did you mean 'key_file'?" in err


def test_a_bad_agent_config_names_file_line_and_field(tmp_path):
    from edge_agent.config import ConfigError

    path = tmp_path / "agent.yaml"
    path.write_text("site: north\nroot: /tmp/north\nstore_url: file:///tmp/store\n"
                    "thresholds:\n  min_new_labeled: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:5" in message and "thresholds.min_new_labeled" in message and "min_new_labelled" in message
    path.write_text("site: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
