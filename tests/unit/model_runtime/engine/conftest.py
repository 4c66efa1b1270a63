"""Session fixtures of the engine tests: one tiny checkpoint from our writer, its model and tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.tokenizer import Tokenizer
from dsv4.model_runtime.weights import load_model


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The CI machine has 2 shared cores; torch's thread pool spinning on them is slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def flash_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("engine") / "tiny-flash", "tiny-flash", quantized=True, seed=0)


@pytest.fixture(scope="session")
def model(flash_ckpt: Path) -> DeepseekV4:
    return load_model(flash_ckpt)


@pytest.fixture(scope="session")
def tokenizer(flash_ckpt: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(flash_ckpt)


@pytest.fixture(scope="session")
def make_engine(model: DeepseekV4, tokenizer: Tokenizer) -> Callable[..., LLMEngine]:
    """make_engine(**EngineConfig fields) -> a fresh engine over the session's model."""

    def make(**config: int | bool) -> LLMEngine:
        return LLMEngine(model, tokenizer, EngineConfig(**config))  # type: ignore[arg-type]

    return make
