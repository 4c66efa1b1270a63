"""The width-true model's decode step on one GPU with its weights packed (FP8 + MXFP4 as released), bf16.

    python bench/decode_gpu.py [--out FILE] [--batches 1,64] [--steps 10]

A random checkpoint of the `flash-widths` preset (Flash's layer widths: 3 layers + MTP, 16 experts) is written
as bytes (valid FP8 / MXFP4 codes with small power-of-two scales; the values mean nothing, the shapes and
formats are the release's) into a temporary folder, loaded by the real loader onto the GPU, and the engine's
decode step (`DeepseekV4.decode_paged` over the paged KV pool, replayed from a CUDA graph) is timed at each batch
size after a short prefill, then the MTP verification step (two graphs around the sampling, which is left out).
One JSON line per batch: ms per step (and per verification step, and their ratio), the bytes the step must
read (every weight but the embedding table, the batch's embedding rows, and of the routed experts the expected
share of distinct experts the batch's tokens pick: 1 - (1 - k/E)^batch), the device-to-device copy bandwidth
measured in the same run, and the fraction of that bandwidth floor the step reaches. Needs a CUDA device; no
network, nothing built (gpu.sh runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv4.model_runtime.engine.cuda_graphs import GRAPH_DEVICES, DecodeGraphs
from dsv4.model_runtime.engine.kv_state import KVCacheManager, PagedSequenceState
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.engine.step_inputs import SLOT, DecodeInputs
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4


def _tiled(shape: tuple[int, ...], pool: torch.Tensor) -> torch.Tensor:
    """A tensor of `shape` and pool's dtype filled by repeating `pool` (the values only have to be valid)."""
    n, p = math.prod(shape), pool.numel()
    out = torch.empty(n, dtype=pool.dtype)
    full = n // p
    out[: full * p].view(full, p).copy_(pool.expand(full, p))
    out[full * p :] = pool[: n - full * p]
    return out.view(shape)


