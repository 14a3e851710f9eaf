"""The sample sidecar: what the edge says about a sample it uploads, and what the cloud accepts.

One schema for both sides: the sampler writes it, the cloud validates every sidecar against it before a
sample can reach a training set, so a sidecar that is valid JSON but not an object, or has a field of the
wrong type, is rejected with a reason instead of crashing the intake for the whole fleet.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, model_validator

M = TypeVar("M", bound=BaseModel)
MAX_SIDECAR_BYTES = 64 * 1024
MAX_NAME = 256  # a version, site, class or reason name: what a report or the labelling page shows in one line
MAX_PATH = 4096  # a file name at the site (PATH_MAX)
Name = Annotated[str, Field(max_length=MAX_NAME)]
Unit = Annotated[FiniteFloat, Field(ge=0, le=1)]  # the agent's scores are normalised to [0, 1]
# An INT8 graph's probabilities come in 1/255 steps and the agent rounds them to 6 places: a distribution
# sums to one within this.
SUM_TOLERANCE = 0.05


class SidecarError(ValueError):
    """A sidecar that cannot be used; the message says why."""


class SampleSidecar(BaseModel):
    model_config = ConfigDict(extra="allow")  # newer agents may say more; what is known must be right

    site: str = Field(min_length=1, max_length=MAX_NAME)
    time: FiniteFloat
    reasons: list[Name] = Field(max_length=32)
    source_file: str | None = Field(None, max_length=MAX_PATH)
    model_version: Name | None = None
    probabilities: dict[Name, FiniteFloat] | None = None
    member_probabilities: list[list[FiniteFloat]] | None = None
    operator_label: Name | None = None
    source: str | None = Field(None, description="inbox, http or operator: where the image came from")
    split: Literal["train", "val", "gate", "test"] | None = Field(
        None, description="an operator-labelled image's split at its site; only train and val ever go up")
    uncertainty: Unit | None = Field(None, description="normalised entropy of the served probabilities (0..1)")
    disagreement: Unit | None = Field(None, description="mean total-variation spread of the members (0..1)")

    @model_validator(mode="after")
    def _distributions(self) -> "SampleSidecar":
        """The ensemble's and every member's probabilities are each one distribution over the same classes."""
        if self.probabilities is not None:
            _check_distribution(list(self.probabilities.values()), "probabilities")
        width = len(self.probabilities) if self.probabilities else None
        for i, member in enumerate(self.member_probabilities or []):
            _check_distribution(member, f"member_probabilities.{i}")
            if width is not None and len(member) != width:
                raise ValueError(f"member_probabilities.{i}: {len(member)} values for {width} classes")
        return self

    def fits(self, classes: list[str]) -> str | None:
        """Why this sidecar's probabilities are not over ``classes`` (the family's), or None when they are."""
        if self.probabilities is not None and sorted(self.probabilities) != sorted(classes):
            return f"probabilities are over {sorted(self.probabilities)}, not the family's classes {classes}"
        for i, member in enumerate(self.member_probabilities or []):
            if len(member) != len(classes):
                return f"member_probabilities.{i}: {len(member)} values for the family's {len(classes)} classes"
        return None


def _check_distribution(values: list[float], name: str) -> None:
    if not values:
        raise ValueError(f"{name}: empty")
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{name}: a probability outside [0, 1]")
    if not math.isclose(sum(values), 1.0, abs_tol=SUM_TOLERANCE):
        raise ValueError(f"{name}: sums to {sum(values):.4f}, not 1")


def validate_json_object(data: bytes, model: type[M], what: str) -> tuple[dict, M]:
    """``(raw, validated)`` for JSON bytes that must be an object matching ``model``; a ``ValueError``
    naming ``what`` and the first few problems otherwise (one schema check for everything sites write)."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{what} is not a JSON object (got {type(raw).__name__})")
    try:
        return raw, model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or what}: {e['msg']}" for e in exc.errors()[:3])
        raise ValueError(f"{what} fields: {problems}") from None


def parse_sidecar(data: bytes) -> SampleSidecar:
    """Validate sidecar bytes; :class:`SidecarError` with the first few problems."""
    if len(data) > MAX_SIDECAR_BYTES:
        raise SidecarError(f"sidecar too large ({len(data)} bytes > {MAX_SIDECAR_BYTES})")
    try:
        return validate_json_object(data, SampleSidecar, "sidecar")[1]
    except ValueError as exc:
        raise SidecarError(str(exc)) from None
