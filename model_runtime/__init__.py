"""dsv4 model runtime: config, checkpoint loading, the DeepSeek-V4 model, KV state, engine and tokenizer.

`load_model`, `LLM` and `SamplingParams` are imported lazily so that importing the package (e.g. for the
tokenizer) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsv4.model_runtime.engine.llm import LLM
    from dsv4.model_runtime.engine.sampling_params import SamplingParams
    from dsv4.model_runtime.weights import load_model

__all__ = ["LLM", "SamplingParams", "load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from dsv4.model_runtime.weights import load_model

        return load_model
    if name == "LLM":
        from dsv4.model_runtime.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from dsv4.model_runtime.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
