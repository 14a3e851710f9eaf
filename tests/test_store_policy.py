"""Each site speaks only for itself: with the per-site S3 policy (orchestrator.storepolicy) on a real S3 API
(moto's server, signatures and IAM policies checked), a site's own credentials write its samples, heartbeat and
exam list and read the labels that come home to it, and cannot write another site's exam list or heartbeat."""

from __future__ import annotations

import json

import pytest

from edge_agent.store import Store, StoreError
from orchestrator.s3local import local_s3
from orchestrator.storepolicy import site_s3_policy


@pytest.fixture(scope="module")
def s3():
    with local_s3() as server:
        yield server


def as_site(s3, monkeypatch, site: str) -> Store:
    for name, value in s3.add_user(f"site-{site}", site_s3_policy(s3.url, site)).items():
        monkeypatch.setenv(name, value)
    return Store(s3.url, s3.options())


def test_a_site_writes_only_under_its_own_paths(s3, monkeypatch):
    for name, value in s3.env().items():  # the cloud's credentials: it writes the labels that go home
        monkeypatch.setenv(name, value)
    Store(s3.url, s3.options()).put_verified("labels/a.json", json.dumps({"site": "a", "labels": []}).encode())
    store = as_site(s3, monkeypatch, "a")
    sha = "0" * 64
    assert store.put_verified(f"samples/a/{sha}.png", b"image")
    assert store.put_verified("status/a.json", b'{"site": "a"}')
    assert store.put_verified("exams/a.json", b'{"site": "a", "sha256": []}')
    assert json.loads(store.read("labels/a.json", max_bytes=1000))["site"] == "a"
    for foreign in ("exams/b.json", "status/b.json", f"samples/b/{sha}.png", "labels/a.json"):
        with pytest.raises(StoreError, match="(?i)denied|forbidden|403"):
            store.put_verified(foreign, b'{"site": "b"}')
    with pytest.raises((StoreError, PermissionError, FileNotFoundError)):
        store.read("labels/b.json", max_bytes=1000)
