import re

import pytest

from hjepa_core.config import ConfigError, load_config


def test_fashion_mnist_config_loads_and_roundtrips(tmp_path):
    from hjepa_core.config import config_from_dict

    cfg = load_config("configs/fashion_mnist.yaml")
    assert cfg.data.multicrop.global_crop_size == 32
    path = cfg.save(tmp_path / "config.yaml")
    assert config_from_dict(load_config(path).to_dict()).to_dict() == cfg.to_dict()


def test_seed_template_keys():
    cfg = load_config("configs/multicrop_training.yaml")
    assert cfg.data.use_multicrop is True
    assert cfg.data.multicrop.num_local_crops == 6
    assert cfg.data.multicrop.local_crop_scale == (0.05, 0.4)
    assert cfg.masking.strategy == "global_only"
    assert cfg.model.encoder == "vit_base"


def test_overrides_are_typed():
    cfg = load_config(None, ["training.lr=1e-4", "training.epochs=3", "data.use_multicrop=false",
                             "masking.base_scale=[0.1, 0.2]"])
    assert cfg.training.lr == pytest.approx(1e-4)
    assert cfg.training.epochs == 3
    assert cfg.data.use_multicrop is False
    assert cfg.masking.base_scale == (0.1, 0.2)
    assert cfg.crops.num_local_crops == 0 and cfg.crops.num_global_crops == 1


def test_num_workers_defaults_to_auto_and_takes_an_integer_or_null():
    assert load_config("configs/fashion_mnist.yaml").data.num_workers is None
    assert load_config(None, ["data.num_workers=3"]).data.num_workers == 3
    assert load_config("configs/multicrop_training.yaml", ["data.num_workers=null"]).data.num_workers is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.bach_size=2", "did you mean 'training.batch_size'"),
        ("data.multicrop.num_local_crop=2", "data.multicrop.num_local_crops"),
        ("training.epochs=abc", "training.epochs: expected an integer"),
        ("masking.strategy=random", "masking.strategy='random' is not one of"),
        ("data.multicrop.local_crop_size=256", "local_crop_size (256) must be <="),
        ("data.multicrop.global_crop_size=230", "not divisible by model.patch_size"),
        ("loss.hierarchy_weights=[1.0]", "give one weight per level"),
        ("masking.num_hierarchies=6 loss.hierarchy_weights=[1,1,1,1,1,1]", "lower num_hierarchies"),
        ("masking.base_scale=[0.9,1.0]", "lower base_scale"),
        ("model.encoder=vit_huge", "model.encoder='vit_huge'"),
        ("training.lr", "must look like key=value"),
        ("training.lr=inf", "training.lr must be a finite number > 0"),
        ("training.lr=nan", "training.lr must be a finite number > 0"),
        ("training.lr=0", "training.lr must be a finite number > 0"),
        ("training.max_steps=0", "training.max_steps must be >= 1"),
        ("data.max_samples=-5", "data.max_samples must be >= 1"),
        ("training.grad_clip=-1", "training.grad_clip must be > 0"),
        ("training.checkpoint_every_steps=-1", "training.checkpoint_every_steps must be >= 0"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("data.knn_monitor_every=-1", "data.knn_monitor_every must be >= 0"),
        ("loss.collapse_every=0", "loss.collapse_every must be >= 1"),
        ("loss.local_level_weight=-1", "loss.local_level_weight must be a finite number >= 0"),
        ("masking.strategy=cross_crop_prediction data.multicrop.num_local_crops=1",
         "int(1 local crops x masking.cross_crop_target_fraction 0.5) = 0 of them targets"),
        ("masking.strategy=cross_crop_prediction masking.cross_crop_target_fraction=1.5",
         "masking: cross_crop_target_fraction must be in (0, 1], got 1.5"),
        ("loss.image_weight=nan", "loss.image_weight must be a finite number >= 0"),
        ("loss.sigreg_weight=-0.1", "loss.sigreg_weight must be a finite number >= 0"),
        ("data.multicrop.global_crop_scale=[1.0,0.4]", "data.multicrop.global_crop_scale=[1.0, 0.4] must be"),
        ("data.multicrop.local_crop_scale=[0.0,0.4]", "0 < low <= high <= 1"),
        ("data.multicrop.local_crop_scale=[0.1,1.5]", "0 < low <= high <= 1"),
        ("data.dataset=imagenet", "data.dataset='imagenet' is not a known dataset; use one of fashion_mnist"),
        ("data.dataset=shards", "data.dataset: 'shards': say where the shards are"),
        ("training.lr=[1,2", "override 'training.lr=[1,2': the value is not valid YAML"),
        ("masking.base_scale=[0.1]", "masking.base_scale: expected 2 values like [0.4, 1.0], got [0.1]"),
        ("masking.base_scale=[0.1,0.2,0.3]", "masking.base_scale: expected 2 values"),
        ("loss.hierarchy_weights=[1,a,1]", "loss.hierarchy_weights[1]: expected a number, got 'a'"),
        ("training.lr.x=1", "unknown config key 'training.lr.x'; did you mean 'training.lr'?"),
        ("trainig.lr=1", "unknown config key 'trainig.lr'; did you mean 'training.lr'?"),
        ("training=1", "training: expected a mapping of TrainingConfig fields"),
        ("training.device=null", "training.device: expected a string, got None"),
        ("data.use_multicrop=maybe", "data.use_multicrop: expected true/false, got 'maybe'"),
        ("training.target_precision=fp16", "training.target_precision='fp16' must be auto, fp32 or bf16"),
        ("training.output_dir=${oc.env:HJEPA_SURELY_UNSET}", "training.output_dir: "),
    ],
)
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override.split(" "))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainig:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="did you mean 'training"):
        load_config(unknown)


