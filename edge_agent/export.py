"""ONNX export: the graph the edge serves takes raw pixels and returns probabilities.

Normalisation and softmax are inside the graph, so a serving process needs nothing but the file:
its metadata carries the class names and input size. INT8 static quantisation shrinks and speeds
the graph on small CPUs; :func:`quantize_int8` calibrates it on real images.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from torch import nn

from .models import Normalization
from .onnx_model import INPUT_NAME

log = logging.getLogger(__name__)

OPSET = 18


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Pixels [N,1,H,W] resized to ``size`` x ``size`` (bilinear, no antialiasing: ONNX Resize, which the INT8
    quantiser keeps); the one resize a member sees both in training and inside the served graph."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    return nn.functional.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images [N,H,W] resized as the graph resizes them (:func:`resize`), for a member's data."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = [resize(torch.from_numpy(images[i:i + 256, None].astype(np.float32)), size)[:, 0]
           for i in range(0, len(images), 256)]
    if not out:
        return np.zeros((0, size, size), np.uint8)
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8).numpy()


class Classifier(nn.Module):
    """Raw 0..255 pixels [N,1,H,W] in, class probabilities out. With ``size``, the pixels are first resized
    to the size the model runs at (an ensemble member of another size than the graph's input)."""

    def __init__(self, model: nn.Module, normalization: Normalization, size: int | None = None):
        super().__init__()
        self.model = model
        self.size = size
        self.register_buffer("mean", torch.tensor(normalization.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(normalization.std, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            image = resize(image, self.size)
        return torch.softmax(self.model((image - self.mean) / self.std), dim=1)


def export_onnx(module: nn.Module, path: str | Path, *, image_size: int, class_names: Sequence[str],
                metadata: dict[str, str] | None = None, output_names: Sequence[str] = ("probs",)) -> Path:
    """Export ``module`` (raw pixels in) with a dynamic batch axis; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example = torch.rand(2, 1, image_size, image_size) * 255
    batch = torch.export.Dim("batch", min=1, max=4096)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(module, (example,), str(raw), input_names=[INPUT_NAME], output_names=list(output_names),
                          dynamic_shapes={"image": {0: batch}}, opset_version=OPSET, dynamo=True,
                          external_data=False, verbose=False)
        graph = onnx.load(str(raw))
        props = {"class_names": json.dumps(list(class_names)), "image_size": str(image_size), **(metadata or {})}
        onnx.helper.set_model_props(graph, props)
        onnx.checker.check_model(graph)
        staged = Path(tmp) / "final.onnx"
        onnx.save(graph, str(staged))
        os.replace(staged, path)
    return path


class _CalibrationReader:
    """Feeds calibration images to onnxruntime's quantiser in small batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 16):
        self._batches = iter([images[i:i + batch_size, None].astype(np.float32)
                              for i in range(0, len(images), batch_size)])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray) -> Path:
    """Static INT8 quantisation (QDQ, per-channel weights) calibrated on uint8 images [N,H,W]."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ValueError("INT8 quantisation needs calibration images")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    source = onnx.load(str(fp32_path))
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        staged = Path(tmp) / "int8.onnx"
        quantize_static(str(prepared), str(staged), _CalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=_softmax_nodes(prepared))
        quantized = onnx.load(str(staged))
        props = {p.key: p.value for p in source.metadata_props}
        onnx.helper.set_model_props(quantized, {**props, "precision": "int8"})
        onnx.save(quantized, str(staged))
        os.replace(staged, out_path)
    return out_path


def _softmax_nodes(path: Path) -> list[str]:
    """Keep the final softmax in float: quantising probabilities costs accuracy for no speed."""
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Softmax"]
