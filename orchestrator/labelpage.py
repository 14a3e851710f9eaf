"""``edgeloop label``: a small local web page that works through the labelling queue, one sample at a time.

It shows the sample, what the site's served model said (the ensemble's probabilities and each member's),
and why the site sent it; a click or a key (1..9 for the classes, d to discard) saves the answer at once
and brings the next one. Nothing here needs a build step or a browser extension: one HTML page, one form.

Its answers become training labels, so it trusts no one by default: a request whose ``Host`` is not one it
serves under is refused (DNS rebinding), a form post must carry the page's CSRF token and, when the browser
says where it comes from, come from the page's own origin; off loopback a token is required (given once as
``?token=...``, then kept in a cookie). The store is read at most once per ``cache_s``, not per request.
An answer is taken only for a sample the page knows from the store (a post naming any other is refused, 404);
a labels database that does not read answers 503 with why, and nothing is saved.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import logging
import secrets
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from orchestrator.labelling import LabelError, LabelQueue, Pending, RecordError
from orchestrator.samples import Sample

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:860px;color:#1b1f24}
.card{display:flex;gap:2rem;align-items:flex-start}
img{width:320px;height:320px;image-rendering:pixelated;border:1px solid #ccc;background:#000}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}
button{font-size:1.1rem;margin:.3rem .4rem .3rem 0;padding:.5rem 1rem;cursor:pointer}
.discard{background:#eee}.muted{color:#666}kbd{border:1px solid #bbb;border-radius:3px;padding:0 .3rem}
"""


COOKIE = "edgeloop_label_token"
log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class CachedSamples:
    """``load()`` at most once per ``ttl_s`` (the store is listed and read once for many page views).

    Only the first call waits for a load: later, an expired value is still answered while one background thread
    loads the next (a page view never waits on the store, however many samples it holds). A failed background
    load keeps the last value and is tried again at the next expiry (and logged)."""

    def __init__(self, load: Callable[[], list[Sample]], ttl_s: float):
        self.load, self.ttl_s = load, ttl_s
        self._lock = threading.Lock()
        self._value: list[Sample] | None = None
        self._at = 0.0
        self._refreshing = False

    def __call__(self) -> list[Sample]:
        with self._lock:
            if self._value is None:
                self._value, self._at = self.load(), time.monotonic()
            elif time.monotonic() - self._at >= self.ttl_s and not self._refreshing:
                self._refreshing = True
                threading.Thread(target=self._refresh, daemon=True, name="labelpage-refresh").start()
            return self._value

    def _refresh(self) -> None:
        try:
            value = self.load()
        except Exception:  # noqa: BLE001 - the page keeps what it has; the next expiry tries again
            log.exception("reading the store's samples failed; the page shows the last ones read")
            value = None
        with self._lock:
            if value is not None:
                self._value = value
            self._at, self._refreshing = time.monotonic(), False


