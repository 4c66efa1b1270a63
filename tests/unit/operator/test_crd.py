"""The generated CRD: up to date in the chart, structural, with the names, columns and defaults users rely on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dsv4.operator import api, crd
from dsv4.operator.spec import parse_spec

from .conftest import apply_defaults, root_schema

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
CHART_CRD = REPO / "charts" / "dsv4-operator" / "crds" / f"{api.CRD_NAME}.yaml"


def test_chart_crd_is_generated_from_the_current_source() -> None:
    assert CHART_CRD.read_text() == crd.render(), "run `python -m dsv4.operator.crd` and commit the result"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for key in ("properties",):
            for name, sub in node.get(key, {}).items():
                out += _walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                out += _walk(node[key], f"{path}[{key}]")
    return out


def test_schema_is_structural() -> None:
    for path, node in _walk(root_schema()):
        assert not {"$ref", "anyOf", "allOf", "oneOf", "title", "$defs"} & node.keys(), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"


def test_names_subresource_and_columns() -> None:
    manifest = yaml.safe_load(CHART_CRD.read_text())
    names = manifest["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (api.KIND, api.PLURAL, ["dsv4"])
    version = manifest["spec"]["versions"][0]
    assert version["name"] == api.VERSION and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Prefill", "Decode", "Pods/Group", "Prefix Hits", "Endpoint", "Age"]


def test_api_server_defaults_equal_the_operators_defaults() -> None:
    minimal = {"model": {"variant": "tiny"}, "accelerator": {"type": "cpu"}}
    defaulted = apply_defaults(root_schema()["properties"]["spec"], minimal)
    assert defaulted["redis"]["managed"] is True and defaulted["prefill"]["maxReplicas"] == 4
    assert parse_spec(defaulted) == parse_spec(minimal)


def test_optional_objects_get_no_default() -> None:
    spec = root_schema()["properties"]["spec"]["properties"]
    assert "default" not in spec["model"]["properties"]["source"]
    assert "default" not in spec["redis"]["properties"]["secretRef"]


def test_every_cel_rule_has_a_message() -> None:
    rules = [r for _, node in _walk(root_schema()) for r in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 15
    assert all(r["message"] and r["rule"] for r in rules)
