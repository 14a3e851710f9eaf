"""The one training loop, used by the cloud (pretraining, retraining) and the edge (fine-tuning).

Data are decoded once into memory (:class:`~edge_agent.datasets.ArraySet`); each epoch augments a
fresh copy with the chosen policy. The best weights by validation accuracy are kept; a time budget
and a stop callback can end training between batches, and the model still ends with the best weights.

The same loop runs data-parallel when torch.distributed is initialised (``edgeloop train
--nproc-per-node N`` starts it under torch's elastic launcher): every rank takes its share of each
global batch through a :class:`~torch.utils.data.DistributedSampler`, DDP averages the gradients, and
rank 0 alone validates and keeps the best weights. One process is the same loop with one rank.
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
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler

from .augment import build_policy
from .datasets import ArraySet
from .models import Normalization

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch: split evenly over the ranks of a distributed run")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_balance: Literal["none", "weighted"] = Field(
        "none", description="weighted: each class's loss weighted by the inverse of its share of the training set")
    ema_decay: float | None = Field(
        None, ge=0.5, lt=1, description="keep an exponential moving average of the weights (per step) and "
                                        "validate, keep and return the averaged model; None: the raw weights")
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
        "auto", description="mixed precision for the forward pass; auto = bf16 on a GPU and where the CPU has AMX "
                            "or AVX512-BF16")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = a CUDA GPU when there is one")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a distributed run (rank 0 of 1 when there is none)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0


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


def resolve_device(name: str) -> torch.device:
    """The device ``TrainConfig.device`` names; a rank's GPU is the one its launcher set as current."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no CUDA GPU is available here")
    return torch.device("cuda", torch.cuda.current_device())


def _mixed_precision(config: TrainConfig, device: torch.device) -> tuple[torch.autocast, torch.amp.GradScaler]:
    """Autocast for the forward pass, and the gradient scaler fp16 needs (a no-op otherwise).

    On the CPU, bf16 halves the step time with AMX (bench/train_elpv.py); elsewhere it is emulated and slower.
    On a GPU, bf16 where it has it, else fp16 with loss scaling. Weights and the optimizer stay fp32.
    """
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        enabled = config.precision != "fp32"
    else:
        dtype, enabled = torch.bfloat16, uses_bf16(config)
    scaler = torch.amp.GradScaler(device.type, enabled=enabled and dtype == torch.float16)
    return torch.autocast(device.type, dtype=dtype, enabled=enabled), scaler


def _per_rank_batch(config: TrainConfig, ranks: Ranks) -> int:
    if config.batch_size % ranks.world:
        raise ValueError(f"batch size {config.batch_size} does not split evenly over {ranks.world} ranks")
    return config.batch_size // ranks.world


