"""A state prefilled and exported in one process continues token-identically when imported in another (both
processes drive the engine through the workers' `Engine` interface)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4.model_runtime.make_checkpoint import write_checkpoint

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("kv_worker.py")


def _run(mode: str, ckpt: Path, out: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(WORKER), mode, str(ckpt), str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{mode} worker failed:\n{proc.stderr[-3000:]}"


def test_export_in_one_process_import_in_another(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny-flash", quantized=True, seed=0)
    _run("prefill", ckpt, tmp_path)
    _run("decode", ckpt, tmp_path)
    record = json.loads((tmp_path / "prefill.json").read_text())
    decoded = json.loads((tmp_path / "decode.json").read_text())
    assert len(decoded) == len(record) == 20
    for r, got in zip(record, decoded, strict=True):
        assert got == r["expected"], f"prompt of {len(r['prompt'])} tokens"
