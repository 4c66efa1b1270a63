"""dsv4 services: the OpenAI-compatible gateway, prefill and decode workers, KV handoff, telemetry and the CLI."""
