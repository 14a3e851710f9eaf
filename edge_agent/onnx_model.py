"""Serving an exported graph with onnxruntime, and classifying image files defensively."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnxruntime as ort

from .fileio import file_sha256
from .imaging import ImageError, decode_image

# The graph's input: raw 0..255 pixels, float32 [N,1,H,W]. Serving must not import torch, so this lives here.
INPUT_NAME = "image"


class OnnxClassifier:
    """An onnxruntime session plus what its metadata says about inputs and classes."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own opaque types for bad files
            raise ValueError(f"{self.path}: not a loadable ONNX model ({exc})") from None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        try:
            self.class_names: list[str] = json.loads(self.metadata["class_names"])
            self.image_size = int(self.metadata["image_size"])
        except (KeyError, ValueError):
            raise ValueError(f"{self.path}: not an edgeloop model (no class_names/image_size metadata)") from None
        self.version = self.metadata.get("version") or file_sha256(self.path)[:12]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs by name for uint8 images [N,H,W] at the model's size."""
        x = np.ascontiguousarray(images[:, None], dtype=np.float32)
        return dict(zip(self.output_names, self.session.run(None, {INPUT_NAME: x})))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.run(images)[self.output_names[0]]


def predict_files(classifier: OnnxClassifier, paths: Iterable[str | Path], batch_size: int = 32,
                  max_bytes: int | None = None) -> Iterator[dict]:
    """One result dict per file, in order: a prediction, or an ``error`` for an unusable file."""
    pending: list[tuple[Path, np.ndarray]] = []

    def flush() -> Iterator[dict]:
        probs = classifier.predict(np.stack([image for _, image in pending]))
        for (path, _), p in zip(pending, probs):
            yield {"file": str(path), "label": classifier.class_names[int(p.argmax())],
                   "probabilities": {c: round(float(v), 6) for c, v in zip(classifier.class_names, p)},
                   "model_version": classifier.version}
        pending.clear()

    for path in map(Path, paths):
        try:
            pending.append((path, decode_image(path, classifier.image_size, max_bytes)))
        except ImageError as exc:
            yield from flush() if pending else ()
            yield {"file": str(path), "error": str(exc)}
            continue
        if len(pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()
