"""A local HTTP endpoint: POST an image, get back the same JSON the inbox writes.

Beside it: ``GET /metrics`` (Prometheus, :mod:`edge_agent.metrics`) and the Open Inference Protocol's ``/v2``
endpoints (:mod:`edge_agent.oip`: metadata, health, batch inference), all under the same token rule.

One module on purpose (about 460 lines): the connection and worker limits every endpoint shares; the endpoints'
own logic is in metrics.py and oip.py.

The stdlib's HTTP server (plus prometheus_client, pure Python): nothing to build on an edge board. It serves
through the same :class:`EnsembleHandle` as the inbox, so an activation is picked up by the next request. One
bad or hostile client must never stop the site, so every resource a client can hold is bounded:

- one gate thread accepts connections and reads, with a selector, each one's request line and headers
  (``MAX_HEAD`` bytes at most, else 431); a connection whose head is not complete within
  ``header_timeout_s`` of connecting is closed, however slowly it trickles bytes, and when
  ``max_connections`` are waiting the one idle longest is dropped for the newcomer (waiting connections
  cost no thread, and a flood of them cannot lock real clients out);
- a complete request is handled by a pool of ``workers`` threads, ``max_queued`` at most waiting (beyond
  that: 503 at once, never a reset); its body must arrive within ``request_timeout_s`` in all (408), so
  a client dribbling a byte at a time cannot hold a worker either;
- the body is read only after its ``Content-Length`` is checked (missing, negative, non-numeric and
  oversize are refused before a byte is read); images are checked for pixel count before decoding; a
  ``/v2`` batch holds at most ``max_batch`` images in ``max_batch_bytes``, each image under the same limits;
- a bearer token is required whenever the config has one (always off loopback).
"""

from __future__ import annotations

import hmac
import io
import json
from importlib.metadata import PackageNotFoundError, version as package_version
import logging
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Callable

import numpy as np

from edge_agent.config import ServeConfig
from edge_agent import oip
from edge_agent.imaging import MAX_PIXELS, ImageError, decode_image
from edge_agent.metrics import AgentMetrics
from edge_agent.serving import EnsembleHandle, Prediction, classify

log = logging.getLogger(__name__)


class ServeError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class Classifier:
    """What a request needs: decode, classify, count, hand each prediction to sample selection."""

    def __init__(self, handle: EnsembleHandle, max_bytes: int,
                 on_prediction: Callable[[bytes, Prediction, str], None] | None = None, max_pixels: int = MAX_PIXELS,
                 metrics: AgentMetrics | None = None):
        self.handle, self.max_bytes, self.on_prediction = handle, max_bytes, on_prediction
        self.max_pixels = max_pixels
        self.metrics = metrics  # the server's, when not given

    def __call__(self, body: bytes, name: str) -> dict[str, Any]:
        classifier = self.serving()
        try:
            image = decode_image(body, classifier.image_size, self.max_bytes, self.max_pixels)
        except ImageError as exc:
            raise ServeError(413 if "too large" in str(exc) else 400, str(exc)) from None
        return self.classify(classifier, image[np.newaxis], [body], [name])[0].as_result(name)

    def serving(self):
        """The serving ensemble's classifier (503 when none serves)."""
        classifier = self.handle.get()
        if classifier is None:
            raise ServeError(503, "no active model")
        return classifier

    def classify(self, classifier, images: np.ndarray, raws: list[bytes], names: list[str]) -> list[Prediction]:
        """Classify a batch in one graph run; each prediction is counted and offered to sample selection."""
        predictions = classify(classifier, images)
        for raw, prediction, name in zip(raws, predictions, names):
            if self.on_prediction is not None:
                try:
                    self.on_prediction(raw, prediction, name)
                except Exception:
                    log.exception("sample selection failed for an HTTP request")
            if self.metrics is not None:  # after selection: a count a scraper sees has its sample queued
                self.metrics.prediction(prediction, "http")
        return predictions


BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 17\r\n"
        b"Retry-After: 1\r\nConnection: close\r\n\r\n{\"error\": \"busy\"}")
HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 34\r\nConnection: close\r\n\r\n{\"error\": \"request head too large\"}")
MAX_HEAD = 32 * 1024  # request line and headers; a bearer token and a file name fit many times over


