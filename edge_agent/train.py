"""The one training loop, used by the cloud (pretraining, retraining) and the edge (fine-tuning).

Data are decoded once into memory (:class:`~edge_agent.datasets.ArraySet`); each epoch augments a
fresh copy with the chosen policy. The best weights by validation accuracy are kept; a time budget
and a stop callback can end training between batches, and the model still ends with the best weights.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .augment import build_policy
from .datasets import ArraySet
from .models import Normalization

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch threads; default every core")
    time_budget_s: float | None = Field(None, gt=0, description="stop after this many seconds (best weights kept)")
    policy: str = Field("flips", description="augmentation policy name (edge_agent.augment.POLICIES)")
    keep: Literal["best", "last"] = Field(
        "best", description="weights to end with: the best epoch on val, or the last (when val is too small "
                            "to choose an epoch: a few dozen images pick a lucky one)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast for the forward pass; auto = bf16 where the CPU has AMX or AVX512-BF16")


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float
    lr: float


@dataclass
class TrainResult:
    state_dict: dict
    best_val_acc: float
    best_epoch: int
    history: list[EpochMetrics] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0


def normalization_of(data: ArraySet) -> Normalization:
    """Pixel mean and std of a training set, fixed into the model so serving needs no statistics."""
    pixels = data.images.astype(np.float32)
    return Normalization(mean=float(pixels.mean()), std=float(max(pixels.std(), 1.0)))


def to_tensor(images: np.ndarray, normalization: Normalization) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    return ((x - normalization.mean) / normalization.std).contiguous(memory_format=torch.channels_last)


def bf16_native() -> bool:
    """Does this CPU run bf16 matrix maths natively (AMX tiles or AVX512-BF16)? Elsewhere bf16 is emulated
    and slower than fp32, so ``precision="auto"`` stays in fp32 there."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def uses_bf16(config: TrainConfig) -> bool:
    return config.precision == "bf16" or (config.precision == "auto" and bf16_native())


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int):
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps, pct_start=0.25)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, normalization: Normalization,
                  batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = [torch.softmax(model(to_tensor(images[i:i + batch_size], normalization)), dim=1)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def evaluate(model: nn.Module, data: ArraySet, normalization: Normalization) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a dataset; (nan, nan) when it is empty."""
    if len(data) == 0:
        return float("nan"), float("nan")
    probs = predict_proba(model, data.images, normalization)
    accuracy = float((probs.argmax(1) == data.labels).mean())
    loss = float(-np.log(np.clip(probs[np.arange(len(data)), data.labels], 1e-7, 1)).mean())
    return accuracy, loss


def _augmented_batch(images: np.ndarray, policy) -> np.ndarray:
    return np.stack([policy(image) for image in images])


def train_model(model: nn.Module, train: ArraySet, val: ArraySet, config: TrainConfig,
                normalization: Normalization,
                on_epoch: Callable[[EpochMetrics], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train ``model`` in place; it ends holding the best weights by validation accuracy (or the last)."""
    if len(train) == 0:
        raise ValueError("no training images")
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    # oneDNN's CPU convolutions run about a fifth faster on channels-last tensors (measured: bench/).
    model.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(config.seed)
    policy = build_policy(config.policy, seed=config.seed)
    batches_per_epoch = -(-len(train) // config.batch_size)
    optimizer = _optimizer(model, config)
    scheduler = _scheduler(optimizer, config, config.epochs * batches_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    # bf16 autocast: about half the step time with AMX (bench/train_elpv.py); weights and the optimizer stay fp32.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=uses_bf16(config))
    started = time.monotonic()
    best = TrainResult(copy.deepcopy(model.state_dict()), -1.0, 0)

    def out_of_time() -> bool:
        over_budget = config.time_budget_s is not None and time.monotonic() - started > config.time_budget_s
        return over_budget or bool(should_stop and should_stop())

    for epoch in range(1, config.epochs + 1):
        epoch_start = time.monotonic()
        model.train()
        order = rng.permutation(len(train))
        seen = correct = 0
        loss_sum = 0.0
        for i in range(0, len(order), config.batch_size):
            index = order[i:i + config.batch_size]
            if len(index) < 2 and seen:  # a batch of one breaks BatchNorm; drop the remainder
                continue
            x = to_tensor(_augmented_batch(train.images[index], policy), normalization)
            y = torch.from_numpy(train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                logits = model(x)
                loss = criterion(logits.float(), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(index)
            loss_sum += loss.item() * len(index)
            correct += int((logits.argmax(1) == y).sum())
            if out_of_time():
                best.stopped_early = True
                break
        val_acc, val_loss = evaluate(model, val, normalization)
        metrics = EpochMetrics(epoch, loss_sum / max(seen, 1), correct / max(seen, 1), val_loss, val_acc,
                               time.monotonic() - epoch_start, optimizer.param_groups[0]["lr"])
        best.history.append(metrics)
        score = metrics.train_acc if np.isnan(val_acc) else val_acc
        if score > best.best_val_acc:
            best.state_dict, best.best_val_acc, best.best_epoch = copy.deepcopy(model.state_dict()), score, epoch
        if on_epoch:
            on_epoch(metrics)
        if best.stopped_early:
            break
    if config.keep == "best":
        model.load_state_dict(best.state_dict)
    else:
        best.best_epoch, best.best_val_acc = len(best.history), best.history[-1].val_acc if best.history else -1.0
    model.to(memory_format=torch.contiguous_format).eval()  # the layout exporters and checkpoints expect
    best.seconds = time.monotonic() - started
    return best
