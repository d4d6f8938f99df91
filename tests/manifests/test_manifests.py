"""manifests/ renders with `kubectl kustomize`, base and every overlay, and validates offline:
core kinds with kubernetes-validate --strict, the TrainJob against the Trainer's CRD schema kept in
manifests/schemas/ (jsonschema, unknown fields rejected), the PyTorchJob's pod templates as core
``PodTemplate`` objects (its CRD schema is not bundled)."""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
TRAINJOB_CRD = MANIFESTS / "schemas" / "trainer.kubeflow.org_trainjobs.yaml"
KUSTOMIZATIONS = {"default": ".", "base": "base", "postgres": "overlays/postgres",
                  "trainjob": "overlays/trainjob", "pytorchjob": "overlays/pytorchjob"}
INFRASTRUCTURE_KINDS = {"Namespace", "ServiceAccount", "PersistentVolumeClaim", "ConfigMap", "Deployment", "Service",
                        "NetworkPolicy"}
TRAINING_LABEL = ("app.kubernetes.io/component", "training")
PIPELINE_NAMESPACE = "kubeflow-user-example-com"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")

Resources = dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each kustomization rendered once, as a YAML file."""
    folder = tmp_path_factory.mktemp("manifests")
    paths = {}
    for name, path in KUSTOMIZATIONS.items():
        out = subprocess.run(["kubectl", "kustomize", str(MANIFESTS / path)], capture_output=True, text=True,
                             check=True, timeout=60)
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(out.stdout)
    return paths


def _resources(path: Path) -> Resources:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(path.read_text()) if d}


def _trainjob_pod(job: dict[str, Any]) -> dict[str, Any]:
    """The pod template the TrainJob patches into the runtime's `node` job."""
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    return node["template"]["spec"]["template"]


def _pod_templates(resources: Resources) -> list[dict[str, Any]]:
    templates = [r["spec"]["template"] for r in resources.values() if r["kind"] == "Deployment"]
    for r in resources.values():
        if r["kind"] == "PyTorchJob":
            templates += [replica["template"] for replica in r["spec"]["pytorchReplicaSpecs"].values()]
        elif r["kind"] == "TrainJob":
            templates.append(_trainjob_pod(r))
    return templates


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural schema with unknown fields rejected (as `kubectl apply` does by default)."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [_strict(s) for s in schema[key]]
    return schema


def _validate_trainjob(job: dict[str, Any]) -> None:
    """jsonschema against the CRD's v1alpha1 schema, plus the CEL rules that apply at creation."""
    (crd,) = [d for d in yaml.safe_load_all(TRAINJOB_CRD.read_text()) if d]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == job["apiVersion"].split("/")[1]]
    assert job["apiVersion"].split("/")[0] == crd["spec"]["group"] and job["kind"] == crd["spec"]["names"]["kind"]
    jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"])).validate(job)
    name = job["metadata"]["name"]
    if not (re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63):
        raise jsonschema.ValidationError(f"metadata.name {name!r}: an RFC 1035 label of at most 63 characters")


