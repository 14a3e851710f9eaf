"""One factory that builds every model from a spec, and checkpoints that carry that spec.

The cloud pretrains and the edge fine-tunes with these same builders, so a cloud checkpoint always
loads at the edge. torchvision's architectures are made for 224x224 RGB; edge inputs are small
grayscale crops, so the stems are adapted (see each builder) or they learn nothing on a CPU budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str
    num_classes: int = Field(ge=2)
    in_channels: int = Field(1, ge=1)
    image_size: int = Field(64, ge=16)


class Normalization(BaseModel):
    """Pixel statistics of the training data (0..255 scale), fixed with the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: float = 127.5
    std: float = 64.0


class CheckpointMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: ModelSpec
    class_names: list[str]
    normalization: Normalization = Field(default_factory=Normalization)
    metrics: dict[str, float] = Field(default_factory=dict)
    dataset_id: str | None = None
    parent: str | None = Field(None, description="version of the model this one was fine-tuned from")
    train_config: dict = Field(default_factory=dict)


def _resnet18(spec: ModelSpec) -> nn.Module:
    model = tvm.resnet18(num_classes=spec.num_classes, zero_init_residual=True)
    if spec.image_size >= 64:
        # Keep the 7x7/2 stem (cheap on a CPU at 96 px) but read grayscale.
        model.conv1 = nn.Conv2d(spec.in_channels, 64, 7, 2, 3, bias=False)
    else:
        # Tiny inputs: a 3x3/1 stem, or the 32x downsampling leaves a 1x1 map before the last stage.
        model.conv1 = nn.Conv2d(spec.in_channels, 64, 3, 1, 1, bias=False)
    return model


def _mobilenet_v3_small(spec: ModelSpec) -> nn.Module:
    model = tvm.mobilenet_v3_small(num_classes=spec.num_classes)
    first = model.features[0][0]
    # Grayscale, stride 1: at 64 px the stock stride-32 net ends on a 2x2 map and stays at the
    # majority class (SETUP-NOTES); stride 1 in the stem gives the later blocks 4x more to see.
    model.features[0][0] = nn.Conv2d(spec.in_channels, first.out_channels, 3, 1, 1, bias=False)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1  # torchvision sets 0.01, too slow to settle in a few small epochs
    return model


def _tiny_cnn(spec: ModelSpec) -> nn.Module:
    """A ~25k-parameter CNN for tests and very small devices."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(spec.in_channels, 16), nn.MaxPool2d(2),
        *block(16, 32), nn.MaxPool2d(2),
        *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.1), nn.Linear(64, spec.num_classes),
    )


class SlimResNet(nn.Module):
    """A ResNet-18-shaped net (2-2-2-2 basic blocks) at a fraction of its width, for large inputs on a CPU.

    ELPV's defects are thin cracks that a 96 px cell blurs away; at 256 px ResNet-18 costs 74 s an epoch on
    2 cores, this net (widths 32..256) 22 s and the ``small`` one (16..128) 8 s, so full-size cells fit the
    budget (bench/train_elpv.py). Inputs of 64 px and up get a 3x3/2 stem and a max-pool (4x down before
    the first stage); smaller ones keep full resolution, or the last stage would see a 1x1 map.
    """

    def __init__(self, spec: ModelSpec, widths: tuple[int, ...]):
        super().__init__()
        large = spec.image_size >= 64
        stem = [nn.Conv2d(spec.in_channels, widths[0], 3, 2 if large else 1, 1, bias=False),
                nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)] + ([nn.MaxPool2d(3, 2, 1)] if large else [])
        blocks, cin = [], widths[0]
        for stage, width in enumerate(widths):
            for index in range(2):
                stride = 2 if stage and not index else 1
                down = None if stride == 1 and cin == width else nn.Sequential(
                    nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))
                blocks.append(BasicBlock(cin, width, stride, down))
                cin = width
        for block in blocks:  # zero-init the last BN of each residual branch: every block starts as identity
            nn.init.zeros_(block.bn2.weight)
        self.features = nn.Sequential(*stem, *blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, spec.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


DEFAULT_ARCH = "slim_resnet"  # the first base's architecture, chosen on val (bench/elpv_recipe.py)
ARCHITECTURES: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "resnet18": _resnet18,
    "mobilenet_v3_small": _mobilenet_v3_small,
    "tiny_cnn": _tiny_cnn,
    "slim_resnet": lambda spec: SlimResNet(spec, (32, 64, 128, 256)),
    "slim_resnet_small": lambda spec: SlimResNet(spec, (16, 32, 64, 128)),
}


def build_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """Build the model a spec names; ``seed`` makes its initial weights reproducible."""
    try:
        builder = ARCHITECTURES[spec.arch]
    except KeyError:
        raise ValueError(f"unknown architecture {spec.arch!r}; choose one of {sorted(ARCHITECTURES)}") from None
    if seed is None:
        return builder(spec)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return builder(spec)


def save_checkpoint(path: str | Path, model: nn.Module, meta: CheckpointMeta) -> Path:
    """Write state dict + meta atomically (temp name, then rename) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "meta": meta.model_dump(mode="json")}, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path) -> tuple[nn.Module, CheckpointMeta]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = CheckpointMeta.model_validate(payload["meta"])
    except Exception as exc:  # torch raises many types for a damaged file
        raise ValueError(f"{path}: not a readable edgeloop checkpoint ({type(exc).__name__}: {exc})") from None
    model = build_model(meta.spec)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, meta

