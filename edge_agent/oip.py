"""The Open Inference Protocol (KServe's and Triton's "v2" REST API) at the edge, beside the agent's own endpoints.

Any client that speaks it (KServe, Triton and MLServer clients, or plain HTTP) can ask the site's serving ensemble,
by the name :data:`MODEL_NAME`, whatever version serves (``/versions/<v>`` must name the serving one):

- ``GET /v2``: server metadata; ``GET /v2/health/live`` and ``/v2/health/ready``: 200 when true, 400 when not
  (the protocol's rule: 4xx means false);
- ``GET /v2/models/ensemble`` (metadata: inputs, outputs, the class names) and ``/v2/models/ensemble/ready``;
- ``POST /v2/models/ensemble/infer`` with exactly one input, a batch of at most ``serve.max_batch`` images:

  * ``BYTES`` of shape ``[N]`` (or ``[N, 1]``): each element an image file (PNG, JPEG, ...), base64 in JSON (JSON
    has no raw bytes), or raw with the binary tensor data extension (``Inference-Header-Content-Length`` header,
    the input's ``binary_data_size`` parameter, each element a 4-byte little-endian length and its bytes);
  * ``UINT8`` or ``FP32`` pixels (0-255, grey) of shape ``[N, H, W]`` or ``[N, 1, H, W]`` at the model's size,
    in JSON (flat or nested, row-major) or binary (little-endian).

  It answers ``probs`` (FP32 ``[N, classes]``, the ensemble's probabilities), ``label`` (BYTES ``[N]``, the class
  each image gets) and ``class_names`` (BYTES ``[classes]``), in JSON; ``outputs`` in the request picks some.

Every image is held to the same limits as the one-image POST (bytes, pixels, read before decoding), the body to
``serve.max_batch_bytes``; a bad request is a 4xx with ``{"error": "..."}`` naming what is wrong (and which image),
and nothing is classified. Images answered here go to sample selection as HTTP requests (``source: http``), within
the HTTP share of the upload budget, like the one-image POST's.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import unquote

import numpy as np

from edge_agent.imaging import ImageError, decode_image, encode_png

MODEL_NAME = "ensemble"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data"]
OUTPUTS = ("probs", "label", "class_names")
PIXEL_TYPES = {"UINT8": np.dtype("u1"), "FP32": np.dtype("<f4")}
MAX_ID = 256  # characters of a request id echoed back


class ProtocolError(Exception):
    """A request the protocol answers with ``status`` and ``{"error": reason}``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Route:
    """What a ``/v2`` path asks for: ``server``, ``live``, ``ready``, ``model``, ``model_ready``, ``infer`` or
    ``unknown``; the model and version it names, if any."""

    kind: str
    model: str | None = None
    version: str | None = None

    @property
    def method(self) -> str:
        return "POST" if self.kind == "infer" else "GET"


def is_v2(path: str) -> bool:
    """Whether a request path is the protocol's (its first segment is ``v2``)."""
    return path.split("?", 1)[0].strip("/").split("/", 1)[0] == "v2"


def route(path: str) -> Route:
    parts = [p for p in path.split("?", 1)[0].split("/") if p][1:]  # after "v2"
    if not parts:
        return Route("server")
    if parts in (["health", "live"], ["health", "ready"]):
        return Route(parts[1])
    if parts[0] == "models" and len(parts) >= 2:
        model, tail, version = unquote(parts[1]), parts[2:], None
        if tail[:1] == ["versions"] and len(tail) >= 2:
            version, tail = unquote(tail[1]), tail[2:]
        kind = {(): "model", ("ready",): "model_ready", ("infer",): "infer"}.get(tuple(tail))
        if kind is not None:
            return Route(kind, model, version)
    return Route("unknown")


def check_model(where: Route, classifier) -> None:
    """404 unless the route names the served model (and, if it names one, the serving version)."""
    if where.model != MODEL_NAME:
        raise ProtocolError(404, f"unknown model {where.model[:100]!r}: this agent serves {MODEL_NAME!r}")
    if where.version is not None and where.version != classifier.version:
        raise ProtocolError(404, f"version {where.version[:100]!r} of {MODEL_NAME!r} is not served "
                                 f"(serving {classifier.version!r})")


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "edgeloop-agent", "version": version, "extensions": EXTENSIONS}


def model_metadata(classifier, max_batch: int) -> dict[str, Any]:
    size, classes = classifier.image_size, list(classifier.class_names)
    return {"name": MODEL_NAME, "versions": [classifier.version], "platform": PLATFORM,
            "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
                       {"name": "image", "datatype": "UINT8", "shape": [-1, 1, size, size]}],
            "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, len(classes)]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]},
                        {"name": "class_names", "datatype": "BYTES", "shape": [len(classes)]}],
            "parameters": {"max_batch_size": max_batch, "class_names": classes, "image_size": size,
                           "inputs": "exactly one: image files (BYTES [N], base64 in JSON) or grey pixels 0-255 "
                                     f"(UINT8 or FP32, [N, {size}, {size}] or [N, 1, {size}, {size}])"}}


