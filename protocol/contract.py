"""The container contract between the operator and the services: one image serves every role, and the operator starts
it with these commands, ports, HTTP paths, mounted files and metric names (the env names are in `env`)."""

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

RENDEZVOUS_PORT = 29500  # torch.distributed's store on a group's leader (env.MASTER_PORT)

# Redis connections of one gateway (its `redis_max_connections` default): every request in flight holds one while it
# waits for its tokens. The managed Redis admits that many per gateway replica on top of its own default of 10,000.
GATEWAY_REDIS_CONNECTIONS = 2048
REDIS_DEFAULT_MAXCLIENTS = 10000

HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
# Prometheus histograms (seconds) the gateway exports and the operator's planner reads: TTFT sizes prefill, ITL decode.
METRIC_TTFT = "dsv4_time_to_first_token_seconds"
METRIC_ITL = "dsv4_inter_token_latency_seconds"

# Files mounted into the pod: the ConfigMap with the role's settings and the Secret with API keys.
CONFIG_DIR = "/etc/dsv4"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
API_KEY_DIR = "/etc/dsv4/api-keys"
API_KEY_FILE = f"{API_KEY_DIR}/keys"  # one key per line; the Secret's key `keys`
MODEL_DIR = "/models"
# Ascend groups: the HCCL rank table (Ascend's hccl.json format) the operator keeps up to date for each pod's group.
# It always exists; its "status" is RANK_TABLE_INITIALIZING until every pod of the group has its devices, then
# RANK_TABLE_COMPLETED with the full server list. The runtime waits for COMPLETED before it initialises HCCL.
RANK_TABLE_DIR = "/etc/dsv4/hccl"
RANK_TABLE_FILE = f"{RANK_TABLE_DIR}/hccl.json"
RANK_TABLE_INITIALIZING = "initializing"
RANK_TABLE_COMPLETED = "completed"
