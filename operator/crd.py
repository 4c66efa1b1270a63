"""The CRD manifest, generated from the pydantic models in `spec.py` and `status.py`.

`python -m dsv4.operator.crd` rewrites the chart's copy; a unit test fails when that copy is out of date.
The conversion turns pydantic's JSON schema into a Kubernetes structural schema: `$ref`s inlined, optional fields
as plain (not required) properties, and nested objects defaulted to their fields' defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from dsv4.operator import api
from dsv4.operator.spec import MAX_NAME_LENGTH, DeploymentSpec, cel
from dsv4.operator.status import DeploymentStatus

CRD_FILE = Path(__file__).resolve().parent.parent / "charts" / "dsv4-operator" / "crds" / f"{api.CRD_NAME}.yaml"

# Keys of pydantic's JSON schema that carry meaning in an OpenAPI v3 structural schema; the rest (title, ...) go.
_KEPT = {
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "format",
    "x-kubernetes-validations",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
}


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The structural OpenAPI v3 form of one pydantic JSON-schema node."""
    if "$ref" in schema:
        resolved = dict(defs[schema["$ref"].rsplit("/", 1)[-1]])
        resolved.update({k: v for k, v in schema.items() if k != "$ref"})
        return structural(resolved, defs)
    if "anyOf" in schema and not schema.get("x-kubernetes-int-or-string"):
        branches = [b for b in schema["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express a union of {branches} in a structural schema")
        merged = {**schema, **branches[0]}
        del merged["anyOf"]
        if merged.get("default", 0) is None:
            del merged["default"]
        return structural(merged, defs)
    out: dict[str, Any] = {k: v for k, v in schema.items() if k in _KEPT}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if "exclusiveMinimum" in out:  # OpenAPI v3.0 spells it as a flag next to minimum
        out["minimum"], out["exclusiveMinimum"] = out["exclusiveMinimum"], True
    if "properties" in schema:
        out["type"] = "object"
        required = set(schema.get("required", []))
        props: dict[str, Any] = {}
        for name, sub in schema["properties"].items():
            node = structural(sub, defs)
            optional = any(b.get("type") == "null" for b in sub.get("anyOf", []))
            if name not in required and not optional and "properties" in node and "default" not in node:
                node["default"] = object_default(node)
            props[name] = node
        out["properties"] = props
        if required:
            out["required"] = sorted(required)
    elif isinstance(schema.get("additionalProperties"), dict):
        out["type"] = "object"
        out["additionalProperties"] = structural(schema["additionalProperties"], defs)
    if "items" in schema:
        out["items"] = structural(schema["items"], defs)
    return out


def object_default(node: dict[str, Any]) -> dict[str, Any]:
    """The value the API server would make of `{}` for this object schema, spelled out.

    The API server checks a default against the CEL rules without defaulting it first, so `{}` would fail any
    rule that reads a defaulted field.
    """
    return {name: sub["default"] for name, sub in node["properties"].items() if "default" in sub}


def model_schema(model: type[DeploymentSpec] | type[DeploymentStatus]) -> dict[str, Any]:
    """The structural schema of a pydantic model (camelCase field names, as on the wire)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def printer_columns() -> list[dict[str, Any]]:
    """Columns of `kubectl get dsv4`."""
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {
            "name": "Prefill",
            "type": "string",
            "jsonPath": ".status.prefill.summary",
            "description": "rank groups ready/desired",
        },
        {
            "name": "Decode",
            "type": "string",
            "jsonPath": ".status.decode.summary",
            "description": "rank groups ready/desired",
        },
        {
            "name": "Pods/Group",
            "type": "integer",
            "jsonPath": ".status.decode.podsPerGroup",
            "description": "pods of one decode group",
            "priority": 1,
        },
        {
            "name": "Prefix Hits",
            "type": "string",
            "jsonPath": ".status.prefixCache.hitRate",
            "description": "share of prompt tokens taken from cached prefixes",
            "priority": 1,
        },
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    root: dict[str, Any] = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": model_schema(DeploymentSpec),
            "status": model_schema(DeploymentStatus),
        },
        "x-kubernetes-validations": [
            cel(
                f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
                f"metadata.name must be at most {MAX_NAME_LENGTH} characters: child names append suffixes",
            )
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": api.CRD_NAME, "labels": {"app.kubernetes.io/part-of": "dsv4"}},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["all", "dsv4"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns(),
                }
            ],
        },
    }


def render() -> str:
    """The CRD as the YAML text stored in the chart."""
    header = "# Generated by `python -m dsv4.operator.crd` from operator/spec.py and operator/status.py. Do not edit.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)


def main() -> int:
    """Rewrite the chart's CRD file."""
    CRD_FILE.parent.mkdir(parents=True, exist_ok=True)
    CRD_FILE.write_text(render())
    print(f"wrote {CRD_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
