"""Every Redis key and stream name a deployment uses. Each is namespaced by the deployment name, with a hash tag, so
two deployments can share one Redis and one deployment's keys stay in one Redis Cluster slot."""

from __future__ import annotations

# Redis Streams consumer groups (the autoscaling signal): the work streams and their one group.
PREFILL_STREAM = "prefill"
DECODE_STREAM = "decode"
WORKER_GROUP = "workers"


def redis_key(deployment: str, *parts: str) -> str:
    """The Redis key of `parts` inside `deployment`'s namespace, e.g. `dsv4:{prod}:stream:prefill`.

    The hash tag braces keep one deployment's keys in one Redis Cluster slot, so multi-key operations stay legal.
    """
    if not deployment or any(c in deployment for c in "{}:"):
        raise ValueError(f"invalid deployment name for a Redis namespace: {deployment!r}")
    return ":".join(("dsv4", "{" + deployment + "}", *parts))


def stream_key(deployment: str, stream: str) -> str:
    """The key of the work stream `stream` (PREFILL_STREAM or DECODE_STREAM)."""
    return redis_key(deployment, "stream", stream)


def worker_stream_key(deployment: str, stream: str, consumer: str) -> str:
    """A worker's own work stream (`stream` = PREFILL_STREAM or DECODE_STREAM): the gateway's prefix-aware routing
    puts a job there when that worker holds the job's prefix."""
    return redis_key(deployment, "stream", stream, "to", consumer)


def worker_alive_key(deployment: str, stream: str, consumer: str) -> str:
    """Present while a worker of `stream` heartbeats (it expires after the takeover time): a worker waiting on an
    empty stream looks idle to Redis 7.0's XINFO CONSUMERS, so idleness alone cannot tell it from a dead one."""
    return redis_key(deployment, "alive", stream, consumer)


def workers_key(deployment: str, stream: str) -> str:
    """Set: the consumers of `stream` that have their own stream (who to take over from when one dies)."""
    return redis_key(deployment, "workers", stream)


def dead_letter_key(deployment: str, stream: str) -> str:
    """Where malformed entries of `stream` are moved, so bad input is kept for inspection and never retried."""
    return redis_key(deployment, "dead", stream)


def token_stream_key(deployment: str, request_id: str) -> str:
    """The per-request token stream."""
    return redis_key(deployment, "tokens", request_id)


def request_lease_key(deployment: str, request_id: str) -> str:
    """Held by the gateway while it waits on `request_id`; gone = Redis lost the request (a broker that restarted
    empty), so the gateway stops waiting for its tokens."""
    return redis_key(deployment, "lease", request_id)


def cancel_key(deployment: str, request_id: str) -> str:
    """Set while the client of `request_id` went away; workers stop generating."""
    return redis_key(deployment, "cancel", request_id)


def handed_over_key(deployment: str, request_id: str) -> str:
    """Set once a request's decode job is enqueued, so a reclaimed prefill job is not handed over twice."""
    return redis_key(deployment, "handed", request_id)


def descriptor_key(deployment: str, handoff_id: str) -> str:
    """Key of a KV handoff's descriptor."""
    return redis_key(deployment, "kv", handoff_id, "desc")


def handoff_id_of(key: str) -> str | None:
    """The handoff id inside a descriptor key, or None for a key that is not one."""
    parts = key.split(":")
    if len(parts) != 5 or parts[0] != "dsv4" or parts[2] != "kv" or parts[4] != "desc":
        return None
    return parts[3]


def chunk_key(deployment: str, handoff_id: str, index: int) -> str:
    """Key of chunk `index` of a handoff on the `redis` data plane."""
    return redis_key(deployment, "kv", handoff_id, "chunk", str(index))


# The shared prefix tier (exported KV states of prompt prefixes, keyed by their chain hash) and the KV events
# workers publish for the gateway's prefix-aware routing.
def prefix_blob_key(deployment: str, chain_hash: str) -> str:
    """The exported KV state of the prefix whose last block has `chain_hash`."""
    return redis_key(deployment, "prefix", chain_hash)


def prefix_lru_key(deployment: str) -> str:
    """Sorted set: chain hash -> last use (ms); the least recently used prefix leaves first."""
    return redis_key(deployment, "prefix-lru")


def prefix_sizes_key(deployment: str) -> str:
    """Hash: chain hash -> bytes of its blob (what leaves the budget when it goes)."""
    return redis_key(deployment, "prefix-sizes")


def prefix_bytes_key(deployment: str) -> str:
    """Integer: bytes of every blob in the tier (the budget is checked against it)."""
    return redis_key(deployment, "prefix-bytes")


def kv_events_key(deployment: str, pool: str) -> str:
    """Stream of the KV events of work pool `pool`'s workers (prefixes stored and evicted, with each one's load)."""
    return redis_key(deployment, "kv-events", pool)


def prefix_stats_key(deployment: str) -> str:
    """Hash: worker -> its prefix-cache counters (JSON), read by the operator for the status's hit rate."""
    return redis_key(deployment, "prefix-stats")
