"""The torch_npu schema reader and call checker, on the pinned wheel's real schemas."""

from __future__ import annotations

import pytest
import torch

from .schema import SchemaError, parse_schema

pytestmark = pytest.mark.unit


def test_wheel_holds_the_ops_the_adapters_use(schemas):
    used = {
        "npu_rms_norm",
        "npu_rotary_mul",
        "npu_mhc_pre",
        "npu_mhc_sinkhorn",
        "npu_mhc_post",
        "npu_grouped_matmul",
        "npu_lightning_indexer",
        "npu_sparse_flash_attention",
        "npu_moe_gating_top_k",
        "npu_moe_init_routing_v2",
    }
    assert used <= set(schemas), used - set(schemas)
    assert len(schemas) > 500


def test_schema_parse_and_bind(schemas):
    gating = schemas["npu_moe_gating_top_k"]
    assert [p.name for p in gating.params][:3] == ["x", "k", "bias"]
    assert gating.params[2].keyword_only and not gating.params[1].keyword_only
    x = torch.zeros(2, 8)
    assert gating.bind((x, 2), {"tid2eid": torch.zeros(4, 2, dtype=torch.long)})["k"] == 2
    with pytest.raises(SchemaError, match="no argument 'norm_typ'"):
        gating.bind((x, 2), {"norm_typ": 2})
    with pytest.raises(SchemaError, match="required argument 'k' missing"):
        gating.bind((x,), {})
    with pytest.raises(SchemaError, match="must be int"):
        gating.bind((x, 2.0), {})
    with pytest.raises(SchemaError, match="positional"):
        gating.bind((x, 2, None), {})  # bias is keyword-only


def test_list_and_optional_types():
    s = parse_schema("f(Tensor[] x, *, int[]? sizes=None, SymInt n=1, str mode='a', float eps=1e-6) -> Tensor[]")
    t = torch.zeros(1)
    s.bind(([t, t],), {"sizes": [1, 2], "n": 3, "eps": 1})
    for bad in ({"sizes": [1.5]}, {"n": True}, {"mode": 1}):
        with pytest.raises(SchemaError):
            s.bind(([t],), bad)
    with pytest.raises(SchemaError):
        s.bind((t,), {})