@dataclass(frozen=True)
class Limits:
    image_size: int
    max_batch: int
    max_bytes: int
    max_pixels: int


@dataclass
class Batch:
    """A parsed inference request: the pixels to classify and what sample selection and the answer need."""

    images: np.ndarray  # [N, H, W] uint8, or float32 0-255
    raws: list[bytes]  # each image as a file (the sent file, or a PNG of sent pixels) for sample selection
    names: list[str]
    request_id: str | None
    outputs: list[str]


def parse_infer(body: bytes, header_length: str | None, limits: Limits) -> Batch:
    """The batch an inference request carries, checked whole before anything is classified."""
    document, binary = _split(body, header_length)
    try:
        request = json.loads(document)
    except ValueError as exc:  # UnicodeDecodeError too
        raise ProtocolError(400, f"malformed JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ProtocolError(400, "the request must be a JSON object with \"inputs\"")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        got = len(inputs) if isinstance(inputs, list) else type(inputs).__name__
        raise ProtocolError(400, f"\"inputs\" must hold exactly one input (image files or pixels), got {got}")
    tensor = inputs[0]
    datatype, shape = tensor.get("datatype"), _shape(tensor.get("shape"))
    _check_form(datatype, shape, limits.image_size)
    if shape[0] > limits.max_batch:
        raise ProtocolError(413, f"a batch of {shape[0]} images is over the limit of {limits.max_batch} "
                                 f"(serve.max_batch)")
    raw = _binary_of(tensor, binary)
    if datatype == "BYTES":
        raws = _files(tensor, shape, raw)
        images = np.stack([_decode(i, data, limits) for i, data in enumerate(raws)])
    else:
        images = _pixels(tensor, datatype, shape, raw, limits.image_size)
        raws = [encode_png(np.rint(image).astype(np.uint8)) for image in images]
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(400, "\"id\" must be a string")
    request_id = request_id[:MAX_ID] if request_id is not None else None
    names = [f"{(request_id or 'v2')[:180]}-{i}" for i in range(len(images))]  # as sample names: bounded
    return Batch(images, raws, names, request_id, _outputs(request.get("outputs")))


def infer_response(batch: Batch, probs: np.ndarray, class_names: Sequence[str], version: str) -> dict[str, Any]:
    """The protocol's answer: the requested outputs, row-major, in JSON."""
    n, classes = probs.shape
    tensors = {
        "probs": {"name": "probs", "datatype": "FP32", "shape": [n, classes],
                  "data": probs.astype(np.float32).ravel().tolist()},
        "label": {"name": "label", "datatype": "BYTES", "shape": [n], "parameters": {"content_type": "str"},
                  "data": [class_names[int(i)] for i in probs.argmax(1)]},
        "class_names": {"name": "class_names", "datatype": "BYTES", "shape": [classes],
                        "parameters": {"content_type": "str"}, "data": list(class_names)}}
    answer: dict[str, Any] = {"model_name": MODEL_NAME, "model_version": version,
                              "outputs": [tensors[name] for name in batch.outputs]}
    if batch.request_id is not None:
        answer["id"] = batch.request_id
    return answer


