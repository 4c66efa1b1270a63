"""torch_npu op schemas read from the release wheel without importing it, and a checker for calls against them.

The wheel ships `torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`, whose `func:` entries are the
native-function schemas the ops are generated from (`name(Tensor x, int k, *, Tensor? bias=None) -> Tensor`).
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

SCHEMA_MEMBER = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
_FUNC = re.compile(r"^(?P<name>[\w.]+)\((?P<args>.*)\)\s*->\s*(?P<ret>.+)$")


class SchemaError(TypeError):
    """A call that the pinned torch_npu schema would reject (unknown keyword, missing argument, wrong type)."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    has_default: bool
    keyword_only: bool


@dataclass(frozen=True)
class Schema:
    name: str
    params: tuple[Param, ...]
    returns: str

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Bind a call as the dispatcher would; raise SchemaError naming the problem."""
        positional = [p for p in self.params if not p.keyword_only]
        if len(args) > len(positional):
            raise SchemaError(f"{self.name}: {len(args)} positional arguments, the schema takes {len(positional)}")
        bound = {p.name: a for p, a in zip(positional, args, strict=False)}
        by_name = {p.name: p for p in self.params}
        for key, value in kwargs.items():
            if key not in by_name:
                raise SchemaError(f"{self.name}: no argument {key!r} in the schema {self}")
            if key in bound:
                raise SchemaError(f"{self.name}: argument {key!r} given twice")
            bound[key] = value
        for p in self.params:
            if p.name not in bound:
                if not p.has_default:
                    raise SchemaError(f"{self.name}: required argument {p.name!r} missing")
                continue
            if not type_matches(p.type, bound[p.name]):
                raise SchemaError(f"{self.name}: argument {p.name!r} must be {p.type}, got {type(bound[p.name])}")
        return bound

    def __str__(self) -> str:
        return f"{self.name}({', '.join(f'{p.type} {p.name}' for p in self.params)}) -> {self.returns}"


def type_matches(schema_type: str, value: Any) -> bool:
    """Whether a Python value is acceptable for a schema type (Tensor, Tensor?, Tensor[], int, float, ...)."""
    t = schema_type.replace("(a!)", "").replace("(b!)", "")
    if t.endswith("?"):
        return value is None or type_matches(t[:-1], value)
    if re.fullmatch(r"(Tensor|int|SymInt|float|bool)\[\d*\]", t):
        return isinstance(value, list | tuple) and all(type_matches(t.split("[")[0], v) for v in value)
    if t == "Tensor":
        return isinstance(value, torch.Tensor)
    if t in ("int", "SymInt"):
        return isinstance(value, int) and not isinstance(value, bool)
    if t in ("float", "double"):
        return isinstance(value, float | int) and not isinstance(value, bool)
    if t == "bool":
        return isinstance(value, bool)
    if t == "str":
        return isinstance(value, str)
    if t == "ScalarType":
        return isinstance(value, torch.dtype)
    raise SchemaError(f"schema type {schema_type!r} is not understood by this checker")


def parse_schema(func: str) -> Schema:
    """One `func:` string -> Schema (overload suffixes like `.List` stay in the name)."""
    m = _FUNC.match(func.strip())
    if m is None:
        raise ValueError(f"not a native-function schema: {func!r}")
    params: list[Param] = []
    keyword_only = False
    for raw in _split_args(m.group("args")):
        if raw == "*":
            keyword_only = True
            continue
        decl, _, default = raw.partition("=")
        typ, _, name = decl.strip().rpartition(" ")
        params.append(Param(name.strip(), typ.strip(), bool(default), keyword_only))
    return Schema(m.group("name"), tuple(params), m.group("ret").strip())


def _split_args(args: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in args:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def load_schemas(wheel: Path) -> dict[str, Schema]:
    """Every op schema of a torch_npu wheel, by name (first entry wins where the YAML lists one twice)."""
    with zipfile.ZipFile(wheel) as zf:
        doc = yaml.safe_load(zf.read(SCHEMA_MEMBER))
    schemas: dict[str, Schema] = {}
    for section in doc.values():
        if not isinstance(section, list):
            continue
        for entry in section:
            # other sections list bare op names under `func` (e.g. the symint list); only schemas count
            if isinstance(entry, dict) and _FUNC.match(str(entry.get("func", "")).strip()):
                schema = parse_schema(entry["func"])
                schemas.setdefault(schema.name, schema)
    return schemas
