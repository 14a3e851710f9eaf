"""Training and exporting models from dataset versions: the cloud's side of the shared ML core."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_agent.datasets import ArraySet, DatasetVersion, open_dataset
from edge_agent.export import Classifier, export_onnx, quantize_int8
from edge_agent.fileio import file_sha256, write_json_atomic
from edge_agent.models import CheckpointMeta, ModelSpec, Normalization, build_model, load_checkpoint, save_checkpoint
from edge_agent.onnx_model import OnnxClassifier
from edge_agent.train import EpochMetrics, Ranks, TrainConfig, evaluate, normalization_of, train_model

log = logging.getLogger(__name__)

CHECKPOINT = "model.pt"
METRICS = "metrics.json"


def machine_info() -> dict:
    """Where a run trained: timings in metrics and benchmarks mean little without it."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def train_on_dataset(data: str | Path, arch: str, out: str | Path, config: TrainConfig, *,
                     init: str | Path | None = None, image_size: int | None = None,
                     on_epoch: Callable[[EpochMetrics], None] | None = None,
                     group: Callable[[], AbstractContextManager] = nullcontext) -> dict:
    """Train ``arch`` (or fine-tune the checkpoint ``init``) on a dataset version.

    Writes ``out/model.pt`` (best by validation accuracy) and ``out/metrics.json``, each atomically, and
    returns the metrics. ``image_size`` trains on resized images (default: the dataset's own size). In a
    distributed run every rank trains and rank 0 alone evaluates and writes; the others return ``{}``.
    ``group`` joins the distributed job: entered only after this rank has read (and checked) every image,
    so each rank names a bad file itself rather than dying in the rendezvous when a peer fails first.
    """
    dataset = open_dataset(data)
    train, val, test = (dataset.load_split(s, image_size) for s in ("train", "val", "test"))
    with group():
        return _train_loaded(dataset, train, val, test, arch, out, config, init, image_size, on_epoch)


def _train_loaded(dataset: DatasetVersion, train: ArraySet, val: ArraySet, test: ArraySet, arch: str,
                  out: str | Path, config: TrainConfig, init: str | Path | None, image_size: int | None,
                  on_epoch: Callable[[EpochMetrics], None] | None) -> dict:
    model, spec, normalization, parent_version = _starting_model(dataset, train, arch, config.seed, init, image_size)
    ranks = Ranks.current()
    if ranks.main:
        log.info("training %s on %s (%d train, %d val, %d test images%s)", spec.arch, dataset.id, len(train),
                 len(val), len(test), f"; {ranks.world} ranks" if ranks.world > 1 else "")
    result = train_model(model, train, val, config, normalization, on_epoch=on_epoch)
    if not ranks.main:
        return {}
    test_acc, test_loss = evaluate(model, test, normalization)
    epochs = len(result.history)
    metrics = {
        "dataset_id": dataset.id, "arch": spec.arch, "image_size": spec.image_size,
        "train_images": len(train), "val_images": len(val), "test_images": len(test),
        "best_epoch": result.best_epoch, "val_acc": result.best_val_acc, "test_acc": test_acc,
        "test_loss": test_loss, "epochs_run": epochs, "seconds": result.seconds,
        "seconds_per_epoch": result.seconds / max(epochs, 1), "stopped_early": result.stopped_early,
        "ranks": ranks.world, "config": config.model_dump(), "history": [asdict(m) for m in result.history],
        "machine": machine_info(),
    }
    out = Path(out)
    meta = CheckpointMeta(spec=spec, class_names=dataset.classes, normalization=normalization,
                          metrics={"val_acc": result.best_val_acc, "test_acc": test_acc},
                          dataset_id=dataset.id, parent=parent_version, train_config=config.model_dump())
    save_checkpoint(out / CHECKPOINT, model, meta)
    write_json_atomic(out / METRICS, metrics)
    return metrics


def _starting_model(dataset: DatasetVersion, train: ArraySet, arch: str, seed: int, init: str | Path | None,
                    image_size: int | None = None) -> tuple[nn.Module, ModelSpec, Normalization, str | None]:
    """(model, spec, normalization, parent version): the checkpoint ``init`` as it was, or a fresh ``arch``.

    A fine-tune keeps its parent's normalization, so the edge's base models and the cloud's agree on inputs.
    """
    if init is None:
        spec = ModelSpec(arch=arch, num_classes=len(dataset.classes), image_size=image_size or dataset.image_size)
        return build_model(spec, seed), spec, normalization_of(train), None
    model, parent = load_checkpoint(init)
    if parent.spec.image_size != (image_size or dataset.image_size):
        raise ValueError(f"{init} expects {parent.spec.image_size} px images, not {image_size or dataset.image_size} px")
    return model, parent.spec, parent.normalization, file_sha256(init)[:12]


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, version: str | None = None) -> Path:
    """A checkpoint as ONNX with what the edge needs inside: version, arch, normalization, classes."""
    model, meta = load_checkpoint(checkpoint)
    metadata = {"version": version or file_sha256(checkpoint)[:12], "arch": meta.spec.arch,
                "normalization": meta.normalization.model_dump_json(), "dataset_id": meta.dataset_id or ""}
    return export_onnx(Classifier(model, meta.normalization), out, image_size=meta.spec.image_size,
                       class_names=meta.class_names, metadata=metadata)


def onnx_accuracy(path: str | Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of an exported graph as onnxruntime runs it (what the edge serves, not the PyTorch model)."""
    return float((OnnxClassifier(path).predict(images).argmax(1) == labels).mean())


def quantize_with_report(fp32: str | Path, out: str | Path, calibration_data: str | Path,
                         calibration_images: int = 256) -> dict:
    """INT8-quantise ``fp32`` on a dataset's train split; accuracy of both graphs on its test split."""
    dataset = open_dataset(calibration_data)
    size = OnnxClassifier(fp32).image_size
    calibration = dataset.load_split("train", size).images[:calibration_images]
    started = time.monotonic()
    quantize_int8(fp32, out, calibration)
    evaluation = dataset.load_split("test", size)
    if len(evaluation) == 0:
        evaluation = dataset.load_split("val", size)
    return {"fp32_accuracy": onnx_accuracy(fp32, evaluation.images, evaluation.labels),
            "int8_accuracy": onnx_accuracy(out, evaluation.images, evaluation.labels),
            "evaluated_on": len(evaluation), "calibration_images": len(calibration),
            "fp32_bytes": Path(fp32).stat().st_size, "int8_bytes": Path(out).stat().st_size,
            "quantize_seconds": time.monotonic() - started}


def max_abs_difference(checkpoint: str | Path, onnx_path: str | Path, images: np.ndarray) -> float:
    """Largest difference between PyTorch and onnxruntime probabilities on the same images."""
    model, meta = load_checkpoint(checkpoint)
    with torch.no_grad():
        reference = Classifier(model, meta.normalization)(torch.from_numpy(images[:, None].astype(np.float32)))
    return float(np.abs(OnnxClassifier(onnx_path).predict(images) - reference.numpy()).max())
