"""The labelling queue: the library, Label Studio files, and the web page in a real headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from agent_helpers import free_port, wait_for_url

from edge_agent.datasets import open_dataset
from edge_agent.store import Store
from orchestrator.labelling import LabelError, LabelQueue, label_studio_config
from orchestrator.samples import build_retraining_set, collect_samples

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["functional", "defective"]
ARTIFACTS = Path(os.environ.get("EDGELOOP_TEST_ARTIFACTS", REPO / "test-artifacts"))


def _store_with_samples(root: Path, elpv_small: Path, n: int = 4) -> Store:
    """A file store holding ``n`` real ELPV images as samples from site-1, the first with an operator label."""
    dataset = open_dataset(elpv_small / "sites" / "site-1")
    folder = root / "samples" / "site-1"
    folder.mkdir(parents=True)
    for i, record in enumerate(dataset.records[:n]):
        image = (dataset.root / record["file"]).read_bytes()
        sha = hashlib.sha256(image).hexdigest()
        (folder / f"{sha}.png").write_bytes(image)
        sidecar = {"site": "site-1", "time": 1000.0 + i, "reasons": ["uncertain"], "model_version": "v7",
                   "probabilities": {"functional": 0.45 + 0.01 * i, "defective": 0.55 - 0.01 * i},
                   "member_probabilities": [[0.4, 0.6], [0.5 + 0.02 * i, 0.5 - 0.02 * i]],
                   "uncertainty": 0.99 - 0.01 * i, "disagreement": 0.1,
                   "operator_label": "defective" if i == 0 else None}
        (folder / f"{sha}.json").write_text(json.dumps(sidecar))
    (root / "exams").mkdir()  # site-1 published its exam list (without one its samples are held)
    (root / "exams" / "site-1.json").write_text(json.dumps({"site": "site-1", "sha256": [], "phash": []}))
    return Store(root.as_uri())


def test_queue_orders_saves_and_labels_the_retraining_set(tmp_path, elpv_small):
    samples = collect_samples(_store_with_samples(tmp_path / "store", elpv_small)).accepted
    queue = LabelQueue(tmp_path / "registry", CLASSES)
    pending = queue.pending(samples)
    assert len(pending) == 3  # the operator-labelled one is not asked about
    assert [p.score for p in pending] == sorted((p.score for p in pending), reverse=True)
    queue.set(pending[0].sha256, "defective")
    queue.set(pending[1].sha256, None, discard=True)
    with pytest.raises(LabelError, match="unknown class"):
        queue.set(pending[2].sha256, "cracked")
    assert [p.sha256 for p in queue.pending(samples)] == [pending[2].sha256]
    assert queue(pending[0].sample) == 1 and queue(pending[1].sample) is None
    report, unlabelled = build_retraining_set(open_dataset(elpv_small / "generic"), samples, queue,
                                              tmp_path / "retrain")
    added = [r for r in open_dataset(tmp_path / "retrain").records if r["file"].split("/")[-1].startswith("sample-")]
    assert unlabelled == 3 and [r["label"] for r in added] == [1]  # only what a person labelled went in


def test_label_studio_round_trip(tmp_path, elpv_small):
    samples = collect_samples(_store_with_samples(tmp_path / "store", elpv_small)).accepted
    queue = LabelQueue(tmp_path / "registry", CLASSES)
    assert queue.export_label_studio(samples, tmp_path / "tasks.json") == 3
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    png = base64.b64decode(tasks[0]["data"]["image"].split(",", 1)[1])
    assert hashlib.sha256(png).hexdigest() == tasks[0]["data"]["sha256"]
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == ["defective"]
    tasks[0]["annotations"] = [{"result": [{"value": {"choices": ["functional"]}}]}]
    tasks[1]["annotations"] = [{"was_cancelled": True, "result": [{"value": {"choices": ["defective"]}}]}]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    assert queue.import_label_studio(tmp_path / "export.json") == 1
    assert queue.labels()[tasks[0]["data"]["sha256"]]["label"] == "functional"
    with pytest.raises(LabelError, match="not a Label Studio"):
        (tmp_path / "broken.json").write_text("{oops")
        queue.import_label_studio(tmp_path / "broken.json")
    assert '<Choice value="defective"/>' in label_studio_config(CLASSES)


@pytest.fixture
def label_page(tmp_path, elpv_small):
    """``edgeloop label`` as a real subprocess on a free port, over a store with samples."""
    _store_with_samples(tmp_path / "store", elpv_small)
    inventory = tmp_path / "fleet.yaml"
    inventory.write_text(f"""
