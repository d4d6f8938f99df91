"""The model registry after evaluation, against a real MLflow server: only scored versions, their
scores as tags, a signature and an input example, the candidate/champion aliases, and a load by
alias in a fresh process that has no hjepa installed."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from hjepa_core.eval import evaluate, load_encoder, open_source
from hjepa_core.eval.features import encode_pixels, pixel_batches
from hjepa_core.eval.registry import champion_decision, register_evaluated
from tests.eval.conftest import fast_settings, train_tiny

pytest.importorskip("mlflow")

LOAD_SCRIPT = """
import json, sys
import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
import hjepa_core
example = np.asarray(json.loads(sys.argv[2]), dtype=np.uint8)
print(json.dumps({"features": model.predict(example).tolist(), "hjepa_core": hjepa_core.__file__,
                  "loader": model.metadata.flavors["python_function"]["loader_module"]}))
"""


@pytest.mark.parametrize(("scores", "champion", "promote", "why"), [
    ({"probe_top1": 0.6, "pixels_probe_top1": 0.5}, None, True, "no champion"),
    ({"probe_top1": 0.6, "pixels_probe_top1": 0.5}, {"version": "3", "probe_top1": "0.55"}, True, "version 3"),
    ({"probe_top1": 0.6, "pixels_probe_top1": 0.5}, {"version": "3", "probe_top1": "0.6"}, False, "version 3"),
    ({"probe_top1": 0.6, "pixels_probe_top1": 0.6}, None, False, "raw pixels"),
    ({"probe_top1": 0.6}, None, False, "baseline"),
    ({"probe_top1": 0.6, "pixels_probe_top1": 0.5}, {"version": "2"}, False, "no probe_top1 tag"),
])
def test_champion_decision(scores, champion, promote, why):
    decided, reason = champion_decision(scores, champion)
    assert decided is promote and why in reason


@pytest.fixture(scope="module")
def evaluated(mlflow_server, tmp_path_factory, fashion_mnist_train):
    """A tiny tracked training run (registering nothing) and its tracked evaluation (registering)."""
    import mlflow

    name = f"hjepa-encoder-{uuid.uuid4().hex[:8]}"
    out = tmp_path_factory.mktemp("registry")
    result = train_tiny(out / "train", "tracking.enabled=true", f"tracking.tracking_uri={mlflow_server}",
                        "tracking.experiment=registry-test", f"tracking.registered_model_name={name}")
    client = mlflow.MlflowClient(mlflow_server)
    assert client.search_model_versions(f"name='{name}'") == [], "training must not register a model"
    report = evaluate(result.encoder_path, fast_settings(out, tracking=None, max_train_samples=200))
    return name, result, report


def test_evaluation_registers_a_scored_version(mlflow_server, evaluated, tmp_path):
    import mlflow

    name, result, report = evaluated
    registered = report["registered_model"]
    client = mlflow.MlflowClient(mlflow_server)
    [version] = client.search_model_versions(f"name='{name}'")
    assert version.version == registered["version"] and version.run_id == report["mlflow_run_id"]
    version = client.get_model_version(name, version.version)
    assert "candidate" in version.aliases
    tags, metrics = version.tags, report["metrics"]
    for key in ("probe_top1", "knn_top1", "pixels_probe_top1", "pixels_knn_top1", "random_init_probe_top1"):
        assert float(tags[key]) == pytest.approx(metrics[key], abs=1e-6), key
    assert tags["pretrain_run_id"] == result.run_id and tags["eval_run_id"] == report["mlflow_run_id"]
    assert tags["selected_encoder"] == report["selected_encoder"] and tags["champion_decision"]
    assert ("champion" in version.aliases) == (metrics["probe_top1"] > metrics["pixels_probe_top1"])

    info = mlflow.models.get_model_info(f"models:/{name}/{version.version}")
    [inputs], [outputs] = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert (inputs.type, inputs.shape) == (np.dtype("uint8"), (-1, 3, 32, 32))
    assert (outputs.type, outputs.shape) == (np.dtype("float32"), (-1, 32))
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=str(tmp_path)))
    flavor = info.flavors["python_function"]
    assert flavor["loader_module"] == "hjepa_core.serving" and "python_model" not in flavor
    assert (local / "code" / "hjepa_core" / "serving.py").is_file()
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle") or p.name == "__pycache__"]
    example = mlflow.models.Model.load(str(local)).load_input_example(str(local))
    assert np.asarray(example).shape == (2, 3, 32, 32)

    train_artifacts = {a.path for a in client.list_artifacts(result.run_id, "checkpoints")}
    assert any(path.startswith("checkpoints/checkpoint-") for path in train_artifacts), train_artifacts


def _load_in_fresh_process(uri: str, model_uri: str, example: np.ndarray, cwd: Path) -> dict:
    """Loads ``model_uri`` in a new interpreter whose import path has site-packages but not the
    hjepa package (``-S``: no .pth files, so no editable install), so the model's own code loads."""
    paths = sysconfig.get_paths()
    env = {"PYTHONPATH": ":".join(dict.fromkeys([paths["purelib"], paths["platlib"]])),
           "MLFLOW_TRACKING_URI": uri, "HOME": str(cwd), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-S", "-c", LOAD_SCRIPT, model_uri, json.dumps(example.tolist())],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_champion_moves_only_past_champion_and_pixels_and_loads_in_a_fresh_process(
    mlflow_server, evaluated, tmp_path
):
    import mlflow

    _, _, report = evaluated
    name = f"hjepa-champion-{uuid.uuid4().hex[:8]}"
    loaded = load_encoder(report["checkpoint"])
    test_source = open_source("fashion_mnist", None, "test", 8)
    client = mlflow.MlflowClient(mlflow_server)
    champions = []
    # champion, below the champion, below raw pixels, above both (no baseline: test_champion_decision)
    for probe, pixels in ((0.50, 0.40), (0.45, 0.40), (0.60, 0.70), (0.70, 0.40)):
        metrics = {"probe_top1": probe, "pixels_probe_top1": pixels}
        registered = register_evaluated({**report, "metrics": metrics}, loaded, test_source, name,
                                        report["mlflow_run_id"], mlflow_server)
        assert client.get_model_version_by_alias(name, "candidate").version == registered["version"]
        champions.append(client.get_model_version_by_alias(name, "champion").version)
    assert champions == ["1", "1", "1", "4"]

    pixels, _ = next(iter(pixel_batches(test_source, loaded.crop_size, batch_size=3)))
    selected = loaded.context_encoder if report["selected_encoder"] == "context" else loaded.encoder
    expected = encode_pixels(selected, pixels)  # the features the evaluation scored
    out = _load_in_fresh_process(mlflow_server, f"models:/{name}@champion", pixels.numpy(), tmp_path)
    assert out["loader"] == "hjepa_core.serving"
    assert "/code/hjepa_core/" in out["hjepa_core"], out["hjepa_core"]  # the model's copy, not an install
    assert torch.allclose(torch.tensor(out["features"]), expected, atol=1e-5)
