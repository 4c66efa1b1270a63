"""The marker texts of the DeepSeek-V4 chat format, spelled as in `tokenizer.json`.

Every marker is one added token of the vocabulary; the tokenizer resolves their ids by these texts, so the
numbers live in `tokenizer.json` only. Note the fullwidth vertical line (U+FF5C) and the lower one-eighth block
(U+2581) inside the names.
"""

from __future__ import annotations

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"

# Quick-instruction task markers of the official encoder (message key "task").
TASK_TOKENS: dict[str, str] = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

# Texts that must never appear inside parsed reasoning or content (the official parser rejects them).
RESERVED_IN_OUTPUT: tuple[str, ...] = (BOS, EOS, THINK_START, THINK_END, DSML)
