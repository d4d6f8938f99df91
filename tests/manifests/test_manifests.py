"""manifests/ renders with `kubectl kustomize` and validates offline (kubernetes-validate --strict).

The PyTorchJob CRD's schema is not bundled with kubernetes-validate: its pod templates are
checked strictly as core ``PodTemplate`` objects and the rest structurally.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "manifests")], capture_output=True, text=True,
                         check=True, timeout=60)
    path = tmp_path_factory.mktemp("manifests") / "all.yaml"
    path.write_text(out.stdout)
    return path


def _resources(path: Path) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(path.read_text()) if d}


def _pod_specs(resources: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    specs = [r["spec"]["template"]["spec"] for r in resources.values() if r["kind"] == "Deployment"]
    job = resources["PyTorchJob/hjepa-pretrain"]
    specs += [replica["template"]["spec"] for replica in job["spec"]["pytorchReplicaSpecs"].values()]
    return specs


def test_core_resources_validate_strictly(rendered: Path) -> None:
    if not VALIDATE.exists():
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[dev]')")
    result = subprocess.run([str(VALIDATE), "--strict", str(rendered)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("namespace/hjepa", "deployment/mlflow", "service/mlflow", "persistentvolumeclaim/hjepa-data",
                 "persistentvolumeclaim/mlflow-store", "configmap/mlflow-config"):
        assert f"passed for resource {name}" in result.stdout, name


def test_inventory_and_wiring(rendered: Path) -> None:
    resources = _resources(rendered)
    assert set(resources) >= {"Namespace/hjepa", "Deployment/mlflow", "Service/mlflow", "ConfigMap/mlflow-config",
                              "PersistentVolumeClaim/hjepa-data", "PersistentVolumeClaim/mlflow-store",
                              "PyTorchJob/hjepa-pretrain"}
    assert not [r for r in resources.values() if r["kind"] == "Secret"], "secrets are created out of band"
    assert {r["metadata"].get("namespace", "hjepa") for r in resources.values()} == {"hjepa"}
    uri = resources["ConfigMap/mlflow-config"]["data"]["MLFLOW_TRACKING_URI"]
    assert uri == "http://mlflow.hjepa.svc.cluster.local:5000"
    mlflow = resources["Deployment/mlflow"]["spec"]["template"]["spec"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in mlflow["volumes"] if "persistentVolumeClaim" in v} == \
        {"mlflow-store"}
    from hjepa_kfp.components import DEFAULT_IMAGE

    images = {c["image"] for spec in _pod_specs(resources) for c in spec["containers"]}
    assert images == {DEFAULT_IMAGE}, "one image for the components, MLflow and the PyTorchJob"


def test_non_root_and_resources(rendered: Path) -> None:
    for spec in _pod_specs(_resources(rendered)):
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert "memory" in container["resources"]["limits"]


def test_pytorchjob(rendered: Path) -> None:
    import kubernetes_validate

    from hjepa_core.cli import build_parser
    from hjepa_core.config import load_config

    job = _resources(rendered)["PyTorchJob/hjepa-pretrain"]
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
        spec = replica["template"]["spec"]
        (container,) = spec["containers"]
        assert container["name"] == "pytorch"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == nproc
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert volumes[mounts["/mnt/hjepa"]]["persistentVolumeClaim"]["claimName"] == "hjepa-data"
        assert container["command"][:4] == ["python", "-m", "torch.distributed.run", "--module"]
        args = build_parser().parse_args(container["args"])
        assert args.command == "train" and args.resume == "auto"
        config = load_config(ROOT / "configs" / Path(args.config).name, args.overrides)
        assert config.data.dataset.startswith("shards:/mnt/hjepa/")
        assert config.training.output_dir.startswith("/mnt/hjepa/")