def test_default_is_the_infrastructure_only(rendered: dict[str, Path]) -> None:
    default = _resources(rendered["default"])
    assert default == _resources(rendered["base"]), "`kubectl apply -k manifests/` applies base/"
    assert {r["kind"] for r in default.values()} == INFRASTRUCTURE_KINDS
    for name in ("trainjob", "pytorchjob"):
        kinds = {r["kind"] for r in _resources(rendered[name]).values()}
        assert kinds == {"TrainJob" if name == "trainjob" else "PyTorchJob"}, "a job overlay holds only its job"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_core_resources_validate_strictly(rendered: dict[str, Path], name: str) -> None:
    if not VALIDATE.exists():
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[dev]')")
    result = subprocess.run([str(VALIDATE), "--strict", str(rendered[name])], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for resource in _resources(rendered[name]).values():
        if resource["kind"] in INFRASTRUCTURE_KINDS:
            key = f"{resource['kind'].lower()}/{resource['metadata']['name']}"
            assert f"passed for resource {key}" in result.stdout, key


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_namespace_labels_image_and_no_secrets(rendered: dict[str, Path], name: str) -> None:
    from hjepa_kfp.components import DEFAULT_IMAGE

    resources = _resources(rendered[name])
    assert not [r for r in resources.values() if r["kind"] == "Secret"], "secrets are created out of band"
    assert {r["metadata"].get("namespace", "hjepa") for r in resources.values()} == {"hjepa"}
    assert all(r["metadata"]["labels"]["app.kubernetes.io/part-of"] == "hjepa" for r in resources.values())
    images = {c["image"] for t in _pod_templates(resources) for c in t["spec"]["containers"] if "image" in c}
    images |= {r["spec"]["trainer"]["image"] for r in resources.values() if r["kind"] == "TrainJob"}
    assert images - {"postgres:16.6-bookworm"} <= {DEFAULT_IMAGE}, "one image for components, MLflow and jobs"
    for template in _pod_templates(resources):
        for container in template["spec"]["containers"]:
            for env in container.get("env", []):
                if re.search("PASSWORD|TOKEN|SECRET", env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def test_inventory_and_wiring(rendered: dict[str, Path]) -> None:
    resources = _resources(rendered["base"])
    assert set(resources) == {"Namespace/hjepa", "ServiceAccount/hjepa", "Deployment/mlflow", "Service/mlflow",
                              "ConfigMap/mlflow-config", "PersistentVolumeClaim/hjepa-data",
                              "PersistentVolumeClaim/mlflow-store", "NetworkPolicy/mlflow"}
    uri = resources["ConfigMap/mlflow-config"]["data"]["MLFLOW_TRACKING_URI"]
    assert uri == "http://mlflow.hjepa.svc.cluster.local:5000"
    mlflow = resources["Deployment/mlflow"]["spec"]["template"]["spec"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in mlflow["volumes"] if "persistentVolumeClaim" in v} == \
        {"mlflow-store"}
    args = mlflow["containers"][0]["args"]
    assert "--backend-store-uri=sqlite:////mlflow/mlflow.db" in args and "--workers=1" in args, "sqlite: one writer"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_non_root_and_resources(rendered: dict[str, Path], name: str) -> None:
    resources = _resources(rendered[name])
    for template in _pod_templates(resources):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    limits = [c["resources"] for t in _pod_templates(resources) for c in t["spec"]["containers"]
              if c["name"] != "node"]  # the TrainJob's container patch: its resources are resourcesPerNode
    limits += [r["spec"]["trainer"]["resourcesPerNode"] for r in resources.values() if r["kind"] == "TrainJob"]
    for resources_ in limits:
        assert {"cpu", "memory"} <= set(resources_["requests"]) and "memory" in resources_["limits"]


def _check_training_command(command: list[str], args: list[str]) -> None:
    """The job runs torchrun over `hjepa train` on the shards of the PVC, resuming, as a parsed CLI call."""
    from hjepa_core.cli import build_parser
    from hjepa_core.config import load_config

    assert command[-2:] == ["--module", "hjepa_core.cli"]
    assert command[0] == "torchrun" or command[:3] == ["python", "-m", "torch.distributed.run"]
    parsed = build_parser().parse_args(args)
    assert parsed.command == "train" and parsed.resume == "auto"
    config = load_config(ROOT / "configs" / Path(parsed.config).name, parsed.overrides)
    assert config.data.dataset.startswith("shards:/mnt/hjepa/")
    assert config.training.output_dir.startswith("/mnt/hjepa/")


def _check_training_pod(template: dict[str, Any], container_name: str) -> None:
    assert template["metadata"]["labels"][TRAINING_LABEL[0]] == TRAINING_LABEL[1], "may reach MLflow"
    spec = template["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == container_name]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/mnt/hjepa"]]["persistentVolumeClaim"]["claimName"] == "hjepa-data"
    assert spec["serviceAccountName"] == "hjepa"


def test_trainjob(rendered: dict[str, Path]) -> None:
    job = _resources(rendered["trainjob"])["TrainJob/hjepa-pretrain"]
    _validate_trainjob(job)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] >= 2, "multi-node"
    assert str(trainer["numProcPerNode"]) == trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
    _check_training_command(trainer["command"], trainer["args"])
    env = {e["name"]: e["valueFrom"] for e in trainer["env"]}
    assert env["MLFLOW_TRACKING_URI"]["configMapKeyRef"]["name"] == "mlflow-config"
    assert {v["secretKeyRef"]["name"] for v in env.values() if "secretKeyRef" in v} == {"mlflow-credentials"}
    assert all(v["secretKeyRef"]["optional"] for v in env.values() if "secretKeyRef" in v)
    _check_training_pod(_trainjob_pod(job), "node")