def _fp8(shape: tuple[int, ...], pool: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of magnitude < 2 (exponent field <= 7, sign kept): never NaN, never huge."""
    return _tiled(shape, (pool & 0x3F) | (pool & 0x80)).view(torch.float8_e4m3fn)


def _e8m0(shape: tuple[int, ...], exponent: int) -> torch.Tensor:
    return torch.full(shape, 127 + exponent, dtype=torch.uint8).view(torch.float8_e8m0fnu)


def write_random_bytes_checkpoint(out: Path, preset: str = "flash-widths") -> Path:
    """A checkpoint of `preset` in the released formats, filled with random codes (seconds, not minutes)."""
    from dsv4.model_runtime.make_checkpoint import preset_config
    from dsv4.model_runtime.schema import checkpoint_schema
    from dsv4.model_runtime.storage import fp4_scale_shape, fp8_block_scale_shape

    cfg = preset_config(preset, quantized=True)
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (1 << 22,), generator=g, dtype=torch.uint8)
    floats = torch.randn(1 << 20, generator=g) * 0.02
    tensors: dict[str, torch.Tensor] = {}
    for spec in checkpoint_schema(cfg):
        scale = spec.name.removesuffix(".weight") + ".scale"
        if spec.kind == "fp8":
            tensors[spec.name] = _fp8(spec.shape, pool)
            tensors[scale] = _e8m0(fp8_block_scale_shape(*spec.shape), -6)
        elif spec.kind == "fp4":
            out_f, in_f = spec.shape
            tensors[spec.name] = _tiled((out_f, in_f // 2), pool).view(torch.int8)  # every byte is two e2m1 codes
            tensors[scale] = _e8m0(fp4_scale_shape(out_f, in_f), -6)
        elif spec.kind == "i64":
            tensors[spec.name] = torch.randint(0, cfg.n_routed_experts, spec.shape, generator=g)
        elif spec.name.endswith("norm.weight"):
            tensors[spec.name] = torch.ones(spec.shape, dtype=torch.bfloat16)
        else:
            tensors[spec.name] = _tiled(spec.shape, floats if spec.kind == "f32" else floats.bfloat16())
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), best of 5."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def _time_steps(model: DeepseekV4, batch: int, prompt: int, steps: int) -> tuple[float, float]:
    """ms per engine decode step (`DeepseekV4.decode_paged` over the paged pool, replayed from a captured graph on
    a GPU) and per MTP verification step (its two graphs: the model call over [token, draft], then the MTP and the
    undo of the rejected drafts; the sampling between them is left out), for `batch` rows after a `prompt`-token
    prefill. Every draft is rejected, so each step advances the rows by one token and the block-table width stays
    that of the first step (the default block holds every position timed here)."""
    kv = KVCacheManager(model, num_blocks=4 * batch + 8, block_size=256, num_slots=batch + 1)
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(2, model.cfg.vocab_size, (batch, prompt + 2 * (steps + 2)), generator=g)
    states = []
    for row in range(batch):
        seq = Request(f"r{row}", ids[row, :prompt].tolist(), SamplingParams(), seed=0, eos_token_id=None)
        kv.grow(seq, ids.shape[1] + 1)
        assert isinstance(seq.state, PagedSequenceState)
        states.append(seq.state)
    pool = kv.pool
    pool.flush_block_tables()
    model.prefill(ids[:, :prompt].to(model.device), list(states), last_only=True)
    graphs = DecodeGraphs(model, pool, capture=model.device.type in GRAPH_DEVICES)
    slots = torch.tensor([st.slot for st in states])

    def inputs(column: int, verify: bool) -> DecodeInputs:
        position = torch.tensor([st.position for st in states])
        cols = [ids[:, column], position, slots] + ([ids[:, column + 1]] if verify else [])
        rows = torch.stack(cols, dim=1).to(model.device)
        return DecodeInputs(rows, pool.block_tables[rows[:, SLOT], :1])

    def decode(column: int) -> None:
        graphs.run(inputs(column, False))
        for st in states:
            st.position += 1

    rejected = torch.full((batch, 2), 1, dtype=torch.int64, device=model.device)  # no draft is token 1

    def verify(column: int) -> None:
        graphs.run_verify(inputs(column, True)).finish(rejected)
        for st in states:
            st.position += 1

    timings = []
    for run in (decode, verify):
        column = prompt
        for _ in range(2):  # warm-up: Triton compiles each kernel, the graphs are captured
            run(column)
            column += 1
        _sync(model.device)
        t = time.perf_counter()
        for _ in range(steps):
            run(column)
            column += 1
        _sync(model.device)
        timings.append((time.perf_counter() - t) / steps * 1e3)
    return timings[0], timings[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompt", type=int, default=16, help="prefill tokens before the timed decode steps")
    p.add_argument("--preset", default="flash-widths")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark), or cpu to try the script on a small preset")
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"bench": "decode_gpu", "error": "no CUDA device"}))
        return 1
    from dsv4.model_runtime.placement import Layout
    from dsv4.model_runtime.weights import load_rank

    lines = []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        t0 = time.perf_counter()
        ckpt = write_random_bytes_checkpoint(Path(tmp) / "ckpt", a.preset)
        written = time.perf_counter() - t0
        model, report = load_rank(ckpt, Layout(), 0, device, torch.bfloat16)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    routed = ("w13", "w2", "w13_scale", "w2_scale")  # the routed experts' stacks (shared experts are Linears)
    expert_bytes = sum(t.numel() * t.element_size() for n, t in tensors if n.rsplit(".", 1)[-1] in routed)
    weight_bytes = sum(t.numel() * t.element_size() for _, t in tensors)
    packed = {str(t.dtype) for _, t in tensors if t.dtype in (torch.float8_e4m3fn, torch.int8)}
    bw = copy_bandwidth(device, (2 << 30) if device.type == "cuda" else (256 << 20))
    embed = model.embed.weight
    for batch in (int(b) for b in a.batches.split(",")):
        decode_ms, verify_ms = _time_steps(model, batch, a.prompt, a.steps)
        # routed experts read: the expected share of distinct experts that `batch` tokens of k picks each hit
        k, e = model.cfg.num_experts_per_tok, model.cfg.n_routed_experts
        hit = 1 - (1 - k / e) ** batch
        need = weight_bytes - embed.numel() * embed.element_size() + batch * embed.shape[1] * embed.element_size()
        need -= round((1 - hit) * expert_bytes)
        floor_ms = need / bw * 1e3
        line = {
            "bench": "decode_gpu",
            "preset": a.preset,
            "batch": batch,
            "graphs": device.type in GRAPH_DEVICES,
            "ms_per_step": round(decode_ms, 3),
            "tokens_per_s": round(batch / decode_ms * 1e3, 1),
            "bytes_per_step": need,
            "routed_experts_read": round(hit, 3),
            "copy_bandwidth_gbps": round(bw / 1e9, 1),
            "bandwidth_floor_ms": round(floor_ms, 3),
            "fraction_of_floor": round(floor_ms / decode_ms, 3),
            "verify_ms_per_step": round(verify_ms, 3),
            # MTP pays when 1 + acceptance rate (tokens a verification step yields) beats this
            "verify_over_decode": round(verify_ms / decode_ms, 3),
            "packed_dtypes": sorted(packed),
            "load_s": round(report.seconds, 2),
            "load_gbps": round(report.bytes_read / report.seconds / 1e9, 2),
            "write_s": round(written, 2),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }
        lines.append(json.dumps(line))
        print(lines[-1], flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
