"""The sample sidecar: what the edge says about a sample it uploads, and what the cloud accepts.

One schema for both sides: the sampler writes it, the cloud validates every sidecar against it before a
sample can reach a training set, so a sidecar that is valid JSON but not an object, or has a field of the
wrong type, is rejected with a reason instead of crashing the intake for the whole fleet.
"""

from __future__ import annotations

import json

import math

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, model_validator

MAX_SIDECAR_BYTES = 64 * 1024
# An INT8 graph's probabilities come in 1/255 steps and the agent rounds them to 6 places: a distribution
# sums to one within this.
SUM_TOLERANCE = 0.05


class SidecarError(ValueError):
    """A sidecar that cannot be used; the message says why."""


class SampleSidecar(BaseModel):
    model_config = ConfigDict(extra="allow")  # newer agents may say more; what is known must be right

    site: str = Field(min_length=1)
    time: FiniteFloat
    reasons: list[str]
    source_file: str | None = None
    model_version: str | None = None
    probabilities: dict[str, FiniteFloat] | None = None
    member_probabilities: list[list[FiniteFloat]] | None = None
    operator_label: str | None = None
    source: str | None = Field(None, description="inbox, http or operator: where the image came from")
    uncertainty: FiniteFloat | None = None
    disagreement: FiniteFloat | None = None

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


def parse_sidecar(data: bytes) -> SampleSidecar:
    """Validate sidecar bytes; :class:`SidecarError` with the first few problems."""
    if len(data) > MAX_SIDECAR_BYTES:
        raise SidecarError(f"sidecar too large ({len(data)} bytes > {MAX_SIDECAR_BYTES})")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SidecarError(f"sidecar is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise SidecarError(f"sidecar is not a JSON object (got {type(raw).__name__})")
    try:
        return SampleSidecar.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'sidecar'}: {e['msg']}" for e in exc.errors()[:3])
        raise SidecarError(f"sidecar fields: {problems}") from None
