"""Links that fail the way real ones do: a connection that stalls mid-upload (no reset, just silence) and a
known_hosts file with a malformed line. A host with a bad link fails alone, within its deadline."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from orchestrator.inventory import load_inventory
from orchestrator.provision import CHANGED, FAILED, OK, build_wheel, provision
from orchestrator.sshfleet import fleet_inventory, stop_agents

pytestmark = pytest.mark.timeout(300)


class StallingProxy:
    """A TCP relay to a real sshd that, once armed and another ``after`` bytes went up, stops relaying but
    keeps the sockets open (the link goes silent mid-transfer, as a stalled radio link does)."""

    def __init__(self, target_port: int, after: int = 16 * 1024):
        self.target_port, self.after = target_port, after
        self.armed = threading.Event()
        self.stall = threading.Event()
        self.sent_since_armed = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, up: bool) -> None:
        try:
            while data := source.recv(65536):
                if up and self.armed.is_set():
                    self.sent_since_armed += len(data)
                    if self.sent_since_armed > self.after:
                        self.stall.set()
                while self.stall.is_set():
                    time.sleep(0.1)  # swallow the link: nothing more gets through, nothing is closed
                sink.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture(scope="module")
def wheel():
    return build_wheel()


def test_a_link_that_stalls_during_the_wheel_upload_fails_that_host_alone(sshd_fleet, wheel, tmp_path):
    fleet = sshd_fleet
    victim, healthy = fleet.hosts[0], fleet.hosts[1]
    proxy = StallingProxy(victim.port)
    known = tmp_path / "known_hosts"
    known.write_text(fleet.known_hosts.read_text() + f"[127.0.0.1]:{proxy.port} {victim.host_pub}\n")
    roots = tmp_path / "roots"
    path = fleet_inventory(fleet, tmp_path / "inv.yaml", roots, known_hosts=known)
    path.write_text(path.read_text().replace(f"port: {victim.port}}}", f"port: {proxy.port}}}")
                    .replace("connect_timeout_s: 5}", "connect_timeout_s: 5, io_timeout_s: 3}"))
    inventory = load_inventory(path)

    def stall_the_upload(site: str, step: str) -> None:
        if site == victim.name and step == "wheel":
            proxy.armed.set()  # the wheel (well over 16 KiB) stalls part way up

    started = time.monotonic()
    try:
        report = provision(inventory, wheel=wheel, limit=[victim.name, healthy.name], on_step=stall_the_upload,
                           retry_delays_s=())
    finally:
        proxy.close()
        stop_agents(roots)
    seconds = time.monotonic() - started
    by_site = {h.site: h for h in report.hosts}
    stalled = {s.step: s for s in by_site[victim.name].steps}
    assert stalled["wheel"].status == FAILED and "upload to the host stalled" in stalled["wheel"].message, \
        stalled["wheel"].message
    assert stalled["wheel"].seconds < 30
    assert not by_site[healthy.name].failed, report.recap()
    assert seconds < 120


def test_a_malformed_known_hosts_line_is_reported_per_host_not_fatal(sshd_fleet, wheel, tmp_path):
    fleet = sshd_fleet
    known = tmp_path / "known_hosts"
    lines = [f"[127.0.0.1]:{h.port} {h.host_pub}" for h in fleet.hosts]
    lines[1] = f"[127.0.0.1]:{fleet.hosts[1].port} ssh-ed25519 AAAA!!!not-base64"  # host1's line is damaged
    known.write_text("\n".join([lines[0], "garbage without fields", lines[1], lines[2]]) + "\n")
    inventory = load_inventory(fleet_inventory(fleet, tmp_path / "inv.yaml", tmp_path / "roots", known_hosts=known))

    report = provision(inventory, wheel=wheel, check=True)

    by_site = {h.site: h for h in report.hosts}
    assert [h.site for h in report.failed] == ["host1"], report.recap()
    assert by_site["host1"].error_kind == "hostkey" and "malformed" in by_site["host1"].reason
    assert "2, 3" in by_site["host1"].reason  # which lines were skipped
    assert {s.status for s in by_site["host0"].steps} <= {OK, CHANGED, "skipped"}
