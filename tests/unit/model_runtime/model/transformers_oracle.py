"""transformers' `DeepseekV4ForCausalLM` on one of our official-format checkpoints: the CPU test oracle.

Used by the oracle tests and the CPU benchmarks (which import it from the checkout: it is not in the wheel), never
by serving; transformers is a test extra and is imported only when called. The config differs in one place:
transformers takes only 0/4/128 in `compress_ratios`, so the HCA rate of small test models travels as
`layer_types` + `compress_rates`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def load_transformers_oracle(ckpt: Path) -> Any:
    """transformers 5.23.0 DeepseekV4ForCausalLM on the checkpoint at `ckpt`, fp32, eager attention, eval mode."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    raw = json.loads((ckpt / "config.json").read_text())
    ratios = raw.pop("compress_ratios")[: raw["num_hidden_layers"]]
    raw["layer_types"] = [
        {0: "sliding_attention", 4: "compressed_sparse_attention"}.get(r, "heavily_compressed_attention")
        for r in ratios
    ]
    hca = [r for r in ratios if r not in (0, 4)]
    raw["compress_rates"] = {"compressed_sparse_attention": 4, "heavily_compressed_attention": hca[0] if hca else 128}
    model = DeepseekV4ForCausalLM.from_pretrained(
        str(ckpt), config=DeepseekV4Config.from_dict(raw), dtype=torch.float32, attn_implementation="eager"
    )
    # Tensors stored as BF16 stay BF16 after loading with dtype=float32; the upcast is exact (oracle_notes §2).
    return model.float().eval()
