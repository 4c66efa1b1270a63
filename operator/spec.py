"""The `DeepSeekV4Deployment` spec: the one source of the CRD schema, its defaults and its CEL rules.

The pydantic models below are what the operator reads; `dsv4.operator.crd` turns them into the CRD's structural
OpenAPI schema. Rules the API server enforces with CEL are attached to the model they constrain with `cel(...)`, so a
rule and the fields it names live side by side. What CEL cannot check is in `dsv4.operator.checks`. The parts a role
also reads (`kvHandoff`, `disaggregation`, `parallelism`, `prefixCache.tier`) are the models of `dsv4.protocol.config`,
so the API server and the roles accept the same values.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

from dsv4.protocol.config import (
    DEFAULT_MAX_QUEUED_TOKENS,
    MAX_QUEUED_TOKENS_LIMIT,
    MODEL_CONTEXT,
    DisaggregationConfig,
    EngineStepConfig,
    KvHandoffConfig,
    ParallelismConfig,
    PrefixTierConfig,
)

# Kubernetes quantities ("2", "16Gi", 4) keep their user spelling; the API server accepts either JSON type.
Quantity = Annotated[str | int, WithJsonSchema({"x-kubernetes-int-or-string": True})]

# Names that end up in child object names (e.g. `<name>-gateway`, `<name>-redis-0`) must leave room for suffixes.
MAX_NAME_LENGTH = 40

NVIDIA_PRODUCTS = ("A100", "H100", "H200", "H20", "B200", "GB200", "L40S")
ASCEND_PRODUCTS = ("910B", "910C", "310P")


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry: a CEL rule and the message the API server returns when it fails."""
    entry = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


def validations(*rules: dict[str, str]) -> ConfigDict:
    """Model config carrying CEL rules into the generated schema."""
    extra: dict[str, Any] = {"x-kubernetes-validations": list(rules)}
    return ConfigDict(json_schema_extra=extra)


class Base(BaseModel):
    """camelCase on the wire (as every Kubernetes API), snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class PvcSource(Base):
    """Weights on a PersistentVolumeClaim (mounted read-only)."""

    claim_name: str = Field(min_length=1, description="PersistentVolumeClaim holding the checkpoint")
    sub_path: str = Field(default="", description="folder of the checkpoint inside the volume")


class ModelSource(Base):
    """Where the checkpoint comes from: exactly one of pvc, image, hostPath."""

    model_config = validations(
        cel(
            "(has(self.pvc) ? 1 : 0) + (has(self.image) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) == 1",
            "model.source needs exactly one of pvc, image or hostPath",
        )
    )
    pvc: PvcSource | None = None
    image: str | None = Field(default=None, min_length=1, description="OCI image holding the checkpoint (image volume)")
    host_path: str | None = Field(default=None, pattern=r"^/", description="absolute checkpoint folder on every node")


class LocalCacheSpec(Base):
    """Node-local copy of the weights, made by an init container before the worker starts (docs/operator.md)."""

    host_path: str | None = Field(
        default=None,
        pattern=r"^/",
        description="node folder kept across pods (writable by uid 1000); unset: an emptyDir that lives with the pod",
    )
    size_limit: Quantity | None = Field(default=None, description="sizeLimit of the emptyDir when hostPath is unset")


class ModelSpec(Base):
    """Which DeepSeek-V4 model to serve."""

    model_config = validations(
        cel(
            "self.variant == 'tiny' || has(self.source)",
            "model.source is required unless model.variant is tiny (written into each worker pod at start)",
        ),
        cel(
            "!has(self.localCache) || (has(self.source) && !has(self.source.image))",
            "model.localCache needs a pvc or hostPath source: an image volume is node-local already",
        ),
    )
    variant: Literal["flash", "pro", "tiny", "custom"] = Field(description="flash, pro, tiny (test model) or custom")
    source: ModelSource | None = None
    revision: str | None = Field(default=None, description="checkpoint revision, recorded in the config and status")
    max_model_len: int = Field(
        default=MODEL_CONTEXT,
        ge=16,
        le=MODEL_CONTEXT,
        description="prompt + max_tokens the gateway admits (default: the model's 1M context; the workers still refuse "
        "what their KV pool cannot hold)",
    )
    local_cache: LocalCacheSpec | None = Field(
        default=None, description="copy the weights to node-local storage before each worker starts"
    )


class RdmaSpec(Base):
    """An RDMA device resource each worker pod asks for (from the cluster's RDMA device plugin)."""

    resource_name: str = Field(
        pattern=r"^[a-z0-9.-]+/[A-Za-z0-9_.-]+$", max_length=253, description="e.g. rdma/ib or nvidia.com/hostdev"
    )
    count: int = Field(default=1, ge=1, le=32)


class FabricSpec(Base):
    """How the ranks of a group reach each other: collective-library env, RDMA devices and the fabric domain."""

    socket_interface: str | None = Field(
        default=None,
        pattern=r"^\^?[A-Za-z0-9_.,:=-]+$",
        max_length=128,
        description="NIC(s) for bootstrap and socket traffic: NCCL_SOCKET_IFNAME / HCCL_SOCKET_IFNAME / GLOO",
    )
    ib_hca: str | None = Field(
        default=None, pattern=r"^[\^=]?[A-Za-z0-9_.,:-]+$", max_length=256, description="NCCL_IB_HCA (nvidia)"
    )
    rdma: RdmaSpec | None = Field(default=None, description="RDMA devices per worker pod (nvidia); adds IPC_LOCK")
    topology_key: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^([a-z0-9.-]+/)?[A-Za-z0-9_.-]+$",
        description="node label every pod of a group must share: an NVLink domain, an Ascend super pod "
        "(default for 910C: huawei.com/topotree.superpodid)",
    )


