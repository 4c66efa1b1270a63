"""The container contract between the operator and the services (DESIGN.md §4, §5).

One image serves every role; the operator starts it with these commands, ports, environment variables and mounted
files, and the services read exactly these. Both sides import this module, so a change here changes both.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """A process role; the value is also the `dsv4` subcommand that runs it."""

    GATEWAY = "gateway"
    PREFILL = "prefill"
    DECODE = "decode"


# Ports inside the pod. Workers serve /healthz, /readyz, /metrics and the `direct` KV data plane on WORKER_PORT.
GATEWAY_PORT = 8000
WORKER_PORT = 8100

HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
# Prometheus histograms (seconds) the gateway exports and the operator's planner reads: TTFT sizes prefill, ITL decode.
METRIC_TTFT = "dsv4_time_to_first_token_seconds"
METRIC_ITL = "dsv4_inter_token_latency_seconds"

# Environment variables read by every role (OTEL_* are the standard OpenTelemetry ones and are passed through).
ENV_DEPLOYMENT = "DSV4_DEPLOYMENT"  # namespaces every Redis key: two deployments can share one Redis
ENV_ROLE = "DSV4_ROLE"
ENV_MODEL = "DSV4_MODEL"  # checkpoint folder inside the pod
ENV_REDIS_URL = "DSV4_REDIS_URL"
ENV_REDIS_PASSWORD = "DSV4_REDIS_PASSWORD"  # from the secret named in spec.redis.secretRef, when set
ENV_CONFIG_FILE = "DSV4_CONFIG_FILE"
ENV_API_KEY_FILE = "DSV4_API_KEY_FILE"
ENV_API_KEYS = "DSV4_API_KEYS"  # comma-separated accepted keys, e.g. from a Secret via secretKeyRef
ENV_DEVICE = "DSV4_DEVICE"  # cpu | cuda | npu; the accelerator profile sets it
ENV_DTYPE = "DSV4_DTYPE"  # float32 (default) | bfloat16 | float16 | float64: the model's compute dtype
ENV_POD_NAME = "DSV4_POD_NAME"  # downward API; the consumer name of a worker in the Redis consumer groups
ENV_POD_IP = "DSV4_POD_IP"  # downward API; where the `direct` data plane is reached
ENV_SUPERVISOR_PID = "DSV4_SUPERVISOR_PID"  # set by `dsv4 serve` for its children: they stop when it dies

# Files mounted into the pod: the ConfigMap with the services' settings and the Secret with API keys.
CONFIG_DIR = "/etc/dsv4"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
API_KEY_DIR = "/etc/dsv4/api-keys"
API_KEY_FILE = f"{API_KEY_DIR}/keys"  # one key per line; the Secret's key `keys`
MODEL_DIR = "/models"

# Redis Streams consumer groups (the autoscaling signal) and the key prefix of everything a deployment writes.
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