def test_params_file_layers_its_config_sections(tmp_path):
    """A DVC params file: its config sections go over the config file and under overrides; its
    stage sections are not config; a bad key names the params file."""
    params = tmp_path / "params.yaml"
    params.write_text("pretrain: {epochs: 3}\nmasking: {strategy: cross_crop_prediction}\n"
                      "model: {depth: 2}\ndata: {multicrop: {num_local_crops: 4}}\n")
    cfg = load_config("configs/fashion_mnist.yaml", ["model.depth=3"], params=params)
    assert cfg.masking.strategy == "cross_crop_prediction" and cfg.data.multicrop.num_local_crops == 4
    assert cfg.model.depth == 3 and cfg.model.embed_dim == 128 and cfg.training.epochs == 1
    params.write_text("masking: {stratgy: global_only}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{params}: unknown config key 'masking.stratgy'; did you mean")):
        load_config("configs/fashion_mnist.yaml", params=params)
    with pytest.raises(ConfigError, match=r"params file .* does not exist"):
        load_config(None, params=tmp_path / "nope.yaml")


def test_valid_limits_and_dataset_spellings_load():
    cfg = load_config(None, ["training.grad_clip=0", "training.max_steps=1", "data.max_samples=1",
                             "data.dataset=imagefolder:/somewhere", "data.multicrop.local_crop_scale=[0.4,0.4]"])
    assert cfg.training.grad_clip == 0 and cfg.data.max_samples == 1
    assert load_config(None, ["data.dataset=shards:/x/manifest.json"]).data.dataset == "shards:/x/manifest.json"
    assert load_config(None, ["data.dataset=Fashion-MNIST"]).data.dataset == "Fashion-MNIST"


def test_environment_check_names_the_missing_path_and_device(tmp_path, monkeypatch):
    import torch

    with pytest.raises(ConfigError, match=r"data.data_path=/nonexistent does not exist; pass the folder"):
        load_config(None, ["data.data_path=/nonexistent"]).check_environment()
    assert load_config(None, [f"data.data_path={tmp_path}"]).check_environment()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(None, ["training.device=cuda"])  # a config written on a GPU box still loads
    with pytest.raises(ConfigError, match=r"training\.device=cuda but CUDA is not available.*training\.device=cpu"):
        cfg.check_environment()


def test_written_config_loads_back_identically(tmp_path):
    """config.yaml of a run, read back by ``--config`` or a resume, gives the same Config: tuples stay
    tuples, None stays None, and strings YAML could read as numbers or dates stay strings."""
    from hjepa_core.config import config_from_dict

    cfg = load_config("configs/fashion_mnist.yaml", [
        "tracking.run_name='1e-4'", "tracking.tags={commit: '0123', day: '2024-01-01', flag: 'true', n: '1e3'}",
        "training.max_steps=7", "training.time_budget_s=12.5", "training.min_lr=1e-7", "data.data_path=null",
        "masking.base_scale=[0.1,0.2]", "data.multicrop.local_crop_scale=[0.05,0.4]", "training.device=cpu"])
    assert cfg.tracking.run_name == "1e-4" and cfg.tracking.tags["n"] == "1e3"
    loaded = load_config(cfg.save(tmp_path / "config.yaml"))
    assert loaded == cfg
    assert isinstance(loaded.masking.base_scale, tuple) and isinstance(loaded.data.multicrop.global_crop_scale, tuple)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_cli_value_forms():
    """The override spellings the hand-written parser took still work on OmegaConf."""
    cfg = load_config(None, ["training.max_steps=1e3", "training.epochs=3.0", "training.time_budget_s=None",
                             "data.data_path=", "loss.hierarchy_weights=[1,0.5,0.25]", "tracking.tags={a: 1}",
                             "tracking.registered_model_name=null", " training.lr = 0.5"])
    assert cfg.training.max_steps == 1000 and cfg.training.epochs == 3 and cfg.training.time_budget_s is None
    assert cfg.data.data_path == "" and cfg.loss.hierarchy_weights == [1.0, 0.5, 0.25]
    assert cfg.tracking.tags == {"a": "1"} and cfg.tracking.registered_model_name is None and cfg.training.lr == 0.5


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, message in (("training:\n  epochs: abc\n", "training.epochs: expected an integer, got 'abc'"),
                          ("training:\n  lr: 1\n  lr: 2\n", "not valid YAML"), ("5\n", "top level must be a mapping"),
                          ("- 1\n", "top level must be a mapping")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=r"bad\.yaml") as info:
            load_config(bad)
        assert message in str(info.value)


def test_overrides_interpolate(monkeypatch):
    monkeypatch.setenv("HJEPA_RUNS", "/data/runs")
    cfg = load_config(None, ["training.output_dir=${oc.env:HJEPA_RUNS}/a", "tracking.run_name=${training.seed}"])
    assert cfg.training.output_dir == "/data/runs/a" and cfg.tracking.run_name == "0"


def test_a_predictor_needs_at_least_one_block():
    with pytest.raises(ConfigError, match=r"model\.predictor_depth must be >= 1"):
        load_config("configs/fashion_mnist.yaml", ["model.predictor_depth=0"])
