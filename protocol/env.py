"""Every `DSV4_*` environment variable dsv4 reads, named once (this module imports nothing, so any layer may use it).

The services' settings classes read `DSV4_<FIELD>` for each field (pydantic-settings, nested fields with `__`); a
unit test checks that every such name is declared here and that nothing here is left unread.
"""

PREFIX = "DSV4_"

# ---- every role (the operator sets them in every pod; `dsv4 serve` sets them for its children)
DEPLOYMENT = "DSV4_DEPLOYMENT"  # namespaces every Redis key: two deployments can share one Redis
ROLE = "DSV4_ROLE"
MODEL = "DSV4_MODEL"  # checkpoint folder inside the pod
REDIS_URL = "DSV4_REDIS_URL"
REDIS_PASSWORD = "DSV4_REDIS_PASSWORD"  # from the secret named in spec.redis.secretRef, when set
CONFIG_FILE = "DSV4_CONFIG_FILE"  # the role's settings file from the operator's ConfigMap
HOST = "DSV4_HOST"
PORT = "DSV4_PORT"
SUPERVISOR_PID = "DSV4_SUPERVISOR_PID"  # set by `dsv4 serve` for its children: they stop when it dies

# ---- gateway
API_KEY_FILE = "DSV4_API_KEY_FILE"
API_KEYS = "DSV4_API_KEYS"  # comma-separated accepted keys, e.g. from a Secret via secretKeyRef
SERVED_MODEL_NAME = "DSV4_SERVED_MODEL_NAME"
DISAGGREGATION = "DSV4_DISAGGREGATION"  # nested: DSV4_DISAGGREGATION__MODE, __MIN_PROMPT_TOKENS, __MAX_PREFILL_QUEUE
MAX_MODEL_LEN = "DSV4_MAX_MODEL_LEN"
DEFAULT_MAX_TOKENS = "DSV4_DEFAULT_MAX_TOKENS"
TOKEN_TIMEOUT_S = "DSV4_TOKEN_TIMEOUT_S"
QUEUE_STATS_TTL_S = "DSV4_QUEUE_STATS_TTL_S"
RETRY_AFTER_S = "DSV4_RETRY_AFTER_S"
REDIS_MAX_CONNECTIONS = "DSV4_REDIS_MAX_CONNECTIONS"  # the gateway's pool: one connection per request in flight
PREFIX_ROUTING = "DSV4_PREFIX_ROUTING"  # nested: DSV4_PREFIX_ROUTING__ENABLED, __MAX_QUEUED_TOKENS

# ---- prefill and decode workers
DEVICE = "DSV4_DEVICE"  # cpu | cuda | npu; the accelerator profile sets it
DTYPE = "DSV4_DTYPE"  # the model's compute dtype
POD_NAME = "DSV4_POD_NAME"  # downward API; the consumer name of a worker in the Redis consumer groups
POD_IP = "DSV4_POD_IP"  # downward API; where the `direct` data plane is reached
KV_HANDOFF = "DSV4_KV_HANDOFF"  # nested: DSV4_KV_HANDOFF__TRANSPORT, __TTL_SECONDS, __CHUNK_BYTES
PARALLELISM = "DSV4_PARALLELISM"  # nested: DSV4_PARALLELISM__TENSOR, __DATA, __EXPERT
MAX_INFLIGHT = "DSV4_MAX_INFLIGHT"
RECLAIM_IDLE_MS = "DSV4_RECLAIM_IDLE_MS"
HEARTBEAT_S = "DSV4_HEARTBEAT_S"
DRAIN_TIMEOUT_S = "DSV4_DRAIN_TIMEOUT_S"
PREFIX_CACHE = "DSV4_PREFIX_CACHE"  # nested: __ENABLED, __TIER__BUDGET_BYTES, __TIER__TTL_SECONDS, __TIER__REDIS_URL
PREFIX_TIER_REDIS_PASSWORD = "DSV4_PREFIX_TIER_REDIS_PASSWORD"  # from spec.prefixCache.tierSecretRef, when set
ENGINE = "DSV4_ENGINE"  # nested: DSV4_ENGINE__MAX_NUM_SEQS, __MAX_NUM_BATCHED_TOKENS, __CUDA_GRAPHS, ...

# ---- the model runtime and kernels
KERNEL_BACKEND = "DSV4_KERNEL_BACKEND"  # reference | cuda | ascend: overrides the backend the device implies

# ---- `dsv4 serve` and the operator
HOME = "DSV4_HOME"  # where `dsv4 serve` keeps the embedded model and its logs (default ~/.cache/dsv4)
IMAGE = "DSV4_IMAGE"  # the operator's default image for pods whose spec names none
WATCH_NAMESPACES = "DSV4_WATCH_NAMESPACES"  # the operator's namespaces (comma-separated), from the chart
OPERATOR_VERBOSE = "DSV4_OPERATOR_VERBOSE"
LIVENESS_ENDPOINT = "DSV4_LIVENESS_ENDPOINT"  # the operator's kopf liveness probe address

# ---- rank groups: torchrun's names. A worker replica is a group of pods, each starting NPROC_PER_NODE rank processes
# (one per device). The operator sets these five on every pod of a group (dsv4 serve sets them for its local group);
# the worker gives each rank process RANK = NODE_RANK * NPROC_PER_NODE + LOCAL_RANK, LOCAL_RANK, LOCAL_WORLD_SIZE.
MASTER_ADDR = "MASTER_ADDR"  # the group leader's stable DNS name (node rank 0)
MASTER_PORT = "MASTER_PORT"  # contract.RENDEZVOUS_PORT inside a pod
WORLD_SIZE = "WORLD_SIZE"  # ranks in the group: pods per replica x NPROC_PER_NODE
NODE_RANK = "NODE_RANK"  # this pod's index in its group, 0 = the leader (it runs the engine's scheduler)
NPROC_PER_NODE = "NPROC_PER_NODE"  # rank processes this pod starts: its devices
RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
# Ascend: the group's HCCL rank table (contract.RANK_TABLE_FILE), the name HCCL and torch_npu read.
RANK_TABLE_FILE = "RANK_TABLE_FILE"