class AcceleratorSpec(Base):
    """The node pool kind; the operator's accelerator profile turns it into resources, node selectors and env."""

    model_config = validations(
        cel(
            "self.type != 'cpu' || (!has(self.devicesPerPod) && !has(self.product) && !has(self.resourceName))",
            "accelerator type cpu takes no devicesPerPod, product or resourceName",
        ),
        cel(
            "!has(self.product) || (self.type == 'nvidia' && self.product in "
            + _cel_list(NVIDIA_PRODUCTS)
            + ") || (self.type == 'ascend' && self.product in "
            + _cel_list(ASCEND_PRODUCTS)
            + ")",
            f"accelerator.product must be one of {', '.join(NVIDIA_PRODUCTS)} for nvidia "
            f"or {', '.join(ASCEND_PRODUCTS)} for ascend",
        ),
        cel(
            "!has(self.resourceName) || (self.type == 'nvidia' && self.resourceName.startsWith('nvidia.com/'))"
            " || (self.type == 'ascend' && self.resourceName.startsWith('huawei.com/'))",
            "accelerator.resourceName must be nvidia.com/* for type nvidia and huawei.com/* for type ascend",
        ),
        cel(
            "self.type == 'nvidia' || (!has(self.fabric.ibHca) && !has(self.fabric.rdma))",
            "accelerator.fabric.ibHca and rdma apply to type nvidia (Ascend NICs come with the NPUs)",
        ),
        cel(
            "self.type == 'ascend' || !has(self.driverGroupId)",
            "accelerator.driverGroupId applies to type ascend (the HwHiAiUser group)",
        ),
    )
    type: Literal["nvidia", "ascend", "cpu"] = Field(description="nvidia, ascend or cpu")
    product: str | None = Field(
        default=None, max_length=32, description="e.g. H200 or 910C; selects nodes and the device resource name"
    )
    devices_per_pod: int | None = Field(
        default=None, ge=1, le=16, description="devices per worker pod (default: TP x DP)"
    )
    resource_name: str | None = Field(
        default=None, max_length=253, description="override of the extended resource, e.g. huawei.com/npu"
    )
    fabric: FabricSpec = Field(default_factory=FabricSpec)
    driver_group_id: int | None = Field(
        default=None, ge=0, le=2147483647, description="gid of HwHiAiUser on the Ascend hosts (default 1000)"
    )