def create_app(queue: LabelQueue, load_samples: Callable[[], list[Sample]], hosts: list[str] | None = None,
               token: str | None = None, cache_s: float = 5.0) -> FastAPI:
    """The page over ``queue``; ``load_samples`` reads the checked samples (cached for ``cache_s``).

    ``hosts``: the names the page answers under (default: loopback names only); ``token``: required on every
    request when given (``edgeloop label`` requires one off loopback).
    """
    app = FastAPI(title="edgeloop labelling queue")
    allowed = {h.lower() for h in (hosts or ["127.0.0.1", "localhost", "::1"])}
    csrf = secrets.token_urlsafe(24)
    load_samples = CachedSamples(load_samples, cache_s)

    @app.exception_handler(RecordError)
    async def unreadable(request: Request, exc: RecordError) -> PlainTextResponse:
        return PlainTextResponse(str(exc), status_code=503)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = (request.headers.get("host") or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name.strip("[]") not in {h.strip("[]") for h in allowed}:
            return PlainTextResponse(f"unknown Host {host!r}", status_code=400)
        if token is not None:
            given = request.query_params.get("token") or request.cookies.get(COOKIE) or \
                request.headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return PlainTextResponse("a token is required (open the page as /?token=...)", status_code=401)
        if request.method == "POST":
            origin = request.headers.get("origin") or request.headers.get("referer")
            if origin and urlsplit(origin).netloc.lower() != host:
                return PlainTextResponse(f"cross-origin post from {origin!r} refused", status_code=403)
        response = await call_next(request)
        if token is not None and request.query_params.get("token"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    def pending() -> list[Pending]:
        return queue.pending(load_samples())

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        waiting = pending()
        done = queue.count()
        if not waiting:
            return _html("<h1>Nothing to label</h1>"
                         f"<p class=muted>{done} answered so far; new samples appear as the sites send them.</p>")
        return _html(_card(waiting[0], queue.classes, len(waiting), done, csrf))

    @app.get("/image/{sha256}")
    def image(sha256: str) -> Response:
        sample = next((s for s in load_samples() if s.sha256 == sha256), None)
        if sample is None:
            raise HTTPException(404, "no such sample")
        return Response(sample.image, media_type="image/png")

    @app.post("/label")
    async def label(request: Request) -> RedirectResponse:
        form = {k: v[-1] for k, v in parse_qs((await request.body()).decode(errors="replace")).items()}
        if not hmac.compare_digest(form.get("csrf", "").encode(), csrf.encode()):
            raise HTTPException(403, "the form's CSRF token is missing or stale; reload the page")
        sha = form.get("sha256", "")
        if sha not in {s.sha256 for s in await run_in_threadpool(load_samples)}:
            raise HTTPException(404, f"no checked sample {sha[:80]!r} in the store: nothing saved")
        try:
            await run_in_threadpool(queue.set, sha, form.get("label"), discard=form.get("action") == "discard")
        except LabelError as exc:
            raise HTTPException(400, str(exc)) from None
        return RedirectResponse("/", status_code=303)

    @app.get("/api/queue")
    def status() -> dict:
        waiting = pending()
        return {"pending": len(waiting), "answered": queue.count(),
                "next": waiting[0].sha256 if waiting else None}

    return app


def _card(item: Pending, classes: list[str], waiting: int, done: int, csrf: str) -> str:
    s = item.sample.sidecar
    probs = s.get("probabilities") or {}
    members = s.get("member_probabilities") or []
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{probs.get(c, 0):.3f}</td>"
                   + "".join(f"<td>{m[i]:.3f}</td>" for m in members if i < len(m)) + "</tr>"
                   for i, c in enumerate(classes))
    head = "<tr><th>class</th><th>ensemble</th>" + "".join(f"<th>member {k}</th>" for k in range(len(members)))
    buttons = "".join(f'<button name="label" value="{html.escape(c)}" data-key="{k + 1}">'
                      f"<kbd>{k + 1}</kbd> {html.escape(c)}</button>" for k, c in enumerate(classes))
    reasons = ", ".join(s.get("reasons") or []) or "–"
    return f"""
<h1>Label a sample <span class=muted>({waiting} waiting, {done} answered)</span></h1>
<div class=card>
  <img id=sample src="/image/{item.sha256}" alt="sample {item.sha256[:12]}">
  <div>
    <p><b>site</b> {html.escape(item.sample.site)} · <b>model</b> {html.escape(str(s.get('model_version') or '–'))}</p>
    <p><b>why it was sent</b> {html.escape(reasons)}
       (uncertainty {s.get('uncertainty') or 0:.2f}, disagreement {s.get('disagreement') or 0:.2f})</p>
    <p><b>the model said</b> <span id=prediction>{html.escape(item.prediction or '–')}</span></p>
    <table>{head}</tr>{rows}</table>
    <form id=answer method=post action="/label">
      <input type=hidden name=sha256 value="{item.sha256}">
      <input type=hidden name=csrf value="{csrf}">
      {buttons}
      <button class=discard name=action value=discard data-key=d><kbd>d</kbd> discard</button>
    </form>
  </div>
</div>
<script>
document.addEventListener("keydown", e => {{
  const b = document.querySelector(`#answer button[data-key="${{e.key}}"]`);
  if (b) {{ e.preventDefault(); b.click(); }}
}});
</script>"""


def _html(body: str) -> str:
    return f"<!doctype html><html><head><meta charset=utf-8><title>edgeloop · labelling</title>" \
           f"<style>{STYLE}</style></head><body>{body}</body></html>"
