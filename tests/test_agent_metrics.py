"""``GET /metrics`` of a real agent process, parsed with prometheus_client's own parser: the values move with real
predictions (inbox and HTTP, one image and v2 batches), quarantined files, and uploads that fail while the store is
broken and go through once it is back; the token rule of ``/status`` holds. Fine-tune and gate counting is shown on
the agent's metrics object with the report shapes a fine-tune writes (a real fine-tune is tested elsewhere)."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from agent_helpers import AgentProcess, free_port, serving_site, wait_for, write_config
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.layout import AgentPaths
from edge_agent.metrics import AgentMetrics

SIZE = 32
TOKEN = "m3trics-t0ken"


def png(seed: int, size: int = 40) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


class Scrape:
    """One scrape, parsed by prometheus_client's parser: samples by name, summed over matching labels."""

    def __init__(self, text: str):
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def labels(self, name: str, key: str) -> set[str]:
        return {s.labels[key] for s in self.samples if s.name == name}


def scrape(port: int, token: str | None = TOKEN) -> Scrape:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape(answer.read().decode())


def post(port: int, path: str, body: bytes) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.status


def test_a_real_agents_metrics_move_with_its_work(tmp_path):
    port, root, store = free_port(), tmp_path / "agent", tmp_path / "store"
    serving_site(root, SIZE)
    store.write_text("not a folder: every upload fails until this is gone")  # the fault, injected on purpose
    config = write_config(root, store.as_uri(), image_size=SIZE, serve={"port": port, "token": TOKEN},
                          upload={"random_share": 1.0, "retry_base_s": 0.2, "retry_max_s": 0.5})
    agent = AgentProcess(config)
    try:
        def up() -> Scrape | None:
            try:
                return scrape(port)
            except OSError:
                return None
        first = wait_for(up, 60, "the metrics endpoint", agent)
        with pytest.raises(urllib.error.HTTPError) as refused:  # the same token rule as /status
            scrape(port, token=None)
        assert refused.value.code == 401
        assert first.value("edgeloop_predictions_total") == 0 and first.value("edgeloop_status_ok") == 1
        assert first.labels("edgeloop_agent_info", "site") == {"site-1"}

        inbox = AgentPaths(root).inbox
        for i in range(4):
            (inbox / f"cell-{i}.png").write_bytes(png(i))
        (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        assert [post(port, "/classify", png(10 + i)) for i in range(3)] == [200] * 3
        batch = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                             "data": [base64.b64encode(png(20 + i)).decode() for i in range(2)]}]}
        assert post(port, "/v2/models/ensemble/infer", json.dumps(batch).encode()) == 200

        def inbox_done() -> Scrape | None:
            s = scrape(port)
            done = (s.value("edgeloop_predictions_total", source="inbox") == 4, s.value("edgeloop_quarantine_files") == 1,
                    s.value("edgeloop_inbox_processed_total") == 4, s.value("edgeloop_upload_error") == 1,
                    s.value("edgeloop_sample_uploads_total", result="failed") >= 1)
            return s if all(done) else None
        s = wait_for(inbox_done, 60, "the inbox classified and an upload failed", agent)
        assert s.value("edgeloop_predictions_total", source="http") == 5  # 3 one-image POSTs + a batch of 2
        assert s.labels("edgeloop_predictions_total", "model_version") == {"v1"}
        assert s.labels("edgeloop_predictions_total", "class") <= {"functional", "defective"}
        assert s.value("edgeloop_inference_seconds_count", source="inbox") == 4
        assert s.value("edgeloop_inference_seconds_count", source="http") == 5
        assert s.value("edgeloop_inference_seconds_sum") > 0
        assert s.value("edgeloop_http_requests_total", endpoint="classify", code="200") == 3
        assert s.value("edgeloop_http_requests_total", endpoint="v2_infer", code="200") == 1
        assert s.value("edgeloop_http_requests_total", endpoint="metrics", code="401") == 1
        assert s.value("edgeloop_http_request_seconds_count", endpoint="classify") == 3
        assert s.value("edgeloop_inbox_processed_total") == 4 and s.value("edgeloop_inbox_quarantined_total") == 1
        assert s.value("edgeloop_store_consecutive_failures") >= 1 and s.value("edgeloop_upload_error") == 1
        assert s.value("edgeloop_outbox_samples") >= 1 and s.value("edgeloop_outbox_bytes") > 0
        assert s.value("edgeloop_sample_uploads_total", result="uploaded") == 0
        assert 0 <= s.value("edgeloop_heartbeat_age_seconds") < 10
        assert s.value("edgeloop_inbox_files") == 0 and s.value("edgeloop_finetune_running") == 0

        store.unlink()  # the store comes back: what waited goes up, and the failure gauges fall
        waiting = s.value("edgeloop_outbox_samples")

        def drained() -> Scrape | None:
            s = scrape(port)
            return s if s.value("edgeloop_outbox_samples") == 0 and s.value("edgeloop_upload_error") == 0 else None
        after = wait_for(drained, 60, "the outbox drained to the store", agent)
        uploaded = after.value("edgeloop_sample_uploads_total", result="uploaded")
        assert uploaded == waiting == after.value("edgeloop_samples_uploaded_total") == len(list(
            (store / "samples" / "site-1").glob("*.json")))
        assert after.value("edgeloop_store_consecutive_failures") == 0
        assert after.value("edgeloop_predictions_total") == 9  # the scrapes themselves classify nothing
        assert agent.terminate() == 0
    finally:
        agent.close()
    log = (root / "agent.log").read_text()
    assert TOKEN not in log and "Traceback" not in log  # no step of the loop failed on the way


