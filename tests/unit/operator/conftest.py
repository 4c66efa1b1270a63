"""Admission as the API server does it, in-process: schema defaults, then the CEL rules, then the typed spec.

The CEL rules are evaluated by cel-python over the generated CRD, so a rule that is wrong in the CRD fails here in
seconds; tests/cluster/operator checks the same invalid specs against the real kube-apiserver.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import celpy
import pytest

from dsv4.operator.crd import crd_manifest
from dsv4.operator.spec import DeploymentSpec, parse_spec

Admit = Callable[[dict[str, Any]], DeploymentSpec]


class Rejected(Exception):
    """The resource would be refused; the message is the CEL rule's message or the schema error."""


def root_schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Fill in `default`s the way the API server does: for absent properties, then recursively."""
    if not isinstance(obj, dict) or "properties" not in schema:
        if isinstance(obj, list) and "items" in schema:
            return [apply_defaults(schema["items"], x) for x in obj]
        return obj
    out = dict(obj)
    for name, sub in schema["properties"].items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if name in out:
            out[name] = apply_defaults(sub, out[name])
    return out


_env = celpy.Environment()


def check_cel(schema: dict[str, Any], obj: Any, path: str = "") -> None:
    """Evaluate every x-kubernetes-validations rule on the object it belongs to, depth first."""
    if isinstance(obj, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name in obj:
                check_cel(sub, obj[name], f"{path}.{name}")
    for rule in schema.get("x-kubernetes-validations", []):
        program = _env.program(_env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(obj)}):
            raise Rejected(f"{path or '<root>'}: {rule['message']}")


def admit_resource(resource: dict[str, Any]) -> DeploymentSpec:
    schema = root_schema()
    defaulted = apply_defaults(schema, resource)
    try:
        spec = parse_spec(defaulted["spec"])
    except ValueError as err:
        raise Rejected(str(err)) from err
    check_cel(schema, defaulted)
    return spec


@pytest.fixture
def admit() -> Callable[..., DeploymentSpec]:
    """`admit(spec, name="demo")` → the defaulted typed spec, or raises Rejected with the API server's message."""

    def _admit(spec: dict[str, Any], name: str = "demo") -> DeploymentSpec:
        return admit_resource({"metadata": {"name": name}, "spec": spec})

    return _admit
