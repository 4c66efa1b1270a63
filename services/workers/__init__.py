"""Prefill and decode workers: Redis Streams consumers that drive an `engine_port.Engine`."""
