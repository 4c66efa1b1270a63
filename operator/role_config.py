"""The settings file of each role (`protocol.config`), as the ConfigMap the operator mounts into its pods."""

from __future__ import annotations

from typing import Any

import yaml

from dsv4.operator.ownership import Owner, metadata
from dsv4.operator.spec import DeploymentSpec
from dsv4.protocol.config import GatewayFile, PrefixCacheConfig, PrefixRoutingConfig, WorkerFile
from dsv4.protocol.contract import Role


def served_model_name(spec: DeploymentSpec) -> str:
    """The model id the gateway answers to (`/v1/models`, the `model` field of requests)."""
    return f"deepseek-v4-{spec.model.variant}"


def role_config(owner: Owner, spec: DeploymentSpec, role: Role) -> GatewayFile | WorkerFile:
    """The settings file of one role (mounted at contract.CONFIG_FILE): exactly the model that role reads."""
    prefix = spec.prefix_cache
    if role is Role.GATEWAY:
        return GatewayFile(
            deployment=owner.name,
            served_model_name=served_model_name(spec),
            max_model_len=spec.model.max_model_len,
            disaggregation=spec.disaggregation,
            prefix_routing=PrefixRoutingConfig(enabled=prefix.enabled, max_queued_tokens=prefix.max_queued_tokens),
        )
    pool = spec.prefill if role is Role.PREFILL else spec.decode
    return WorkerFile(
        deployment=owner.name,
        kv_handoff=spec.kv_handoff,
        parallelism=pool.parallelism,
        engine=pool.engine,
        prefix_cache=PrefixCacheConfig(enabled=prefix.enabled, tier=prefix.tier),
    )


def config_text(owner: Owner, spec: DeploymentSpec, role: Role) -> str:
    """The role's file as YAML (its hash rolls that role's pods when it changes)."""
    return yaml.safe_dump(role_config(owner, spec, role).model_dump(by_alias=True, mode="json"), sort_keys=True)


def config_map(owner: Owner, spec: DeploymentSpec) -> dict[str, Any]:
    """The ConfigMap holding one config file per role."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, "config"),
        "data": {f"{role.value}.yaml": config_text(owner, spec, role) for role in Role},
    }
