"""The Open Inference Protocol (v2) endpoints, called with plain HTTP in the protocol's documented JSON shape (and
its binary tensor data extension) against the real server and a real onnxruntime ensemble: metadata, health, batch
inference equal to the one-image POST's answers, and every kind of bad input a clear 4xx that disturbs nothing."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest
from agent_helpers import serving_site
from PIL import Image

from edge_agent.config import ServeConfig
from edge_agent.imaging import decode_image
from edge_agent.layout import AgentPaths
from edge_agent.onnx_model import OnnxClassifier
from edge_agent.server import Classifier, Server
from edge_agent.serving import EnsembleHandle

SIZE = 32
INFER = "/v2/models/ensemble/infer"


def png(seed: int, size: int = 40) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> AgentPaths:
    return serving_site(tmp_path_factory.mktemp("site"), SIZE)


@pytest.fixture(scope="module")
def served(site):
    """A server with small limits (4 images a batch, 1 Mpx an image), and what it handed to sample selection."""
    selected: list[tuple[str, str]] = []
    config = ServeConfig(port=1, max_batch=4, max_image_pixels=1_000_000, max_batch_bytes=3_000_000,
                         token="t0k").model_copy(update={"port": 0})
    handle = EnsembleHandle(site.active_link, image_size=SIZE)
    on_prediction = lambda raw, prediction, name: selected.append((name, prediction.label))  # noqa: E731
    server = Server(config, Classifier(handle, config.max_image_bytes, on_prediction, config.max_image_pixels),
                    lambda: {"ok": True}).start()
    yield server.address[1], selected
    server.stop()


def call(port: int, path: str, body: dict | bytes | None = None, headers: dict | None = None,
         token: str | None = "t0k") -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={**({"Authorization": f"Bearer {token}"} if token else {}),
                                              "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def bytes_request(files: list[bytes], **extra) -> dict:
    return {"id": "req-1", "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [len(files)],
                                       "data": [base64.b64encode(f).decode() for f in files]}], **extra}


def probs_of(answer: dict) -> np.ndarray:
    output = next(o for o in answer["outputs"] if o["name"] == "probs")
    assert output["datatype"] == "FP32"
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def test_server_and_model_metadata_and_health(served, site):
    port, _ = served
    assert call(port, "/v2") == (200, {"name": "edgeloop-agent", "version": call(port, "/v2")[1]["version"],
                                       "extensions": ["binary_tensor_data"]})
    assert call(port, "/v2/health/live") == (200, {"live": True})
    assert call(port, "/v2/health/ready") == (200, {"ready": True})
    code, meta = call(port, "/v2/models/ensemble")
    assert code == 200 and meta["name"] == "ensemble" and meta["versions"] == ["v1"]
    assert meta["platform"] == "onnxruntime_onnx" and meta["parameters"]["max_batch_size"] == 4
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"probs": [-1, 2], "label": [-1], "class_names": [2]}
    assert {i["datatype"] for i in meta["inputs"]} == {"BYTES", "UINT8"}
    assert call(port, "/v2/models/ensemble/ready") == (200, {"name": "ensemble", "ready": True})
    assert call(port, "/v2/models/ensemble/versions/v1/ready") == (200, {"name": "ensemble", "ready": True})
    code, answer = call(port, "/v2/models/resnet/ready")
    assert code == 404 and "unknown model 'resnet'" in answer["error"]
    code, answer = call(port, "/v2/models/ensemble/versions/v0")
    assert code == 404 and "serving 'v1'" in answer["error"]
    assert call(port, "/v2/nothing/here")[0] == 404
    assert call(port, INFER)[0] == 405  # a GET of the infer path
    assert call(port, "/v2/health/ready", token=None)[0] == 401  # the same token rule as /status


def test_a_batch_of_image_files_gets_the_ensembles_probabilities(served, site):
    """Base64 files in JSON and raw files in the binary extension both answer exactly what the one-image POST
    and the graph itself answer for the same images."""
    port, selected = served
    files = [png(i, size=40 + 7 * i) for i in range(4)]
    before = len(selected)
    code, answer = call(port, INFER, bytes_request(files))
    assert code == 200, answer
    assert answer["model_name"] == "ensemble" and answer["model_version"] == "v1" and answer["id"] == "req-1"
    probs = probs_of(answer)
    graph = OnnxClassifier(site.ensembles / "v1" / "ensemble.onnx", threads=1)
    expected = graph.run(np.stack([decode_image(f, SIZE) for f in files]))["probs"]
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert probs.shape == (4, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    labels = next(o for o in answer["outputs"] if o["name"] == "label")
    assert labels["datatype"] == "BYTES" and labels["data"] == [graph.class_names[i] for i in expected.argmax(1)]
    assert next(o for o in answer["outputs"] if o["name"] == "class_names")["data"] == ["functional", "defective"]
    one = [call(port, "/classify", f, {"Content-Type": "image/png"})[1]["probabilities"] for f in files]
    np.testing.assert_allclose(probs, [[p["functional"], p["defective"]] for p in one], atol=1e-5)
    assert [name for name, _ in selected[before:before + 4]] == [f"req-1-{i}" for i in range(4)]  # each to selection

    header = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [4],
                                     "parameters": {"binary_data_size": sum(4 + len(f) for f in files)}}],
                         "outputs": [{"name": "probs"}]}).encode()
    binary = b"".join(struct.pack("<I", len(f)) + f for f in files)
    code, answer = call(port, INFER, header + binary, {"Inference-Header-Content-Length": str(len(header)),
                                                       "Content-Type": "application/octet-stream"})
    assert code == 200 and [o["name"] for o in answer["outputs"]] == ["probs"] and "id" not in answer
    np.testing.assert_allclose(probs_of(answer), expected, atol=1e-6)


def test_pixel_tensors_in_json_and_binary(served, site):
    port, _ = served
    pixels = np.random.default_rng(7).integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)
    graph = OnnxClassifier(site.ensembles / "v1" / "ensemble.onnx", threads=1)
    expected = graph.run(pixels)["probs"]
    for datatype, shape, data in (("UINT8", [3, SIZE, SIZE], pixels.ravel().tolist()),  # flat
                                  ("UINT8", [3, 1, SIZE, SIZE], pixels[:, None].tolist()),  # nested
                                  ("FP32", [3, 1, SIZE, SIZE], pixels.astype(float).ravel().tolist())):
        code, answer = call(port, INFER, {"inputs": [{"name": "image", "datatype": datatype, "shape": shape,
                                                      "data": data}]})
        assert code == 200, answer
        np.testing.assert_allclose(probs_of(answer), expected, atol=1e-6)
    for datatype, raw in (("UINT8", pixels.tobytes()), ("FP32", pixels.astype("<f4").tobytes())):
        header = json.dumps({"inputs": [{"name": "image", "datatype": datatype, "shape": [3, SIZE, SIZE],
                                         "parameters": {"binary_data_size": len(raw)}}]}).encode()
        code, answer = call(port, INFER, header + raw, {"Inference-Header-Content-Length": str(len(header))})
        assert code == 200, answer
        np.testing.assert_allclose(probs_of(answer), expected, atol=1e-6)


def pixels(datatype: str, shape: list, data) -> dict:
    return {"inputs": [{"name": "image", "datatype": datatype, "shape": shape, "data": data}]}


def canvas(pixels_wide: int) -> bytes:
    """A real, well-formed PNG with a canvas over the 1 Mpx limit (it compresses to a few kB)."""
    out = io.BytesIO()
    Image.new("L", (pixels_wide, pixels_wide)).save(out, "PNG")
    return out.getvalue()


BAD = {
    "wrong shape": (pixels("UINT8", [1, SIZE, SIZE + 1], [0] * SIZE * (SIZE + 1)), 400, "does not fit the model"),
    "wrong rank": (pixels("UINT8", [SIZE * SIZE], [0] * SIZE * SIZE), 400, "does not fit the model"),
    "wrong dtype": (pixels("INT64", [1, SIZE, SIZE], [0] * SIZE * SIZE), 400, "datatype 'INT64' is not accepted"),
    "too many pixels": (bytes_request([png(1), canvas(1001)]), 400, "image 1: too many pixels: 1001x1001"),
    "batch over the limit": (bytes_request([png(i) for i in range(5)]), 413, "batch of 5 images is over the limit of 4"),
    "malformed JSON": (b'{"inputs": [', 400, "malformed JSON"),
    "not an object": (b"[1, 2]", 400, "JSON object"),
    "two inputs": ({"inputs": [pixels("UINT8", [1, SIZE, SIZE], [0] * SIZE * SIZE)["inputs"][0]] * 2}, 400,
                   "exactly one input"),
    "shape and data disagree": (pixels("UINT8", [2, SIZE, SIZE], [0] * SIZE * SIZE), 400, "says 2048 values"),
    "ragged data": (pixels("UINT8", [1, SIZE, SIZE], [[0] * SIZE] * (SIZE - 1) + [[0] * (SIZE - 1)]), 400,
                    "not a regular array"),
    "strings as pixels": (pixels("FP32", [1, SIZE, SIZE], ["a"] * SIZE * SIZE), 400, "not a regular array"),
    "pixels out of range": (pixels("FP32", [1, SIZE, SIZE], [300.0] * SIZE * SIZE), 400, "grey levels 0-255"),
    "fractional UINT8": (pixels("UINT8", [1, SIZE, SIZE], [0.5] * SIZE * SIZE), 400, "whole numbers"),
    "not base64": ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, 400,
                   "image 0: not base64"),
    "not an image": (bytes_request([png(1), b"GIF89a-not-really"]), 400, "image 1: "),
    "empty batch": (bytes_request([]), 400, "holds no image"),
    "unknown output": (bytes_request([png(1)], outputs=[{"name": "logits"}]), 400, "unknown output 'logits'"),
    "unknown model": (bytes_request([png(1)]), 404, "unknown model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_clear_4xx_and_disturbs_nothing(served, case):
    port, selected = served
    body, code, message = BAD[case]
    before = len(selected)
    path = "/v2/models/other/infer" if case == "unknown model" else INFER
    got, answer = call(port, path, body)
    assert (got, set(answer)) == (code, {"error"}) and message in answer["error"], answer
    assert len(selected) == before  # nothing of a bad batch was classified or selected
    code, answer = call(port, INFER, bytes_request([png(3)]))  # the server goes on serving
    assert code == 200 and probs_of(answer).shape == (1, 2)


def test_the_body_limits_and_the_binary_framing(served):
    port, _ = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # refused before the body is read
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nAuthorization: Bearer t0k\r\nContent-Length: 3000001\r\n\r\n{{".encode())
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.0 413") and b"3000001 bytes > limit 3000000 (serve.max_batch_bytes)" in answer
    for header_length, body, message in (
            ("abc", b"{}", "Inference-Header-Content-Length"),
            ("999", b"{}", "Inference-Header-Content-Length"),
            ("json", b"", "no binary_data_size")):
        if header_length == "json":  # a JSON input with binary bytes after it, and no size that claims them
            body = json.dumps(pixels("UINT8", [1, SIZE, SIZE], [0] * SIZE * SIZE)).encode()
            header_length, body = str(len(body)), body + b"\x01\x00"
        code, answer = call(port, INFER, body, {"Inference-Header-Content-Length": header_length})
        assert code == 400 and message in answer["error"], answer
    header = json.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    code, answer = call(port, INFER, header + struct.pack("<I", 100) + b"abcd",
                        {"Inference-Header-Content-Length": str(len(header))})
    assert code == 400 and "says 100 bytes, 4 are left" in answer["error"]


def test_each_image_of_a_batch_is_held_to_the_one_image_byte_limit(site):
    config = ServeConfig(port=1, max_image_bytes=5_000).model_copy(update={"port": 0})
    handle = EnsembleHandle(site.active_link, image_size=SIZE)
    server = Server(config, Classifier(handle, config.max_image_bytes, None, config.max_image_pixels),
                    lambda: {}).start()
    try:
        port = server.address[1]
        small, large = png(1, size=20), png(2, size=200)
        assert len(small) < 5_000 < len(large) < config.max_batch_bytes
        code, answer = call(port, INFER, bytes_request([small, large]), token=None)
        assert code == 413 and answer["error"].startswith("image 1: too large")
        assert call(port, INFER, bytes_request([small, small]), token=None)[0] == 200
    finally:
        server.stop()
