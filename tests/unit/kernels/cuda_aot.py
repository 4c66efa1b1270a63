"""Ahead-of-time compilation of every Triton kernel of the `cuda` backend for an NVIDIA target, without a GPU.

Triton's compiler and the ptxas it ships run on any machine, so CPU CI can prove that each kernel lowers to a
cubin for sm_90 (H100/H200) at the Flash-sized tile configurations the wrappers pick: the interpreter cannot
catch a construct the real compiler rejects. Running the cubins needs a GPU (bench/gpu.sh).

    python tests/unit/kernels/cuda_aot.py [--arch 90]     # JSON line per kernel; exit 1 if one fails
(needs a process without TRITON_INTERPRET=1: the kernels must be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dsv4.kernels.cuda import attention, grouped_gemv, grouped_scaled, linear, mhc, moe, norm_rope, paged, sampling

_C = "constexpr"


def _specs() -> list[tuple[str, Any, dict[str, str], dict[str, Any], int]]:
    """(name, kernel, argument types, constexpr values, warps) at Flash decode shapes, bf16 activations, with the
    tile sizes and warp counts the wrappers launch."""
    bf, f32, i32, i64 = "*bf16", "*fp32", "i32", "*i64"
    specs: list[tuple[str, Any, dict[str, str], dict[str, Any], int]] = [
        (
            "norm_rope[d512,heads]",
            norm_rope._norm_rope_kernel,
            dict(x_ptr=bf, w_ptr=f32, cos_ptr=f32, sin_ptr=f32, out_ptr=bf, rows=i32, heads=i32, eps="fp32"),
            dict(D=512, HALF_R=32, NORM=True, HAS_WEIGHT=True, ROPE=True, INVERSE=False, BLOCK_R=8, BLOCK_D=512),
            4,
        ),
        (
            "swiglu",
            norm_rope._swiglu_kernel,
            dict(gate_ptr=bf, up_ptr=bf, scale_ptr=f32, out_ptr=bf, total=i32, inter=i32, limit="fp32"),
            dict(HAS_SCALE=True, BLOCK=1024),
            4,
        ),
        (
            "sinkhorn[n4]",
            mhc._sinkhorn_kernel,
            dict(logits_ptr=f32, out_ptr=f32, rows=i32, iters=i32, eps="fp32"),
            dict(N_HC=4, NP=4, BN=16),
            4,
        ),
        (
            "mhc_post[n4,d4096]",
            mhc._mhc_post_kernel,
            dict(y_ptr=bf, streams_ptr=bf, post_ptr=f32, comb_ptr=f32, out_ptr=bf, rows=i32),
            dict(N_HC=4, DIM=4096, NP=4, BN=mhc.BLOCK_N, BD=mhc.BLOCK_D),
            mhc.NUM_WARPS,
        ),
        (
            "compress_pool[l8,c512]",
            attention._compress_pool_kernel,
            dict(kv_ptr=f32, score_ptr=f32, out_ptr=f32),
            dict(L=8, C=512, BLOCK_L=8, BLOCK_C=attention._pool_block_c(8, 512)),
            4,
        ),
        (
            "compress_pool[l128,c512]",  # an HCA block of Flash (m = 128)
            attention._compress_pool_kernel,
            dict(kv_ptr=f32, score_ptr=f32, out_ptr=f32),
            dict(L=128, C=512, BLOCK_L=128, BLOCK_C=attention._pool_block_c(128, 512)),
            4,
        ),
        *[
            (
                f"compress_pool_slots[{name}]",
                attention._compress_pool_slots_kernel,
                dict(kv_ptr=f32, score_ptr=f32, slots_ptr=i64, complete_ptr="*u8", out_ptr=f32),
                dict(
                    L=length,
                    W=width,
                    C=channels,
                    PREV=prev,
                    BLOCK_L=length,
                    BLOCK_C=attention._pool_block_c(length, channels),
                ),
                4,
            )
            for name, length, width, channels, prev in (
                ("hca,m128,c512", 128, 512, 512, 0),
                ("csa,m4,c512", 8, 1024, 512, 4),
                ("csa-indexer,m4,c128", 8, 256, 128, 4),
            )
        ],
        (
            "indexer_scores[h64,d128]",
            attention._indexer_scores_kernel,
            dict(q_ptr=bf, w_ptr=bf, keys_ptr=bf, visible_ptr=i64, out_ptr=f32, S=i32, E=i32),
            dict(HI=64, D=128, BLOCK_H=64, BLOCK_D=128, BLOCK_E=64, ROUND_BF16=True, PRECISION="tf32"),
            4,
        ),
        (
            "topk[e1024]",
            attention._topk_kernel,
            dict(score_ptr=f32, visible_ptr=i64, out_ptr=i64, rows=i32, E=i32, K=i32),
            dict(BLOCK_R=2, BLOCK_E=1024),
            4,
        ),
        (
            "sparse_attention[h64,d512]",
            attention._sparse_attention_kernel,
            dict(q_ptr=bf, kv_ptr=bf, idx_ptr=i64, sink_ptr=f32, out_ptr=bf, S=i32, N=i32, K=i32, scale="fp32"),
            dict(H=64, D=512, BLOCK_H=16, BLOCK_D=512, BLOCK_K=16, PRECISION="tf32"),
            attention.ATTENTION_WARPS,
        ),
        (
            "route[e256,k6]",
            moe._route_kernel,
            dict(
                logits_ptr=f32, bias_ptr=f32, hash_ptr=i64, w_ptr=f32, idx_ptr=i64, rows=i32, E=i32, route_scale="fp32"
            ),
            dict(TOPK=6, HASH=False, BLOCK_R=16, BLOCK_E=256, BLOCK_K=8),
            4,
        ),
    ]
    u8, i32p = "*u8", "*i32"
    specs += [
        (
            "paged_attention[h64,d512,fp8]",
            paged._paged_attention_kernel,
            dict(
                q_ptr=bf, win_ptr=bf, slot_ptr=i64, pos_ptr=i64, e0_ptr=u8, e1_ptr=u8, e2_ptr=bf, table_ptr=i32p,
                idx_ptr=i64, sink_ptr=f32, out_ptr=bf, T=i32, K=i32, scale="fp32",
            ),
            dict(H=64, D=512, W=128, NOPE=448, RPB=64, FORMAT=1, BLOCK_H=16, BLOCK_D=512, BLOCK_K=16,
                 PRECISION="tf32"),
            attention.ATTENTION_WARPS,
        ),
        (
            "paged_scores[h64,d128,mxfp4]",
            paged._paged_scores_kernel,
            dict(
                q_ptr=bf, w_ptr=bf, k0_ptr=u8, k1_ptr=u8, k2_ptr=u8, table_ptr=i32p, visible_ptr=i64, out_ptr=f32,
                T=i32, E_PAD=i32,
            ),
            dict(HI=64, D=128, RPB=64, FORMAT=2, BLOCK_H=64, BLOCK_D=128, BLOCK_E=64, ROUND_BF16=True,
                 PRECISION="tf32"),
            4,
        ),
        (
            "merge_topk[g8,k512]",
            paged._merge_topk_kernel,
            dict(score_ptr=f32, cand_ptr=i64, visible_ptr=i64, out_ptr=i64, N=i32, K=i32, E_PAD=i32, GROUPS=i32),
            dict(BLOCK=1024, BITS=19),
            4,
        ),
    ]  # fmt: skip
    for fp8, weight, out in ((False, bf, f32), (True, "*fp8e4nv", bf)):
        specs.append(
            (
                f"linear[quant={int(fp8)}]",
                linear._linear_kernel,
                dict(x_ptr=bf, w_ptr=weight, scale_ptr="*u8", out_ptr=out, M=i32, N_OUT=i32, K=i32),
                dict(
                    QUANT=fp8,
                    SCALE_E8M0=fp8,
                    BLOCK_M=16,
                    BLOCK_O=64,
                    BLOCK_K=linear.LINEAR_BLOCK_K,
                    PRECISION="tf32",
                ),
                linear.LINEAR_WARPS,
            )
        )
    for quant, weight, scale in ((0, bf, f32), (1, "*fp8e4nv", "*u8"), (2, "*u8", "*u8")):
        specs.append(
            (
                f"grouped_matmul[quant={quant}]",
                moe._grouped_matmul_kernel,
                dict(
                    x_ptr=bf,
                    w_ptr=weight,
                    scale_ptr=scale,
                    ends_ptr="*i32",
                    tile_expert_ptr=i64,
                    tile_first_ptr=i64,
                    out_ptr=bf,
                    M=i32,
                    N_OUT=i32,
                    K=i32,
                    N_EXPERTS=i32,
                ),
                dict(
                    QUANT=quant,
                    SCALE_E8M0=quant > 0,
                    BLOCK_M=16,
                    BLOCK_O=64,
                    BLOCK_K=moe.GROUPED_BLOCK_K,
                    PRECISION="tf32",
                ),
                moe.GROUPED_WARPS,
            )
        )
    # Flash's expert and wo_a widths are multiples of 16 and torch's buffers 16-byte aligned, and Triton specializes
    # such arguments (":16" below), which is what lets the kernel load 16 bytes a thread in one vector
    a16 = ":16"
    for quant, weight, scale in ((1, "*u8", "*u8"), (1, "*u8", f32), (2, "*u8", "*u8")):
        for rows in (1, 2, 4):  # the rows per program grouped_gemv.gemv_rows picks
            specs.append(
                (
                    f"grouped_gemv[quant={quant},scale={scale[1:]},rows={rows}]",
                    grouped_gemv._grouped_gemv_kernel,
                    dict(
                        x_ptr=(bf if quant == 1 else "*i32") + a16,  # MXFP4 reads bf16 x as column-pair words
                        w_ptr=weight + a16,
                        scale_ptr=scale + a16,
                        ends_ptr="*i32",
                        tile_expert_ptr=i64,
                        tile_first_ptr=i64,
                        out_ptr=bf + a16,
                        M=i32,
                        N_OUT=i32 + a16,
                        K=i32 + a16,
                        N_EXPERTS=i32,
                        STEPS=i32,
                        SPLIT_STEPS=i32,
                        KB=i32 + a16,
                    ),
                    dict(
                        QUANT=quant,
                        X_KIND=1,
                        SCALE_E8M0=scale == "*u8",
                        ROWS=rows,
                        BN=grouped_gemv.BLOCK_N,
                        G=grouped_gemv.gemv_groups(quant, rows),
                        GB=grouped_gemv.GROUP_BYTES,
                    ),
                    grouped_gemv.GEMV_WARPS,
                )
            )
    specs.append(
        (
            "grouped_mxfp4_scaled",
            grouped_scaled._grouped_mxfp4_scaled_kernel,
            dict(
                x_ptr=bf + a16,
                w_ptr="*u8" + a16,
                scale_ptr="*u8" + a16,
                ends_ptr="*i32",
                tile_expert_ptr=i64,
                tile_first_ptr=i64,
                out_ptr=bf + a16,
                M=i32,
                N_OUT=i32 + a16,
                K=i32 + a16,
                N_EXPERTS=i32,
            ),
            dict(X_FORMAT="bf16", BN=grouped_scaled.BLOCK_N, BO=grouped_scaled.BLOCK_O, BK=grouped_scaled.BLOCK_K),
            grouped_scaled.SCALED_WARPS,
        )
    )
    finish = dict(part_ptr=f32, sq_ptr=f32, streams_ptr=bf, scale_ptr=f32, base_ptr=f32, x_ptr=bf)
    pre_args = dict(post_ptr=f32, comb_ptr=f32, rows=i32, splits=i32, iters=i32, hc_eps="fp32", norm_eps="fp32")
    head_args = dict(rows=i32, splits=i32, hc_eps="fp32", norm_eps="fp32")
    for batch in (1, 64):  # mhc.mix_plan's decode layouts: 1-row programs at batch 1, 16-row ones at 64
        for op, outputs, kernel, args in (
            ("mhc_pre", 24, mhc._mhc_pre_finish_kernel, pre_args),
            ("hc_head", 4, mhc._hc_head_finish_kernel, head_args),
        ):
            bn, bk, split = mhc.mix_plan(batch, 4 * 4096, outputs)
            bo = max(4, triton.next_power_of_2(outputs))
            sc = mhc._sum_chunk(bn, -(-4 * 4096 // split), bo)
            specs += [
                (
                    f"mix_partial[out{outputs},n4,d4096,b{batch}]",
                    mhc._mix_partial_kernel,
                    dict(streams_ptr=bf, fn_ptr=f32, part_ptr=f32, sq_ptr=f32, rows=i32),
                    dict(OUT=outputs, WIDTH=4 * 4096, BO=bo, BN=bn, BK=bk, SPLIT=split),
                    mhc.NUM_WARPS,
                ),
                (
                    f"{op}[n4,d4096,finish,b{batch}]",
                    kernel,
                    finish | args,
                    dict(N_HC=4, DIM=4096, NP=4, BO=bo, BN=bn, BD=mhc.BLOCK_D, SC=sc),
                    mhc.NUM_WARPS,
                ),
            ]
    for batch in (1, 64):  # mhc.post_mix_plan's decode layouts (its finishing kernel is mhc_pre's, above)
        bn, bk, split = mhc.post_mix_plan(batch, 4096, 4, 24)
        specs.append(
            (
                f"mhc_post_mix[n4,d4096,b{batch}]",
                mhc._mhc_post_mix_kernel,
                dict(
                    y_ptr=bf,
                    streams_ptr=bf,
                    post_ptr=f32,
                    comb_ptr=f32,
                    fn_ptr=f32,
                    out_ptr=bf,
                    part_ptr=f32,
                    sq_ptr=f32,
                    rows=i32,
                ),
                dict(N_HC=4, DIM=4096, NP=4, OUT=24, BO=32, BN=bn, BK=bk, SPLIT=split),
                mhc.NUM_WARPS,
            )
        )
    # the sampler at Flash's vocabulary (129,280 tokens: 64 chunks, 4,096 block maxima a row)
    f64, chunks = "*fp64", -(-129280 // sampling.CHUNK)
    scan = dict(
        logits_ptr=f32,
        temp_ptr=f64,
        topk_ptr=i64,
        noise_ptr=f64,
        seeds_ptr=i64,
        index_ptr=i64,
        maxima_ptr=i64,
        best_val_ptr=f64,
        best_idx_ptr="*i32",
    )
    for topk, noise, seeded in ((True, True, False), (False, True, False), (True, False, False), (True, True, True)):
        flags = dict(HAS_TOPK=topk, HAS_NOISE=noise, SEEDED=seeded, CHUNK=sampling.CHUNK, SUB=sampling.SUB)
        specs += [
            (
                f"sample_scan[topk={int(topk)},noise={int(noise)},seeded={int(seeded)}]",
                sampling._scan_kernel,
                scan | dict(V=i32, C=i32),
                flags,
                sampling.SAMPLE_WARPS,
            ),
            (
                f"sample_pick[topk={int(topk)},noise={int(noise)},seeded={int(seeded)}]",
                sampling._pick_kernel,
                scan | dict(out_ptr=i64 if noise else "*i32", V=i32, C=i32),
                flags | dict(KMAX=sampling.KMAX, CP=chunks, MP=chunks * sampling.CHUNK // sampling.SUB),
                sampling.PICK_WARPS,
            ),
        ]
    specs.append(
        (
            "sample_filter",
            sampling._filter_kernel,
            dict(logits_ptr=f32, temp_ptr=f64, thr_ptr="*i32", out_ptr=f64, V=i32),
            dict(CHUNK=sampling.CHUNK),
            sampling.SAMPLE_WARPS,
        )
    )
    # the top-p / min-p path: softmax shares, radix rounds, the keep-and-draw pass, the chunks' argmax
    stats = dict(logits_ptr=f32, temp_ptr=f64, thr_ptr="*i32", cmax_ptr=f64, csum_ptr=f64, V=i32, C=i32)
    shape = dict(CP=chunks, BINS=sampling.BINS, ROUNDS=sampling.ROUNDS)
    walk = dict(hist_ptr=f64, count_ptr="*i32", prefix_ptr=i64, above_ptr=f64)
    specs += [
        ("sample_stats", sampling._stats_kernel, stats, dict(CHUNK=sampling.CHUNK), sampling.SAMPLE_WARPS),
        (
            "sample_radix",
            sampling._radix_kernel,
            dict(logits_ptr=f32, temp_ptr=f64, topp_ptr=f64, thr_ptr="*i32", cmax_ptr=f64, csum_ptr=f64)
            | walk
            | dict(V=i32, C=i32, rnd=i32),
            dict(CHUNK=sampling.CHUNK, TILE=sampling.TILE, RADIX_BITS=sampling.RADIX_BITS) | shape,
            sampling.SAMPLE_WARPS,
        ),
        (
            "sample_argmax",
            sampling._argmax_chunks_kernel,
            dict(best_val_ptr=f64, best_idx_ptr="*i32", out_ptr=i64, C=i32),
            dict(CP=chunks),
            1,
        ),
    ]
    keep = (
        dict(logits_ptr=f32, temp_ptr=f64, topp_ptr=f64, minp_ptr=f64, thr_ptr="*i32", cmax_ptr=f64, csum_ptr=f64)
        | walk
        | dict(noise_ptr=f64, seeds_ptr=i64, index_ptr=i64, out_ptr=f64, best_val_ptr=f64, best_idx_ptr="*i32")
        | dict(V=i32, C=i32)
    )
    for topp, minp, noise, seeded in ((True, True, False, False), (True, False, True, False), (True, True, True, True)):
        specs.append(
            (
                f"sample_keep[topp={int(topp)},minp={int(minp)},noise={int(noise)},seeded={int(seeded)}]",
                sampling._keep_kernel,
                keep,
                dict(HAS_TOPP=topp, HAS_MINP=minp, HAS_NOISE=noise, SEEDED=seeded, CHUNK=sampling.CHUNK) | shape,
                sampling.SAMPLE_WARPS,
            )
        )
    return specs


def register_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers per thread and spill-store bytes that `ptxas -v` reports for the kernel's PTX."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        for ptxas in ("ptxas-blackwell", "ptxas"):  # the one whose PTX ISA version matches this Triton's output
            done = subprocess.run(
                [str(bin_dir / ptxas), f"-arch=sm_{arch}a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                capture_output=True,
                text=True,
            )
            regs = re.search(r"Used (\d+) registers", done.stderr)
            spills = re.search(r"(\d+) bytes spill stores", done.stderr)
            if done.returncode == 0 and regs and spills:
                return {"registers": int(regs.group(1)), "spill_store_bytes": int(spills.group(1))}
    raise RuntimeError(f"ptxas -v gave no register report: {done.stderr[-500:]}")


def compile_all(arch: int = 90) -> list[dict[str, Any]]:
    """Compile every kernel for `cuda` sm_<arch>; one result per kernel: ok, shared bytes, registers a thread and
    spill-store bytes (ptxas -v), seconds, or the error."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("aot: run without TRITON_INTERPRET=1 (the kernels must be JIT functions)")
    target = GPUTarget("cuda", arch, 32)
    results = []
    for name, kernel, types, constexprs, warps in _specs():
        signature = {a: t.removesuffix(":16") for a, t in types.items()} | dict.fromkeys(constexprs, _C)
        names = list(signature)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in types.items() if t.endswith(":16")}
        start = time.perf_counter()
        try:
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(source, target=target, options={"num_warps": warps})
            results.append(
                {
                    "kernel": name,
                    "arch": f"sm_{arch}",
                    "ok": "cubin" in compiled.asm,
                    "num_warps": warps,
                    "shared_bytes": int(compiled.metadata.shared),
                    **register_usage(compiled.asm["ptx"], arch),
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
        except Exception as e:  # report every kernel, not only the first failure
            results.append({"kernel": name, "arch": f"sm_{arch}", "ok": False, "error": repr(e)[:800]})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile every cuda-backend Triton kernel for an NVIDIA arch")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    results = compile_all(args.arch)
    for r in results:
        print(json.dumps(r), flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