def _head_complete(data: bytes | bytearray) -> bool:
    """Whether the request line and headers have all arrived (http.server accepts bare LF line ends too)."""
    return b"\n\r\n" in data or b"\n\n" in data


class _Prefixed(io.RawIOBase):
    """A connection's bytes: first those the gate already read (the head), then the socket's."""

    def __init__(self, connection: socket.socket, prefix: bytes):
        self.connection, self.prefix = connection, memoryview(prefix)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.prefix:
            n = min(len(buffer), len(self.prefix))
            buffer[:n], self.prefix = self.prefix[:n], self.prefix[n:]
            return n
        return self.connection.recv_into(buffer)


class _Writer(io.BufferedIOBase):
    """Unbuffered writes that send everything (as socketserver's own writer does)."""

    def __init__(self, connection: socket.socket):
        self.connection = connection

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.connection.sendall(data)
        return len(data)


def _agent_version() -> str:
    try:
        return package_version("edgeloop")
    except PackageNotFoundError:
        return "unknown"


def endpoint_of(method: str, path: str) -> str:
    """A request's endpoint, as a metric label (a handful of values, whatever the path says)."""
    path = path.split("?", 1)[0].rstrip("/")
    if oip.is_v2(path):
        kind = oip.route(path).kind
        return "v2_infer" if kind == "infer" else "v2_health" if kind in ("live", "ready", "model_ready") \
            else "v2_metadata" if kind in ("server", "model") else "v2_unknown"
    if method == "POST":
        return "classify"
    return {"": "status", "/health": "status", "/status": "status", "/metrics": "metrics"}.get(path, "unknown")