@pytest.mark.parametrize(("path", "value", "message"), [
    (("spec", "trainer", "numNodes"), "two", "'two' is not of type 'integer'"),
    (("spec", "trainer", "gpus"), 4, "Additional properties are not allowed ('gpus'"),
    (("spec", "runtimeRef"), {"kind": "ClusterTrainingRuntime"}, "'name' is a required property"),
    (("metadata", "name"), "HJEPA.pretrain", "an RFC 1035 label"),
])
def test_trainjob_schema_rejects_mistakes(rendered: dict[str, Path], path: tuple[str, ...], value: Any,
                                          message: str) -> None:
    """The validator is real: each of these mistakes fails it."""
    job = copy.deepcopy(_resources(rendered["trainjob"])["TrainJob/hjepa-pretrain"])
    parent = job
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError, match=re.escape(message)):
        _validate_trainjob(job)


def test_trainjob_schema_is_the_trainers_crd() -> None:
    note = (MANIFESTS / "schemas" / "README.md").read_text()
    digest = hashlib.sha256(TRAINJOB_CRD.read_bytes()).hexdigest()
    assert digest in note and "github.com/kubeflow/trainer" in note, "schemas/README.md: source, commit, sha256"
    assert re.search(r"commit\s+`[0-9a-f]{40}`", note)
    (crd,) = [d for d in yaml.safe_load_all(TRAINJOB_CRD.read_text()) if d]
    assert crd["kind"] == "CustomResourceDefinition" and crd["metadata"]["name"] == "trainjobs.trainer.kubeflow.org"


def test_pytorchjob(rendered: dict[str, Path]) -> None:
    import kubernetes_validate

    job = _resources(rendered["pytorchjob"])["PyTorchJob/hjepa-pretrain"]
    assert job["apiVersion"] == "kubeflow.org/v1"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    nproc = job["spec"]["nprocPerNode"]
    assert isinstance(nproc, str) and nproc.isdigit()
    for replica in replicas.values():
        assert replica["restartPolicy"] in {"OnFailure", "Always", "ExitCode", "Never"}
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                    "template": replica["template"]}
        kubernetes_validate.validate(template, kubernetes_validate.latest_version(), strict=True)
        (container,) = replica["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == nproc
        _check_training_command(container["command"], container["args"])
        _check_training_pod(replica["template"], "pytorch")


def test_mlflow_on_postgres(rendered: dict[str, Path]) -> None:
    import sqlalchemy

    resources = _resources(rendered["postgres"])
    assert set(resources) == set(_resources(rendered["base"])) | {
        "Deployment/postgres", "Service/postgres", "PersistentVolumeClaim/postgres-data", "NetworkPolicy/postgres"}
    mlflow = resources["Deployment/mlflow"]["spec"]["template"]["spec"]["containers"][0]
    assert not [a for a in mlflow["args"] if a.startswith("--backend-store-uri")]
    assert int(next(a for a in mlflow["args"] if a.startswith("--workers=")).split("=")[1]) > 1
    env = {e["name"]: e for e in mlflow["env"]}
    uri = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert re.fullmatch(r"postgresql://mlflow@postgres:5432/mlflow", uri), "no password in the URI"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres", "key": "password"}
    sqlalchemy.create_engine(uri).dispose()  # the driver the URI needs is installed (it is in the image too)

    postgres = resources["Deployment/postgres"]["spec"]["template"]["spec"]
    (container,) = postgres["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres", "key": "password"}
    assert env["POSTGRES_USER"]["value"] == "mlflow" and env["POSTGRES_DB"]["value"] == "mlflow"
    volumes = {v["name"]: v for v in postgres["volumes"]}
    data = next(m for m in container["volumeMounts"] if m["mountPath"] == "/var/lib/postgresql/data")
    assert volumes[data["name"]]["persistentVolumeClaim"]["claimName"] == "postgres-data"
    assert env["PGDATA"]["value"].startswith("/var/lib/postgresql/data/")
    service = resources["Service/postgres"]["spec"]
    assert service["selector"] == resources["Deployment/postgres"]["spec"]["template"]["metadata"]["labels"]


def test_network_policies(rendered: dict[str, Path]) -> None:
    resources = _resources(rendered["postgres"])
    mlflow_labels = resources["Deployment/mlflow"]["spec"]["template"]["metadata"]["labels"]
    policy = resources["NetworkPolicy/mlflow"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= mlflow_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": PIPELINE_NAMESPACE}}},
        {"podSelector": {"matchLabels": dict([TRAINING_LABEL])}},
    ], "only the pipeline namespace and this namespace's training pods reach MLflow"
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]
    (rule,) = resources["NetworkPolicy/postgres"]["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]
    assert resources["NetworkPolicy/postgres"]["spec"]["podSelector"]["matchLabels"].items() <= \
        resources["Deployment/postgres"]["spec"]["template"]["metadata"]["labels"].items()