class Toleration(Base):
    """A pod toleration (the subset of core/v1 Toleration users set)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Resources(Base):
    """CPU/memory requests and limits of a container (devices come from the accelerator profile)."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class Scheduling(Base):
    """Overrides merged over the accelerator profile's placement."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    priority_class_name: str | None = None


class PoolSpec(Base):
    """One pool of replicas: its size in groups, bounds for the planner, resources and placement.

    A replica is a rank group of `podsPerReplica` pods that together hold the pool's parallel layout.
    """

    model_config = validations(
        cel("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas"),
        cel(
            "self.replicas >= self.minReplicas && self.replicas <= self.maxReplicas",
            "replicas must lie between minReplicas and maxReplicas",
        ),
    )
    replicas: int = Field(default=1, ge=0, le=1024, description="rank groups")
    min_replicas: int = Field(default=1, ge=0, le=1024)
    max_replicas: int = Field(default=4, ge=0, le=1024)
    pods_per_replica: int = Field(default=1, ge=1, le=64, description="pods of one rank group (one per node)")
    drain_seconds: int = Field(
        default=300, ge=0, le=3600, description="SIGTERM: how long in-flight work may finish (the grace period follows)"
    )
    resources: Resources = Field(default_factory=Resources)
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig)
    engine: EngineStepConfig = Field(default_factory=EngineStepConfig)
    scheduling: Scheduling = Field(default_factory=Scheduling)


class GatewaySpec(Base):
    """The OpenAI-compatible front door (no accelerator)."""

    model_config = validations(
        cel("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas"),
        cel(
            "self.replicas >= self.minReplicas && self.replicas <= self.maxReplicas",
            "replicas must lie between minReplicas and maxReplicas",
        ),
    )
    replicas: int = Field(default=1, ge=1, le=64)
    min_replicas: int = Field(default=1, ge=1, le=64)
    max_replicas: int = Field(default=4, ge=1, le=64)
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    resources: Resources = Field(default_factory=Resources)
    scheduling: Scheduling = Field(default_factory=Scheduling)


class SecretKeyRef(Base):
    """A key of a Secret in the deployment's namespace."""

    name: str = Field(min_length=1)
    key: str = Field(default="password", min_length=1)


class RedisSpec(Base):
    """The Redis that carries queues and handoffs: managed by the operator, or an existing one by URL."""

    model_config = validations(
        cel("!(self.managed && has(self.url))", "redis.url is set: set redis.managed to false (they are exclusive)"),
        cel("self.managed || has(self.url)", "redis.managed is false: set redis.url"),
        cel("!has(self.secretRef) || has(self.url)", "redis.secretRef applies only to an external redis.url"),
    )
    managed: bool = True
    url: str | None = Field(default=None, pattern=r"^rediss?://", description="redis:// or rediss:// URL")
    secret_ref: SecretKeyRef | None = Field(default=None, description="Secret key holding the password of redis.url")
    image: str = Field(default="redis:7.4", description="image of the managed Redis")
    resources: Resources = Field(default_factory=Resources)


class AutoscalingSpec(Base):
    """The planner: SLO targets, the prefill:decode ratio it keeps, and how fast it may move."""

    model_config = validations(
        cel(
            "self.minPrefillDecodeRatio <= self.maxPrefillDecodeRatio",
            "autoscaling.minPrefillDecodeRatio must not exceed maxPrefillDecodeRatio",
        ),
    )
    enabled: bool = False
    ttft_target_ms: int = Field(default=2000, ge=1, description="p95 time to first token the planner aims for")
    itl_target_ms: int = Field(default=100, ge=1, description="p95 inter-token latency the planner aims for")
    target_queue_per_replica: int = Field(default=4, ge=1, description="pending + lag per replica before scaling up")
    min_prefill_decode_ratio: float = Field(default=0.25, gt=0, le=64)
    max_prefill_decode_ratio: float = Field(default=4.0, gt=0, le=64)
    scale_up_cooldown_seconds: int = Field(default=60, ge=0, le=86400)
    scale_down_cooldown_seconds: int = Field(default=300, ge=0, le=86400)
    interval_seconds: int = Field(default=15, ge=5, le=3600, description="how often the planner runs")


class TelemetrySpec(Base):
    """OpenTelemetry export (OTEL_* env of every pod)."""

    otlp_endpoint: str | None = Field(default=None, pattern=r"^https?://", description="OTLP/HTTP collector URL")
    sampling_ratio: float = Field(default=0.05, ge=0, le=1)