cloud: {{store_url: "{(tmp_path / 'store').as_uri()}", registry: "{tmp_path / 'registry'}"}}
defaults: {{connection: {{type: local}}}}
sites: [{{name: site-1, root: "{tmp_path / 'site-1'}"}}]
""")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgeloop", "label", "-i", str(inventory),
                             "--classes", ",".join(CLASSES), "--port", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for_url(url + "/api/queue", proc, "edgeloop label", timeout=60)
    yield url, tmp_path
    proc.terminate()
    proc.wait(10)


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("chromium and chromium-driver are missing: `apt-get install -y chromium chromium-driver` "
                    "(make test does this)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,700"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_page_labels_by_key_and_click_and_the_label_reaches_retraining(label_page, elpv_small):
    from selenium.webdriver.common.by import By

    url, home = label_page
    queue = json.loads(urllib.request.urlopen(url + "/api/queue").read())
    assert queue["pending"] == 3
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser = _browser()
    try:
        browser.get(url)
        first = browser.find_element(By.NAME, "sha256").get_attribute("value")
        assert first == queue["next"] and browser.find_element(By.ID, "prediction").text == "defective"
        assert browser.execute_script("const i = document.getElementById('sample'); "
                                      "return i.complete && i.naturalWidth") > 0  # the image really loads
        browser.save_screenshot(str(ARTIFACTS / "labelling-page.png"))
        second = _answer(browser, lambda: browser.find_element(By.TAG_NAME, "body").send_keys("2"))  # key 2
        third = _answer(browser, lambda: browser.find_element(By.CSS_SELECTOR, 'button[value="functional"]').click())
        assert third not in (first, second, None)
        assert _answer(browser, lambda: browser.find_element(By.CSS_SELECTOR, 'button[value="discard"]').click()) \
            is None  # nothing left: the page says so
        browser.save_screenshot(str(ARTIFACTS / "labelling-done.png"))
    finally:
        browser.quit()
    labels = LabelQueue(home / "registry", CLASSES).labels()
    assert labels[first]["label"] == "defective" and labels[second]["label"] == "functional"
    samples = collect_samples(Store((home / "store").as_uri())).accepted
    build_retraining_set(open_dataset(elpv_small / "generic"), samples, LabelQueue(home / "registry", CLASSES),
                         home / "retrain")
    added = {r["file"].split("/")[-1][len("sample-site-1-"):-4]: r["label"]
             for r in open_dataset(home / "retrain").records if "/sample-" in r["file"]}
    assert added == {first[:16]: 1, second[:16]: 0}


def _current(browser) -> str | None:
    """The sample on the page, or None on the "Nothing to label" page; raises while the page is loading."""
    from selenium.webdriver.common.by import By

    if "Nothing to label" in browser.find_element(By.TAG_NAME, "h1").text:
        return None
    return browser.find_element(By.NAME, "sha256").get_attribute("value")


def _answer(browser, act) -> str | None:
    """Answer the sample on the page with ``act`` and wait for the next page; returns its sample."""
    from selenium.webdriver.support.ui import WebDriverWait

    before = _current(browser)
    act()

    def moved_on(driver) -> bool:
        try:
            return _current(driver) != before
        except Exception:  # the old page is gone and the new one not there yet
            return False

    WebDriverWait(browser, 15).until(moved_on, "the page did not move on to the next sample")
    return _current(browser)


def test_a_bad_inventory_or_label_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "edgeloop", "label", "-i", str(tmp_path / "none.yaml")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "none.yaml" in result.stderr
    queue = LabelQueue(tmp_path, CLASSES)
    with pytest.raises(LabelError, match="not a sample id"):
        queue.set("../../etc/passwd", "defective")


def test_collect_takes_only_new_samples_and_pseudo_labels_the_sure_ones(tmp_path, elpv_small):
    from orchestrator.collect import collect_new

    store = _store_with_samples(tmp_path / "store", elpv_small, n=4)
    folder = tmp_path / "store" / "samples" / "site-1"
    sure = sorted(folder.glob("*.json"))[-1]  # make one sample sure, with its members agreeing
    sidecar = json.loads(sure.read_text())
    sidecar.update(operator_label=None, probabilities={"functional": 0.02, "defective": 0.98},
                   member_probabilities=[[0.03, 0.97], [0.01, 0.99]])
    sure.write_text(json.dumps(sidecar))
    queue = LabelQueue(tmp_path / "registry", CLASSES)
    first = collect_new(store, tmp_path / "registry", queue, confidence=0.95)
    assert len(first.new) == 4 and first.operator_labelled == 1 and first.pseudo_labelled == 1
    assert first.queued == 2 and queue.labels()[sure.stem] == {**queue.labels()[sure.stem], "label": "defective",
                                                               "by": "pseudo"}
    again = collect_new(store, tmp_path / "registry", queue, confidence=0.95)
    assert again.new == [] and again.pseudo_labelled == 0  # the watermark: nothing is collected twice
    _store_with_samples(tmp_path / "late", elpv_small, n=6)  # two older samples a site uploads late
    for path in (tmp_path / "late" / "samples" / "site-1").iterdir():
        if not (folder / path.name).exists():
            path.replace(folder / path.name)
    assert len(collect_new(store, tmp_path / "registry", queue, confidence=0.95).new) == 2


def test_a_hostile_label_studio_file_changes_nothing_and_says_why(tmp_path, elpv_small):
    """One good task, then a task that is not an object and one with an unknown class: the whole file is
    refused before anything is written, with one error naming the tasks."""
    samples = collect_samples(_store_with_samples(tmp_path / "store", elpv_small)).accepted
    queue = LabelQueue(tmp_path / "registry", CLASSES)
    good = {"data": {"sha256": samples[0].sha256}, "annotations": [{"result": [{"value": {"choices": ["defective"]}}]}]}
    unknown = {"data": {"sha256": samples[1].sha256}, "annotations": [{"result": [{"value": {"choices": ["cat"]}}]}]}
    (tmp_path / "hostile.json").write_text(json.dumps([good, "not a task", unknown, 7]))
    with pytest.raises(LabelError) as refused:
        queue.import_label_studio(tmp_path / "hostile.json")
    message = str(refused.value)
    assert "nothing imported; 3 task(s) refused" in message and "task 2: not an object" in message
    assert "task 3: unknown class 'cat'" in message and "task 4: not an object" in message
    assert queue.labels() == {}
    (tmp_path / "good.json").write_text(json.dumps([good]))
    assert queue.import_label_studio(tmp_path / "good.json") == 1


def test_the_page_refuses_an_unknown_host_a_cross_origin_post_and_a_post_without_its_token(label_page):
    import re
    import urllib.error

    url, home = label_page

    def request(path, data=None, **headers):
        try:
            with urllib.request.urlopen(urllib.request.Request(url + path, data=data, headers=headers)) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    assert request("/", Host="evil.example")[0] == 400  # DNS rebinding: another name for this address
    status, page = request("/")
    assert status == 200
    sha = re.search(r'name=sha256 value="([0-9a-f]{64})"', page).group(1)
    csrf = re.search(r'name=csrf value="([^"]+)"', page).group(1)
    form = f"sha256={sha}&label=defective&csrf={csrf}".encode()
    assert request("/label", form, Origin="http://evil.example")[0] == 403
    assert request("/label", f"sha256={sha}&label=defective".encode())[0] == 403  # no CSRF token
    assert sha not in LabelQueue(home / "registry", CLASSES).labels()
    assert request("/label", form, Origin=url)[0] == 200  # its own origin: saved, then the next page
    assert sha in LabelQueue(home / "registry", CLASSES).labels()


def test_off_loopback_the_page_needs_a_token(tmp_path):
    inventory = tmp_path / "fleet.yaml"
    inventory.write_text(f"""
cloud: {{store_url: "{(tmp_path / 'store').as_uri()}", registry: "{tmp_path / 'registry'}"}}
defaults: {{connection: {{type: local}}}}
sites: [{{name: site-1, root: "{tmp_path / 'site-1'}"}}]
""")
    env = {k: v for k, v in os.environ.items() if k != "EDGELOOP_LABEL_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "edgeloop", "label", "-i", str(inventory), "--classes",
                             ",".join(CLASSES), "--host", "0.0.0.0", "--port", "1"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "off loopback: set a token in $EDGELOOP_LABEL_TOKEN" in result.stderr
