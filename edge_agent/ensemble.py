"""Soft-voting ensembles: weights fitted on the site's validation split when it is large enough (else equal),
exported as one ONNX graph whose members may differ in architecture and input size.

One graph holds every member and the weighted average, so serving is one onnxruntime session (one set of
threads, one allocation arena) instead of K, and the switch to a new ensemble is a single file. The graph
outputs ``probs`` [N,C] (the ensemble) and ``member_probs`` [N,K,C] (each member, for disagreement-based
sample selection and per-member reporting).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(-1) == labels).mean()) if len(labels) else float("nan")


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    if not len(labels):
        return float("nan")
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)).mean())


def combine(member_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted soft vote: member_probs [N,K,C], weights [K] summing to 1 → [N,C]."""
    return np.einsum("nkc,k->nc", member_probs, weights)


@dataclass(frozen=True)
class WeightFit:
    weights: list[float]
    val_accuracy: float
    val_nll: float


def fit_weights(member_probs: np.ndarray, labels: np.ndarray) -> WeightFit:
    """Uniform weights, unless dropping members beats them on validation by a real margin.

    The best of hundreds of weightings scored on a few dozen validation images is mostly the luckiest one:
    such fitted ensembles scored below their own best member on test splits (bench/loop.py). So the
    candidates are few (uniform, each member alone, each member left out, with equal weights) and one must
    beat uniform by ``max(2 images, 2 %)`` of validation accuracy to be used; log-loss breaks ties.
    """
    k = member_probs.shape[1]
    uniform = _fit(member_probs, labels, np.full(k, 1.0 / k))
    margin = max(2 / max(len(labels), 1), 0.02)
    others = [*np.eye(k), *((1 - np.eye(k)) / (k - 1) if k > 2 else [])]
    fits = [f for f in (_fit(member_probs, labels, w) for w in others) if f.val_accuracy >= uniform.val_accuracy + margin]
    return max(fits, key=lambda f: (f.val_accuracy, -f.val_nll), default=uniform)


def _fit(member_probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> WeightFit:
    probs = combine(member_probs, weights)
    return WeightFit([float(w) for w in weights], accuracy(probs, labels), log_loss(probs, labels))


def equal_or_fitted(member_probs: np.ndarray, labels: np.ndarray, min_val: int) -> tuple[WeightFit, str]:
    """:func:`fit_weights` when val has at least ``min_val`` images, else equal weights; and why, for the report.

    On a few dozen images the standard error of an accuracy (3-5 points) exceeds the margin a fitted weighting
    must win by, so what it picks is mostly luck (ensembles below their best member in bench/loop.py)."""
    k, n = member_probs.shape[1], len(labels)
    if n >= min_val:
        fit = fit_weights(member_probs, labels)
        uniform = np.allclose(fit.weights, 1.0 / k)
        return fit, (f"fitted on {n} val images (>= {min_val}): "
                     + ("equal weights won" if uniform else "a weighting beat equal weights by the margin"))
    return _fit(member_probs, labels, np.full(k, 1.0 / k)), \
        f"equal weights: {n} val images are fewer than the {min_val} needed to fit them"


def fused_module(members: Sequence, normalizations: Sequence, weights: Sequence[float],
                 sizes: Sequence[int | None] | None = None):
    """One torch module: raw pixels → (weighted probs [N,C], member probs [N,K,C]).

    The graph has ONE input, at the site's image size (``export_ensemble``'s ``image_size``), not the largest
    member's: every candidate (base as-is, active, new) is scored on the same site images and served by the
    same path, which decodes images at the site's size, and a larger input would only carry upsampled pixels.
    A member of another size (``sizes[k]``; None = the input's) resizes the input inside the graph, bilinear,
    as it was resized in its fine-tune (:func:`edge_agent.export.resize`). To let members see more of a
    cell, raise the site's size to the largest member's: smaller members then downsample.
    """
    import torch
    from torch import nn

    from edge_agent.export import Classifier

    sizes = list(sizes) if sizes is not None else [None] * len(members)

    class FusedEnsemble(nn.Module):
        def __init__(self):
            super().__init__()
            self.members = nn.ModuleList(Classifier(m, n, s) for m, n, s in zip(members, normalizations, sizes))
            self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32))

        def forward(self, image: torch.Tensor):
            member_probs = torch.stack([member(image) for member in self.members], dim=1)
            return (member_probs * self.weights.view(1, -1, 1)).sum(dim=1), member_probs

    return FusedEnsemble().eval()


def export_ensemble(members: Sequence, normalizations: Sequence, weights: Sequence[float], path: Path, *,
                    image_size: int, class_names: Sequence[str], metadata: dict[str, str],
                    sizes: Sequence[int | None] | None = None) -> Path:
    """The fused graph (:func:`fused_module`) as ONNX, input ``image_size``; ``sizes`` are the members' own."""
    from edge_agent.export import export_onnx

    module = fused_module(members, normalizations, weights, sizes)
    own = [image_size if s is None else int(s) for s in (sizes or [None] * len(members))]
    meta = {**metadata, "weights": json.dumps(list(weights)), "members": str(len(members)),
            "member_sizes": json.dumps(own)}
    return export_onnx(module, path, image_size=image_size, class_names=list(class_names), metadata=meta,
                       output_names=("probs", "member_probs"))


def evaluate_graph(classifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 64,
                   predictions: bool = False) -> dict:
    """Ensemble and per-member accuracy (and log-loss) of an exported ensemble graph; with ``predictions``,
    also each image's predicted class (what the paired gate compares)."""
    if not len(labels):
        return {"n": 0, "accuracy": None, "nll": None, "members": [], **({"predictions": []} if predictions else {})}
    outputs = [classifier.run(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    probs = np.concatenate([o["probs"] for o in outputs])
    members = np.concatenate([o["member_probs"] for o in outputs])
    return {"n": int(len(labels)), "accuracy": accuracy(probs, labels), "nll": log_loss(probs, labels),
            "members": [{"accuracy": accuracy(members[:, k], labels), "nll": log_loss(members[:, k], labels)}
                        for k in range(members.shape[1])],
            **({"predictions": probs.argmax(1).tolist()} if predictions else {})}
