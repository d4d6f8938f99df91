"""The DVC pipeline: end to end in a temporary copy of the repo (repro, no-op, partial rerun, an
experiment setting a masking strategy), and dvc.yaml read against the code and the config."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hjepa_core.config import Config, load_config
from tests.test_architecture import ROOT, _imports, _modules

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"
STAGES = ("shard", "pretrain", "evaluate")

needs_dvc = pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed in this environment")


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
    config["training"].update(log_every=2)
    config["tracking"] = {"enabled": False}
    (repo / "configs/tiny.yaml").write_text(yaml.safe_dump(config))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update(embed_dim=32, depth=2, num_heads=2, predictor_embed_dim=32,
                           predictor_depth=1, predictor_num_heads=2)
    params["shard"].update(max_samples=128, samples_per_shard=64)
    params["pretrain"].update(config="configs/tiny.yaml", batch_size=32)
    params["evaluate"].update(max_train_samples=128, max_test_samples=64, probe_epochs=2, k=5)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def _stages_run(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


def _named(node: object, name: str) -> list[dict]:
    """Every entry called ``name`` anywhere in `dvc exp show --json` output."""
    if isinstance(node, list):
        return [found for item in node for found in _named(item, name)]
    if isinstance(node, dict):
        here = [node] if node.get("name") == name and "data" in node else []
        return here + [found for value in node.values() for found in _named(value, name)]
    return []


def _changed_stages(status: str) -> set[str]:
    """The stages `dvc status` reports (its stage lines are ``NAME:``)."""
    return {line.strip().rstrip(":") for line in status.splitlines()} & set(STAGES)


@needs_dvc
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
    new_lr = params["pretrain"]["lr"] / 2  # a change of the tracked value, whatever the default is
    params["pretrain"]["lr"] = new_lr
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert "pretrain" in _run([str(DVC), "status"], repo, env)
    third = _run([str(DVC), "repro"], repo, env)
    assert _stages_run(third) == {"pretrain", "evaluate"}
    diff = json.loads(_run([str(DVC), "params", "diff", "--json"], repo, env))
    assert diff["params.yaml"]["pretrain.lr"]["new"] == new_lr

    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "halve lr"], repo, env)
    # an edit to evaluation code reruns evaluate, not training
    report = repo / "hjepa_core/eval/report.py"
    original = report.read_text()
    report.write_text(original + "\n# edited\n")
    assert _changed_stages(_run([str(DVC), "status"], repo, env)) == {"evaluate"}
    report.write_text(original)
    # a model/masking setting is a DVC param: `-S` sets it and the training run uses it
    experiment = _run([str(DVC), "exp", "run", "-S", "pretrain.epochs=2",
                       "-S", "masking.strategy=cross_crop_prediction", "-n", "two-epochs"], repo, env)
    assert _stages_run(experiment) == {"pretrain", "evaluate"}
    assert json.loads((repo / "outputs/dvc/pretrain/summary.json").read_text())["steps"] == 8
    used = yaml.safe_load((repo / "outputs/dvc/pretrain/config.yaml").read_text())
    assert used["masking"]["strategy"] == "cross_crop_prediction" and used["model"]["embed_dim"] == 32
    diff = json.loads(_run([str(DVC), "metrics", "diff", "--json"], repo, env))
    assert diff["outputs/dvc/pretrain/summary.json"]["steps"] == {"old": 4, "new": 8, "diff": 4}
    (exp,) = _named(json.loads(_run([str(DVC), "exp", "show", "--json"], repo, env)), "two-epochs")
    assert exp["data"]["params"]["params.yaml"]["data"]["masking"]["strategy"] == "cross_crop_prediction"
    plots = _run([str(DVC), "plots", "show", "--json"], repo, env)
    assert "loss_history.csv" in plots and "confusion_matrix.png" in plots


def _stage_code(command: str) -> set[str]:
    """The hjepa_core files `hjepa COMMAND` runs: cli.py, the modules its ``_run_COMMAND`` imports
    and, transitively, theirs. A name imported from a package resolves to the module defining it
    (the ``__init__`` files only re-export), and the packages above a module count (their
    ``__init__`` runs)."""
    modules = _modules("hjepa_core")
    tree = ast.parse(modules["hjepa_core.cli"].read_text())
    (run,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == f"_run_{command}"]
    todo = []
    for node in [*tree.body, *ast.walk(run)]:
        if isinstance(node, ast.Import):
            todo += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]

    def defining_module(target: str) -> str | None:
        if target in modules:
            return target
        package, _, name = target.rpartition(".")
        if package not in modules:
            return None
        sources = [i.target.rpartition(".")[0] for i in _imports(package, modules[package])
                   if i.target.endswith(f".{name}") and i.target.rpartition(".")[0] in modules]
        return next((s for s in sources if s != package), package)

    seen = {"hjepa_core.cli"}
    while todo:
        module = defining_module(todo.pop())
        if module is None or module in seen:
            continue
        parts = module.split(".")
        seen.update(".".join(parts[:depth]) for depth in range(1, len(parts)))
        seen.add(module)
        todo += [i.target for i in _imports(module, modules[module])]
    return {modules[m].relative_to(ROOT).as_posix() for m in seen}


def _dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize(("stage", "command"), [("shard", "shard"), ("pretrain", "train"), ("evaluate", "evaluate")])
def test_stages_depend_on_the_code_they_run(stage: str, command: str) -> None:
    deps = [d for d in _dvc_yaml()[stage]["deps"] if d.startswith("hjepa_core")]
    covered = {p.relative_to(ROOT).as_posix() for d in deps
               for p in ([ROOT / d] if d.endswith(".py") else sorted((ROOT / d).rglob("*.py")))}
    code = _stage_code(command)
    assert covered == code, (f"dvc.yaml stage {stage}: deps on code it does not run {sorted(covered - code)}, "
                             f"missing code it runs {sorted(code - covered)}")
    if stage == "pretrain":
        assert "hjepa_core/eval/probe.py" not in covered and "hjepa_core/eval/report.py" not in covered


def test_params_are_the_configs_model_masking_and_crops() -> None:
    """params.yaml's config sections restate the base config (so `dvc repro` trains the default),
    name every setting of model, masking and multi-crop (so `dvc exp show` lists them all), and
    are all tracked by the pretrain stage (so changing one reruns it)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    base = REPO / params["pretrain"]["config"]
    resolved = load_config(base).to_dict()
    assert load_config(base, params=REPO / "params.yaml").to_dict() == resolved
    assert params["model"] == resolved["model"] and params["masking"] == resolved["masking"]
    assert params["data"] == {"use_multicrop": resolved["data"]["use_multicrop"],
                              "multicrop": resolved["data"]["multicrop"]}
    sections = {f.name for f in Config.__dataclass_fields__.values()} & set(params)
    assert sections == {"data", "masking", "model"}
    assert sections <= set(_dvc_yaml()["pretrain"]["params"])
    assert "--params params.yaml" in _dvc_yaml()["pretrain"]["cmd"]