class PrefixCacheSpec(Base):
    """Prefix caching (docs/serving.md): each worker's engine cache, the shared tier in Redis, and the gateway's
    prefix-aware routing; `enabled: false` computes every prompt from its first token."""

    model_config = validations(
        cel("!has(self.tierSecretRef) || has(self.tier.redisUrl)", "prefixCache.tierSecretRef needs tier.redisUrl"),
    )
    enabled: bool = True
    tier: PrefixTierConfig = Field(default_factory=PrefixTierConfig)
    tier_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding tier.redisUrl's password"
    )
    max_queued_tokens: int = Field(
        default=DEFAULT_MAX_QUEUED_TOKENS,
        ge=1,
        le=MAX_QUEUED_TOKENS_LIMIT,
        description="routing: prompt tokens a worker may have waiting from one gateway before work goes elsewhere",
    )


class AuthSpec(Base):
    """API keys the gateway accepts: a Secret with one key per line."""

    api_key_secret_ref: SecretKeyRef | None = None


def _layout_rules(pool: str) -> list[dict[str, str]]:
    """CEL rules tying one pool's layout (tensor x data ranks) to its pods and their devices, and its engine's
    switches to its layout."""
    p = f"self.{pool}"
    ranks = f"{p}.parallelism.tensor * {p}.parallelism.data"
    pods = f"{p}.podsPerReplica"
    return [
        cel(
            f"!has(self.accelerator.devicesPerPod) || {ranks} <= {pods} * self.accelerator.devicesPerPod",
            f"tensor x data parallelism of {pool} must fit in {pool}.podsPerReplica x accelerator.devicesPerPod",
        ),
        cel(
            f"{pods} == 1 || !has(self.accelerator.devicesPerPod) || "
            f"{ranks} == {pods} * self.accelerator.devicesPerPod",
            f"{pool} spans {pool}.podsPerReplica pods: tensor x data must equal podsPerReplica x devicesPerPod "
            "(every device of the group holds a rank)",
        ),
        cel(
            f"{pods} == 1 || has(self.accelerator.devicesPerPod) || ({ranks}) % {pods} == 0",
            f"tensor x data parallelism of {pool} must be a multiple of {pool}.podsPerReplica "
            "(each pod holds the same number of ranks)",
        ),
        cel(
            f"{pods} == 1 || self.accelerator.type != 'cpu' || {ranks} == {pods}",
            f"a cpu pod holds one rank: {pool}.parallelism.data must equal {pool}.podsPerReplica",
        ),
    ]


class DeploymentSpec(Base):
    """`spec` of a DeepSeekV4Deployment."""

    model_config = validations(
        cel(
            "!(self.model.variant in ['flash', 'pro'] && self.accelerator.type == 'cpu')",
            "model.variant flash and pro need accelerator type nvidia or ascend; use tiny or custom on cpu",
        ),
        cel(
            "self.decode.minReplicas >= 1",
            "decode.minReplicas must be at least 1: decode serves every request",
        ),
        cel(
            "self.disaggregation.mode == 'never' || self.prefill.maxReplicas >= 1",
            "prefill.maxReplicas is 0: raise it or set disaggregation.mode to never",
        ),
        *(rule for pool in ("prefill", "decode") for rule in _layout_rules(pool)),
        cel(
            "self.accelerator.type != 'cpu' || (self.prefill.parallelism.tensor == 1 && "
            "self.decode.parallelism.tensor == 1)",
            "tensor parallelism needs accelerator devices; cpu pools run tensor 1",
        ),
    )
    model: ModelSpec
    accelerator: AcceleratorSpec
    image: str | None = Field(default=None, description="image of every role (default: the operator's own image)")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    prefill: PoolSpec = Field(default_factory=PoolSpec)
    decode: PoolSpec = Field(default_factory=PoolSpec)
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    disaggregation: DisaggregationConfig = Field(default_factory=DisaggregationConfig)
    kv_handoff: KvHandoffConfig = Field(default_factory=KvHandoffConfig)
    prefix_cache: PrefixCacheSpec = Field(default_factory=PrefixCacheSpec)
    redis: RedisSpec = Field(default_factory=RedisSpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    telemetry: TelemetrySpec = Field(default_factory=TelemetrySpec)
    auth: AuthSpec = Field(default_factory=AuthSpec)


def parse_spec(raw: dict[str, Any]) -> DeploymentSpec:
    """The typed spec of a custom resource's `spec` (the API server has already applied defaults)."""
    return DeploymentSpec.model_validate(raw)
