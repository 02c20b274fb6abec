"""Model characteristics (seed 004): what a model needs from a head and which backends suit it best.

A registered model narrows its candidates to heads that can run it (backend, quantization, context,
dynamic shapes) and tilts ``model_specific`` and ``adaptive`` toward its preferred backends.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from router_worker.core.model import Head

PREFERRED_BACKEND_BONUS = 1.25


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_id: Annotated[str, Field(min_length=1, max_length=256)]
    parameter_count: Annotated[int, Field(ge=0)] = 0
    backends: list[str] = Field(default_factory=list)
    """Backends that can run the model at all (empty: any)."""
    preferred_backends: list[str] = Field(default_factory=list)
    quantization: str | None = None
    """A quantization the model is served in; heads must support it."""
    min_context: Annotated[int, Field(ge=0)] = 0
    dynamic_shapes: bool = False
    """The model needs heads that handle dynamic shapes."""

    @field_validator("quantization")
    @classmethod
    def _upper(cls, v: str | None) -> str | None:
        return v.upper() if v else v


def spec_miss(head: Head, spec: ModelSpec) -> str | None:
    """Why ``head`` can not run the model, or None when it can."""
    if spec.backends and head.backend not in spec.backends:
        return f"backend {head.backend} can not run {spec.model_id}"
    if spec.quantization and spec.quantization not in head.quantizations:
        return f"no {spec.quantization} support for {spec.model_id}"
    if spec.min_context and head.max_context < spec.min_context:
        return f"max_context {head.max_context} < {spec.model_id}'s {spec.min_context}"
    if spec.dynamic_shapes and not head.dynamic_shapes:
        return f"no dynamic shapes for {spec.model_id}"
    return None


def backend_bonus(head: Head, spec: ModelSpec | None) -> float:
    return PREFERRED_BACKEND_BONUS if spec is not None and head.backend in spec.preferred_backends else 1.0
