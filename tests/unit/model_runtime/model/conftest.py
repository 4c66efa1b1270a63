"""Session fixtures of the model tests: real checkpoints written by our writer, and the transformers oracle."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dsv4.model_runtime.make_checkpoint import write_checkpoint

from .transformers_oracle import load_transformers_oracle

VOCAB = 129280


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The CI machine has 2 shared cores; torch's thread pool spinning on them is slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], Path]:
    """checkpoint(preset, quantized) -> folder written once per session by `write_checkpoint` (seed 0)."""
    cache: dict[tuple[str, bool], Path] = {}

    def get(preset: str, quantized: bool) -> Path:
        key = (preset, quantized)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{preset}-{'q' if quantized else 'bf16'}")
            cache[key] = write_checkpoint(out / "ckpt", preset, quantized=quantized, seed=0)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def oracle() -> Callable[[Path], Any]:
    """oracle(ckpt) -> the transformers model on that checkpoint, loaded once per session."""
    cache: dict[Path, Any] = {}

    def get(ckpt: Path) -> Any:
        if ckpt not in cache:
            cache[ckpt] = load_transformers_oracle(ckpt)
        return cache[ckpt]

    return get


def token_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def ids() -> Callable[..., torch.Tensor]:
    """ids(batch, length, seed=0) -> random token ids [batch, length]."""
    return token_ids