# ---- parsing ----------------------------------------------------------------------------------------
def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON, binary tensor data) of a body: all JSON unless ``Inference-Header-Content-Length`` says where
    the JSON ends (the binary tensor data extension)."""
    if header_length is None:
        return body, b""
    if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(body):
        raise ProtocolError(400, f"Inference-Header-Content-Length {header_length[:20]!r} must be a size within "
                                 f"the body's {len(body)} bytes")
    return body[:int(header_length)], body[int(header_length):]


def _shape(value: Any) -> list[int]:
    if not isinstance(value, list) or not value or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ProtocolError(400, f"\"shape\" must be a list of non-negative integers, got {str(value)[:60]}")
    return value


def _check_form(datatype: Any, shape: list[int], size: int) -> None:
    """The datatype is one the model takes, and the shape the form it takes it in, with at least one image."""
    if datatype != "BYTES" and datatype not in PIXEL_TYPES:
        raise ProtocolError(400, f"datatype {str(datatype)[:20]!r} is not accepted: BYTES (image files), "
                                 "UINT8 or FP32 (grey pixels 0-255)")
    n = shape[0]
    if datatype == "BYTES" and shape not in ([n], [n, 1]):
        raise ProtocolError(400, f"shape {shape} does not fit image files: [N] or [N, 1] expected")
    if datatype != "BYTES" and shape not in ([n, size, size], [n, 1, size, size]):
        raise ProtocolError(400, f"shape {shape} does not fit the model: [N, {size}, {size}] or "
                                 f"[N, 1, {size}, {size}] expected")
    if n < 1:
        raise ProtocolError(400, f"shape {shape} holds no image: N >= 1 expected")


def _binary_of(tensor: dict[str, Any], binary: bytes) -> bytes | None:
    """The input's binary data (the whole binary part: there is one input), or None when it is in JSON."""
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(400, "\"parameters\" must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise ProtocolError(400, f"{len(binary)} bytes follow the JSON, but the input has no binary_data_size")
        if "data" not in tensor:
            raise ProtocolError(400, "the input has neither \"data\" nor a binary_data_size parameter")
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise ProtocolError(400, f"binary_data_size {str(size)[:20]} does not match the {len(binary)} bytes "
                                 "after the JSON")
    return binary


def _files(tensor: dict[str, Any], shape: list[int], raw: bytes | None) -> list[bytes]:
    """The image files of a BYTES input (its shape checked by :func:`_check_form`)."""
    n = shape[0]
    if raw is not None:
        files = _length_prefixed(raw)
    else:
        files = [_base64(i, element) for i, element in enumerate(_flat(tensor["data"], 2))]
    if len(files) != n:
        raise ProtocolError(400, f"shape {shape} says {n} images, the data holds {len(files)}")
    return files


def _flat(data: Any, depth: int) -> list[Any]:
    """A JSON tensor's elements, row-major, from a flat or nested (up to ``depth`` levels) list."""
    if not isinstance(data, list):
        raise ProtocolError(400, "\"data\" must be a list")
    out: list[Any] = []
    for element in data:
        out.extend(_flat(element, depth - 1) if isinstance(element, list) and depth > 1 else [element])
    return out


def _base64(index: int, element: Any) -> bytes:
    if not isinstance(element, str):
        raise ProtocolError(400, f"image {index}: a BYTES element in JSON must be a base64 string, got "
                                 f"{type(element).__name__}")
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(400, f"image {index}: not base64 ({exc})") from None


def _length_prefixed(raw: bytes) -> list[bytes]:
    """BYTES elements in binary: each a 4-byte little-endian length, then that many bytes."""
    files, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ProtocolError(400, f"binary BYTES data ends inside the length of element {len(files)}")
        (size,) = struct.unpack_from("<I", raw, at)
        if at + 4 + size > len(raw):
            raise ProtocolError(400, f"binary BYTES element {len(files)} says {size} bytes, "
                                     f"{len(raw) - at - 4} are left")
        files.append(raw[at + 4:at + 4 + size])
        at += 4 + size
    return files


def _decode(index: int, data: bytes, limits: Limits) -> np.ndarray:
    """One image file to pixels at the model's size, under the one-image POST's limits (413 for bytes)."""
    try:
        return decode_image(data, limits.image_size, limits.max_bytes, limits.max_pixels)
    except ImageError as exc:
        raise ProtocolError(413 if str(exc).startswith("too large") else 400, f"image {index}: {exc}") from None


def _pixels(tensor: dict[str, Any], datatype: str, shape: list[int], raw: bytes | None, size: int) -> np.ndarray:
    """The grey pixels of a UINT8 or FP32 input, [N, H, W] at the model's size (shape checked by
    :func:`_check_form`), checked to be 0-255."""
    n = shape[0]
    count, dtype = math.prod(shape), PIXEL_TYPES[datatype]
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise ProtocolError(400, f"{datatype} {shape} takes {count * dtype.itemsize} bytes, the binary data "
                                     f"holds {len(raw)}")
        values = np.frombuffer(raw, dtype)
    else:
        try:
            values = np.asarray(tensor["data"], dtype=np.float64).ravel()
        except (ValueError, TypeError, OverflowError):
            raise ProtocolError(400, f"\"data\" is not a regular array of numbers for {datatype}") from None
        if values.size != count:
            raise ProtocolError(400, f"shape {shape} says {count} values, the data holds {values.size}")
    if datatype == "FP32" or raw is None:
        finite = np.isfinite(values)
        if not finite.all() or values.min() < 0 or values.max() > 255:
            raise ProtocolError(400, f"{datatype} pixels must be grey levels 0-255 (raw, unnormalised), got "
                                     f"{'non-finite values' if not finite.all() else f'{values.min():g}..{values.max():g}'}")
        if datatype == "UINT8" and not np.array_equal(values, np.rint(values)):
            raise ProtocolError(400, "UINT8 pixels must be whole numbers 0-255")
    return values.astype(np.uint8 if datatype == "UINT8" else np.float32).reshape(n, size, size)


def _outputs(requested: Any) -> list[str]:
    """The outputs asked for (all when none is named)."""
    if requested is None:
        return list(OUTPUTS)
    if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                  for o in requested):
        raise ProtocolError(400, "\"outputs\" must be a list of {\"name\": ...}")
    names = [o["name"] for o in requested]
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown:
        raise ProtocolError(400, f"unknown output {unknown[0][:60]!r}: the model has {', '.join(OUTPUTS)}")
    return names or list(OUTPUTS)
