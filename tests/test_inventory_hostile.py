"""Inventories written carelessly or with intent: injection through values, keys pasted where paths belong,
secrets leaking in escaped forms, alias bombs. Each is refused with a message that names where, never what."""

from __future__ import annotations

import json
import shlex
import time

import pytest

from edgeloop.cli import main as cli_main
from orchestrator.inventory import InventoryError, load_inventory, mask
from orchestrator.provision.service import render_supervisor, render_unit

BASE = """\
cloud: {{store_url: "file:///srv/store"}}
defaults:
  connection: {{type: ssh, user: edge, key_file: {key_file}}}
sites:
  - name: alpha
    connection: {{host: 10.0.0.1}}
    root: {root}
"""
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\\n-----END OPENSSH PRIVATE KEY-----"


def inventory(tmp_path, root='"/opt/edgeloop"', key_file="~/.ssh/id_ed25519"):
    path = tmp_path / "inv.yaml"
    path.write_text(BASE.format(root=root, key_file=key_file))
    return path


@pytest.mark.parametrize("root", [r'"/opt/edge\nrm -rf /"', r'"/opt/edge\rX"', r'"/opt/\x00edge"', r'"/opt/e\tdge"'])
def test_control_characters_in_a_path_are_refused_naming_the_field(tmp_path, root):
    with pytest.raises(InventoryError) as err:
        load_inventory(inventory(tmp_path, root=root), env={})
    message = str(err.value)
    assert "inv.yaml:7" in message and "field 'root'" in message and "control character" in message
    assert "rm -rf" not in message


def test_a_private_key_pasted_as_key_file_is_refused_without_echoing_it(tmp_path, capsys):
    path = inventory(tmp_path, key_file=f'"{KEY}"')
    with pytest.raises(InventoryError) as err:
        load_inventory(path, env={})
    message = str(err.value)
    assert "key material" in message and "connection.key_file" in message
    assert "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU" not in message and "PRIVATE KEY" not in message
    assert cli_main(["inventory", "check", str(path)]) == 2
    out = capsys.readouterr()
    assert "key material" in out.err and "b3BlbnNzaC1rZXkt" not in out.out + out.err


def test_a_key_from_the_environment_is_refused_too(tmp_path):
    path = inventory(tmp_path, key_file='"${EDGE_KEY}"')
    with pytest.raises(InventoryError) as err:
        load_inventory(path, env={"EDGE_KEY": KEY.replace("\\n", "\n")})
    assert "key material" in str(err.value) and "b3BlbnNzaC1rZXkt" not in str(err.value)


def test_secrets_are_masked_in_escaped_forms():
    secret = 'pa"ss\\word with space'
    secrets = {"STORE_PASSWORD": secret}
    for shown in (secret, json.dumps(secret), repr(secret), shlex.quote(secret),
                  json.dumps({"password": secret})):
        masked = mask(f"error: {shown} refused", secrets)
        assert "pa" not in masked.replace("password", "") and "${STORE_PASSWORD}" in masked, masked


def test_an_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 600
    started = time.monotonic()
    with pytest.raises(InventoryError, match="aliases expand to more than"):
        load_inventory(path, env={})
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("root", ["/opt/edge loop", "/opt/100%x/$HOME/it's \"here\"", "/opt/a\\b"])
def test_scripts_and_units_quote_what_the_inventory_gave(root):
    script = render_supervisor("alpha", f"{root}/venv/bin/python", f"{root}/config/agent.yaml",
                               f"{root}/agent.out", f"{root}/supervisor.pid")
    run_line = next(line for line in script.splitlines() if "-m edge_agent run" in line)
    words = shlex.split(run_line.strip().removesuffix("&").strip())
    assert words[0] == f"{root}/venv/bin/python" and words[words.index("--config") + 1] == f"{root}/config/agent.yaml"
    unit = render_unit("alpha", f"{root}/venv/bin/python", f"{root}/config/agent.yaml", root)
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    for line in (exec_start, next(line for line in unit.splitlines() if line.startswith("WorkingDirectory="))):
        assert "%" not in line.replace("%%", ""), line  # a lone % is a systemd specifier
    unquoted = exec_start.removeprefix("ExecStart=").replace("%%", "%").replace("$$", "$")
    assert shlex.split(unquoted)[0] == f"{root}/venv/bin/python"
    working = next(line for line in unit.splitlines() if line.startswith("WorkingDirectory="))
    assert working.removeprefix("WorkingDirectory=").replace("%%", "%") == root


@pytest.mark.parametrize("name, line, field", [("[a, b]", 3, "name"), ("{x: 1}", 3, "name"), ("7", 3, "name")])
def test_a_site_name_of_the_wrong_type_is_a_message_with_file_line_and_field(tmp_path, name, line, field):
    path = tmp_path / "inv.yaml"
    path.write_text(f'cloud: {{store_url: "file:///srv/store"}}\nsites:\n  - {{name: {name}, root: /opt/e, '
                    'connection: {type: local}}\n  - {name: ok, root: [1], connection: {type: local}}\n')
    with pytest.raises(InventoryError) as err:
        load_inventory(path, env={})
    message = str(err.value)
    assert f"inv.yaml:{line}: site #1: field '{field}': Input should be a valid string" in message
    assert "inv.yaml:4: site 'ok': field 'root'" in message
