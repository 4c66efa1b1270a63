"""The CPU-runnable paths of bench/decode_gpu.py, bench/engine_gpu.py, bench/sharded_load.py and bench/rank_groups.py
on tiny-flash (the GPU run is gpu.sh's, on a machine lent for minutes: a script broken by a change must fail here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4.protocol import env as dsv4_env

pytestmark = pytest.mark.integration
BENCH = Path(__file__).resolve().parents[3] / "bench"


def _lines(*cmd: str, env: dict[str, str] | None = None) -> list[dict]:
    done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_decode_bench_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "decode.jsonl"
    args = ("--device", "cpu", "--preset", "tiny-flash", "--batches", "1,4", "--steps", "1", "--prompt", "3")
    lines = _lines(str(BENCH / "decode_gpu.py"), *args, "--out", str(out))
    assert [line["batch"] for line in lines] == [1, 4]
    for line in lines:
        assert line["ms_per_step"] > 0 and 0 < line["routed_experts_read"] <= 1
        assert line["packed_dtypes"] == ["torch.float8_e4m3fn", "torch.int8"]  # loaded packed
        # the engine's paged step and the verification step, through DecodeGraphs' buffers (no capture on CPU)
        assert not line["graphs"] and line["verify_ms_per_step"] > 0
        assert line["verify_over_decode"] == pytest.approx(line["verify_ms_per_step"] / line["ms_per_step"], rel=0.01)
    assert lines[0]["bytes_per_step"] < lines[1]["bytes_per_step"]  # more rows hit more experts
    assert len(out.read_text().splitlines()) == 2


def test_sharded_load_bench_ratios(tmp_path: Path) -> None:
    env = os.environ | {dsv4_env.HOME: str(tmp_path)}  # the tiny checkpoint is cached there
    lines = _lines(str(BENCH / "sharded_load.py"), "--preset", "tiny-flash", "--worlds", "1,2", env=env)
    assert [line["world"] for line in lines] == [1, 2]
    assert lines[0]["max_rank_weight_bytes_ratio"] == pytest.approx(1.0, abs=1e-3)
    # tiny-flash at world 2: its replicated tensors (K=V, compressors, indexer, 128-wide shared expert) are a
    # large part of a small model, so a rank holds well over half; the width-true model is within 10%
    assert 1.0 < lines[1]["max_rank_weight_bytes_ratio"] < 1.6
    assert all(line["peak_rss_ratio"] > 0 and line["gbps"] > 0 for line in lines)


def test_rank_groups_bench_lines(tmp_path: Path) -> None:
    env = os.environ | {dsv4_env.HOME: str(tmp_path)}
    args = ("--layouts", "tp2,dp2", "--batches", "2", "--prompt", "4", "--tokens", "2", "--reps", "1")
    lines = _lines(str(BENCH / "rank_groups.py"), *args, env=env)
    assert [(line["layout"], line["world"], line["batch"]) for line in lines] == [
        ("1", 1, 2),
        ("tp2", 2, 2),
        ("dp2", 2, 2),
    ]
    assert lines[0]["ratio"] == 1.0
    assert all(line["tokens_per_s"] > 0 and line["ratio"] > 0 for line in lines)


def test_engine_bench_on_cpu(tmp_path: Path) -> None:
    """On CPU only the reference run is timed (every other run names a GPU backend); its engine is overlapped, as on
    CUDA (EngineConfig(overlap_scheduling=True) forces it on)."""
    out = tmp_path / "engine.jsonl"
    args = ("--device", "cpu", "--presets", "tiny-flash", "--batches", "1,3", "--tokens", "3", "--prompt", "4")
    lines = _lines(str(BENCH / "engine_gpu.py"), *args, "--out", str(out))
    assert lines[0] == {"bench": "engine_gpu", "device": "cpu", "torch": torch.__version__}
    assert [(line["run"], line["batch"]) for line in lines[1:]] == [("reference", 1), ("reference", 3)]
    assert all(line["decode_tok_s"] > 0 and line["ms_per_decode_step"] > 0 for line in lines[1:])
    assert len(out.read_text().splitlines()) == 3


def test_engine_bench_runs_mtp_on_cpu() -> None:
    """The MTP runs: verification steps every step, the acceptance rate in the line, and a ratio line against the
    reference run whose greedy tokens MTP must reproduce."""
    args = ("--device", "cpu", "--presets", "tiny-flash", "--batches", "2", "--tokens", "4", "--prompt", "4")
    lines = _lines(str(BENCH / "engine_gpu.py"), *args, "--runs", "reference,cuda+graphs+mtp,reference+mtp")
    assert [(line.get("run"), line["batch"]) for line in lines[1:]] == [
        ("reference", 2),
        ("reference+mtp", 2),
        (None, 2),
    ]
    assert 0.0 <= lines[2]["mtp_acceptance"] <= 1.0 and "mtp_acceptance" not in lines[1]
    assert lines[3]["same_tokens"] == {"reference+mtp/reference": True}
