"""The OpenAI-compatible gateway: renders requests to token ids, enqueues them and streams tokens back."""
