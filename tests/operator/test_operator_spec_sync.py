"""One source of truth for the specs: the CRDs' openAPIV3Schema and the pydantic models cannot drift.

Both ways: every field on one side is on the other, with the same type, required-ness, default,
bounds (minimum/exclusive, maximum/exclusive, lengths, items, pattern, enum) and nullability; a
model with a cross-field validator has a CEL rule on the same schema node and the reverse (transition
rules on oldSelf have no model counterpart: the operator never sees the old spec). And the defaults
an InferenceService leaves out are the worker's own (EngineConfig, SLO, WorkerOptions, `flexllm serve`).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from flexllm.operator.models import FinetuneJobSpec, InferenceServiceSpec
from flexllm.worker.cli import build_parser
from flexllm.worker.engine.config import EngineConfig
from flexllm.worker.finetune.spec import FinetuneJobSpec as WorkerJobSpec
from flexllm.worker.options import SLO, WorkerOptions

REPO = Path(__file__).resolve().parents[2]
SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}
BOUND_KEYS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "minLength", "maxLength",
              "minItems", "maxItems", "pattern", "enum", "nullable")


def spec_schema(plural: str) -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / f"flexllm.ai_{plural}.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def crd_bounds(schema: dict[str, Any]) -> dict[str, Any]:
    bounds = {key: schema[key] for key in BOUND_KEYS if key in schema and schema[key] is not False}
    return {key: sorted(value) if key == "enum" else value for key, value in bounds.items()}


def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(X, True) for X | None; (annotation, False) otherwise."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        assert len(args) == 1, f"only X | None unions are mapped: {annotation}"
        return args[0], True
    return annotation, False


def model_bounds(annotation: Any, metadata: list[Any], kind: str, nullable: bool) -> dict[str, Any]:
    """The pydantic constraints in the CRD's vocabulary."""
    sized = ("minItems", "maxItems") if kind == "array" else ("minLength", "maxLength")
    bounds: dict[str, Any] = {}
    for item in metadata:
        match item:
            case annotated_types.Ge(ge=value):
                bounds["minimum"] = value
            case annotated_types.Gt(gt=value):
                bounds.update(minimum=value, exclusiveMinimum=True)
            case annotated_types.Le(le=value):
                bounds["maximum"] = value
            case annotated_types.Lt(lt=value):
                bounds.update(maximum=value, exclusiveMaximum=True)
            case annotated_types.MinLen(min_length=value):
                bounds[sized[0]] = value
            case annotated_types.MaxLen(max_length=value):
                bounds[sized[1]] = value
            case _ if getattr(item, "pattern", None):
                bounds["pattern"] = item.pattern
    if typing.get_origin(annotation) is typing.Literal:
        bounds["enum"] = sorted(typing.get_args(annotation))
    if nullable:
        bounds["nullable"] = True
    return bounds


def kind_of(annotation: Any) -> str:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object"
    if typing.get_origin(annotation) in (list, tuple):
        return "array"
    if typing.get_origin(annotation) is typing.Literal:
        return SCALARS[type(typing.get_args(annotation)[0])]
    return SCALARS[annotation]


def compare_value(schema: dict[str, Any], annotation: Any, metadata: list[Any], default: Any, where: str,
                  nullable: bool = False) -> list[str]:
    """Type, bounds and default of one field (or one array item) against its schema."""
    kind = kind_of(annotation)
    if schema.get("type") != kind:
        return [f"{where}: CRD type {schema.get('type')!r}, model type {kind!r} ({annotation})"]
    problems = []
    wanted = model_bounds(annotation, metadata, kind, nullable)
    if crd_bounds(schema) != wanted:
        problems.append(f"{where}: CRD bounds {crd_bounds(schema)}, model bounds {wanted}")
    if kind == "object":
        if default is not None and default != annotation():
            problems.append(f"{where}: a model default other than {annotation.__name__}() has no CRD form")
        if (default is not None) != ("default" in schema) or schema.get("default", {}) != {}:
            problems.append(f"{where}: CRD default {schema.get('default')!r}, model default {default!r}")
        problems += compare_model(schema, annotation, where)
    elif kind == "array":
        (item,) = typing.get_args(annotation)[:1]
        problems += compare_value(schema["items"], item, [], None, f"{where}[]")
        if (None if default is None else list(default)) != schema.get("default"):
            problems.append(f"{where}: CRD default {schema.get('default')!r}, model default {default!r}")
    elif default != schema.get("default"):
        problems.append(f"{where}: CRD default {schema.get('default')!r}, model default {default!r}")
    return problems


