"""Checkpoints: unreadable or foreign files are one-line errors; ``auto`` falls back to the
newest checkpoint that loads; stale temporaries are removed."""

import pytest
import torch

from hjepa_core.train.checkpoint import (
    TRAINING_KEYS,
    CheckpointError,
    load_resume,
    load_training_state,
    remove_stale_temps,
    save_checkpoint,
)


def _save(directory, step):
    return save_checkpoint({**dict.fromkeys(TRAINING_KEYS, 0), "step": step}, directory, step, keep_last=5)


@pytest.mark.parametrize("kind", ["zero-byte", "truncated", "foreign", "not-torch"])
def test_bad_checkpoints_are_one_line_errors_naming_the_file(tmp_path, kind):
    path = _save(tmp_path, 1)
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_text("hello")
    with pytest.raises(CheckpointError) as info:
        load_training_state(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert ("not an hjepa training checkpoint" if kind == "foreign" else "truncated, empty or not a torch file") \
        in message


def test_auto_falls_back_to_the_newest_loadable_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(checkpoints, step)
    (checkpoints / "checkpoint-00000003.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(1)}, checkpoints / "checkpoint-00000002.pt")
    with pytest.warns(UserWarning, match=r"skipped unloadable checkpoint\(s\) checkpoint-00000003.pt, "
                                         r"checkpoint-00000002.pt; resuming from .*checkpoint-00000001.pt"):
        path, state = load_resume("auto", tmp_path)
    assert path.name == "checkpoint-00000001.pt" and state["step"] == 1
    (checkpoints / "checkpoint-00000001.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"none of the checkpoints in .* loads"):
        load_resume("auto", tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint-00000003\.pt: not a readable"):
        load_resume(checkpoints / "checkpoint-00000003.pt", tmp_path)  # a named file never falls back


def test_stale_temporaries_are_removed(tmp_path):
    kept = _save(tmp_path, 1)
    stale = tmp_path / ".checkpoint-00000002.pt.123-abcd.tmp"
    stale.write_bytes(b"partial")
    assert remove_stale_temps(tmp_path) == [stale]
    assert sorted(tmp_path.iterdir()) == [kept]
    assert remove_stale_temps(tmp_path / "missing") == []


def test_resume_with_drop_path_equals_uninterrupted(tmp_path):
    """Drop-path draws random masks every step; a run resumed from a mid-epoch checkpoint must
    draw the same ones as the uninterrupted run (no hidden RNG draw, e.g. by a new loader
    iterator, may shift them)."""
    import shutil

    from hjepa_core.config import load_config
    from hjepa_core.train import train
    from tests.tiny import tiny_overrides

    settings = ["model.drop_path_rate=0.2", "training.max_steps=10", "training.checkpoint_every_steps=4",
                "training.keep_last_checkpoints=5", "data.max_samples=128"]  # 8 steps per epoch
    straight = tmp_path / "straight"
    train(load_config("configs/fashion_mnist.yaml", tiny_overrides(straight, *settings)), progress=False)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "checkpoint-00000004.pt", resumed / "checkpoints")
    train(load_config("configs/fashion_mnist.yaml", tiny_overrides(resumed, *settings)), resume="auto",
          progress=False)
    a = torch.load(straight / "encoder.pt", weights_only=True)
    b = torch.load(resumed / "encoder.pt", weights_only=True)
    for part in ("state_dict", "context_state_dict"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