def test_finetunes_and_gate_decisions_are_counted_by_outcome(tmp_path):
    """The report shapes edge_agent.finetune writes (an activated run, a kept one with its gate, a skipped one)
    and the exits without one (failed, fenced), through the hooks the daemon calls."""
    from edge_agent.activation import EXIT_FENCED

    metrics = AgentMetrics(lambda: {"site": "s", "queues": {"inbox": 2, "outbox": 1, "outbox_bytes": 10}},
                           tmp_path / "status.json", tmp_path / "quarantine")
    gate = {"accept": True, "reason": "p=0.01 <= alpha", "n": 40}
    metrics.finetune_ended(0, {"run_id": "a", "activated": True, "gate": gate, "seconds": 95.0})
    metrics.finetune_ended(0, {"run_id": "b", "activated": False, "gate": {**gate, "accept": False}, "seconds": 700})
    metrics.finetune_ended(0, {"run_id": "c", "activated": False, "skipped": "too few", "gate": None, "seconds": 2})
    metrics.finetune_ended(1, None)
    metrics.finetune_ended(EXIT_FENCED, None)
    metrics.gate("shadow", {"accept": False})
    metrics.gate("shadow", None)  # nothing to judge: no decision
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")  # what the scraper asked for
    s = Scrape(metrics.render(None)[0].decode())
    assert {o: s.value("edgeloop_finetunes_total", outcome=o) for o in ("activated", "kept", "skipped", "failed",
                                                                         "fenced")} == dict.fromkeys(
        ("activated", "kept", "skipped", "failed", "fenced"), 1)
    assert s.value("edgeloop_finetune_seconds_count") == 3 and s.value("edgeloop_finetune_seconds_sum") == 797
    assert s.value("edgeloop_finetune_seconds_bucket", le="120.0") == 2
    assert s.value("edgeloop_gate_decisions_total", kind="finetune", outcome="accept") == 1
    assert s.value("edgeloop_gate_decisions_total", kind="finetune", outcome="keep") == 1
    assert s.value("edgeloop_gate_decisions_total", kind="shadow") == 1
    assert s.value("edgeloop_inbox_files") == 2 and "edgeloop_heartbeat_age_seconds" not in s.families


def test_a_failing_status_still_gives_a_scrape():
    def broken() -> dict:
        raise OSError("disk gone")

    metrics = AgentMetrics(broken)
    s = Scrape(metrics.render(None)[0].decode())
    assert s.value("edgeloop_status_ok") == 0 and "edgeloop_predictions" in s.families
