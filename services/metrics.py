"""Prometheus metrics of every role (prefix `dsv4_`, docs/serving.md); one process registers them once, at import."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter("dsv4_requests", "Finished API requests", ["endpoint", "status"])
TTFT = Histogram("dsv4_time_to_first_token_seconds", "Request arrival to first token sent", buckets=_LATENCY_BUCKETS)
ITL = Histogram("dsv4_inter_token_latency_seconds", "Time between streamed tokens", buckets=_ITL_BUCKETS)
REQUEST_SECONDS = Histogram("dsv4_request_duration_seconds", "Request arrival to last byte", buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("dsv4_prompt_tokens", "Prompt tokens of accepted requests")
GENERATED_TOKENS = Counter("dsv4_generated_tokens", "Tokens generated", ["role"])
PREFILL_DECISIONS = Counter(
    "dsv4_prefill_decisions", "Where requests were prefilled", ["placement", "reason"]
)  # placement: disaggregated | local
QUEUE_LENGTH = Gauge("dsv4_queue_length", "Entries in a work stream", ["stream"])
QUEUE_LAG = Gauge("dsv4_queue_lag", "Jobs not yet delivered to a worker", ["stream"])
QUEUE_PENDING = Gauge("dsv4_queue_pending", "Jobs delivered and not yet acknowledged", ["stream"])
QUEUE_CONSUMERS = Gauge("dsv4_queue_consumers", "Workers in a stream's consumer group", ["stream"])
HANDOFF_BYTES = Counter("dsv4_handoff_bytes", "KV handoff bytes moved", ["transport", "direction"])
HANDOFF_SECONDS = Histogram(
    "dsv4_handoff_seconds", "KV handoff write or read time", ["transport", "direction"], buckets=_LATENCY_BUCKETS
)
HANDOFF_FAILURES = Counter("dsv4_handoff_failures", "Handoffs that could not be used", ["reason"])
BATCH_SIZE = Gauge("dsv4_batch_size", "Requests in the engine's running batch", ["role"])
KV_CACHE_USAGE = Gauge("dsv4_kv_cache_usage_ratio", "Used fraction of the engine's KV-cache blocks", ["role"])
KV_POOL_BLOCKS = Gauge("dsv4_kv_pool_blocks", "Blocks of the engine's KV pool (sized at start)", ["role"])
KV_POOL_MAX_TOKENS = Gauge("dsv4_kv_pool_max_tokens", "Token positions the engine's KV pool holds", ["role"])
# Prefix caching, per pool (role = prefill | decode): hit rate = hits / lookups (requests) or hit_tokens /
# lookup_tokens (tokens); prefill_tokens counts what the engine computed.
PREFILL_TOKENS = Counter("dsv4_prefill_tokens", "Prompt tokens the engine computed (cache hits left out)", ["role"])
PREFIX_LOOKUPS = Counter("dsv4_prefix_cache_lookups", "Requests admitted with a prefix-cache lookup", ["role"])
PREFIX_HITS = Counter("dsv4_prefix_cache_hits", "Requests resumed from a cached prefix", ["role"])
PREFIX_LOOKUP_TOKENS = Counter("dsv4_prefix_cache_lookup_tokens", "Prompt tokens of the lookups", ["role"])
PREFIX_HIT_TOKENS = Counter("dsv4_prefix_cache_hit_tokens", "Prompt tokens taken from cached prefixes", ["role"])
PREFIX_HIT_RATIO = Gauge(
    "dsv4_prefix_cache_hit_ratio",
    "Share of looked-up prompt tokens (or requests) that hit, since start",
    ["role", "unit"],
)  # unit: tokens | requests
PREFIX_BYTES = Gauge("dsv4_prefix_cache_bytes", "Bytes of cached prefixes", ["role", "tier"])  # tier: local | redis
PREFIX_EVICTIONS = Counter("dsv4_prefix_cache_evictions", "Cached prefixes evicted", ["role", "tier"])
PREFIX_TIER_IMPORTS = Counter(
    "dsv4_prefix_tier_imports", "Prefixes fetched from the Redis tier", ["result"]
)  # result: imported | refused | gone
PREFIX_TIER_PUBLISHED = Counter("dsv4_prefix_tier_published", "Prefixes published to the Redis tier")
# MTP speculative decoding, per pool: acceptance rate = accepted / draft tokens (vLLM's spec_decode counters).
MTP_DRAFT_TOKENS = Counter("dsv4_mtp_draft_tokens", "MTP draft tokens the engine verified", ["role"])
MTP_ACCEPTED_TOKENS = Counter("dsv4_mtp_accepted_tokens", "MTP draft tokens verification accepted", ["role"])
ROUTES = Counter("dsv4_routes", "Gateway routing decisions", ["pool", "reason"])  # reason: prefix | load | shared


def render() -> tuple[bytes, str]:
    """The exposition text of this process's metrics and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