def compare_field(schema: dict[str, Any], info: FieldInfo, where: str) -> list[str]:
    annotation, optional = unwrap_optional(info.annotation)
    default = None if info.default is PydanticUndefined else info.default
    nullable = optional and default is not None  # None is a value (e.g. no clipping), not "left out"
    return compare_value(schema, annotation, info.metadata, default, where, nullable)


def compare_model(schema: dict[str, Any], model: type[BaseModel], where: str) -> list[str]:
    """Both ways: fields, required-ness, each field, and cross-field validators against CEL rules."""
    properties = schema.get("properties", {})
    fields = {info.alias or name: info for name, info in model.model_fields.items()}
    problems = [f"{where}.{key}: in the CRD only" for key in sorted(properties.keys() - fields.keys())]
    problems += [f"{where}.{key}: in {model.__name__} only" for key in sorted(fields.keys() - properties.keys())]
    required = set(schema.get("required", []))
    for key in sorted(properties.keys() & fields.keys()):
        if fields[key].is_required() != (key in required):
            side = "the model" if fields[key].is_required() else "the CRD"
            problems.append(f"{where}.{key}: required in {side} only")
        problems += compare_field(properties[key], fields[key], f"{where}.{key}")
    cel = [rule for rule in schema.get("x-kubernetes-validations", []) if "oldSelf" not in rule["rule"]]
    validators = model.__pydantic_decorators__.model_validators
    if bool(cel) != bool(validators):
        problems.append(f"{where}: CEL rules {[r['rule'] for r in cel]} but {model.__name__} validators "
                        f"{list(validators)}")
    return problems


@pytest.mark.parametrize(("plural", "model"), [("finetunejobs", FinetuneJobSpec),
                                               ("inferenceservices", InferenceServiceSpec)])
def test_crd_spec_and_pydantic_model_agree_both_ways(plural, model):
    problems = compare_model(spec_schema(plural), model, "spec")
    assert not problems, "\n".join(problems)


def test_the_workers_job_spec_is_the_operators_but_for_the_service():
    """The worker parses the CR's spec with the same fields; only the operator needs the service."""
    assert WorkerJobSpec.model_fields.keys() == FinetuneJobSpec.model_fields.keys()
    assert not WorkerJobSpec.model_fields["inference_service"].is_required()
    assert compare_model(spec_schema("finetunejobs")["properties"]["training"],
                         WorkerJobSpec.model_fields["training"].annotation, "spec.training") == []


def test_the_drift_check_catches_drift():
    """The comparison itself: a changed bound, default, type, or an extra field each show up."""
    schema = spec_schema("inferenceservices")
    schema["properties"]["engine"]["properties"]["maxLoras"]["minimum"] = 2
    schema["properties"]["slo"]["properties"]["ttftMs"]["default"] = 1
    schema["properties"]["replicas"]["type"] = "string"
    schema["properties"]["extra"] = {"type": "string"}
    del schema["x-kubernetes-validations"]
    problems = "\n".join(compare_model(schema, InferenceServiceSpec, "spec"))
    for expected in ("spec.engine.maxLoras: CRD bounds {'minimum': 2}", "spec.slo.ttftMs: CRD default 1",
                     "spec.replicas: CRD type 'string'", "spec.extra: in the CRD only", "spec: CEL rules []"):
        assert expected in problems


@pytest.mark.parametrize(("path", "worker", "flag"), [
    ("engine.maxTokensPerBatch", EngineConfig.max_tokens_per_batch, "max_tokens_per_batch"),
    ("engine.kvCacheFraction", EngineConfig.kv_cache_fraction, "kv_cache_fraction"),
    ("engine.maxLoras", EngineConfig.max_loras, "max_loras"),
    ("engine.maxLoraRank", EngineConfig.max_lora_rank, "max_lora_rank"),
    ("engine.policy", WorkerOptions.policy, "policy"),
    ("engine.maxFinetuneTokens", WorkerOptions.max_finetune_tokens, "max_finetune_tokens"),
    ("slo.ttftMs", round(SLO.ttft_s * 1000, 6), "ttft_ms"),
    ("slo.tpotMs", round(SLO.tpot_s * 1000, 6), "tpot_ms"),
    ("model.dtype", EngineConfig.dtype, "dtype"),
])
def test_service_defaults_are_the_workers_defaults(path, worker, flag):
    """What an InferenceService leaves out, the CRD, the operator and `flexllm serve` all fill in alike."""
    group, key = path.split(".")
    crd = spec_schema("inferenceservices")["properties"][group]["properties"][key]["default"]
    model = InferenceServiceSpec.model_validate({"model": {"uri": "m"}}).model_dump(by_alias=True)[group][key]
    serve = vars(build_parser().parse_args(["serve"]))[flag]
    assert (crd, model, serve) == (worker, worker, worker)
