"""A training run's MLflow contents, against a real local MLflow server."""

from mlflow import MlflowClient

from hjepa_core.config import load_config
from hjepa_core.train import train
from tests.tiny import tiny_overrides


def test_training_run_is_browsable_in_mlflow(tmp_path, mlflow_server):
    cfg = load_config("configs/fashion_mnist.yaml", tiny_overrides(
        tmp_path, "training.max_steps=4", "tracking.enabled=true", f"tracking.tracking_uri={mlflow_server}",
        "tracking.experiment=engine-test", "tracking.registered_model_name=hjepa-encoder-test",
        "loss.collapse_every=2"))
    result = train(cfg, progress=False)
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["training.lr"] == str(cfg.training.lr)
    assert params["masking.strategy"] == "global_only"
    assert params["data.multicrop.num_local_crops"] == str(cfg.data.multicrop.num_local_crops)
    assert len(params) == len(cfg.flat())
    for key in ("loss", "loss/level_0", "loss/level_1", "loss/local", "lr", "weight_decay",
                "ema_momentum", "images_per_s", "collapse/std", "collapse/effective_rank", "grad_norm"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(result.run_id, "loss")) == 2  # log_every=2 over 4 steps
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "metrics.json", "loss_curve.png", "crops_and_masks.png", "encoder.pt"} <= artifacts
    # the final training state is an artifact; the encoder is registered only after evaluation
    checkpoints = [a.path for a in client.list_artifacts(result.run_id, "checkpoints")]
    assert checkpoints == ["checkpoints/checkpoint-00000004.pt"]
    assert client.search_model_versions("name='hjepa-encoder-test'") == []
