"""Projections over weights kept as the checkpoint stores them: FP8 e4m3 with its 128x128 UE8M0 block scales, or
a float weight in its stored dtype (bf16 in released checkpoints). The kernels decode on the fly; nothing here
dequantizes or casts a weight.

A `Linear` is built as a float placeholder (on the meta device by the loader); the loader gives it the stored
tensors (`weight` and, for FP8, the `scale` buffer), so the official names `<prefix>.weight` / `<prefix>.scale`
are the module's own. Routed experts are stacked per MoE layer and go through `expert_matmul`.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.kernels.ops import Ops
from dsv4.model_runtime.layers.ops_module import OpsModule


class Linear(OpsModule):
    """y = x W^T with W = `weight` (float) or `weight` * `scale` per 128x128 block (F8_E4M3 + E8M0/F32)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.scale: torch.Tensor | None
        self.register_buffer("scale", None)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out] in `out_dtype` (default x.dtype), accumulated in at least fp32."""
        return self.ops.linear(x, self.weight, self.scale, out_dtype)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """The grouped projection of `wo_a`: x [N, G, in] -> [N, G, out/G], group g through weight rows
        [g*out/G, (g+1)*out/G). An FP8 weight needs out/G to be a multiple of 128 (the loader checks it).

        The transposes are copied explicitly (a reshape copies only when N > 1), so a decode step dispatches the
        same ops whatever its batch size."""
        n, g, k = x.shape
        w = self.weight.view(g, -1, k)
        by_group = x.transpose(0, 1).clone(memory_format=torch.contiguous_format)  # [G, N, in]
        if self.scale is None:
            out = torch.bmm(by_group, (w if w.dtype == x.dtype else w.to(x.dtype)).transpose(1, 2))  # [G, N, out/G]
        else:
            ends = torch.arange(1, g + 1, device=x.device, dtype=torch.int32) * n
            flat = self.ops.grouped_matmul_fp8(
                by_group.view(g * n, k), w, self.scale.view(g, -1, self.scale.shape[-1]), ends
            )
            out = flat.view(g, n, -1)
        return out.transpose(0, 1).clone(memory_format=torch.contiguous_format)


def expert_matmul(
    ops: Ops, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, group_ends: torch.Tensor
) -> torch.Tensor:
    """Stacked experts [E, O, K] as stored (float, FP8 + block scales, or MXFP4 packed + E8M0) on rows of x sorted
    by expert: the grouped-matmul op of the storage."""
    if scale is None:
        return ops.grouped_matmul(x, weight, group_ends)
    if weight.dtype == torch.float8_e4m3fn:
        return ops.grouped_matmul_fp8(x, weight, scale, group_ends)
    return ops.grouped_matmul_mxfp4(x, weight, scale, group_ends)
