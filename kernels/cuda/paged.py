"""Paged decode ops on the `cuda` backend: the KV pool read in place through block tables.

For now the rows are gathered and decoded by PyTorch ops on the GPU (only the rows a step reads: the window and
the selected entries for attention; every covered key for the indexer's scoring pass), then the Triton sparse
attention and indexer kernels of `attention.py` run over them. No host sync on either path.
"""

from __future__ import annotations

import torch

from dsv4.kernels.cuda.attention import indexer_topk, sparse_attention
from dsv4.kernels.cuda.launch import check_device
from dsv4.kernels.paged import PagedRows
from dsv4.kernels.reference import paged as ref_paged
from dsv4.kernels.registry import register


@register("paged_sparse_attention", "cuda")
def paged_sparse_attention(
    q: torch.Tensor,
    window: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    entries: PagedRows | None,
    block_tables: torch.Tensor,
    entry_idx: torch.Tensor | None,
    sink: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    check_device("paged_sparse_attention", q, window, slots, positions, block_tables, entry_idx, sink)
    keys, valid = ref_paged.gather_rows(window, slots, positions, entries, block_tables, entry_idx)
    idx = torch.where(valid, torch.arange(keys.shape[1], device=q.device), -1)
    return sparse_attention(q[:, None], keys.to(q.dtype), idx[:, None], sink, scale)[:, 0]


@register("paged_indexer_topk", "cuda")
def paged_indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: PagedRows,
    block_tables: torch.Tensor,
    visible: torch.Tensor,
    topk: int,
) -> torch.Tensor:
    check_device("paged_indexer_topk", q, weights, block_tables, visible, *keys.tensors)
    decoded = ref_paged.all_keys(keys, block_tables)
    return indexer_topk(q[:, None], weights[:, None], decoded, visible[:, None], topk)[:, 0]
