"""The MLflow layout of evaluation runs and ``hjepa compare``, against a real local MLflow server."""

import uuid

import pytest

from hjepa_core.cli import main
from hjepa_core.eval import evaluate
from hjepa_core.eval.compare import compare_runs
from hjepa_core.tracking import TrackingUnavailableError
from tests.eval.conftest import fast_settings, train_tiny


@pytest.fixture(scope="module")
def logged(mlflow_server, tmp_path_factory, fashion_mnist_train):
    """Two tiny pretraining runs (different masking strategies), each with an evaluation run."""
    experiment = f"eval-test-{uuid.uuid4().hex[:8]}"
    runs = {}
    for name, strategy in (("gonly", "global_only"), ("cross", "cross_crop_prediction")):
        out = tmp_path_factory.mktemp(name)
        result = train_tiny(out / "train", "tracking.enabled=true", f"tracking.tracking_uri={mlflow_server}",
                            f"tracking.experiment={experiment}", f"tracking.run_name={name}",
                            "tracking.registered_model_name=null", f"masking.strategy={strategy}")
        # the first evaluation finds its pretraining run by output dir, the second is told
        parent = result.run_id if name == "cross" else None
        report = evaluate(result.encoder_path, fast_settings(out, tracking=None, parent_run_id=parent,
                                                             max_train_samples=200, baselines=name == "gonly"))
        runs[name] = (result, report)
    return experiment, runs


def test_eval_run_is_a_child_of_the_pretraining_run(mlflow_server, logged):
    import mlflow

    _, runs = logged
    client = mlflow.MlflowClient(mlflow_server)
    for name, (result, report) in runs.items():
        assert report["mlflow_run_id"] and report["mlflow_parent_run_id"] == result.run_id
        train_run, eval_run = client.get_run(result.run_id), client.get_run(report["mlflow_run_id"])
        assert eval_run.info.experiment_id == train_run.info.experiment_id
        assert eval_run.info.status == "FINISHED"
        tags = eval_run.data.tags
        assert tags["mlflow.parentRunId"] == result.run_id and tags["hjepa.pretrain_run_id"] == result.run_id
        assert tags["hjepa.stage"] == "evaluate" and tags["hjepa.checkpoint_sha256"] == report["checkpoint_sha256"]
        assert tags["hjepa.parent_match"] == ("checkpoint" if name == "gonly" else "given")
        assert eval_run.data.metrics["probe_top1"] == pytest.approx(report["metrics"]["probe_top1"])
        assert eval_run.data.params["eval.pooling"] == "mean"
        assert eval_run.data.params["pretrain.masking.strategy"] == train_run.data.params["masking.strategy"]
        artifacts = {a.path for a in client.list_artifacts(eval_run.info.run_id)}
        assert {"eval.json", "confusion_matrix.png", "report.md"} <= artifacts
    assert "pixels_probe_top1" in client.get_run(runs["gonly"][1]["mlflow_run_id"]).data.metrics


def test_compare_two_logged_runs(mlflow_server, logged, tmp_path):
    experiment, runs = logged
    result = compare_runs(experiment, "probe_top1", mlflow_server, tmp_path)
    assert sorted(row["run"] for row in result.rows) == ["cross", "gonly"]
    values = [row["metrics"]["probe_top1"] for row in result.rows]
    assert values == sorted(values, reverse=True)
    assert "masking.strategy" in result.param_columns
    assert "eval.baselines" in result.param_columns  # eval settings that differ show too
    assert "training.output_dir" not in result.param_columns  # bookkeeping keys do not
    assert result.metric_columns[0] == "probe_top1" and "final_loss" in result.metric_columns
    for row in result.rows:
        assert row["metrics"]["probe_top1"] == pytest.approx(runs[row["run"]][1]["metrics"]["probe_top1"])
    assert result.curves_path.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "compare.md").read_text() == result.markdown


