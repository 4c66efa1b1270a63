"""Where a worker pod's checkpoint comes from: the model source volume, the node-local cache, the init container
that writes the tiny checkpoint or pre-warms the weights."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from dsv4.operator.spec import DeploymentSpec
from dsv4.protocol import contract

TINY_PRESET = "tiny-flash"  # the checkpoint `model.variant: tiny` writes into each worker pod at start
MODEL_CACHE_DIR = "/model-cache"  # node-local copy of the weights (model.localCache)


def source_volume(spec: DeploymentSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint source as a volume and its read-only mount at contract.MODEL_DIR."""
    src = spec.model.source
    assert src is not None  # callers check
    mount: dict[str, Any] = {"name": "model", "mountPath": contract.MODEL_DIR, "readOnly": True}
    if src.pvc is not None:
        volume: dict[str, Any] = {"name": "model", "persistentVolumeClaim": {"claimName": src.pvc.claim_name}}
        volume["persistentVolumeClaim"]["readOnly"] = True
        if src.pvc.sub_path:
            mount["subPath"] = src.pvc.sub_path
    elif src.image is not None:
        volume = {"name": "model", "image": {"reference": src.image, "pullPolicy": spec.image_pull_policy}}
    else:
        volume = {"name": "model", "hostPath": {"path": src.host_path, "type": "Directory"}}
    return volume, mount


def gateway_reads_checkpoint(spec: DeploymentSpec) -> bool:
    """Whether the gateway mounts the checkpoint for its tokenizer.

    Flash, Pro and tiny use the official DeepSeek-V4 tokenizer, which the image bundles (byte-identical to the
    released files): their gateways mount nothing and never pull or attach the weights. A custom checkpoint may
    bring its own tokenizer, so the gateway mounts its source read-only.
    """
    return spec.model.variant == "custom" and spec.model.source is not None


def _cache_key(spec: DeploymentSpec) -> str:
    """The folder of this checkpoint in a node-local cache shared by deployments (stable across pods)."""
    src = spec.model.source
    assert src is not None
    where = src.model_dump_json(by_alias=True, exclude_none=True)
    digest = hashlib.sha256(f"{where}|{spec.model.revision or ''}".encode()).hexdigest()[:12]
    return f"{spec.model.variant}-{digest}"


@dataclass(frozen=True)
class WorkerModel:
    """The volumes, mounts and init containers that put a worker's checkpoint at `path`."""

    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]]  # of the worker container
    init_containers: list[dict[str, Any]]
    path: str  # env.MODEL of the worker


def worker_model(spec: DeploymentSpec, base: dict[str, Any]) -> WorkerModel:
    """Where a worker's checkpoint comes from, and the init container that puts it in place, if any.

    `base` holds the fields every container of the pod shares (image, env, security, /tmp).
    """
    if spec.model.source is None:
        # tiny: a deterministic random checkpoint (seed 0), so prefill and decode pods hold identical weights.
        init = {
            **base,
            "name": "write-tiny-checkpoint",
            "command": ["dsv4", "make-checkpoint", "--preset", TINY_PRESET, contract.MODEL_DIR],
            "volumeMounts": [*base["volumeMounts"], {"name": "model", "mountPath": contract.MODEL_DIR}],
        }
        return WorkerModel(
            volumes=[{"name": "model", "emptyDir": {}}],
            mounts=[{"name": "model", "mountPath": contract.MODEL_DIR, "readOnly": True}],
            init_containers=[init],
            path=contract.MODEL_DIR,
        )
    volume, mount = source_volume(spec)
    cache = spec.model.local_cache
    if cache is None:
        return WorkerModel(volumes=[volume], mounts=[mount], init_containers=[], path=contract.MODEL_DIR)
    if cache.host_path:
        cache_volume: dict[str, Any] = {
            "name": "model-cache",
            "hostPath": {"path": cache.host_path, "type": "DirectoryOrCreate"},
        }
        target = f"{MODEL_CACHE_DIR}/{_cache_key(spec)}"
    else:
        cache_volume = {"name": "model-cache", "emptyDir": {}}
        if cache.size_limit is not None:
            cache_volume["emptyDir"]["sizeLimit"] = str(cache.size_limit)
        target = MODEL_CACHE_DIR
    init = {
        **base,
        "name": "prewarm-weights",
        "command": ["python", "-m", "dsv4.operator.prewarm", contract.MODEL_DIR, target],
        "volumeMounts": [*base["volumeMounts"], mount, {"name": "model-cache", "mountPath": MODEL_CACHE_DIR}],
    }
    return WorkerModel(
        volumes=[volume, cache_volume],
        mounts=[{"name": "model-cache", "mountPath": MODEL_CACHE_DIR, "readOnly": True}],
        init_containers=[init],
        path=target,
    )
