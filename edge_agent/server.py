"""A local HTTP endpoint: POST an image, get back the same JSON the inbox writes.

stdlib only (``http.server`` in a daemon thread): nothing to install on an edge board. It serves through
the same :class:`EnsembleHandle` as the inbox, so an activation is picked up by the next request.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np

from edge_agent.imaging import ImageError, decode_image
from edge_agent.serving import EnsembleHandle, Prediction, classify

log = logging.getLogger(__name__)


class ServeError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class Classifier:
    """What a request needs: decode, classify, hand the prediction to sample selection."""

    def __init__(self, handle: EnsembleHandle, max_bytes: int,
                 on_prediction: Callable[[bytes, Prediction, str], None] | None = None):
        self.handle, self.max_bytes, self.on_prediction = handle, max_bytes, on_prediction

    def __call__(self, body: bytes, name: str) -> dict[str, Any]:
        classifier = self.handle.get()
        if classifier is None:
            raise ServeError(503, "no active model")
        try:
            image = decode_image(body, classifier.image_size, self.max_bytes)
        except ImageError as exc:
            raise ServeError(413 if "too large" in str(exc) else 400, str(exc)) from None
        prediction = classify(classifier, image[np.newaxis])[0]
        if self.on_prediction is not None:
            try:
                self.on_prediction(body, prediction, name)
            except Exception:
                log.exception("sample selection failed for an HTTP request")
        return prediction.as_result(name)


def make_handler(classify_body: Classifier, status: Callable[[], dict[str, Any]]):
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgeloop-agent"

        def _send(self, code: int, payload: dict[str, Any]) -> None:
            body = (json.dumps(payload, sort_keys=True) + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") in ("", "/health", "/status"):
                self._send(200, status())
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if length > classify_body.max_bytes:
                self._send(413, {"error": f"too large: {length} bytes > limit {classify_body.max_bytes}"})
                return
            body = self.rfile.read(length)
            name = self.headers.get("X-Filename") or self.path.rsplit("/", 1)[-1] or "upload"
            try:
                self._send(200, classify_body(body, name))
            except ServeError as exc:
                self._send(exc.status, {"error": exc.reason})
            except Exception as exc:  # a request must never take the agent down
                log.exception("request failed")
                self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("http %s", format % args)

    return Handler


class Server:
    """The HTTP endpoint running in a background thread."""

    def __init__(self, host: str, port: int, classify_body: Classifier, status: Callable[[], dict[str, Any]]):
        self.httpd = ThreadingHTTPServer((host, port), make_handler(classify_body, status))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    def start(self) -> "Server":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