def test_cli_compare(mlflow_server, logged, tmp_path, capsys):
    experiment, _ = logged
    code = main(["compare", "--experiment", experiment, "--tracking_uri", mlflow_server,
                 "--output_dir", str(tmp_path), "--metric", "knn_top1"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert "masking.strategy" in lines[0] and "knn_top1" in lines[0]
    assert {"gonly", "cross"} == {line.split("|")[1].strip() for line in lines[2:]}
    assert "compare_curves.png" in out


def test_cli_compare_unknown_experiment(mlflow_server, capsys):
    code = main(["compare", "--experiment", "no-such-experiment", "--tracking_uri", mlflow_server])
    err = capsys.readouterr().err
    assert code == 2 and "'no-such-experiment' not found" in err


def _credentialed(uri: str) -> str:
    return uri.replace("http://", "http://alice:s3cret@")


def test_tracking_uri_credentials_are_never_stored(mlflow_server, tmp_path, monkeypatch):
    """A URI with a password works for logging, but config.yaml, checkpoints, encoder.pt,
    eval.json and the MLflow params hold it as ``http://***@host``."""
    import mlflow
    import torch

    uri = _credentialed(mlflow_server)
    experiment = f"creds-{uuid.uuid4().hex[:8]}"
    result = train_tiny(tmp_path / "train", "tracking.enabled=true", f"tracking.tracking_uri={uri}",
                        f"tracking.experiment={experiment}", "tracking.registered_model_name=null",
                        "training.checkpoint_every_steps=1")
    report = evaluate(result.encoder_path, fast_settings(tmp_path, tracking=True, tracking_uri=uri,
                                                         baselines=False, max_train_samples=100))
    shown = _credentialed(mlflow_server).replace("alice:s3cret", "***")
    stored = [(tmp_path / "train" / "config.yaml").read_text(), (tmp_path / "eval" / "eval.json").read_text()]
    for path in [result.encoder_path, *sorted((tmp_path / "train" / "checkpoints").glob("*.pt"))]:
        stored.append(str(torch.load(path, weights_only=True)["config"]))
    client = mlflow.MlflowClient(mlflow_server)
    for run_id in (result.run_id, report["mlflow_run_id"]):
        stored.append(str(client.get_run(run_id).data.params))
    assert len(stored) == 8
    for text in stored:
        assert "s3cret" not in text and shown in text
    # The stored URI is not usable: evaluating with it alone says what to pass, in one line.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exported it
    with pytest.raises(TrackingUnavailableError, match=r"saved without its credentials; pass the full URI"):
        evaluate(result.encoder_path, fast_settings(tmp_path, tracking=True, baselines=False))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # ... or takes MLFLOW_TRACKING_URI's
    again = evaluate(result.encoder_path, fast_settings(tmp_path, tracking=True, baselines=False))
    assert client.get_run(again["mlflow_run_id"]).info.status == "FINISHED"


def test_evaluation_outlives_its_mlflow_server(tmp_path, monkeypatch, fashion_mnist_train):
    """The server dies after the evaluation run started: the report is still written, with one
    warning, in bounded time (MLflow's own retries would stall each call for minutes)."""
    import signal
    import time

    import hjepa_core.eval.report as report_module
    from tests.conftest import start_mlflow_server, stop_mlflow_server

    encoder = train_tiny(tmp_path / "train", "tracking.timeout_s=3").encoder_path
    (tmp_path / "server").mkdir()
    uri, server = start_mlflow_server(tmp_path / "server")
    evaluate_features = report_module._run

    def server_dies_first(*args, **kwargs):
        stop_mlflow_server(server, signal.SIGKILL)
        return evaluate_features(*args, **kwargs)

    monkeypatch.setattr(report_module, "_run", server_dies_first)
    try:
        started = time.monotonic()
        with pytest.warns(UserWarning, match=r"MLflow \w+ failed .*; the run goes on and skips MLflow calls"):
            report = evaluate(encoder, fast_settings(tmp_path, tracking=True, tracking_uri=uri,
                                                     experiment="dies-mid-eval", registered_model_name=""))
        elapsed = time.monotonic() - started
    finally:
        stop_mlflow_server(server, signal.SIGKILL)
    assert (tmp_path / "eval" / "eval.json").is_file() and "probe_top1" in report["metrics"]
    assert elapsed < 120, elapsed  # one 3 s timeout, then calls are skipped (a loaded machine: slack)
