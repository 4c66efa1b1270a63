"""`dsv4 make-checkpoint` as a real subprocess: writes a loadable checkpoint, refuses to overwrite one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4.model_runtime import load_model

pytestmark = pytest.mark.integration


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsv4.services.cli", "make-checkpoint", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_writes_a_loadable_checkpoint_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    done = _run("--preset", "tiny-pro", "--quantized", "--seed", "3", str(out))
    assert done.returncode == 0, done.stderr
    assert "writing tiny-pro quantized" in done.stderr and "wrote" in done.stderr
    model = load_model(out, qat_simulation=False)
    assert model.cfg.compress_ratios[:4] == (8, 8, 4, 8)
    logits = model(torch.tensor([[0, 128803, 1]]))
    assert logits.shape == (1, 3, 129280) and torch.isfinite(logits).all()

    again = _run("--preset", "tiny-flash", str(out))
    assert again.returncode == 1
    assert "not empty" in again.stderr
    assert load_model(out).cfg.compress_ratios[:4] == (8, 8, 4, 8)  # untouched
