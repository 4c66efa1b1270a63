"""The model fingerprint: which KV states (exported blobs, cached prefixes) a model may use.

Kept apart from `kv_export` (which needs crc32c, absent from the bare GPU machine of bench/gpu.sh) because the
engine's prefix cache keys its blocks with it too.
"""

from __future__ import annotations

import hashlib
import json

from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4


def model_fingerprint(model: DeepseekV4) -> str:
    """sha256 over the config, every checkpoint tensor's name, logical shape and stored format, the compute dtype
    and the QAT flag (hex, 32 chars). It does not depend on the parallel layout: ranks of different layouts hold
    different pieces of the same tensors, and a state exported under one imports under another."""
    h = hashlib.sha256()
    h.update(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for line in model.weight_signature:
        h.update(f"{line}\n".encode())
    h.update(f"dtype={model.dtype}\nqat={model.qat_simulation}".encode())
    return h.hexdigest()[:32]
