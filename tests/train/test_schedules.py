import pytest

from hjepa_core.train.checkpoint import TRAINING_KEYS, list_checkpoints, load_resume, save_checkpoint
from hjepa_core.train.optim import parameter_groups
from hjepa_core.train.schedules import cosine_schedule, ema_momentum


def test_warmup_then_cosine():
    assert cosine_schedule(0, 100, 1.0, 0.0, warmup_steps=10) == 0.0
    assert cosine_schedule(5, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_schedule(10, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_schedule(55, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_schedule(100, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_schedule(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_schedule(100, 100, 0.04, 0.4) == pytest.approx(0.4)


def test_ema_momentum_linear():
    assert ema_momentum(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert ema_momentum(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert ema_momentum(200, 100, 0.996, 1.0) == pytest.approx(1.0)


def test_no_weight_decay_on_norms_biases_tokens():
    from hjepa_core.models.predictor import HierarchicalPredictor

    model = HierarchicalPredictor(encoder_dim=16, embed_dim=16, depth=1, num_heads=2, num_levels=2)
    decay, no_decay = parameter_groups(model)
    decayed = {id(p) for p in decay["params"]}
    assert id(model.mask_token) not in decayed and id(model.level_embed) not in decayed
    assert id(model.norm.weight) not in decayed and id(model.embed.bias) not in decayed
    assert id(model.embed.weight) in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_checkpoints_keep_last_and_resolve(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint({**dict.fromkeys(TRAINING_KEYS, 0), "step": step}, tmp_path / "checkpoints", step,
                        keep_last=2)
    (tmp_path / "checkpoints" / ".checkpoint-00000009.pt.abc.tmp").write_bytes(b"partial")
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["checkpoint-00000003.pt", "checkpoint-00000004.pt"]
    assert load_resume("auto", tmp_path)[0].name == "checkpoint-00000004.pt"
    assert load_resume("auto", tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_resume(tmp_path / "missing.pt", tmp_path)
