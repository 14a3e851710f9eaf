"""The sample sidecar: what the edge says about a sample it uploads, and what the cloud accepts.

One schema for both sides: the sampler writes it, the cloud validates every sidecar against it before a
sample can reach a training set, so a sidecar that is valid JSON but not an object, or has a field of the
wrong type, is rejected with a reason instead of crashing the intake for the whole fleet.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_SIDECAR_BYTES = 64 * 1024


class SidecarError(ValueError):
    """A sidecar that cannot be used; the message says why."""


class SampleSidecar(BaseModel):
    model_config = ConfigDict(extra="allow")  # newer agents may say more; what is known must be right

    site: str = Field(min_length=1)
    time: float
    reasons: list[str]
    source_file: str | None = None
    model_version: str | None = None
    probabilities: dict[str, float] | None = None
    member_probabilities: list[list[float]] | None = None
    operator_label: str | None = None
    source: str | None = Field(None, description="inbox, http or operator: where the image came from")
    split: Literal["train", "val", "gate", "test"] | None = Field(
        None, description="an operator-labelled image's split at its site; only train and val ever go up")
    uncertainty: float | None = None
    disagreement: float | None = None


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
