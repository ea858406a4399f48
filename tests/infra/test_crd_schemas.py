"""The Ray custom resources of infra/k8s against the KubeRay CRD schemas they are applied to (vendored under
crds/, with their version and source in crds/kuberay-v1.7.0/README.md), so no cluster is needed.

Two checks, as the API server makes them: the schema's types, enums, patterns and required fields
(jsonschema), and no field the schema does not know. Kubernetes prunes unknown fields of a structural schema
silently (a misspelt `workerGroupSpec` or `securityContex` would be dropped, not refused), so here a typo is
an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from test_manifests import of_kind

KUBERAY = "v1.7.0"
SCHEMAS = Path(__file__).resolve().parent / "crds" / f"kuberay-{KUBERAY}"
PLURALS = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}


def schema_of(kind: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"ray.io_{PLURALS[kind]}.v1.schema.json").read_text())


def schema_problems(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Where the document breaks the schema's types, enums, patterns and required fields (x-kubernetes-*
    keywords and the int-or-string format are Kubernetes' own: jsonschema leaves them to the next check)."""
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message[:200]}"
        for error in validator.iter_errors(doc)
    ]


def unknown_fields(node: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys the schema does not know (Kubernetes would prune them): wherever a schema node lists `properties`
    and does not preserve unknown fields, every key of the document must be one of them."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(node, dict):
        if "properties" in schema:
            properties = schema["properties"]
            return [
                problem
                for key, value in node.items()
                for problem in (
                    [f"{path}.{key}"]
                    if key not in properties
                    else unknown_fields(value, properties[key], f"{path}.{key}")
                )
            ]
        if isinstance(schema.get("additionalProperties"), dict):  # a map: its values have a schema
            return [
                problem
                for key, value in node.items()
                for problem in unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
            ]
    if isinstance(node, list) and isinstance(schema.get("items"), dict):
        return [
            problem
            for i, item in enumerate(node)
            for problem in unknown_fields(item, schema["items"], f"{path}[{i}]")
        ]
    return []


RESOURCES = [(name, doc) for kind in PLURALS for name, doc in of_kind(kind)]


def test_every_ray_resource_is_checked() -> None:
    assert {name for name, _ in RESOURCES} == {
        "raycluster.yaml",
        "rayjob-train.yaml",
        "rayjob-tune.yaml",
        "cronjob-tune.yaml:rayjob.yaml",
    }
    assert all(doc["apiVersion"] == "ray.io/v1" for _, doc in RESOURCES)


@pytest.mark.parametrize(("name", "doc"), RESOURCES, ids=[name for name, _ in RESOURCES])
def test_ray_resource_matches_the_kuberay_crd(name: str, doc: dict[str, Any]) -> None:
    schema = schema_of(doc["kind"])
    assert schema_problems(doc, schema) == []
    assert unknown_fields(doc, schema) == []


def test_checkers_reject_bad_ray_resources() -> None:
    ((_, good),) = of_kind("RayCluster")
    schema = schema_of("RayCluster")
    assert schema_problems(good, schema) == [] and unknown_fields(good, schema) == []

    spec = good["spec"]
    worker = spec["workerGroupSpecs"][0]
    wrong_type = {**good, "spec": {**spec, "workerGroupSpecs": [{**worker, "replicas": "four"}]}}
    assert schema_problems(wrong_type, schema)
    no_containers = {**worker, "template": {"spec": {}}}
    assert schema_problems({**good, "spec": {**spec, "workerGroupSpecs": [no_containers]}}, schema)
    assert schema_problems({**good, "spec": {**spec, "authOptions": {"mode": "password"}}}, schema)

    typo = {**good, "spec": {**spec, "workerGroupSpec": spec["workerGroupSpecs"]}}
    assert unknown_fields(typo, schema) == [".spec.workerGroupSpec"]
    container = {**worker["template"]["spec"]["containers"][0], "securityContex": {}}
    nested = {**worker, "template": {"spec": {**worker["template"]["spec"], "containers": [container]}}}
    assert unknown_fields({**good, "spec": {**spec, "workerGroupSpecs": [nested]}}, schema) == [
        ".spec.workerGroupSpecs[0].template.spec.containers[0].securityContex"
    ]
    # free-form maps stay free: labels, rayStartParams, resource quantities
    params = {**spec["headGroupSpec"], "rayStartParams": {"any-flag": "1"}}
    assert unknown_fields({**good, "spec": {**spec, "headGroupSpec": params}}, schema) == []
