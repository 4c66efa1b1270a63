"""Spec → children: names, labels, owner references, accelerator profiles, security, probes, per-pool rollouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dsv4.operator import builders, profiles, worker_model
from dsv4.operator.ownership import Owner
from dsv4.protocol import contract, env
from dsv4.protocol.config import PrefixRoutingConfig
from dsv4.services.gateway.settings import GatewaySettings
from dsv4.services.workers.settings import WorkerSettings

from .conftest import Admit

pytestmark = pytest.mark.unit

OWNER = Owner(name="demo", namespace="serving", uid="0b6c1d9e-uid")
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
TINY = {"model": {"variant": "tiny"}, "accelerator": {"type": "cpu"}}
FLASH = {
    "model": {"variant": "flash", "source": {"pvc": {"claimName": "weights", "subPath": "flash"}}},
    "accelerator": {"type": "nvidia", "product": "H200"},
    "prefill": {"parallelism": {"tensor": 4}},
    "decode": {"parallelism": {"tensor": 2, "data": 2}},
}
PRO = {
    "model": {"variant": "pro", "source": {"hostPath": "/data/pro"}},
    "accelerator": {"type": "ascend", "product": "910C", "devicesPerPod": 16},
    "auth": {"apiKeySecretRef": {"name": "keys", "key": "api"}},
    "redis": {"managed": False, "url": "redis://r:6379/0", "secretRef": {"name": "rpw"}},
}


def _children(admit: Admit, raw: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["kind"], c["metadata"]["name"]): c for c in builders.children(OWNER, admit(raw), "dsv4:test")}


def _container(children: dict[tuple[str, str], dict[str, Any]], role: str) -> dict[str, Any]:
    container: dict[str, Any] = children[("Deployment", f"demo-{role}")]["spec"]["template"]["spec"]["containers"][0]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_children_of_a_managed_redis_deployment(admit: Admit) -> None:
    kids = _children(admit, TINY)
    expected = {("ConfigMap", "demo-config"), ("Service", "demo-redis"), ("StatefulSet", "demo-redis")}
    for role in ("gateway", "prefill", "decode"):
        expected |= {
            ("Deployment", f"demo-{role}"),
            ("Service", f"demo-{role}"),
            ("PodDisruptionBudget", f"demo-{role}"),
        }
    assert set(kids) == expected


def test_external_redis_has_no_redis_children_and_its_url_is_passed(admit: Admit) -> None:
    kids = _children(admit, PRO)
    assert not any(name == "demo-redis" for _, name in kids)
    got = _env(_container(kids, "decode"))
    assert got[env.REDIS_URL] == "redis://r:6379/0"
    assert got[env.REDIS_PASSWORD] == {"secretKeyRef": {"name": "rpw", "key": "password"}}


def test_every_child_is_owned_labelled_and_namespaced(admit: Admit) -> None:
    for (kind, name), child in _children(admit, FLASH).items():
        meta = child["metadata"]
        assert meta["namespace"] == "serving", name
        [ref] = meta["ownerReferences"]
        assert ref["uid"] == OWNER.uid and ref["controller"] and ref["kind"] == "DeepSeekV4Deployment"
        assert meta["labels"]["app.kubernetes.io/instance"] == "demo"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "dsv4-operator"
        if kind in ("Deployment", "StatefulSet"):
            selector = child["spec"]["selector"]["matchLabels"]
            assert selector.items() <= child["spec"]["template"]["metadata"]["labels"].items()


def test_nvidia_profile(admit: Admit) -> None:
    kids = _children(admit, FLASH)
    prefill, decode = (kids[("Deployment", f"demo-{r}")]["spec"]["template"]["spec"] for r in ("prefill", "decode"))
    assert prefill["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert decode["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "4"  # tensor 2 x data 2
    assert prefill["nodeSelector"] == {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H200"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in prefill["tolerations"]
    shm = next(v for v in prefill["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in prefill["containers"][0]["volumeMounts"]
    assert _env(prefill["containers"][0])[env.DEVICE] == "cuda"
    model = next(m for m in prefill["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert model == {"name": "model", "mountPath": contract.MODEL_DIR, "readOnly": True, "subPath": "flash"}


def test_ascend_profile(admit: Admit) -> None:
    pod = _children(admit, PRO)[("Deployment", "demo-decode")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"huawei.com/Ascend910": "16"}
    assert pod["nodeSelector"] == {"accelerator": "huawei-Ascend910"}
    assert pod["tolerations"][0]["key"] == "huawei.com/Ascend910"
    got = _env(container)
    assert got["ASCEND_RT_VISIBLE_DEVICES"] == ",".join(str(i) for i in range(16))
    assert got["HCCL_IF_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert got[env.DEVICE] == "npu"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for _, path, _ in profiles.ASCEND_HOST_MOUNTS:
        assert mounts[path]["readOnly"] is True
    host = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert {"/usr/local/Ascend/driver", "/etc/hccn.conf", "/data/pro"} <= host


def test_ascend_resource_name_follows_product_and_override(admit: Admit) -> None:
    base = {"model": {"variant": "custom", "source": {"image": "reg/m:1"}}}
    for acc, name in (
        ({"type": "ascend", "product": "310P"}, "huawei.com/Ascend310P"),
        ({"type": "ascend", "resourceName": "huawei.com/ascend-1980"}, "huawei.com/ascend-1980"),
    ):
        container = _container(_children(admit, {**base, "accelerator": acc}), "prefill")
        assert container["resources"]["limits"] == {name: "1"}


def test_cpu_profile_asks_for_no_device(admit: Admit) -> None:
    kids = _children(admit, TINY)
    pod = kids[("Deployment", "demo-decode")]["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod and "affinity" not in pod
    assert not any(v["name"] == "dshm" for v in pod["volumes"])
    got = _env(pod["containers"][0])
    assert got[env.DEVICE] == "cpu" and env.DTYPE not in got  # cpu keeps the workers' default dtype
    assert got[env.MODEL] == contract.MODEL_DIR


def test_tiny_workers_write_their_checkpoint_in_an_init_container(admit: Admit) -> None:
    pod = _children(admit, TINY)[("Deployment", "demo-prefill")]["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["command"] == ["dsv4", "make-checkpoint", "--preset", worker_model.TINY_PRESET, contract.MODEL_DIR]
    assert {"name": "model", "mountPath": contract.MODEL_DIR} in init["volumeMounts"]
    assert {"name": "model", "emptyDir": {}} in pod["volumes"]
    main = pod["containers"][0]
    assert {"name": "model", "mountPath": contract.MODEL_DIR, "readOnly": True} in main["volumeMounts"]
    assert init["securityContext"] == main["securityContext"] and init["image"] == main["image"]


@pytest.mark.parametrize("raw", [TINY, FLASH, PRO], ids=["tiny", "flash", "pro"])
def test_gateway_uses_the_bundled_tokenizer_and_mounts_no_weights(admit: Admit, raw: dict[str, Any]) -> None:
    # The crash-loop bug: DSV4_MODEL pointed the gateway at /models, which only the workers mounted.
    pod = _children(admit, raw)[("Deployment", "demo-gateway")]["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "initContainers" not in pod
    assert pod["containers"][0]["resources"] == {}
    assert {v["name"] for v in pod["volumes"]} <= {"tmp", "config", "api-keys"}
    assert env.MODEL not in _env(pod["containers"][0])


@pytest.mark.parametrize(
    "source",
    [{"pvc": {"claimName": "w", "subPath": "m"}}, {"hostPath": "/data/m"}, {"image": "reg/m:1"}],
    ids=["pvc", "hostPath", "image"],
)
def test_custom_gateway_mounts_the_checkpoint_it_reads_the_tokenizer_from(admit: Admit, source: dict[str, Any]) -> None:
    raw = {"model": {"variant": "custom", "source": source}, "accelerator": {"type": "nvidia"}}
    pod = _children(admit, raw)[("Deployment", "demo-gateway")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert _env(container)[env.MODEL] == contract.MODEL_DIR
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == contract.MODEL_DIR]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume.keys() & {"persistentVolumeClaim", "hostPath", "image"}


@pytest.mark.parametrize("raw", [TINY, FLASH, PRO], ids=["cpu", "nvidia", "ascend"])
def test_pod_security_and_probes(admit: Admit, raw: dict[str, Any]) -> None:
    for (kind, _), child in _children(admit, raw).items():
        if kind not in ("Deployment", "StatefulSet"):
            continue
        pod = child["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert "readinessProbe" in c and "livenessProbe" in c
        for c in pod.get("initContainers", []):
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    for role in ("gateway", "prefill", "decode"):
        c = _container(_children(admit, raw), role)
        assert c["readinessProbe"]["httpGet"]["path"] == contract.READY_PATH
        assert c["livenessProbe"]["httpGet"]["path"] == contract.HEALTH_PATH
        assert c["command"] == ["dsv4", role]


def test_big_models_get_a_long_startup_window(admit: Admit) -> None:
    tiny = _container(_children(admit, TINY), "decode")["startupProbe"]
    pro = _container(_children(admit, PRO), "decode")["startupProbe"]
    assert pro["failureThreshold"] * pro["periodSeconds"] > 10 * tiny["failureThreshold"] * tiny["periodSeconds"]


def test_contract_env_config_and_api_keys(admit: Admit) -> None:
    kids = _children(admit, PRO)
    gw = _container(kids, "gateway")
    got = _env(gw)
    assert got[env.DEPLOYMENT] == "demo" and got[env.ROLE] == "gateway"
    assert got[env.CONFIG_FILE] == contract.CONFIG_FILE
    assert got[env.API_KEY_FILE] == contract.API_KEY_FILE
    assert got[env.POD_NAME] == {"fieldRef": {"fieldPath": "metadata.name"}}
    pod = kids[("Deployment", "demo-gateway")]["spec"]["template"]["spec"]
    secret = next(v for v in pod["volumes"] if v["name"] == "api-keys")["secret"]
    assert secret == {"secretName": "keys", "items": [{"key": "api", "path": "keys"}]}
    assert env.API_KEY_FILE not in _env(_container(kids, "decode"))
    config = yaml.safe_load(kids[("ConfigMap", "demo-config")]["data"]["prefill.yaml"])
    assert config["kvHandoff"]["chunkBytes"] == 4 * 1024 * 1024
    assert "disaggregation" in yaml.safe_load(kids[("ConfigMap", "demo-config")]["data"]["gateway.yaml"])


def test_every_key_of_a_role_config_file_is_read_by_that_role(
    admit: Admit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = {
        **PRO,
        "model": {**PRO["model"], "maxModelLen": 131072},
        "disaggregation": {"mode": "always", "minPromptTokens": 7, "maxPrefillQueue": 9},
        "kvHandoff": {"transport": "direct", "ttlSeconds": 33, "chunkBytes": 1 << 20},
        "decode": {
            "parallelism": {"tensor": 4, "data": 2, "expert": True},
            # MTP under data-parallel attention, and a decode batch for an accelerator
            "engine": {"overlapScheduling": False, "speculativeMtp": True, "maxNumSeqs": 128},
        },
        "prefixCache": {
            "enabled": False,
            "tier": {"budgetBytes": 12345, "ttlSeconds": 77, "redisUrl": "redis://tier:6379/1"},
            "maxQueuedTokens": 999,
        },
    }
    data = _children(admit, raw)[("ConfigMap", "demo-config")]["data"]
    for name in ("gateway", "prefill", "decode"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(data[f"{name}.yaml"])
        monkeypatch.setenv(env.CONFIG_FILE, str(path))
        settings = GatewaySettings() if name == "gateway" else WorkerSettings()
        written = settings.file_model.model_validate(yaml.safe_load(data[f"{name}.yaml"]))
        assert written.model_fields_set == set(type(written).model_fields)  # the operator writes every field
        for field in written.model_fields_set:  # and the role's settings carry each one
            assert getattr(settings, field) == getattr(written, field), (name, field)
    worker = WorkerSettings()  # the decode file is the last one set
    assert worker.parallelism.tensor == 4 and worker.parallelism.expert and worker.kv_handoff.ttl_seconds == 33
    assert not worker.engine.overlap_scheduling and worker.engine.cuda_graphs and worker.engine.speculative_mtp
    assert worker.engine_config().max_num_seqs == worker.inflight_limit() == 128
    assert not worker.prefix_cache.enabled and worker.prefix_cache.tier.budget_bytes == 12345
    assert worker.prefix_cache.tier.redis_url == "redis://tier:6379/1"
    monkeypatch.setenv(env.CONFIG_FILE, str(tmp_path / "gateway.yaml"))
    assert GatewaySettings().served_model_name == "deepseek-v4-pro"
    assert GatewaySettings().max_model_len == 131072
    assert GatewaySettings().disaggregation.min_prompt_tokens == 7
    assert GatewaySettings().prefix_routing == PrefixRoutingConfig(enabled=False, max_queued_tokens=999)


def test_the_prefix_tier_password_reaches_the_prefill_workers_only(admit: Admit) -> None:
    raw = {**PRO, "prefixCache": {"tier": {"redisUrl": "redis://tier:6379/0"}, "tierSecretRef": {"name": "t"}}}
    kids = _children(admit, raw)
    got = _env(_container(kids, "prefill"))
    assert got[env.PREFIX_TIER_REDIS_PASSWORD] == {"secretKeyRef": {"name": "t", "key": "password"}}
    for role in ("decode", "gateway"):
        assert env.PREFIX_TIER_REDIS_PASSWORD not in _env(_container(kids, role))


def test_managed_redis_url_and_statefulset(admit: Admit) -> None:
    kids = _children(admit, TINY)
    assert _env(_container(kids, "prefill"))[env.REDIS_URL] == "redis://demo-redis.serving.svc:6379/0"
    sts = kids[("StatefulSet", "demo-redis")]["spec"]
    assert sts["replicas"] == 1 and sts["serviceName"] == "demo-redis"
    assert kids[("Service", "demo-redis")]["spec"]["ports"][0]["port"] == 6379
    # every gateway replica may hold its whole pool (a connection per request waiting for tokens)
    args = sts["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxclients") + 1] == str(4 * 2048 + 10000)  # gateway maxReplicas defaults to 4
    wider = _children(admit, {**TINY, "gateway": {"maxReplicas": 16}})[("StatefulSet", "demo-redis")]["spec"]
    args = wider["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxclients") + 1] == str(16 * 2048 + 10000)


def _templates(admit: Admit, raw: dict[str, Any]) -> dict[str, Any]:
    kids = _children(admit, raw)
    return {r: kids[("Deployment", f"demo-{r}")]["spec"]["template"] for r in ("gateway", "prefill", "decode")}


@pytest.mark.parametrize(
    ("change", "rolled"),
    [
        ({"prefill": {"resources": {"requests": {"cpu": "2"}}}}, {"prefill"}),
        ({"decode": {"parallelism": {"tensor": 2}}}, {"decode"}),
        ({"prefill": {"engine": {"cudaGraphs": False}}}, {"prefill"}),
        ({"disaggregation": {"minPromptTokens": 64}}, {"gateway"}),
        ({"kvHandoff": {"ttlSeconds": 30}}, {"prefill", "decode"}),
        ({"prefill": {"replicas": 3, "maxReplicas": 4}}, set()),
    ],
)
def test_a_spec_change_rolls_only_the_pools_it_concerns(admit: Admit, change: dict[str, Any], rolled: set[str]) -> None:
    base = {**FLASH, "prefill": {}, "decode": {}}
    before, after = _templates(admit, base), _templates(admit, {**base, **change})
    assert {r for r in before if before[r] != after[r]} == rolled


def test_default_image_applies_only_when_the_spec_names_none(admit: Admit) -> None:
    assert _container(_children(admit, TINY), "gateway")["image"] == "dsv4:test"
    assert _container(_children(admit, {**TINY, "image": "reg/dsv4:9"}), "gateway")["image"] == "reg/dsv4:9"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_examples_build(admit: Admit, path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    owner = Owner(doc["metadata"]["name"], "default", "uid")
    kids = builders.children(owner, admit(doc["spec"], name=owner.name), "dsv4:test")
    assert all(len(c["metadata"]["name"]) <= 63 for c in kids)
