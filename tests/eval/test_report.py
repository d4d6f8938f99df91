import json

import pytest

from hjepa_core.cli import main
from hjepa_core.eval import EvalError, evaluate
from tests.eval.conftest import fast_settings


def test_evaluate_writes_report_and_reuses_cached_features(tmp_path, tiny_checkpoint):
    report = evaluate(tiny_checkpoint, fast_settings(tmp_path))
    # Both encoders of the checkpoint are scored; ``encoder`` is the better one, named in the report.
    assert set(report["methods"]) == {"encoder", "target_encoder", "context_encoder", "random_init", "pixels"}
    selected = report["methods"][f"{report['selected_encoder']}_encoder"]
    assert report["methods"]["encoder"] == selected
    other = report["methods"]["context_encoder" if report["selected_encoder"] == "target" else "target_encoder"]
    assert selected["probe"]["top1"] >= other["probe"]["top1"]
    assert report["metrics"]["target_probe_top1"] == report["methods"]["target_encoder"]["probe"]["top1"]
    assert report["num_train"] == 300 and report["num_test"] == 100 and report["num_classes"] == 10
    assert report["classes"][0] == "T-shirt/top" and report["crop_size"] == 32
    for name in ("probe_top1", "probe_top5", "knn_top1", "knn_top5", "random_init_probe_top1",
                 "pixels_probe_top1", "pixels_knn_top1", "probe_class_acc/0"):
        assert 0.0 <= report["metrics"][name] <= 1.0, name
    assert report["methods"]["pixels"]["feature_dim"] == 32 * 32  # greyscale: one channel kept
    assert report["methods"]["encoder"]["feature_dim"] == 32
    assert report["metrics"]["pixels_probe_top1"] > 0.5  # raw pixels are a real baseline on Fashion-MNIST
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert written["metrics"] == report["metrics"]
    assert (tmp_path / "eval" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "| pixels |" in (tmp_path / "eval" / "report.md").read_text()
    assert report["cache"]["misses"] == 8 and report["cache"]["hits"] == 0

    again = evaluate(tiny_checkpoint, fast_settings(tmp_path))
    assert again["cache"]["hits"] == 8 and again["cache"]["misses"] == 0
    assert again["metrics"] == report["metrics"]  # same features, same seeded protocol


def test_level_pooling_and_no_baselines(tmp_path, tiny_checkpoint):
    report = evaluate(tiny_checkpoint, fast_settings(tmp_path, pooling="levels", baselines=False))
    assert set(report["methods"]) == {"encoder", "target_encoder", "context_encoder"}
    assert report["methods"]["encoder"]["feature_dim"] == 2 * 32  # two hierarchy levels (fashion_mnist.yaml)


def test_evaluate_from_shards(tmp_path, tiny_checkpoint):
    from hjepa_core.data.shards import write_shards

    shards = tmp_path / "shards"
    write_shards("fashion_mnist", shards, "train", max_samples=200, progress=False)
    write_shards("fashion_mnist", shards, "test", max_samples=80, progress=False)
    report = evaluate(tiny_checkpoint, fast_settings(tmp_path, dataset=f"shards:{shards}", max_train_samples=None,
                                                     max_test_samples=None, baselines=False))
    assert report["num_train"] == 200 and report["num_test"] == 80
    assert report["classes"][9] == "Ankle boot"
    subset = evaluate(tiny_checkpoint, fast_settings(tmp_path, dataset=f"shards:{shards}", max_train_samples=50,
                                                     max_test_samples=40, baselines=False))
    assert subset["num_train"] == 50 and subset["num_test"] == 40


def test_cli_evaluate(tmp_path, tiny_checkpoint, capsys):
    code = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--dataset", "fashion_mnist",
                 "--max_train_samples", "200", "--max_test_samples", "50", "--probe_epochs", "3",
                 "--probe_lrs", "0.1", "--probe_wds", "0,1e-4", "--no-baselines", "--no-tracking",
                 "--no-progress", "--cache_dir", str(tmp_path / "c"), "--output_dir", str(tmp_path / "e")])
    out = capsys.readouterr().out
    assert code == 0 and "| encoder |" in out and "eval.json" in out
    sweep = json.loads((tmp_path / "e" / "eval.json").read_text())["methods"]["encoder"]["probe"]["sweep"]
    assert [(s["lr"], s["weight_decay"]) for s in sweep] == [(0.1, 0.0), (0.1, 1e-4)]


@pytest.mark.parametrize(("args", "message"), [
    (["--checkpoint", "{tmp}/missing.pt"], "does not exist"),
    (["--checkpoint", "{ckpt}", "--dataset", "mnist_typo"], "unknown dataset 'mnist_typo'"),
    (["--checkpoint", "{ckpt}", "--dataset", "imagefolder:{tmp}/no_such_dir"], "is not a directory"),
    (["--checkpoint", "{ckpt}", "--config", "configs/fashion_mnist.yaml"], "checkpoint/config mismatch"),
    (["--checkpoint", "{ckpt}", "--pooling", "cls"], "pooling 'cls'"),
])
def test_cli_bad_inputs_give_clear_errors(tmp_path, tiny_checkpoint, capsys, args, message):
    args = [a.format(tmp=tmp_path, ckpt=tiny_checkpoint) for a in args]
    code = main(["evaluate", *args, "--no-tracking", "--no-progress", "--output_dir", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_single_class_dataset_is_rejected(tmp_path, tiny_checkpoint, image_folder):
    root = image_folder(per_class=4, classes=("only",))
    with pytest.raises(EvalError, match="fewer than 2 classes"):
        evaluate(tiny_checkpoint, fast_settings(tmp_path, dataset=f"imagefolder:{root}", max_train_samples=None,
                                                max_test_samples=None))


def test_cache_misses_when_images_are_replaced_in_place(tmp_path, tiny_checkpoint, image_folder):
    from tests.conftest import smooth_image

    root = image_folder(per_class=4, classes=("a", "b"))
    settings = fast_settings(tmp_path, dataset=f"imagefolder:{root}", max_train_samples=None,
                             max_test_samples=None, baselines=False)
    assert evaluate(tiny_checkpoint, settings)["cache"]["misses"] == 4  # 2 encoders x 2 splits
    assert evaluate(tiny_checkpoint, settings)["cache"]["hits"] == 4
    smooth_image(36, 30, seed=99).save(root / "a" / "0.png")  # same name, new picture
    assert evaluate(tiny_checkpoint, settings)["cache"] == {"hits": 0, "misses": 4, "dir": settings.cache_dir}


def test_cache_misses_when_a_split_is_resharded_in_place(tmp_path, tiny_checkpoint):
    from hjepa_core.data.shards import write_shards

    shards = tmp_path / "shards"
    write_shards("fashion_mnist", shards, "train", max_samples=60, progress=False)
    write_shards("fashion_mnist", shards, "test", max_samples=40, progress=False)
    settings = fast_settings(tmp_path, dataset=f"shards:{shards}", max_train_samples=None, max_test_samples=None,
                             baselines=False)
    assert evaluate(tiny_checkpoint, settings)["cache"]["misses"] == 4  # 2 encoders x 2 splits
    write_shards("fashion_mnist", shards, "test", max_samples=40, seed=1, progress=False)
    again = evaluate(tiny_checkpoint, settings)["cache"]
    assert (again["hits"], again["misses"]) == (2, 2)  # train unchanged, test re-extracted
