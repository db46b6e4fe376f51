"""The Kubernetes manifests (deploy/kubernetes) render with kustomize (``kubectl kustomize``) and
validate offline: every built-in kind against the Kubernetes schemas shipped by the
kubernetes-validate package (strict: unknown fields are errors), the RayService's pod templates
as core PodTemplates, its serveConfigV2 against the application it names, and the zerostart
config both modes mount against zerostart's own schema.

KubeRay's RayService CRD schema itself is not available from PyPI, npm or Debian, so the
RayService envelope is checked here field by field for what the KubeRay operator reads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest
import yaml

import zerostart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))
KUBE = os.path.join(ROOT, "deploy", "kubernetes")
K8S_VERSION = "1.32.0"  # the oldest Kubernetes these manifests are written for

kubernetes_validate = pytest.importorskip("kubernetes_validate")


def _render(overlay: str) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run(["kubectl", "kustomize", os.path.join(KUBE, overlay)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _validate(doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{doc['kind']}/{doc['metadata'].get('name')}: {e.message} at "
                             f"{'.'.join(str(p) for p in e.path)}") from None


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def _config_of(docs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("zerostart-config"))
    return cm["metadata"]["name"], yaml.safe_load(cm["data"]["config.yaml"])


def test_the_single_node_server_renders_and_validates(monkeypatch) -> None:
    docs = _render("single-node")
    kinds = _by_kind(docs)
    assert {"Deployment/zerostart", "Service/zerostart", "DaemonSet/zerostart-prefetch"} <= set(kinds)
    for doc in docs:
        _validate(doc)
    cm_name, config = _config_of(docs)
    deployment = kinds["Deployment/zerostart"]["spec"]["template"]["spec"]
    prefetch = kinds["DaemonSet/zerostart-prefetch"]["spec"]["template"]["spec"]
    for spec in (deployment, prefetch):
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["config"]["configMap"]["name"] == cm_name  # the generated (hashed) name, not the base one
        assert volumes["cache"]["hostPath"]["path"] == "/mnt/nvme/zerostart"  # the node-local cache
        assert spec["nodeSelector"] == {"zerostart.io/nvme": "true"}
    server = deployment["containers"][0]
    assert server["image"] == "zerostart:0.1.0" and server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "ZEROSTART_CACHE_DIR", "value": "/var/cache/zerostart"} in server["env"]
    assert prefetch["initContainers"][0]["args"] == ["prefetch", "--config", "/etc/zerostart/config.yaml"]
    _check_zerostart_config(config, [server], monkeypatch)


def test_the_rayservice_renders_and_its_parts_validate(monkeypatch) -> None:
    docs = _render("ray")
    kinds = _by_kind(docs)
    rs = kinds["RayService/zerostart"]
    cm_name, config = _config_of(docs)
    for doc in docs:
        if doc["kind"] != "RayService":
            _validate(doc)
    # the envelope KubeRay reads (ray.io/v1)
    assert rs["apiVersion"] == "ray.io/v1"
    spec = rs["spec"]
    assert set(spec) == {"serveConfigV2", "rayClusterConfig"}
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for name, group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name  # KubeRay: strings only
        # each pod template is a core PodTemplateSpec: validate it as one
        _validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                   "template": group["template"]})
        pod = group["template"]["spec"]
        assert pod["containers"][0]["image"] == "zerostart:0.1.0-ray"
        assert {v["name"]: v for v in pod["volumes"]}["config"]["configMap"]["name"] == cm_name
    gpu = cluster["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 <= gpu["replicas"] <= gpu["maxReplicas"]
    # serveConfigV2 names zerostart's application builder and the config every node mounts
    serve = yaml.safe_load(spec["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "zerostart.cluster:app_from_args"
    import zerostart.cluster

    assert callable(zerostart.cluster.app_from_args)
    assert app["args"]["config"] == "/etc/zerostart/config.yaml"
    # the Ray node labels the config's placement asks for are the ones the groups start with
    labels = {name: dict(kv.split("=", 1) for kv in g["rayStartParams"].get("labels", "").split(",") if kv)
              for name, g in groups}
    cfg = _check_zerostart_config(config, [g["template"]["spec"]["containers"][0] for _, g in groups], monkeypatch)
    assert cfg.cluster.ingress.node_labels.items() <= labels["head"].items()
    for pool in cfg.cluster.pools:
        assert pool.placement.node_labels.items() <= labels["gpu"].items(), pool.name
        assert pool.placement.num_gpus <= gpu["template"]["spec"]["containers"][0]["resources"]["limits"][
            "nvidia.com/gpu"]


def _check_zerostart_config(config: dict[str, Any], servers: list[dict[str, Any]], monkeypatch) -> Any:
    from zerostart.serve import ConfigError, load_config

    # 0.0.0.0 without keys is refused: every container that serves gets them from a required Secret
    monkeypatch.delenv("ZEROSTART_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="no api_keys are set"):
        load_config(data=config)
    for c in servers:
        assert {"secretRef": {"name": "zerostart-api-keys"}} in c["envFrom"], c["name"]
    monkeypatch.setenv("ZEROSTART_API_KEYS", "k1,k2")
    cfg = load_config(data=config)  # zerostart's own schema: unknown keys and bad values are errors
    assert cfg.server.api_keys == ["k1", "k2"]
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 8000
    assert cfg.cluster.cache_dir == "/var/cache/zerostart"
    return cfg


@pytest.mark.ray
def test_serve_config_v2_validates_against_ray_serves_schema() -> None:
    schema = pytest.importorskip("ray.serve.schema")
    rs = _by_kind(_render("ray"))["RayService/zerostart"]
    parsed = schema.ServeDeploySchema.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    assert parsed.applications[0].import_path == "zerostart.cluster:app_from_args"


def test_the_dockerfile_is_multi_stage_with_a_slim_runtime_stage() -> None:
    """No Docker engine runs here; what can be checked without one: two stages, the runtime on
    CUDA's slim `base` flavour, and nothing that builds code installed into it."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        lines = [ln.strip() for ln in f.read().replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]
    stages = [i for i, ln in enumerate(lines) if ln.upper().startswith("FROM ")]
    assert len(stages) == 2
    base = next(ln.split("=", 1)[1] for ln in lines if ln.startswith("ARG CUDA_BASE="))
    assert base.startswith("nvidia/cuda:") and "-base-" in base  # not -runtime- / -devel-: the wheels bring CUDA
    runtime = lines[stages[1]:]
    assert runtime[0] == "FROM ${CUDA_BASE}"
    installs = " ".join(ln for ln in runtime if "apt-get install" in ln or "pip install" in ln)
    for tool in ("gcc", "g++", "make", "build-essential", "-dev", "-venv", "pip install", "cuda-toolkit", "nvcc"):
        assert tool not in installs, tool
    assert any(ln.startswith("COPY --from=build /opt/zerostart") for ln in runtime)
    assert any(ln.startswith("USER ") and "root" not in ln for ln in runtime)
