"""The HTTP endpoint under bad and hostile clients, on a real socket with a real ONNX ensemble: bad
Content-Length, silent and idle connections by the thousand, bursts, canvas bombs, tokens, and the budget
share of what the endpoint may send upstream."""

from __future__ import annotations

import io
import json
import select
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import AgentProcess, serving_site, wait_for, write_config
from PIL import Image
from pydantic import ValidationError

from edge_agent.config import AgentConfig, ServeConfig
from edge_agent.layout import AgentPaths
from edge_agent.outbox import Outbox
from edge_agent.sampler import Sampler
from edge_agent.server import Classifier, Server
from edge_agent.serving import EnsembleHandle
from edge_agent.state import AgentState

SIZE = 32


def png(seed: int = 0, size: int = 40) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> AgentPaths:
    return serving_site(tmp_path_factory.mktemp("site"), SIZE)


def start(site: AgentPaths, on_prediction=None, **serve) -> Server:
    config = ServeConfig(port=1, **serve).model_copy(update={"port": 0})  # port 0: any free port
    handle = EnsembleHandle(site.active_link, image_size=SIZE)
    return Server(config, Classifier(handle, config.max_image_bytes, on_prediction, config.max_image_pixels),
                  lambda: {"ok": True}).start()


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def post(port: int, body: bytes, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/classify", data=body, method="POST",
                                     headers={"X-Filename": "x.png", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.mark.parametrize("header, code", [("Content-Length: -5", 400), ("Content-Length: lots", 400),
                                          (None, 411), ("Content-Length: 999999999999", 413)])
def test_bad_content_lengths_are_answered_at_once(site, header, code):
    server = start(site, max_image_bytes=100_000)
    try:
        head = b"POST /classify HTTP/1.1\r\nHost: x\r\n" + (f"{header}\r\n".encode() if header else b"") + b"\r\n"
        started = time.monotonic()
        answer = raw_request(server.address[1], head + b"abc", timeout=10)
        assert status_of(answer) == code and time.monotonic() - started < 3
    finally:
        server.stop()


def test_a_client_that_sends_nothing_is_cut_off(site):
    server = start(site, header_timeout_s=0.5, request_timeout_s=2)
    try:
        with socket.create_connection(server.address, timeout=10) as sock:
            started = time.monotonic()
            assert sock.recv(10) == b""  # closed by the server
            assert time.monotonic() - started < 3
        with socket.create_connection(server.address, timeout=10) as sock:  # starts, then stalls mid-body
            sock.sendall(b"POST /classify HTTP/1.1\r\nContent-Length: 1000\r\n\r\nabc")
            started = time.monotonic()
            answer = sock.recv(1000)
            assert time.monotonic() - started < 8
            assert answer == b"" or status_of(answer) == 408
    finally:
        server.stop()


def trickle(address, head: bytes, dribble: bytes, every: float = 0.2, limit: float = 12.0) -> tuple[float, bytes]:
    """Send ``head``, then ``dribble`` a byte every ``every`` s until the server answers or hangs up:
    the seconds that took (``limit`` when it never did) and what it said."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(head)
        started = time.monotonic()
        for byte in dribble:
            if select.select([sock], [], [], every)[0] or time.monotonic() - started > limit:
                break
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
        elapsed = time.monotonic() - started
        try:
            return elapsed, sock.recv(1000)
        except OSError:
            return elapsed, b""


def test_clients_that_trickle_their_request_are_cut_off_in_time_and_hold_no_worker(site):
    """A byte every 0.2 s resets any per-read timeout: the head must be complete within header_timeout_s
    of connecting, and the body within request_timeout_s, however it trickles."""
    server = start(site, workers=1, max_queued=1, header_timeout_s=1, request_timeout_s=2)
    try:
        with ThreadPoolExecutor(2) as pool:
            heads = pool.submit(trickle, server.address, b"", b"POST /classify HTTP/1.1\r\nX-Pad: " + b"a" * 100)
            body = pool.submit(trickle, server.address,
                               b"POST /classify HTTP/1.1\r\nContent-Length: 1000\r\n\r\n", b"a" * 100)
            time.sleep(0.5)
            started = time.monotonic()
            code, _ = post(server.address[1], png(3), timeout=15)  # neither trickler holds the pool
            assert code == 200 and time.monotonic() - started < 6
            head_s, _ = heads.result()
            body_s, body_answer = body.result()
        assert head_s < 3, f"a trickled head held its connection {head_s:.1f} s"
        assert body_s < 5 and status_of(body_answer) == 408, f"a trickled body held a worker {body_s:.1f} s"
    finally:
        server.stop()


def test_an_oversized_head_is_refused(site):
    server = start(site)
    try:
        answer = raw_request(server.address[1], b"GET /health HTTP/1.1\r\nX-Pad: " + b"a" * 40_000 + b"\r\n\r\n")
        assert status_of(answer) == 431
    finally:
        server.stop()


def test_a_thousand_idle_connections_neither_block_requests_nor_exhaust_descriptors(site):
    server = start(site, max_connections=64, header_timeout_s=30)
    idle = []
    try:
        for _ in range(1000):
            idle.append(socket.create_connection(server.address, timeout=10))
        time.sleep(0.5)
        fds = len(list(Path("/proc/self/fd").iterdir()))
        code, answer = post(server.address[1], png(1), timeout=10)
        assert code == 200 and answer["label"] in ("functional", "defective")
        assert len(server.waiting) <= 64  # the server holds at most its limit of idle connections
        assert fds < 1000 + 64 + 200  # ours (1000 client ends) + the server's bounded share
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def test_a_burst_of_requests_all_get_an_http_answer(site):
    server = start(site, workers=2, max_queued=8)
    try:
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(lambda i: post(server.address[1], png(i))[0], range(64)))
        assert set(results) <= {200, 503} and results.count(200) >= 10  # busy is an answer, a reset is not
    finally:
        server.stop()


def test_a_huge_canvas_is_refused_before_it_is_decoded(site):
    bomb = io.BytesIO()
    Image.new("1", (1, 1)).save(bomb, "PNG")
    data = bytearray(bomb.getvalue())
    struct.pack_into(">II", data, 16, 60000, 60000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # a valid IHDR: only its size lies
    server = start(site)
    try:
        started = time.monotonic()
        code, answer = post(server.address[1], bytes(data))
        assert code == 400 and "pixels" in answer["error"] and time.monotonic() - started < 5
    finally:
        server.stop()


def test_the_endpoint_has_its_own_pixel_limit(site):
    server = start(site, max_image_pixels=1_000_000)
    try:
        assert post(server.address[1], png(4, size=999))[0] == 200  # under the limit: served
        code, answer = post(server.address[1], png(5, size=1001))  # a real, well-formed image, too big a canvas
        assert code == 400 and "too many pixels: 1001x1001" in answer["error"]
    finally:
        server.stop()


def test_off_loopback_needs_a_token_and_requests_need_the_right_one(site, caplog):
    with pytest.raises(ValidationError, match="needs a bearer token"):
        ServeConfig(host="0.0.0.0", port=8765)
    ServeConfig(host="0.0.0.0", port=0)  # off: nothing to protect
    server = start(site, token="s3cret")
    try:
        port = server.address[1]
        assert post(port, png(2))[0] == 401
        assert post(port, png(2), {"Authorization": "Bearer wrong"})[0] == 401
        assert post(port, png(2), {"Authorization": "Bearer s3cret"})[0] == 200
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)
        assert error.value.code == 401
    finally:
        server.stop()
    assert "s3cret" not in caplog.text


def test_http_and_labelled_samples_only_spend_their_own_share_of_the_budget(tmp_path):
    config = AgentConfig(site="s", root=tmp_path, store_url="file:///tmp/x",
                         upload={"max_samples_per_day": 20, "http_share": 0.25, "labelled_share": 0.1,
                                 "random_share": 1.0})
    state = AgentState()
    sampler = Sampler(config, Outbox(tmp_path / "outbox", 10**9), state, threading.Lock())

    class Sure:  # a prediction the selector always keeps (random share 1.0)
        probs = np.array([0.5, 0.5])
        member_probs = np.array([[0.9, 0.1], [0.1, 0.9]])
        model_version = "v1"
        probabilities = {"functional": 0.5, "defective": 0.5}
        label = "functional"

    queued_http = sum(sampler(png(i), Sure(), f"h{i}.png", source="http") for i in range(20))
    queued_labelled = sum(sampler(png(50 + i), Sure(), f"l{i}.png", operator_label="defective", source="operator")
                          for i in range(20))
    queued_inbox = sum(sampler(png(100 + i), Sure(), f"i{i}.png") for i in range(5))
    assert (queued_http, queued_labelled, queued_inbox) == (5, 2, 5)  # 25 % and 10 % of 20; the inbox is not held
    sources = [json.loads(p.read_text())["source"] for p in (tmp_path / "outbox").glob("*.json")]
    assert sorted(sources) == ["http"] * 5 + ["inbox"] * 5 + ["operator"] * 2


def test_the_real_agent_serves_with_its_token_and_spends_only_the_http_share(tmp_path):
    """The daemon's wiring, end to end: its endpoint takes the token, and what it selects from requests is
    tagged ``http`` and held to ``http_share`` of the day's samples, however many requests come."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root, store = tmp_path / "agent", tmp_path / "store"
    serving_site(root, SIZE)
    config = write_config(root, store.as_uri(), image_size=SIZE,
                          serve={"port": port, "token": "t0ken-abc", "max_image_pixels": 1_000_000},
                          upload={"random_share": 1.0, "max_samples_per_day": 8, "http_share": 0.25})
    agent = AgentProcess(config)
    try:
        def health() -> int | None:
            try:
                return urllib.request.urlopen(urllib.request.Request(
                    f"http://127.0.0.1:{port}/health", headers={"Authorization": "Bearer t0ken-abc"}), timeout=5).status
            except OSError:
                return None
        wait_for(health, 60, "the endpoint", agent)
        assert post(port, png(10))[0] == 401
        token = {"Authorization": "Bearer t0ken-abc"}
        assert post(port, png(11, size=1001), token)[0] == 400  # the site's pixel limit
        assert [post(port, png(20 + i), token)[0] for i in range(6)] == [200] * 6  # every one chosen (random 1.0)
        samples = store / "samples" / "site-1"
        wait_for(lambda: samples.is_dir() and len(list(samples.glob("*.json"))) >= 2, 30, "http samples", agent)
        time.sleep(1.5)  # time for any more to (wrongly) arrive
        sources = [json.loads(p.read_text())["source"] for p in samples.glob("*.json")]
        assert sources == ["http", "http"]  # 25 % of 8, not 6
    finally:
        agent.close()
    assert "t0ken-abc" not in (root / "agent.log").read_text()
