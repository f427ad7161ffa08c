"""Glue shared by the handlers: spec validation that ends in a clear, permanent status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import kopf
from pydantic import BaseModel, ValidationError

from flexllm.operator import status as st
from flexllm.operator.models import describe
from flexllm.worker.names import InvalidNameError, validate_name

Spec = TypeVar("Spec", bound=BaseModel)


def mark_not_ready(patch: kopf.Patch, old: Mapping[str, Any], generation: int | None, phase: str, reason: str,
                   message: str, terminal: bool = False) -> None:
    """Sets the phase, the message and Ready=False with the reason; terminal (a job's end) sets completionTime."""
    ready = st.condition("Ready", False, reason, message, generation)
    patch.status.update(phase=phase, message=message, observedGeneration=generation,
                        conditions=st.merge_conditions(old.get("conditions", []), ready))
    if terminal:
        patch.status["completionTime"] = st.now_iso()


def validate(model: type[Spec], spec: Mapping[str, Any], patch: kopf.Patch, old: Mapping[str, Any],
             generation: int | None, phase: str, terminal: bool = False) -> Spec:
    """The spec as a pydantic model, or a PermanentError with Ready=False/InvalidSpec in the status."""
    try:
        return model.model_validate(dict(spec))
    except ValidationError as error:
        mark_not_ready(patch, old, generation, phase, "InvalidSpec", describe(error), terminal)
        raise kopf.PermanentError(f"invalid spec: {describe(error)}") from error


def require_names(patch: kopf.Patch, old: Mapping[str, Any], generation: int | None, phase: str,
                  names: list[tuple[str, str]], terminal: bool = False) -> None:
    """Each ``(kind, name)`` follows the naming rule (``flexllm.worker.names``), or a PermanentError with
    Ready=False/InvalidName in the status: such a name would never be safe as a Redis key or folder."""
    try:
        for kind, name in names:
            validate_name(name, kind)
    except InvalidNameError as error:
        mark_not_ready(patch, old, generation, phase, "InvalidName", str(error), terminal)
        raise kopf.PermanentError(str(error)) from error