def _threads(config: TrainConfig) -> int:
    """Every core, shared between the ranks on this host (torchrun says how many there are)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return config.threads or max(1, (os.cpu_count() or 1) // local_ranks)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int):
    if config.schedule == "onecycle" and steps >= 3:
        # a quarter warm-up, but at least a step and a half of warm-up and of annealing: OneCycleLR divides by
        # each phase's length, so a phase of zero steps (4 steps in all, say) would divide by zero
        warmup = min(max(0.25, 1.5 / steps), 1 - 1.5 / steps)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps, pct_start=warmup)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, normalization: Normalization,
                  batch_size: int = 256) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    out = [torch.softmax(model(to_tensor(images[i:i + batch_size], normalization).to(device)), dim=1).cpu()
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
    """Train ``model`` in place; it ends on the CPU holding the best weights by validation accuracy (or the last).

    In a distributed run every rank calls this; rank 0 alone validates, keeps the best weights and calls
    ``on_epoch`` (the others end with the last weights, which nobody reads).
    """
    if len(train) == 0:
        raise ValueError("no training images")
    ranks, device = Ranks.current(), resolve_device(config.device)
    batch_size = _per_rank_batch(config, ranks)
    torch.set_num_threads(_threads(config))
    torch.manual_seed(config.seed)
    # oneDNN's CPU convolutions run about a fifth faster on channels-last tensors (measured: bench/).
    model.to(device=device, memory_format=torch.channels_last)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ranks.world > 1 else model
    # The sampler deals each rank every world-th index of one shared shuffle, so the ranks' batches
    # together are the batch one process would take: the same global batch and seed, the same training.
    sampler = DistributedSampler(range(len(train)), num_replicas=ranks.world, rank=ranks.rank, seed=config.seed)
    policy = build_policy(config.policy, seed=config.seed + ranks.rank)
    optimizer = _optimizer(model, config)
    scheduler = _scheduler(optimizer, config, config.epochs * -(-len(sampler) // batch_size))
    weights = _class_weights(train, config, model)
    criterion = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                                    label_smoothing=config.label_smoothing)
    # the averaged copy is what is validated and kept; BatchNorm statistics are averaged with the weights
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True) \
        if config.ema_decay else None
    judged = ema.module if ema else model
    autocast, scaler = _mixed_precision(config, device)
    started = time.monotonic()
    best = TrainResult(copy.deepcopy(judged.state_dict()), -1.0, 0)

    def stop_now() -> bool:
        if config.time_budget_s is None and should_stop is None:
            return False
        stop = (config.time_budget_s is not None and time.monotonic() - started > config.time_budget_s) \
            or bool(should_stop and should_stop())
        return bool(_all_ranks_sum(torch.tensor([float(stop)]), ranks)[0])  # one rank's stop stops them all

    for epoch in range(1, config.epochs + 1):
        epoch_start = time.monotonic()
        net.train()
        sampler.set_epoch(epoch)
        order = np.fromiter(sampler, dtype=np.int64)
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, seen: summed over ranks at the end
        for i in range(0, len(order), batch_size):
            index = order[i:i + batch_size]
            if len(index) < 2 and totals[2]:  # a batch of one breaks BatchNorm; drop the remainder
                continue
            x = to_tensor(_augmented_batch(train.images[index], policy), normalization).to(device, non_blocking=True)
            y = torch.from_numpy(train.labels[index]).to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                logits = net(x)
                loss = criterion(logits.float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema:
                ema.update_parameters(model)
            totals += torch.stack([loss.detach() * len(index), (logits.argmax(1) == y).sum(),
                                   torch.tensor(len(index), device=device)]).double().cpu()
            if stop_now():
                best.stopped_early = True
                break
        loss_sum, correct, seen = _all_ranks_sum(totals, ranks).tolist()
        val_acc, val_loss = evaluate(judged, val, normalization) if ranks.main else (float("nan"), float("nan"))
        metrics = EpochMetrics(epoch, loss_sum / max(seen, 1), correct / max(seen, 1), val_loss, val_acc,
                               time.monotonic() - epoch_start, optimizer.param_groups[0]["lr"])
        best.history.append(metrics)
        score = metrics.train_acc if np.isnan(val_acc) else val_acc
        if ranks.main and score > best.best_val_acc:
            best.state_dict, best.best_val_acc, best.best_epoch = copy.deepcopy(judged.state_dict()), score, epoch
        if on_epoch and ranks.main:
            on_epoch(metrics)
        if best.stopped_early:
            break
    if config.keep == "best" and ranks.main:
        model.load_state_dict(best.state_dict)
    else:
        if ema:
            model.load_state_dict(ema.module.state_dict())
        best.best_epoch, best.best_val_acc = len(best.history), best.history[-1].val_acc if best.history else -1.0
    # the device and layout that exporters, checkpoints and the edge expect
    model.to(device="cpu", memory_format=torch.contiguous_format).eval()
    best.seconds = time.monotonic() - started
    return best


def _class_weights(train: ArraySet, config: TrainConfig, model: nn.Module) -> torch.Tensor | None:
    """Inverse class frequencies (mean 1 over the classes present), or None for plain cross-entropy."""
    if config.class_balance == "none":
        return None
    classes = _num_classes(model)
    counts = np.bincount(train.labels, minlength=classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _num_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features


def _all_ranks_sum(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """``values`` summed over every rank (as they are when there is one); NCCL sums on the GPU."""
    if ranks.world == 1:
        return values
    on_device = values.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(on_device)
    return on_device.cpu()
