"""Glue shared by the handlers: spec validation that ends in a clear, permanent status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import kopf
from pydantic import BaseModel, ValidationError

from flexllm.operator import status as st
from flexllm.operator.models import describe

Spec = TypeVar("Spec", bound=BaseModel)


def mark_not_ready(patch: kopf.Patch, old: Mapping[str, Any], phase: str, reason: str, message: str) -> None:
    """Sets the phase, the message and Ready=False with the reason (terminal for Failed)."""
    ready = st.condition("Ready", False, reason, message)
    patch.status.update(phase=phase, message=message,
                        conditions=st.merge_conditions(old.get("conditions", []), ready))
    if phase == "Failed":
        patch.status["completionTime"] = st.now_iso()


def validate(model: type[Spec], spec: Mapping[str, Any], patch: kopf.Patch, old: Mapping[str, Any],
             phase: str) -> Spec:
    """The spec as a pydantic model, or a PermanentError with Ready=False/InvalidSpec in the status."""
    try:
        return model.model_validate(dict(spec))
    except ValidationError as error:
        mark_not_ready(patch, old, phase, "InvalidSpec", describe(error))
        raise kopf.PermanentError(f"invalid spec: {describe(error)}") from error