def make_handler(classify_body: Classifier, status: Callable[[], dict[str, Any]], config: ServeConfig,
                 metrics: AgentMetrics):
    expected = f"Bearer {config.token}".encode() if config.token else None
    server_metadata = oip.server_metadata(_agent_version())

    class Handler(BaseHTTPRequestHandler):
        server_version = "edgeloop-agent"
        timeout = config.request_timeout_s  # every read and write of this connection
        protocol_version = "HTTP/1.0"  # one request per connection: a worker is never held by keep-alive

        def setup(self) -> None:
            self.connection, head = self.request  # the gate has read the head already
            self.connection.settimeout(self.timeout)
            self.rfile = io.BufferedReader(_Prefixed(self.connection, head))
            self.wfile = _Writer(self.connection)

        def _send(self, code: int, payload: dict[str, Any]) -> None:
            self._send_bytes(code, (json.dumps(payload, sort_keys=True) + "\n").encode(), "application/json")

        def _send_bytes(self, code: int, body: bytes, content_type: str) -> None:
            self.code = code
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if code == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self) -> bool:
            if expected is None:
                return True
            given = (self.headers.get("Authorization") or "").encode()
            if hmac.compare_digest(given, expected):
                return True
            self._send(401, {"error": "a valid bearer token is required"})
            return False

        def _content_length(self, limit: int, setting: str) -> int | None:
            """The declared body size, or None after answering why it cannot be accepted."""
            text = self.headers.get("Content-Length")
            if text is None:
                self._send(411, {"error": "Content-Length is required"})
                return None
            if not text.strip().isdigit():
                self._send(400, {"error": "Content-Length must be a non-negative integer"})
                return None
            length = int(text)
            if length > limit:
                self._send(413, {"error": f"too large: {length} bytes > limit {limit} ({setting})"})
                return None
            return length

        def _read_body(self, length: int) -> bytes | None:
            """The body, all of it within ``request_timeout_s`` (not per read: a client sending a byte at a
            time would hold a worker for ever); or None after answering why not."""
            deadline = time.monotonic() + config.request_timeout_s
            chunks, got = [], 0
            try:
                while got < length:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    self.connection.settimeout(left)
                    chunk = self.rfile.read1(min(65536, length - got))
                    if not chunk:
                        self._send(400, {"error": f"body ended after {got} of {length} bytes"})
                        return None
                    chunks.append(chunk)
                    got += len(chunk)
            except TimeoutError:
                self.connection.settimeout(self.timeout)
                self.close_connection = True
                self._send(408, {"error": f"body not received within {config.request_timeout_s:g} s "
                                          f"({got} of {length} bytes)"})
                return None
            self.connection.settimeout(self.timeout)
            return b"".join(chunks)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._answer(self._get)

        def do_POST(self) -> None:  # noqa: N802
            self._answer(self._post)

        def _answer(self, handle: Callable[[], None]) -> None:
            """Answer a request: authorised, errors as JSON (a request never takes the agent down), counted."""
            started, self.code = time.perf_counter(), 0
            try:
                if self._authorised():
                    handle()
            except (ServeError, oip.ProtocolError) as exc:
                self._send(exc.status, {"error": exc.reason})
            except Exception as exc:
                log.exception("request failed")
                self._send(500, {"error": f"{type(exc).__name__}: {exc}"})
            finally:
                metrics.request(endpoint_of(self.command, self.path), self.code, time.perf_counter() - started)

        def _get(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if oip.is_v2(path):
                self._v2_get(oip.route(path))
            elif path in ("", "/health", "/status"):
                self._send(200, status())
            elif path == "/metrics":
                self._send_bytes(200, *metrics.render(self.headers.get("Accept")))
            else:
                self._send(404, {"error": "not found"})

        def _post(self) -> None:
            where = oip.route(self.path) if oip.is_v2(self.path) else None
            if where is not None and where.kind != "infer":
                raise oip.ProtocolError(405 if where.kind != "unknown" else 404,
                                        f"{self.path[:100]} takes GET" if where.kind != "unknown" else "not found")
            limit, setting = ((config.max_batch_bytes, "serve.max_batch_bytes") if where is not None
                              else (classify_body.max_bytes, "serve.max_image_bytes"))
            length = self._content_length(limit, setting)
            if length is None:
                return
            body = self._read_body(length)
            if body is None:
                return
            if where is not None:
                self._v2_infer(where, body)
                return
            name = (self.headers.get("X-Filename") or self.path.rsplit("/", 1)[-1] or "upload")[:200]
            self._send(200, classify_body(body, name))

        def _v2_get(self, where: oip.Route) -> None:
            """The Open Inference Protocol's metadata and health endpoints (:mod:`edge_agent.oip`)."""
            if where.kind == "unknown":
                raise oip.ProtocolError(404, "not found")
            if where.kind == "infer":
                raise oip.ProtocolError(405, f"{self.path[:100]} takes POST")
            if where.kind == "server":
                self._send(200, server_metadata)
            elif where.kind == "live":
                self._send(200, {"live": True})
            elif where.kind == "ready":  # health answers: 200 when true, 4xx when false (the protocol's rule)
                ready = classify_body.handle.get() is not None
                self._send(200 if ready else 400, {"ready": ready})
            elif where.kind == "model_ready" and classify_body.handle.get() is None:
                self._send(400, {"name": where.model, "ready": False})
            else:
                classifier = classify_body.serving()
                oip.check_model(where, classifier)
                self._send(200, {"name": oip.MODEL_NAME, "ready": True} if where.kind == "model_ready"
                           else oip.model_metadata(classifier, config.max_batch))

        def _v2_infer(self, where: oip.Route, body: bytes) -> None:
            classifier = classify_body.serving()
            oip.check_model(where, classifier)
            limits = oip.Limits(classifier.image_size, config.max_batch, classify_body.max_bytes,
                                classify_body.max_pixels)
            batch = oip.parse_infer(body, self.headers.get("Inference-Header-Content-Length"), limits)
            predictions = classify_body.classify(classifier, batch.images, batch.raws, batch.names)
            probs = np.stack([p.probs for p in predictions])
            self._send(200, oip.infer_response(batch, probs, classifier.class_names, classifier.version))

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("http %s", format % args)

    return Handler


class Server(HTTPServer):
    """The HTTP endpoint: a gate thread for connections, a bounded pool for requests (see the module doc)."""

    request_queue_size = 128

    def __init__(self, config: ServeConfig, classify_body: Classifier, status: Callable[[], dict[str, Any]],
                 metrics: AgentMetrics | None = None):
        self.metrics = metrics or AgentMetrics(status)
        if classify_body.metrics is None:
            classify_body.metrics = self.metrics
        super().__init__((config.host, config.port), make_handler(classify_body, status, config, self.metrics))
        self.config = config
        self.pool = ThreadPoolExecutor(config.workers, thread_name_prefix="http")
        self.slots = threading.BoundedSemaphore(config.workers + config.max_queued)
        self.selector = selectors.DefaultSelector()
        self.waiting: dict[socket.socket, tuple[float, Any, bytearray]] = {}  # -> (deadline, address, head so far)
        self.closing: dict[socket.socket, float] = {}  # refused (503, 431), draining the request until this time
        self.stopping = threading.Event()
        self.gate = threading.Thread(target=self._gate, name="http-gate", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.server_address[:2]

    def start(self) -> "Server":
        self.socket.setblocking(False)
        self.selector.register(self.socket, selectors.EVENT_READ)
        self.gate.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.gate.join(5)
        self.pool.shutdown(wait=False, cancel_futures=True)
        for connection in [*self.waiting, *self.closing]:
            self._drop(connection)
        self.server_close()

    def _gate(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.selector.select(timeout=0.2):
                if key.fileobj is self.socket:
                    self._accept()
                elif key.fileobj in self.closing:
                    self._drain(key.fileobj)
                else:
                    self._receive(key.fileobj)
            self._expire(time.monotonic())

    def _accept(self) -> None:
        while len(self.waiting) < 10_000:  # drain the backlog, bounded
            try:
                connection, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: the gate goes on with what it has
                log.warning("accept failed: %s", exc)
                return
            if len(self.waiting) >= self.config.max_connections:
                self._drop(min(self.waiting, key=lambda c: self.waiting[c][0]))  # the one idle longest
            connection.setblocking(False)
            self.waiting[connection] = (time.monotonic() + self.config.header_timeout_s, address, bytearray())
            self.selector.register(connection, selectors.EVENT_READ)

    def _receive(self, connection: socket.socket) -> None:
        """A waiting connection sent bytes: keep them until its head is complete, then dispatch it."""
        _, address, head = self.waiting[connection]
        try:
            data = connection.recv(MAX_HEAD + 1 - len(head))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client hung up (or reset) before sending a whole request
            self._drop(connection)
            return
        head += data
        if len(head) > MAX_HEAD and not _head_complete(head):
            del self.waiting[connection]
            self._refuse(connection, HEAD_TOO_LARGE)
        elif _head_complete(head):
            del self.waiting[connection]
            self._dispatch(connection, address, bytes(head))

    def _dispatch(self, connection: socket.socket, address: Any, head: bytes) -> None:
        """A whole request head has arrived: hand it to a worker, or answer busy when all are taken."""
        if not self.slots.acquire(blocking=False):
            self._refuse(connection, BUSY)
            return
        self.selector.unregister(connection)
        connection.setblocking(True)
        connection.settimeout(self.config.request_timeout_s)
        self.pool.submit(self._work, connection, address, head)

    def _refuse(self, connection: socket.socket, answer: bytes) -> None:
        """Answer (503, 431) and close gracefully: the unread request is drained first, for closing a socket
        with unread data sends a reset, and the client would see a broken connection instead of the answer.
        At most ``max_connections`` are draining; beyond, the oldest is closed at once."""
        try:
            connection.send(answer)  # small: fits the empty send buffer of a fresh connection
            connection.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(connection)
            return
        if len(self.closing) >= self.config.max_connections:
            self._drop(min(self.closing, key=self.closing.__getitem__))
        self.closing[connection] = time.monotonic() + 2.0

    def _drain(self, connection: socket.socket) -> None:
        try:
            if connection.recv(65536):
                return
        except OSError:
            pass
        self._drop(connection)

    def _work(self, connection: socket.socket, address: Any, head: bytes) -> None:
        try:
            self.finish_request((connection, head), address)
        except Exception as exc:  # timeouts and resets: this client's problem only
            log.debug("http request from %s ended: %s", address, exc)
        finally:
            self.shutdown_request(connection)
            self.slots.release()

    def _expire(self, now: float) -> None:
        late = [c for c, (deadline, _, _) in self.waiting.items() if deadline < now]
        for connection in late + [c for c, deadline in self.closing.items() if deadline < now]:
            self._drop(connection)

    def _drop(self, connection: socket.socket) -> None:
        self.waiting.pop(connection, None)
        self.closing.pop(connection, None)
        try:
            self.selector.unregister(connection)
        except (KeyError, ValueError):
            pass
        connection.close()
