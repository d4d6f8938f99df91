"""The DVC pipeline end to end in a temporary copy of the repo: repro, no-op, partial rerun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"

pytestmark = pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed in this environment")


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def _copy_repo(dest: Path) -> None:
    """The repo's files as a fresh clone would have them (tracked + this change's new files)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        src = REPO / name
        if src.is_file() and not name.startswith(("benchmarks/quality/", "outputs/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _tiny(repo: Path) -> None:
    config = yaml.safe_load((repo / "configs/fashion_mnist.yaml").read_text())
    config["data"]["num_workers"] = 0
    config["model"].update(embed_dim=32, depth=2, num_heads=2, predictor_embed_dim=32,
                           predictor_depth=1, predictor_num_heads=2)
    config["training"].update(log_every=2)
    config["tracking"] = {"enabled": False}
    (repo / "configs/tiny.yaml").write_text(yaml.safe_dump(config))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["shard"].update(max_samples=128, samples_per_shard=64)
    params["pretrain"].update(config="configs/tiny.yaml", batch_size=32)
    params["evaluate"].update(max_train_samples=128, max_test_samples=64, probe_epochs=2, k=5)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def _stages_run(output: str) -> set[str]:
    return {s for s in ("shard", "pretrain", "evaluate") if f"Running stage '{s}'" in output}


def test_dvc_repro_noop_and_partial_rerun(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_repo(repo)
    _tiny(repo)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "HJEPA_CACHE": str(tmp_path / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    git = ["git", "-c", "init.defaultBranch=main"]
    _run([*git, "init", "-q"], repo, env)
    _run(["git", "config", "user.name", "test"], repo, env)
    _run(["git", "config", "user.email", "test@example.com"], repo, env)
    _run([str(DVC), "config", "core.analytics", "false"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "copy"], repo, env)
    _run([str(BIN / "hjepa"), "data", "fetch", "fashion_mnist", "data"], repo, env)
    # the fetched folder is exactly what data.dvc records
    status = _run([str(DVC), "status", "data.dvc"], repo, env)
    assert "modified" not in status and "not in cache" in status

    first = _run([str(DVC), "repro"], repo, env)
    assert _stages_run(first) == {"shard", "pretrain", "evaluate"}
    summary = json.loads((repo / "outputs/dvc/pretrain/summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_loss"] > 0
    metrics = json.loads((repo / "outputs/dvc/eval/metrics.json").read_text())
    for key in ("probe_top1", "knn_top1", "random_init_probe_top1", "pixels_knn_top1"):
        assert 0.0 <= metrics[key] <= 1.0
    history = (repo / "outputs/dvc/pretrain/loss_history.csv").read_text().splitlines()
    assert history[0] == "step,loss" and len(history) >= 2
    shown = json.loads(_run([str(DVC), "metrics", "show", "--json"], repo, env))
    assert "outputs/dvc/eval/metrics.json" in json.dumps(shown)

    second = _run([str(DVC), "repro"], repo, env)
    assert _stages_run(second) == set() and "Data and pipelines are up to date" in second

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"]["lr"] = 0.002
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert "pretrain" in _run([str(DVC), "status"], repo, env)
    third = _run([str(DVC), "repro"], repo, env)
    assert _stages_run(third) == {"pretrain", "evaluate"}
    diff = json.loads(_run([str(DVC), "params", "diff", "--json"], repo, env))
    assert diff["params.yaml"]["pretrain.lr"]["new"] == 0.002

    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "lr 0.002"], repo, env)
    experiment = _run([str(DVC), "exp", "run", "-S", "pretrain.epochs=2", "-n", "two-epochs"], repo, env)
    assert _stages_run(experiment) == {"pretrain", "evaluate"}
    assert json.loads((repo / "outputs/dvc/pretrain/summary.json").read_text())["steps"] == 8
    diff = json.loads(_run([str(DVC), "metrics", "diff", "--json"], repo, env))
    assert diff["outputs/dvc/pretrain/summary.json"]["steps"] == {"old": 4, "new": 8, "diff": 4}
    assert "two-epochs" in _run([str(DVC), "exp", "show", "--json"], repo, env)
    plots = _run([str(DVC), "plots", "show", "--json"], repo, env)
    assert "loss_history.csv" in plots and "confusion_matrix.png" in plots
